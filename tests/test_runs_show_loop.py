"""`trainbus runs show` says how a run's loop trained when it was not the default: its precision, compile,
gradient accumulation and clipping, which config.json and start_training_session record."""

from __future__ import annotations

import json

from kernel_process import cli


def _show(tmp_path, *options: str) -> tuple[str, dict]:
    runs = tmp_path / "runs"
    made = cli("run", "--epochs", "1", "--plugins", "", "--runs-dir", str(runs), *options, cwd=tmp_path, timeout=300)
    assert made.returncode == 0, made.stderr
    run = next(p for p in runs.iterdir() if p.is_dir())
    shown = cli("runs", "show", run.name, "--runs-dir", str(runs), cwd=tmp_path)
    as_json = cli("runs", "show", run.name, "--runs-dir", str(runs), "--json", cwd=tmp_path)
    assert shown.returncode == 0 and as_json.returncode == 0, (shown.stderr, as_json.stderr)
    return shown.stdout, json.loads(as_json.stdout)


def test_runs_show_says_the_loop_a_run_trained_with(tmp_path):
    text, details = _show(tmp_path, "--precision", "bf16-mixed", "--accumulate-grad-batches", "3",
                          "--gradient-clip-val", "0.5")
    loop = [line for line in text.splitlines() if line.strip().startswith("loop ")]
    assert loop == ["  loop        bf16-mixed, an optimizer step every 3 batches, gradients clipped to norm 0.5"], text
    session = details["sessions"][-1]
    assert (session["precision"], session["accumulate_grad_batches"], session["gradient_clip_val"]) == \
        ("bf16-mixed", 3, 0.5), session


def test_runs_show_says_nothing_of_a_default_loop(tmp_path):
    text, _ = _show(tmp_path)
    assert not [line for line in text.splitlines() if line.strip().startswith("loop ")], text
