"""The benches' Measurer (scripts/bench/_runs.py): what it repeats and what its closing line says it repeated."""

from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts" / "bench"))
from _runs import Measurer  # noqa: E402


def _always_noisy(max_retries: int) -> Namespace:
    """Options under which every measurement counts as disturbed: other processes' share is never below 0 cores."""
    return Namespace(max_retries=max_retries, quiet_cores=-1.0, quiet_wait_s=0.0, retry_budget_s=1e9)


def test_a_noisy_measurement_is_run_max_retries_more_times_and_said_so():
    measure, calls = Measurer(_always_noisy(2)), []
    assert measure(lambda: calls.append(None) or len(calls)) in (1, 2, 3)  # the least disturbed attempt's
    assert len(calls) == 3
    assert measure.retries == 2 and "; 2 run(s) repeated for noise;" in measure.closing_line()


def test_a_noisy_measurement_with_no_retries_left_is_not_said_to_be_repeated():
    measure, calls = Measurer(_always_noisy(0)), []
    measure(lambda: calls.append(None))
    measure(lambda: calls.append(None))
    assert len(calls) == 2
    assert measure.retries == 0 and "; 0 run(s) repeated for noise;" in measure.closing_line()
