"""The training loop: epochs of training and validation, one event published at every seam."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from trainbus.proto import events as ev

from .batches import BatchError, batch_size, describe, split, to_device
from .distributed import AGREE_EVERY, Ranks, evenly_shared
from .epoch_metrics import as_float, flat_metrics, is_better, mean, planned_batches
from .loop_checkpoints import LoopCheckpoints
from .replies import NO_CONTROL, Control, merge_replies
from .spec import TrainingSpec, hyperparameters_for_events
from .stepping import Stepper, mark_where
from .training_state import get_rng, loader_generators, set_rng

log = logging.getLogger("trainbus.kernel")

CHECKPOINT_NOW_AFTER_EPOCHS = ("checkpoint_now came with end_epoch's votes, after this epoch's own checkpoint: that "
                               "one (the save_checkpoint or checkpoint_skipped before end_epoch) is of the same state")


class Publisher(Protocol):
    def publish(self, type_: str, step: int, epoch: int, data: dict[str, Any]) -> None: ...
    def take_replies(self) -> list: ...
    def await_votes(self, type_: str, timeout_s: float) -> list[str]: ...
    def journal_refused_since(self, since: float) -> bool: ...


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
    training_metrics: dict[str, float] = field(default_factory=dict)  # the spec's metrics over the last epoch's batches
    # the lowest of a whole epoch's, the run's (resumed: from its checkpoint on)
    best_validation_loss: float | None = None
    best_epoch: int | None = None
    last_epoch_partial: bool = False  # the last metrics are of an epoch a stop cut short (epochs_completed + 1)


class Loop(LoopCheckpoints):
    """Runs a TrainingSpec and publishes its lifecycle; asks `stop_requested()` at every step boundary."""

    def __init__(self, spec: TrainingSpec, bus: Publisher, device: torch.device, stop_requested=lambda: "",
                 vote_timeout_s: float = 0.0, checkpointer=None, stepper: Stepper | None = None,
                 ranks: Ranks | None = None, session_info: dict[str, Any] | None = None,
                 warn=lambda line: None):
        self.spec = spec
        self.warn = warn  # a warning for the user, mid-run (rank 0's: on its terminal and in kernel.log)
        # as events and checkpoints' snapshots carry them, worked out once: a large value costs a pack
        self._event_hyperparameters, self._described = hyperparameters_for_events(spec.hyperparameters)
        self.ranks = ranks  # None: one process; else this rank's place (rank 0 alone has a bus that publishes)
        self.session_info = session_info or {}  # more for start_training_session (the cluster)
        # precision, accumulation, clipping, compile; the model is on `device` by now
        self.stepper = stepper or Stepper(spec.model, spec.optimizer, device)
        self.bus = bus
        self.device = device
        self.stop_requested = stop_requested  # Ctrl-C or SIGTERM, wired by the CLI: its name, or "" for none
        self.vote_timeout_s = vote_timeout_s  # longest wait at end_epoch for plugins that vote there
        self.checkpointer = checkpointer  # None: no snapshots
        # On CUDA, per-step losses stay on the device and are read in bursts by the bus thread;
        # on the CPU .item() costs no sync and is cheaper than tensor arithmetic.
        self._scalar = (lambda t: t.detach()) if device.type == "cuda" else (lambda t: t.item())
        self._stepped_lr: float | None = None  # a per-step schedule: the lr this epoch's last optimizer step used
        self.step = 0
        self.epoch = 0
        self.first_epoch = 1
        self.outcome = Outcome()
        self.latest_metrics: dict[str, float] = {}  # flat, from the last end_epoch: what checkpoints rank by
        # The training epoch in progress, kept on self so a snapshot can carry it.
        self.batches_done = 0
        self.loss_total: Any = 0.0
        self.metric_totals: dict[str, Any] = {}
        self.epoch_rng_state: dict[str, Any] = {}  # RNG as the epoch's data iterator was created
        self._resume: dict[str, Any] | None = None  # mid-epoch resume state, used once
        self._deferred_checkpoint: str | None = None  # asked for mid-accumulation: taken at the next optimizer step
        self._agreed = False  # across ranks: _deferred_checkpoint was agreed on, and waits only for that step
        self._buffers_asked = checkpointer is None  # once the state's full size is known and a persister is here
        self._said_busy = False  # kernel.log said a checkpoint skipped for both buffers busy (loop_checkpoints.py)
        self._held: list = []  # across ranks: rank 0's replies until the ranks next agree
        self._signal = ""  # the Ctrl-C or SIGTERM the latest _decide read (and, across ranks, rank 0 broadcast)
        self._loaded_from: str | None = None
        self._kept_in_eval: list[torch.nn.Module] = []  # submodules the user's code put in eval mode (run())
        self._workers_started: set[int] = set()  # id() of each DataLoader whose persistent workers _iterate started
        # across ranks, a train_loader the user shares out themselves: the ranks ask each other every step whether
        # each has a batch (Ranks.all_have), and the epoch ends where the first runs out; said once (_uneven_said)
        self._batches_asked = ranks is not None and not evenly_shared(spec.train_loader)
        self._left_over = False  # this rank had a batch when another ran out (_together)
        self._uneven_said = False

    def _iterate(self, loader: Any) -> Any:
        """iter(loader), drawing from the RNG as every epoch's does. A DataLoader's persistent workers start at its
        first iter(), which draws their base seed from the RNG (or the loader's generator) before the shuffle; each
        later epoch's draws the shuffle alone. So that a resumed session's first epoch draws as that epoch did
        uninterrupted, the workers are started once under a state put back after it, then iterated as any epoch."""
        if (isinstance(loader, torch.utils.data.DataLoader) and loader.persistent_workers and loader.num_workers > 0
                and id(loader) not in self._workers_started):
            generators = loader_generators(loader)
            before = get_rng(python=False, generators=generators)
            iter(loader)
            set_rng(before, generators)
            self._workers_started.add(id(loader))
        return iter(loader)

    def _generators(self) -> list[torch.Generator]:
        return loader_generators(self.spec.train_loader, self.spec.validation_loader)

    def _publish(self, type_: str, **data: Any) -> None:
        self.bus.publish(type_, self.step, self.epoch, data)

    def run(self) -> Outcome:
        spec, out = self.spec, self.outcome
        spec.model.to(self.device)
        if isinstance(spec.loss_fn, torch.nn.Module):
            self.stepper.follow(spec.loss_fn)
        # Submodules the user's code put in eval mode (a frozen backbone's BatchNorm statistics, its dropout off) stay
        # in it while training, as Lightning (2.2 on) keeps them: model.train() alone turned them back each epoch. A
        # model in eval mode as a whole (eval() after loading weights) is no such choice: it trains in training mode.
        self._kept_in_eval = [m for m in spec.model.modules() if not m.training] if spec.model.training else []
        if self._described:
            log.warning("hyperparameters %s are more than an event carries: events and checkpoints say what they are, "
                        "config.json holds them", ", ".join(self._described))
        self._publish(ev.START_TRAINING_SESSION, hyperparameters=self._event_hyperparameters, epochs=spec.epochs,
                      device=str(self.device), model=type(spec.model).__name__,
                      parameters=sum(p.numel() for p in spec.model.parameters()), **self.stepper.options,
                      **self.session_info)
        if self._loaded_from is not None:
            self._publish(ev.LOAD_CHECKPOINT, path=self._loaded_from, epoch=self.first_epoch,
                          batches_done=self._resume["batches_done"] if self._resume else 0)
        # A run continued from its last epoch's end trains no epoch: it ends in that one (its final.pt, its last events)
        self.epoch = self.first_epoch - 1
        for self.epoch in range(self.first_epoch, spec.epochs + 1):
            planned = planned_batches(spec.train_loader)
            if self._batches_asked:  # each rank's own count: the epoch has the fewest (their last is the same step)
                planned = self.ranks.fewest(planned)
            self._publish(ev.START_EPOCH, batches_planned=planned)
            self._stepped_lr = None
            train = self._train_epoch(planned)
            validation = self._validate() if spec.validation_loader is not None else {}
            # what the epoch trained with (its last step's): a per-step schedule has moved past it by now
            lr = spec.optimizer.param_groups[0]["lr"] if self._stepped_lr is None else self._stepped_lr
            if spec.scheduler is not None and spec.scheduler_interval == "epoch":
                self._epoch_scheduler_step(train, validation)
            if not train["partial"]:  # an epoch a stop cut short still validates and ends, but is not done
                out.epochs_completed = self.epoch
            out.training_loss, out.last_epoch_partial = train["training_loss"], train["partial"]
            out.validation_loss = validation.get("validation_loss")
            out.validation_metrics = validation.get("validation_metrics", {})
            out.training_metrics = train.get("training_metrics") or {}
            if not train["partial"] and is_better(out.validation_loss, out.best_validation_loss):
                out.best_validation_loss, out.best_epoch = out.validation_loss, self.epoch
            self.latest_metrics = flat_metrics(train, validation)
            # the epoch's boundary: replies that came during validation, end_epoch, the votes on it
            early, self._held = self._held + self.bus.take_replies(), []
            # a checkpoint asked for in the epoch's last batches, or the schedule's; named for what asked: a
            # checkpoint_now first, then the epoch's schedule over a step schedule's that fell on its last batch
            scheduled = ("epoch" if self.checkpointer is not None and self.checkpointer.due_at_epoch(self.epoch)
                         else None)
            due = (self._deferred_checkpoint if self._deferred_checkpoint != "step" else None) or scheduled \
                or self._deferred_checkpoint
            self._deferred_checkpoint, self._agreed = None, False
            checkpoint = self._decide(early, due)[1]
            # A stop as the epoch's last batch ended (Ctrl-C, a preemption) leaves it whole: its checkpoint is
            # taken, or a resume would train it again. One cut short inside the epoch has nothing whole to save.
            checkpointed = checkpoint is not None and not train["partial"]
            if checkpointed:
                self._checkpoint(checkpoint, epoch_complete=True, last=self.epoch == spec.epochs)
            self._publish(ev.END_EPOCH, **train, **validation, hyperparameters=self._event_hyperparameters, lr=lr)
            if out.stopped_early:
                break
            self.bus.await_votes(ev.END_EPOCH, self.vote_timeout_s)
            late = self.bus.take_replies()
            control, checkpoint = self._decide(early + late, None)
            if checkpoint is not None and not checkpointed:  # a checkpoint_now that came with the votes
                self._checkpoint(checkpoint, epoch_complete=True)
            elif any(reply.type == "checkpoint_now" for reply in late):  # after the epoch's own, of the same state:
                self._publish(ev.CHECKPOINT_SKIPPED, reason=CHECKPOINT_NOW_AFTER_EPOCHS)  # answered, not dropped
            if self._apply(control):
                break
        out.steps = self.step
        self._publish(ev.END_TRAINING_SESSION, epochs_completed=out.epochs_completed, steps=self.step,
                      stopped_early=out.stopped_early, stop_reasons=out.stop_reasons,
                      training_loss=out.training_loss, validation_loss=out.validation_loss,
                      validation_metrics=out.validation_metrics, training_metrics=out.training_metrics)
        return out

    def _train_epoch(self, planned: int | None) -> dict[str, Any]:
        spec, stepper = self.spec, self.stepper
        spec.model.train()  # its own train() (an override that keeps a part frozen) as Lightning calls it
        for module in self._kept_in_eval:
            module.eval()
        self._publish(ev.START_TRAINING_LOOP)
        batches = self._start_epoch_data()
        cut_short = False
        for batch_index, batch in batches:
            self._publish(ev.START_TRAINING_BATCH, batch_index=batch_index)
            inputs, targets = split(batch, spec.unpack_batch, "train_loader")
            inputs, targets = to_device(inputs, self.device), to_device(targets, self.device)
            # forward backward update
            outputs, loss = stepper.batch(inputs, targets, spec.loss_fn)
            if stepper.due():
                self._optimizer_step(self.step + 1)
            self.step += 1
            self.batches_done = batch_index + 1
            loss_value = self._scalar(loss)
            self.loss_total = self.loss_total + loss_value
            with torch.no_grad():
                for name, fn in spec.metrics.items():
                    self.metric_totals[name] = self.metric_totals[name] + self._metric(name, fn(outputs, targets))
            self._publish(ev.END_TRAINING_BATCH, batch_index=batch_index, batch_size=batch_size(inputs, targets),
                          loss=loss_value,
                          training_loss_total=self.loss_total, training_batch_count=self.batches_done)
            # Once: Adam's moments exist from the first step on, and the buffers are for a persister's use.
            if not self._buffers_asked and not stepper.pending and self.checkpointer.persister_seen:
                self._buffers_asked = True
                self.checkpointer.prepare(self.training_state(epoch_complete=False))
            # replies, checkpoints and Ctrl-C act here, between steps, and at the epoch's end
            if self._step_boundary(self.bus.take_replies(), last_batch=self.batches_done == planned):
                cut_short = True
                break
        # an epoch's last batches step, however few (a stop's too: they were trained on)
        self._optimizer_step(self.step)
        if self._batches_asked:
            left_over = int(self.ranks.sum([float(self._left_over)])[0])  # ranks that had batches left
            if self.batches_done == 0 and left_over:
                world = self.ranks.world_size
                raise BatchError(f"train_loader gave {world - left_over} of the {world} ranks no batch in epoch "
                                 f"{self.epoch}, and the others some: the ranks step together (DDP), so none trained; "
                                 f"give every rank a share (a stream of at least as many files as ranks)")
            self._say_uneven(left_over)
        if self.batches_done == 0:
            raise BatchError(f"train_loader gave no batch in epoch {self.epoch}: it is empty (drop_last with fewer "
                             f"samples than batch_size?), or a one-shot iterator an earlier epoch used up; give a "
                             f"DataLoader, or another iterable that yields batches every time it is iterated")
        # Without a length, a stop after the last batch cannot be told from one before it: partial, to be safe.
        partial = cut_short and (planned is None or self.batches_done < planned)  # planned: this rank's share
        loss_total, count, totals = self._over_ranks(self.loss_total, self.batches_done, self.metric_totals)
        metrics = {name: mean(total, count) for name, total in totals.items()}
        if planned is not None and self.ranks is not None:  # counted as the batches are: over every rank's share
            planned *= self.ranks.world_size  # a DistributedSampler gives each rank as many (or each rank all)
        summary = {"training_loss_total": as_float(loss_total), "training_batch_count": count,
                   "training_loss": mean(loss_total, count), "training_metrics": metrics,
                   "batches_planned": planned, "partial": partial}
        self._publish(ev.END_TRAINING_LOOP, **summary)
        return summary

    def _start_epoch_data(self):
        """The epoch's (batch_index, batch) iterator; after a mid-epoch resume, the same order, skipped ahead."""
        resume, self._resume = self._resume, None
        if resume is not None:
            set_rng(resume["epoch_rng_state"], self._generators())  # the sampler draws its shuffle from this state
        self.epoch_rng_state = get_rng(python=True, generators=self._generators())  # a loader may shuffle with any
        sampler = getattr(self.spec.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # a DistributedSampler shuffles by (seed, epoch)
            sampler.set_epoch(self.epoch)
        iterator = self._iterate(self.spec.train_loader)
        self.batches_done, self.loss_total = 0, 0.0
        self.metric_totals = {name: 0.0 for name in self.spec.metrics}
        if resume is not None:
            for _ in range(resume["batches_done"]):  # data order as the uninterrupted run had it
                next(iterator)
            self.batches_done, self.loss_total = resume["batches_done"], resume["loss_total"]
            self.metric_totals = dict(resume["metric_totals"])
            set_rng(resume["rng"], self._generators())
        batches = enumerate(iterator, start=self.batches_done)
        return self._together(batches) if self._batches_asked else batches

    def _together(self, batches):
        """This rank's batches while every rank has one (Ranks.all_have): each rank asks once a batch, and once more
        as it runs out or hears that another has, so every rank asks as often."""
        self._left_over = False
        for item in batches:
            if not self.ranks.all_have(True):
                self._left_over = True
                return
            yield item
        self.ranks.all_have(False)

    def _say_uneven(self, count: int) -> None:
        if not count or self._uneven_said or not self.ranks.is_main:
            return
        self._uneven_said = True
        self.warn(f"train_loader gave the ranks different numbers of batches in epoch {self.epoch}: every rank ends "
                  f"an epoch where the first runs out (DDP steps them together), so {count} rank"
                  f"{'s' * (count != 1)} left batches untrained; give each rank as many (cut each rank's share to "
                  f"the same length, or drop_last); said once")

    @torch.no_grad()
    def _validate(self) -> dict[str, Any]:
        spec, model = self.spec, self.spec.model
        model.eval()
        self._publish(ev.START_VALIDATION_LOOP)
        loss_total, count, metric_totals = 0.0, 0, {name: 0.0 for name in spec.metrics}
        for batch_index, batch in enumerate(self._iterate(spec.validation_loader)):
            self._publish(ev.START_VALIDATION_BATCH, batch_index=batch_index)
            inputs, targets = split(batch, spec.unpack_batch, "validation_loader")
            inputs, targets = to_device(inputs, self.device), to_device(targets, self.device)
            outputs, loss = self.stepper.evaluate(inputs, targets, spec.loss_fn)
            loss_value = self._scalar(loss)
            loss_total, count = loss_total + loss_value, count + 1
            for name, fn in spec.metrics.items():
                metric_totals[name] = metric_totals[name] + self._metric(name, fn(outputs, targets))
            self._publish(ev.END_VALIDATION_BATCH, batch_index=batch_index, loss=loss_value,
                          validation_loss_total=loss_total, validation_batch_count=count)
        # across ranks, over all of them: a stream the user shares out may give one rank none (fewer files than ranks)
        loss_total, count, metric_totals = self._over_ranks(loss_total, count, metric_totals)
        if count == 0:  # every epoch validates on something, or the epoch's validation metrics are not there
            raise BatchError(f"validation_loader gave no batch in epoch {self.epoch}: it is empty, or a one-shot "
                             f"iterator an earlier epoch used up; give a DataLoader (or None for no validation)")
        metrics = {name: mean(total, count) for name, total in metric_totals.items()}
        summary = {"validation_loss_total": as_float(loss_total), "validation_batch_count": count,
                   "validation_loss": mean(loss_total, count), "validation_metrics": metrics}
        self._publish(ev.END_VALIDATION_LOOP, **summary)
        return summary

    # -- step boundaries (the checkpoints taken there: loop_checkpoints.py) -----------------------

    def _over_ranks(self, loss_total: Any, count: int,
                    metric_totals: dict[str, Any]) -> tuple[Any, int, dict[str, Any]]:
        """An epoch's totals over every rank's share of the data (one process: as they are)."""
        if self.ranks is None:
            return loss_total, count, metric_totals
        names = list(metric_totals)
        sums = self.ranks.sum([as_float(loss_total), count, *(as_float(metric_totals[n]) for n in names)])
        return sums[0], int(sums[1]), dict(zip(names, sums[2:]))

    def _step_boundary(self, replies: list, last_batch: bool = False) -> bool:
        """Replies, checkpoints and Ctrl-C between two steps; True when training stops here. A checkpoint due
        after the epoch's last batch waits for the epoch's end, a few moments on: there it is whole (validated,
        a resume goes on with the next epoch), and one with the epoch's own schedule, not a second at this step."""
        if self.checkpointer is not None and self.checkpointer.due_at_step(self.step):
            self._deferred_checkpoint = self._deferred_checkpoint or "step"
        if self.ranks is not None:
            self._held += replies
            if self.step % AGREE_EVERY:
                # agreed inside an accumulation: its end is this same step on every rank (no agreeing again, which
                # would wait for an agreement point that ends an accumulation too: every lcm(16, k) steps)
                if self._agreed and not self.stepper.pending and not last_batch:
                    self._take_deferred_checkpoint()
                return False
            replies, self._held = self._held, []
        elif not (replies or self._deferred_checkpoint or self.stop_requested()):
            return False  # the usual step: nothing asked
        control, self._deferred_checkpoint = self._decide(replies, self._deferred_checkpoint)
        # partial accumulations are in no checkpoint
        if self._deferred_checkpoint and not self.stepper.pending and not last_batch:
            self._take_deferred_checkpoint()
        self._agreed = self.ranks is not None and self._deferred_checkpoint is not None
        return self._apply(control)

    def _decide(self, replies: list, checkpoint: str | None) -> tuple[Control, str | None]:
        """What this boundary does: the replies merged, and the checkpoint to take (why), or None. In one
        process, as they are; across ranks, rank 0's decision on every rank (kernel/distributed.py)."""
        control = merge_replies(replies) if replies else NO_CONTROL
        if control.checkpoint_now:
            checkpoint = "checkpoint_now"
        # read once, for _apply too: a signal whose handler ran as rank 0's broadcast of 'go on' returned (it came
        # while rank 0 waited there) would stop rank 0 alone, the others waiting in their next all-reduce
        self._signal = self.stop_requested()
        if self.ranks is None:
            return control, checkpoint
        agreed = self.ranks.agree(Control(should_stop=control.should_stop or bool(self._signal),
                                          checkpoint_now=checkpoint is not None))
        if self.ranks.is_main:
            return control, checkpoint
        return agreed, "checkpoint_now" if agreed.checkpoint_now else None

    # -- replies ----------------------------------------------------------------------------------

    def _apply(self, control: Control) -> bool:
        """Act on merged replies at a step boundary (and the signal _decide read); True when training should stop
        now."""
        signal_name = self._signal
        if not (control.should_stop or signal_name):
            return False
        # a signal is said first, with a plugin's stop at the same boundary too: the run ends interrupted (to be
        # continued with `runs resume`), and what reads the reasons (the end mail, runs show) must say so
        reasons = ((f"kernel: stop: interrupted ({signal_name})",) if signal_name else ()) + control.reasons
        self.outcome.stopped_early = True
        self.outcome.stop_reasons.extend(reasons)
        self._publish(ev.STOP_REQUESTED, reasons=list(reasons))
        return True

    def _metric(self, name: str, value: Any) -> Any:
        """A metric's value for the epoch's total; a value that is not one number is one line naming the metric."""
        if isinstance(value, torch.Tensor):
            if value.numel() == 1:  # an attribute: no device sync
                return self._scalar(value)
        else:
            # a one-element numpy array, as a one-element tensor (numpy 2 takes float() of a 0-d array only)
            number = value.item() if getattr(value, "size", None) == 1 and callable(getattr(value, "item", None)) \
                else value
            try:
                return float(number)  # an int, a float, a numpy scalar
            except (TypeError, ValueError):
                pass
        raise BatchError(f"metric {name!r} returned {describe(value)}: a metric must return one number (a float, an "
                         f"int or a one-element tensor or array); average or pick what it should report")

    def _optimizer_step(self, step: int) -> None:
        """The optimizer step due after the run's batch `step` (1-based), and a per-step schedule's."""
        if self.stepper.step() and self.spec.scheduler is not None and self.spec.scheduler_interval == "step":
            self._stepped_lr = self.spec.optimizer.param_groups[0]["lr"]
            try:
                self.spec.scheduler.step()  # a per-step schedule (OneCycleLR, warm-up): after each optimizer step
            except Exception as exc:
                self._scheduler_failed(exc, f"after step {step} (scheduler_interval 'step')")
                raise

    def _epoch_scheduler_step(self, train: dict[str, Any], validation: dict[str, Any]) -> None:
        scheduler = self.spec.scheduler
        try:
            if not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step()
                return
            value = flat_metrics(train, validation).get(self.spec.scheduler_monitor)
            if value is not None:  # an epoch without it (a stop before validation): the plateau waits for one
                scheduler.step(value)
        except Exception as exc:
            self._scheduler_failed(exc, f"after epoch {self.epoch} (scheduler_interval 'epoch')")
            raise

    def _scheduler_failed(self, exc: Exception, when: str) -> None:
        """torch's error in the scheduler's step (OneCycleLR's total_steps run past) says where it came from, as the
        forward's and the loss's do (the loop steps it: no frame of the user's)."""
        mark_where(exc, lambda: f"in the scheduler's step, {type(self.spec.scheduler).__name__}, {when}")
