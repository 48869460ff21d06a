"""What a failed run of several ranks says in run_failed and summary.json (kernel/failures.py)."""

from __future__ import annotations

import subprocess


def test_a_rank_killed_is_not_given_rank_0s_broken_collective_for_its_traceback(tmp_path):
    """run_failed's traceback (the e-mail plugin quotes its tail) leads with each failed rank's own, and rank 0's
    broken collective follows under its own name: a rank killed with kill -9 has no traceback to show."""
    from trainbus.kernel.failures import rank_errors

    killed = subprocess.Popen(["sleep", "60"])
    killed.kill()
    killed.wait(timeout=30)
    gloo = ("Traceback (most recent call last):\n  File \"loop.py\", line 226, in _train_epoch\n"
            "RuntimeError: [gloo] Read error: Connection reset by peer\n")
    error, traceback, _ = rank_errors(tmp_path, "RuntimeError: [gloo] Read error: Connection reset by peer", gloo,
                                      "", local_ranks=2, wait_s=30, pids={1: killed.pid}, peer_gone=True)
    assert error.startswith(f"rank 1: its process (pid {killed.pid}) ended without a word"), error
    rank_1 = traceback.split("rank 0:\n")[0]
    assert rank_1.startswith("rank 1:") and "Connection reset by peer" not in rank_1, traceback
    assert traceback.endswith(f"rank 0:\n{gloo}"), traceback
