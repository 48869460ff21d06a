"""Training targets that last a known wall time however fast the machine: for monitors, which sample on a clock."""

from __future__ import annotations

import time

from trainbus.kernel.digits import build


class _ForSeconds:
    """Cycles through a loader's batches, busy, until `seconds` have passed since the epoch's first batch."""

    def __init__(self, loader, seconds: float):
        self.loader = loader
        self.seconds = seconds

    def __iter__(self):
        end = time.monotonic() + self.seconds
        while True:
            for batch in self.loader:
                yield batch
                if time.monotonic() >= end:
                    return


def digits_for_seconds(hyperparameters: dict):
    """The digits demo, each training epoch lasting `epoch_s` seconds (default 0.5) of real computation."""
    epoch_s = float(hyperparameters.pop("epoch_s", 0.5))
    spec = build(hyperparameters)
    spec.train_loader = _ForSeconds(spec.train_loader, epoch_s)
    return spec


class _Slowly:
    """A loader's batches, each `seconds` later than it would come; its length is the loader's."""

    def __init__(self, loader, seconds: float):
        self.loader = loader
        self.seconds = seconds

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            time.sleep(self.seconds)
            yield batch


def digits_slowly(hyperparameters: dict):
    """The digits demo (45 training batches an epoch), each batch `batch_s` seconds slower (default 0.03)."""
    batch_s = float(hyperparameters.pop("batch_s", 0.03))
    spec = build(hyperparameters)
    spec.train_loader = _Slowly(spec.train_loader, batch_s)
    return spec
