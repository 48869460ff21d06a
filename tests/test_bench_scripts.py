"""The bench scripts as a user starts them: a setting the machine cannot run is one line, not a traceback."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_checkpoint_stall_on_cuda_without_a_gpu_is_one_error_line_and_leaves_nothing(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH / "checkpoint_stall.py"), "--device", "cuda", "--dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --device cuda") and "--device cpu" in lines[0], lines
    assert list(tmp_path.iterdir()) == []  # no work directory made for a run that cannot start


def test_vs_lightning_without_lightning_shows_its_help_and_says_the_install_line_as_an_error():
    if importlib.util.find_spec("lightning") is not None:
        pytest.skip("needs a venv without Lightning (the bench extra)")
    helped = subprocess.run([sys.executable, str(BENCH / "vs_lightning.py"), "--help"], capture_output=True, text=True,
                            timeout=120)
    assert helped.returncode == 0 and "--device" in helped.stdout, helped.stderr
    done = subprocess.run([sys.executable, str(BENCH / "vs_lightning.py"), "--quick"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: vs_lightning.py needs Lightning: ") and done.stderr.count("\n") == 1, \
        done.stderr
