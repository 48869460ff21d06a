"""On PYTHONPATH of a test's run: the checkpoint plugin's `import torch` waits while TRAINBUS_TEST_TORCH_GATE (a file)
is missing, standing in for torch's import starved on a busy box (seconds, tens of them at nice 10)."""

import os
import sys
import time

GATE = os.environ.get("TRAINBUS_TEST_TORCH_GATE", "")
HOLD_MAX_S = 300.0  # a gate the test never opens lets the import go on rather than hang the run


class _HoldTorch:
    """A meta path finder that finds nothing: it only waits, holding the import of torch (its module lock, so
    every thread importing torch waits with it)."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            deadline = time.monotonic() + HOLD_MAX_S
            while not os.path.exists(GATE) and time.monotonic() < deadline:
                time.sleep(0.02)
        return None


if GATE and os.environ.get("TRAINBUS_PLUGIN_NAME") == "checkpoint":
    sys.meta_path.insert(0, _HoldTorch())
