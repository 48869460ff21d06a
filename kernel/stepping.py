"""How one batch becomes an optimizer step: precision, gradient accumulation, gradient clipping, torch.compile.

Lightning's names and meanings, so its users need not relearn them:
- precision "32": as the model is; "bf16-mixed" / "16-mixed": forward and loss under torch.autocast
  (16-mixed scales the loss with a GradScaler, CUDA only); "bf16-true": the model's floating-point
  parameters and inputs in bfloat16.
- accumulate_grad_batches k: the optimizer steps once every k batches, on the mean of their gradients
  (each loss divided by k); an epoch's last batches step too, however many they are, across ranks on
  gradients averaged over every rank as a whole cycle's are.
- gradient_clip_val v: the gradients' total 2-norm clipped to v before each optimizer step (after unscaling).
- compile: the forward pass through torch.compile(model); the model itself (its state_dict keys, what
  checkpoints hold) is unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from .batches import BatchError, describe, floats_to

# The attribute an exception from the forward or the loss gets: where it was raised, and the shapes, which torch's
# own message does not say (a model of torch's modules alone shows no frame of the user's code). An attribute, not
# a note: a note would print in every traceback, the user's own too, after their exception's line.
WHERE_IN_STEP = "_trainbus_where_in_step"


class SteppingError(ValueError):
    """A combination this device cannot run; the message names the fix."""


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "16-mixed" and device.type != "cuda":
        raise SteppingError(f"precision 16-mixed needs a CUDA device (float16 autocast with a loss scaler), "
                            f"this run is on {device.type}; use bf16-mixed on the CPU")


class Stepper:
    """Runs forward, backward and (every k batches) the optimizer step for the loop; owns the loss scaler."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 precision: str = "32", accumulate_grad_batches: int = 1, gradient_clip_val: float = 0.0,
                 compile: bool = False):
        check_precision(precision, device)
        self.options = {"precision": precision, "accumulate_grad_batches": accumulate_grad_batches,
                        "gradient_clip_val": gradient_clip_val, "compile": compile}  # as start_training_session says
        self.model, self.optimizer, self.device = model, optimizer, device
        self.k, self.clip = accumulate_grad_batches, gradient_clip_val
        self.pending = 0  # batches whose gradients are accumulated but not yet stepped
        self._unreduced = False  # the last backward ran under DDP's no_sync: the gradients are this rank's alone
        mixed = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
        self._autocast = (lambda: torch.autocast(device.type, dtype=mixed)) if mixed else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None
        self._cast_inputs = precision == "bf16-true"
        if self._cast_inputs:
            model.to(torch.bfloat16)  # the same Parameter objects: the optimizer keeps them
        self._compile = compile
        self.forward = torch.compile(model) if compile else model
        self._ddp: Any = None  # DistributedDataParallel around the model, across ranks

    def follow(self, module: torch.nn.Module) -> None:
        """A module beside the model (a loss with class weights, CrossEntropyLoss(weight=...)) on the model's device,
        and in bf16-true its dtype, as Lightning moves and casts a loss that is its module's attribute: its weight
        stayed float32 on the CPU, and the first step failed in loss_fn on a GPU or in bf16-true."""
        module.to(self.device)
        if self._cast_inputs:
            module.to(torch.bfloat16)

    def distribute(self, ddp: Any) -> None:
        """Train through DDP from here on (the model itself stays what checkpoints hold)."""
        self._ddp = ddp
        self.forward = torch.compile(ddp) if self._compile else ddp

    def batch(self, inputs: Any, targets: Any, loss_fn) -> tuple[Any, torch.Tensor]:
        """Forward and backward for one batch: (outputs, the batch's own loss, neither scaled nor divided)."""
        if self.pending == 0:
            self.optimizer.zero_grad(set_to_none=True)
        # across ranks, gradients are all-reduced on the batch that completes an accumulation only
        syncing = self._ddp is None or self.pending + 1 >= self.k
        with contextlib.nullcontext() if syncing else self._ddp.no_sync():
            outputs, loss = self.evaluate(inputs, targets, loss_fn)
            if not loss.requires_grad:  # else torch's "element 0 of tensors does not require grad", naming nothing
                raise BatchError("loss_fn returned a loss that does not require a gradient (it has no grad_fn), so "
                                 "nothing would train: it was cut off from the model's outputs (.item(), .detach(), "
                                 "torch.tensor(...), numpy, or torch.no_grad()); compute it from the outputs with "
                                 "torch operations")
            scaled = loss / self.k if self.k > 1 else loss
            try:
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            except Exception as exc:  # autograd's own (an in-place change, a graph freed): no frame of theirs
                mark_where(exc, lambda: "in the backward pass of loss_fn's loss")
                raise
        self.pending += 1
        self._unreduced = not syncing
        return outputs, loss

    def evaluate(self, inputs: Any, targets: Any, loss_fn) -> tuple[Any, torch.Tensor]:
        """The forward pass and loss at the run's precision (validation calls it under no_grad)."""
        if self._cast_inputs:
            inputs = floats_to(inputs, torch.bfloat16)
        with self._autocast():
            try:
                outputs = self.forward(inputs)
            except Exception as exc:
                mark_where(exc, lambda: f"in the model's forward, given inputs {_shape(inputs)}")
                raise
            try:
                loss = loss_fn(outputs, targets)
            except Exception as exc:
                mark_where(exc, lambda: f"in loss_fn, given outputs {_shape(outputs)} and targets {_shape(targets)}")
                raise
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:  # numel: an attribute, no device sync
            raise BatchError(f"loss_fn returned {describe(loss)}: it must return the batch's loss as one number in a "
                             f"tensor (a mean or sum over the batch, e.g. reduction='mean')")
        return outputs, loss

    def due(self) -> bool:
        return self.pending >= self.k

    def step(self) -> bool:
        """The optimizer step on what is accumulated (a no-op when nothing is); True when it stepped."""
        if self.pending == 0:
            return False
        if self._unreduced:  # an epoch's (or a stop's) last batches, fewer than k: no_sync skipped their all-reduce
            self._average_gradients()
        if self.clip:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.pending = 0
        return True

    def _average_gradients(self) -> None:
        """Across ranks, the mean of the accumulated gradients, as DDP's all-reduce on a syncing backward makes it."""
        import torch.distributed as dist

        group = self._ddp.process_group
        world_size = dist.get_world_size(group)
        for parameter in self.model.parameters():
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad, group=group)
                parameter.grad.div_(world_size)
        self._unreduced = False

    def state_dict(self) -> dict[str, Any] | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def _shape(value: Any) -> str:
    """A batch's part as an error says it: a tensor's dtype and shape, else what batches.describe says."""
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"{'an' if dtype[0] in 'aeiou' else 'a'} {dtype} tensor of shape {tuple(value.shape)}"
    return describe(value)


def mark_where(exc: BaseException, where: Callable[[], str]) -> None:
    """Set exc's WHERE_IN_STEP, unless it has one already (the same exception object raised again)."""
    if not hasattr(exc, WHERE_IN_STEP):
        try:
            setattr(exc, WHERE_IN_STEP, where())
        except Exception:  # an exception type that takes no attributes, or a batch that cannot be described
            pass
