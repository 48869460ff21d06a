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
