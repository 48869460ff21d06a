"""Python's garbage collector kept off what lives for the whole run: torch's modules and the built spec.

A full collection walks every object the collector tracks, with the GIL held. With torch loaded that is ~300,000
objects, and ~450,000 once the first optimizer has imported torch._dynamo: ~170 ms a collection on a busy 2-core box.
torch's import set off 4 of them as it grew the heap (~300 ms), the build one more, and the process's exit one
(proto.process.exit_without_teardown collects what has a finalizer); a long run that kept enough objects alive
would pause its steps for one now and then. Frozen (gc.freeze), they are never walked again; only what the run makes
from then on is. Measured with gc.callbacks on the digits demo: docs/benchmarks.md.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def importing_quietly() -> Iterator[None]:
    """No collection while torch imports (its objects are all alive: there is nothing to find), then freeze them."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def freeze_before_training() -> None:
    """Freeze what the build made that lives on (the model, the optimizer, the data, torch._dynamo's modules), once
    its young garbage is collected: what is frozen is never collected, and the build's temporaries should not be."""
    gc.collect(1)
    gc.freeze()
