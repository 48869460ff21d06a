"""JSON for scripts (every `--json`): strict, so jq, JSON.parse and every other parser read it.

A diverged run's losses are NaN, and Python's json writes NaN and Infinity, which JSON has no words for: here a
number that is not finite is null, as JavaScript's JSON.stringify writes one.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable


def finite_or_null(value: Any) -> Any:
    """`value` with every float that is not finite, in any dict or list within it, made None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def strict_dumps(value: Any, indent: int | None = None, default: Callable[[Any], Any] = str) -> str:
    """json.dumps for output a script reads: non-finite numbers as null; `default` for what JSON has no type for."""
    return json.dumps(finite_or_null(value), indent=indent, default=default, allow_nan=False)
