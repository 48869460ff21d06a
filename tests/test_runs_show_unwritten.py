"""`runs show` counts the snapshots no persister answered: taken and published, but never written as a checkpoint."""

from __future__ import annotations

import json

from kernel_process import cli

LAZY = '''
from trainbus.sdk import DURABLE, Plugin


class Lazy(Plugin):
    """A persister the run's end comes before: it has the checkpoint capability and acks each save_checkpoint
    (so the kernel reuses the buffer) without writing it or answering checkpoint_saved or checkpoint_failed."""
    delivery = DURABLE
    capabilities = ("checkpoint",)

    def on_save_checkpoint(self, event):
        pass
'''


def test_snapshots_no_persister_answered_are_shown_as_never_written(tmp_path):
    (tmp_path / "lazy.py").write_text(LAZY)
    (tmp_path / "run.toml").write_text('[run]\nepochs = 2\n[plugins.lazy]\ntarget = "lazy:Lazy"\n')
    done = cli("run", "-c", "run.toml", "--plugins", "lazy", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = next(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir())
    shown = cli("runs", "show", run_id, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    line = next((x for x in shown.stdout.splitlines() if x.startswith("checkpoints:")), None)
    assert line == ("checkpoints: 0 saved (0 still on disk), 0 failed, 0 skipped, 2 never written (no persister "
                    "answered before its session ended)"), shown.stdout
    as_json = json.loads(cli("runs", "show", run_id, "--json", cwd=tmp_path).stdout)
    assert as_json["checkpoints"]["unwritten"] == 2
