"""The training loop: epochs of training and validation, one event published at every seam."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from trainbus.proto import events as ev

from .replies import Control, merge_replies
from .spec import TrainingSpec


class Publisher(Protocol):
    def publish(self, type_: str, step: int, epoch: int, data: dict[str, Any]) -> None: ...
    def take_replies(self) -> list: ...
    def await_votes(self, type_: str, timeout_s: float) -> list[str]: ...


@dataclass
class Outcome:
    """What a finished loop reports: how far it got, why it stopped, the last metrics."""

    epochs_completed: int = 0
    steps: int = 0
    stopped_early: bool = False
    stop_reasons: list[str] = field(default_factory=list)
    training_loss: float | None = None
    validation_loss: float | None = None
    validation_metrics: dict[str, float] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    try:
        import numpy

        numpy.random.seed(seed)
    except ImportError:
        pass


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Loop:
    """Runs a TrainingSpec and publishes its lifecycle; asks `stop_requested()` at every step boundary."""

    def __init__(self, spec: TrainingSpec, bus: Publisher, device: torch.device, stop_requested=lambda: False,
                 vote_timeout_s: float = 0.0):
        self.spec = spec
        self.bus = bus
        self.device = device
        self.stop_requested = stop_requested  # Ctrl-C, wired by the CLI
        self.vote_timeout_s = vote_timeout_s  # longest wait at end_epoch for plugins that vote there
        # On CUDA, per-step losses stay on the device and are read in bursts by the bus thread;
        # on the CPU .item() costs no sync and is cheaper than tensor arithmetic.
        self._scalar = (lambda t: t.detach()) if device.type == "cuda" else (lambda t: t.item())
        self.step = 0
        self.epoch = 0
        self.outcome = Outcome()

    def _publish(self, type_: str, **data: Any) -> None:
        self.bus.publish(type_, self.step, self.epoch, data)

    def run(self) -> Outcome:
        spec, out = self.spec, self.outcome
        spec.model.to(self.device)
        self._publish(ev.START_TRAINING_SESSION, hyperparameters=spec.hyperparameters, epochs=spec.epochs,
                      device=str(self.device), model=type(spec.model).__name__,
                      parameters=sum(p.numel() for p in spec.model.parameters()))
        for self.epoch in range(1, spec.epochs + 1):
            self._publish(ev.START_EPOCH)
            train = self._train_epoch()
            validation = self._validate() if spec.validation_loader is not None else {}
            if spec.scheduler is not None:
                spec.scheduler.step()
            out.epochs_completed = self.epoch
            out.training_loss = train["training_loss"]
            out.validation_loss = validation.get("validation_loss")
            out.validation_metrics = validation.get("validation_metrics", {})
            self._publish(ev.END_EPOCH, **train, **validation, hyperparameters=spec.hyperparameters,
                          lr=spec.optimizer.param_groups[0]["lr"])
            # termination conditions: a stop from a batch, or a vote on this epoch (bounded wait)
            if out.stopped_early:
                break
            self.bus.await_votes(ev.END_EPOCH, self.vote_timeout_s)
            replies = self.bus.take_replies()
            if (replies or self.stop_requested()) and self._apply(merge_replies(replies)):
                break
        out.steps = self.step
        self._publish(ev.END_TRAINING_SESSION, epochs_completed=out.epochs_completed, steps=self.step,
                      stopped_early=out.stopped_early, stop_reasons=out.stop_reasons,
                      training_loss=out.training_loss, validation_loss=out.validation_loss,
                      validation_metrics=out.validation_metrics)
        return out

    def _train_epoch(self) -> dict[str, Any]:
        spec, model = self.spec, self.spec.model
        model.train()
        self._publish(ev.START_TRAINING_LOOP)
        loss_total, count, metric_totals = 0.0, 0, {name: 0.0 for name in spec.metrics}
        for batch_index, (inputs, targets) in enumerate(spec.train_loader):
            self._publish(ev.START_TRAINING_BATCH, batch_index=batch_index)
            inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            # forward backward update
            spec.optimizer.zero_grad(set_to_none=True)
            outputs = model(inputs)
            loss = spec.loss_fn(outputs, targets)
            loss.backward()
            spec.optimizer.step()
            self.step += 1
            loss_value = self._scalar(loss)
            loss_total, count = loss_total + loss_value, count + 1
            with torch.no_grad():
                for name, fn in spec.metrics.items():
                    metric_totals[name] = metric_totals[name] + self._value(fn(outputs, targets))
            self._publish(ev.END_TRAINING_BATCH, batch_index=batch_index, batch_size=len(targets), loss=loss_value,
                          training_loss_total=loss_total, training_batch_count=count)
            # replies and Ctrl-C act here, between steps, and nowhere else
            replies = self.bus.take_replies()
            if (replies or self.stop_requested()) and self._apply(merge_replies(replies)):
                break
        metrics = {name: _mean(total, count) for name, total in metric_totals.items()}
        summary = {"training_loss_total": _float(loss_total), "training_batch_count": count,
                   "training_loss": _mean(loss_total, count), "training_metrics": metrics}
        self._publish(ev.END_TRAINING_LOOP, **summary)
        return summary

    @torch.no_grad()
    def _validate(self) -> dict[str, Any]:
        spec, model = self.spec, self.spec.model
        model.eval()
        self._publish(ev.START_VALIDATION_LOOP)
        loss_total, count, metric_totals = 0.0, 0, {name: 0.0 for name in spec.metrics}
        for batch_index, (inputs, targets) in enumerate(spec.validation_loader):
            self._publish(ev.START_VALIDATION_BATCH, batch_index=batch_index)
            inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            outputs = model(inputs)
            loss_value = self._scalar(spec.loss_fn(outputs, targets))
            loss_total, count = loss_total + loss_value, count + 1
            for name, fn in spec.metrics.items():
                metric_totals[name] = metric_totals[name] + self._value(fn(outputs, targets))
            self._publish(ev.END_VALIDATION_BATCH, batch_index=batch_index, loss=loss_value,
                          validation_loss_total=loss_total, validation_batch_count=count)
        metrics = {name: _mean(total, count) for name, total in metric_totals.items()}
        summary = {"validation_loss_total": _float(loss_total), "validation_batch_count": count,
                   "validation_loss": _mean(loss_total, count), "validation_metrics": metrics}
        self._publish(ev.END_VALIDATION_LOOP, **summary)
        return summary

    def _apply(self, control: Control) -> bool:
        """Act on merged replies at a step boundary; True when training should stop now."""
        if self.stop_requested() and not control.should_stop:
            control = Control(should_stop=True, reasons=("kernel: stop: interrupted (Ctrl-C)",))
        if not control.should_stop:
            return False
        self.outcome.stopped_early = True
        self.outcome.stop_reasons.extend(control.reasons)
        self._publish(ev.STOP_REQUESTED, reasons=list(control.reasons))
        return True

    def _value(self, x: Any) -> Any:
        return self._scalar(x) if isinstance(x, torch.Tensor) else float(x)


def _float(x: Any) -> float:
    return x.item() if isinstance(x, torch.Tensor) else float(x)


def _mean(total: Any, count: int) -> float | None:
    return _float(total) / count if count else None
