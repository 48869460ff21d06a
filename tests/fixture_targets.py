"""Training targets the tests run: the digits demo, paced so a run lasts a known wall time."""

from __future__ import annotations

import time

from trainbus.kernel.digits import build


class _Paced:
    """Yields a loader's batches, sleeping `step_sleep_s` before each: the arithmetic is untouched."""

    def __init__(self, loader, step_sleep_s: float):
        self.loader = loader
        self.step_sleep_s = step_sleep_s

    def __iter__(self):
        for batch in self.loader:
            time.sleep(self.step_sleep_s)
            yield batch

    def __len__(self):
        return len(self.loader)


def paced_digits(hyperparameters: dict):
    """The digits demo with a sleep per training step (hyperparameter `step_sleep_s`, default 10 ms).

    Weights come out bit-identical to the unpaced demo with the same seed and batch size, so a paced
    faulty run compares with an unpaced fault-free one; the pacing only makes the run last long enough
    for a test to act at chosen steps from outside.
    """
    step_sleep_s = float(hyperparameters.pop("step_sleep_s", 0.01))
    spec = build(hyperparameters)
    spec.train_loader = _Paced(spec.train_loader, step_sleep_s)
    return spec
