"""`trainbus run`'s launch options (--nproc, --nnodes, --max-restarts, --rdzv-endpoint) are options of the command
line alone: given in a config's [run] or as a flag, the one error line names the option to give instead."""

from __future__ import annotations

import pytest

from kernel_process import cli


@pytest.mark.parametrize("line, option", [("nproc = 2", "--nproc 2"), ("max_restarts = 1", "--max-restarts 1"),
                                          ("nnodes = 2", "--nnodes 2"),
                                          ('rdzv_endpoint = "node0:29400"', "--rdzv-endpoint node0:29400")])
def test_a_launch_option_in_run_is_said_as_the_option_it_is(tmp_path, line, option):
    (tmp_path / "run.toml").write_text(f"[run]\nepochs = 1\n{line}\n")
    result = cli("run", "-c", str(tmp_path / "run.toml"), "--runs-dir", str(tmp_path / "runs"), "--plugins", "",
                 cwd=tmp_path)
    name = line.split(" = ")[0]
    assert result.returncode == 2, result
    said = result.stderr.strip().splitlines()
    assert len(said) == 1 and said[0].startswith(f"error: {tmp_path / 'run.toml'}: [run]: unknown key '{name}'"), said
    assert f"({name} is an option of trainbus run, not a [run] key: {option})" in said[0], said
    assert "hyperparameter" not in said[0], said  # it is none: [hyperparameters] would only refuse it again
    assert not (tmp_path / "runs").exists() or not any(p.is_dir() for p in (tmp_path / "runs").iterdir())


@pytest.mark.parametrize("word, option", [("max_restarts=1", "--max-restarts 1"), ("nnodes=2", "--nnodes 2")])
def test_a_launch_option_as_a_flag_is_said_as_the_option_it_is(tmp_path, word, option):
    result = cli("run", word, "--runs-dir", str(tmp_path / "runs"), "--plugins", "", cwd=tmp_path)
    assert result.returncode == 2, result
    said = result.stderr.strip().splitlines()
    assert len(said) == 1 and f"is an option of trainbus run: {option})" in said[0], said


FAILING = '''
import torch
from torch.utils.data import DataLoader, TensorDataset
from trainbus.kernel import TrainingSpec


class Broken(torch.nn.Linear):
    def forward(self, x):
        raise ValueError("broken forward")


def build():
    model = Broken(4, 2)
    data = TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    return TrainingSpec(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        loss_fn=torch.nn.functional.cross_entropy, train_loader=DataLoader(data, batch_size=4))
'''


def test_under_your_own_torchrun_a_restart_is_not_said_to_continue_the_run(tmp_path):
    """torchrun --max-restarts of the user's own starts the group again as a new run (only `trainbus run --nproc`
    names the run for its restarts): the failed attempt's last line says so, not that the run goes on in place."""
    import subprocess
    import sys
    from pathlib import Path

    from helpers import free_port

    (tmp_path / "failing.py").write_text(FAILING)
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run([str(torchrun), "--nproc-per-node", "1", "--max-restarts", "1", "--master-port",
                             str(free_port()), "-m", "trainbus.kernel.cli", "run", "failing.py:build", "--plugins", "",
                             "--runs-dir", str(tmp_path / "runs")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, result
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir())
    assert len(runs) == 2, runs  # each attempt a run of its own
    said = [line.strip() for line in result.stdout.splitlines() if "torchrun restarts the group" in line]
    assert said == ["torchrun restarts the group (1 restart left) as a new run, from the start: a restart continues "
                    "the run in place only under `trainbus run --nproc N --max-restarts M`"], result.stdout
