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
