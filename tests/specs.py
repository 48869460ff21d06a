"""Small training specs for tests: deterministic, a few batches, loadable as tests/specs.py:NAME."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from trainbus.kernel import TrainingSpec
from trainbus.proto import events as ev

TRAIN_BATCHES = 3
VALIDATION_BATCHES = 2


def tiny(hyperparameters: dict) -> TrainingSpec:
    """A linear classifier on random data: TRAIN_BATCHES and VALIDATION_BATCHES batches of 4 per epoch."""
    g = torch.Generator().manual_seed(123)
    x, y = torch.randn(4 * TRAIN_BATCHES, 5, generator=g), torch.randint(0, 3, (4 * TRAIN_BATCHES,), generator=g)
    vx, vy = torch.randn(4 * VALIDATION_BATCHES, 5, generator=g), torch.randint(0, 3, (4 * VALIDATION_BATCHES,), generator=g)
    model = torch.nn.Linear(5, 3)
    return TrainingSpec(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=torch.nn.functional.cross_entropy,
        train_loader=DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True),
        validation_loader=DataLoader(TensorDataset(vx, vy), batch_size=4),
        epochs=2,
        hyperparameters={"lr": 0.1},
    )


def tiny_unvalidated(hyperparameters: dict) -> TrainingSpec:
    """tiny with no validation set, and an accuracy over its training batches."""
    spec = tiny(hyperparameters)
    spec.validation_loader = None
    spec.metrics = {"accuracy": lambda outputs, targets: (outputs.argmax(1) == targets).float().mean()}
    return spec


def tiny_accuracy(hyperparameters: dict) -> TrainingSpec:
    """tiny with an accuracy, over its training and its validation batches."""
    spec = tiny(hyperparameters)
    spec.metrics = {"accuracy": lambda outputs, targets: (outputs.argmax(1) == targets).float().mean()}
    return spec


def diverged(hyperparameters: dict) -> TrainingSpec:
    """tiny whose every loss is NaN, as a run that diverged has them (the run itself completes)."""
    spec = tiny(hyperparameters)
    spec.loss_fn = lambda outputs, targets: torch.nn.functional.cross_entropy(outputs, targets) * float("nan")
    return spec


def nan_first_validation(hyperparameters: dict) -> TrainingSpec:
    """tiny whose first validation batch's loss is NaN (one bad sample), every later loss a number: epoch 1's
    validation loss is NaN, the later epochs' are not."""
    spec = tiny(hyperparameters)
    calls = {"validation": 0}

    def loss(outputs, targets):
        value = torch.nn.functional.cross_entropy(outputs, targets)
        if not spec.model.training:
            calls["validation"] += 1
            if calls["validation"] == 1:
                return value * float("nan")
        return value
    spec.loss_fn = loss
    spec.epochs = 3
    return spec


def failing(hyperparameters: dict) -> TrainingSpec:
    """A spec whose loss function raises in the second epoch: the run fails, the kernel says why."""
    spec = tiny(hyperparameters)
    calls = {"n": 0}

    def loss_fn(outputs, targets):
        calls["n"] += 1
        if calls["n"] > TRAIN_BATCHES + VALIDATION_BATCHES:
            raise FloatingPointError("loss exploded")
        return torch.nn.functional.cross_entropy(outputs, targets)

    spec.loss_fn = loss_fn
    return spec


not_a_function = 42


# -- what the loop publishes for `tiny` (kernel/loop.py) ------------------------------------------


def unbuildable(hyperparameters: dict) -> TrainingSpec:
    """A target whose build raises: the run fails before its kernel makes a run directory."""
    raise ValueError("no data at /nowhere")


def epoch_events(checkpoint_before_end: bool = False) -> list[str]:
    """The event types of one epoch of `tiny`, in order; a save_checkpoint before end_epoch if asked for."""
    batches = [ev.START_TRAINING_BATCH, ev.END_TRAINING_BATCH] * TRAIN_BATCHES
    validation = [ev.START_VALIDATION_BATCH, ev.END_VALIDATION_BATCH] * VALIDATION_BATCHES
    return ([ev.START_EPOCH, ev.START_TRAINING_LOOP, *batches, ev.END_TRAINING_LOOP,
             ev.START_VALIDATION_LOOP, *validation, ev.END_VALIDATION_LOOP]
            + ([ev.SAVE_CHECKPOINT] if checkpoint_before_end else []) + [ev.END_EPOCH])


def lifecycle(epochs: int) -> list[str]:
    """The lifecycle event types of a whole run of `tiny` over `epochs` epochs, in order."""
    return [ev.START_TRAINING_SESSION, *epoch_events() * epochs, ev.END_TRAINING_SESSION]
