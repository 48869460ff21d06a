"""A rank of `trainbus run --nproc` takes its launcher's death (kill -9) as one SIGTERM, however Linux says it.

Linux sends the parent-death signal each time the child is handed from one of the dying parent's threads to the
next, and when the thread that started it exits while the process lives on (prctl(2)): a rank counting each as a
SIGTERM took the second for "stop at once" and ended its run cut short, its plugins undrained."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import pytest

from kernel_process import process_gone, wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")

# The rank's side: the kernel's own signal handling and parent watch, as session.py sets them up under --nproc.
RANK = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    os.environ["TRAINBUS_LAUNCH"] = "{}"
    from trainbus.kernel.interrupts import Interrupts
    from trainbus.kernel.pids import signalled_when_gone

    parent, out = int(sys.argv[1]), Path(sys.argv[2])
    interrupts = Interrupts(install=True)
    signalled_when_gone(parent)
    (out / "ready").write_text(str(os.getpid()))
    said, settled = "", 0
    try:
        for _ in range(1200):  # 60 s at most
            time.sleep(0.05)
            (out / "count").write_text(str(interrupts.count))
            if os.getppid() != parent and interrupts.count:
                settled += 1  # the parent is gone and said: give any repeat of its death time to arrive
                if settled >= 20:
                    break
    except KeyboardInterrupt:
        said = "stopped at once"
    (out / "result").write_text(f"{interrupts.count} {said}".strip())
""")

# The launcher's side: the rank started from a thread that then ends, and more threads besides (torchrun's agent
# has several), so Linux says the parent's death more than once.
LAUNCHER = textwrap.dedent("""
    import subprocess, sys, threading, time
    from pathlib import Path

    out = Path(sys.argv[2])
    def start():
        subprocess.Popen([sys.executable, sys.argv[1], str(__import__("os").getpid()), str(out)])
        while not (out / "ready").exists():
            time.sleep(0.01)
    starter = threading.Thread(target=start)
    starter.start()
    starter.join()
    for _ in range(4):
        threading.Thread(target=time.sleep, args=(120,), daemon=True).start()
    (out / "starter_gone").write_text("")
    time.sleep(120)
""")


def test_a_launcher_killed_is_one_sigterm_to_its_rank(tmp_path):
    rank, launcher = tmp_path / "rank.py", tmp_path / "launcher.py"
    rank.write_text(RANK)
    launcher.write_text(LAUNCHER)
    process = subprocess.Popen([sys.executable, str(launcher), str(rank), str(tmp_path)])
    try:
        wait_until(lambda: (tmp_path / "starter_gone").exists(), 60, "the launcher's starting thread to end")
        # the starting thread's end is no death of the launcher: the rank goes on training (were it taken for a
        # SIGTERM, the rank says so by its count; give it the time to)
        try:
            wait_until(lambda: (tmp_path / "count").exists() and (tmp_path / "count").read_text() not in ("", "0"),
                       2, "a SIGTERM the rank should not have taken")
        except AssertionError:
            pass
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        result = wait_until(lambda: (tmp_path / "result").exists() and (tmp_path / "result").read_text(), 90,
                            "the rank to settle after its launcher was killed")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        rank_pid = (tmp_path / "ready").read_text() if (tmp_path / "ready").exists() else ""
        if rank_pid.isdigit() and not process_gone(int(rank_pid)):
            os.kill(int(rank_pid), signal.SIGKILL)
    assert result == "1", f"the rank counted {result!r} SIGTERMs for one launcher killed"
