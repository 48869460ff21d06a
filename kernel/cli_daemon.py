"""`trainbus daemon`: start, stop and ask the daemon that runs a runs directory's queue, here or remotely."""

from __future__ import annotations

import json
import shlex
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape

from .cli_common import KEYS_DIR_HELP, UserError, key_file_path, keys_dir_path, out, runs_dir_path
from .runs_dir_check import check_runs_dir
from .registry import MAX_RESUMES

daemon_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                         help="The kernel daemon: a queue of runs for one runs directory that outlives crashes.")


RUNS_DIR_OPTION = typer.Option("runs", "--runs-dir", parser=runs_dir_path,
                               help="The runs directory it serves (default ./runs).")
# None when not given: with --remote it is refused, not dropped (the remote daemon serves its own directory)
LOCAL_RUNS_DIR_OPTION = typer.Option(None, "--runs-dir", parser=runs_dir_path,
                                     help="The runs directory its daemon serves (default ./runs; not with --remote).")


@daemon_app.command("start")
def daemon_start(
    runs_dir: Path = RUNS_DIR_OPTION,
    gpus: Optional[str] = typer.Option(None, "--gpus", help="The devices runs are placed on, comma-separated "
                                                            "(0,1 or GPU UUIDs; '' for none); default: every GPU "
                                                            "NVML sees."),
    max_concurrent: int = typer.Option(1, "--max-concurrent", min=1, help="Runs training at once (default 1)."),
    foreground: bool = typer.Option(False, "--foreground", help="Stay in the foreground, logging to stderr too "
                                                                "(for systemd: docs/daemon.md)."),
    listen: Optional[str] = typer.Option(None, "--listen", help="HOST:PORT: also serve requests over TCP with "
                                                                "CURVE (PORT 0: a free one): monitor keys may ask "
                                                                "status, control keys may submit runs and cancel "
                                                                "(or stop) them."),
    keys_dir: Optional[Path] = typer.Option(None, "--keys-dir", parser=keys_dir_path, help=KEYS_DIR_HELP),
    quiet: bool = typer.Option(False, "--quiet", hidden=True, help="No log lines on stderr."),
) -> None:
    """Start the daemon for a runs directory: it runs the queued runs (`trainbus run ... --detach`) in order."""
    from trainbus.proto.remote import KeyFileError, keys_dir as default_keys_dir

    from . import daemon_client, daemon_files, placement
    from .daemon_serve import serve
    from .keys import KeyStore
    from .remote import ListenError, check_listen

    check_runs_dir(str(runs_dir))
    try:
        devices = None if gpus is None else placement.parse_devices(gpus)
        if listen:
            check_listen(listen, KeyStore(default_keys_dir(keys_dir)), ports=1)  # one port: the daemon's
        if foreground:
            raise typer.Exit(code=serve(runs_dir, devices, max_concurrent, foreground_log=not quiet,
                                        listen=listen, keys_dir=keys_dir and str(keys_dir)))
        argv = ["--runs-dir", str(runs_dir.resolve()), "--max-concurrent", str(max_concurrent)]
        argv += ["--gpus", gpus] if gpus is not None else []
        argv += ["--listen", listen] if listen else []
        argv += ["--keys-dir", str(keys_dir.resolve())] if keys_dir else []
        answer = daemon_client.start_background(runs_dir, argv)
    except (daemon_files.DaemonError, ListenError, KeyFileError) as exc:
        raise UserError(str(exc)) from None
    if answer.get("starting"):  # it holds the directory and works through its first round: not killed for it
        out.print(f"daemon pid {answer['pid']} holds {escape(str(runs_dir.resolve()))} and is still settling its runs "
                  f"before it serves (a long queue, a slow disk); `trainbus daemon status --runs-dir "
                  f"{escape(shlex.quote(str(runs_dir)))}` says when it serves; log: "
                  f"{escape(str(daemon_files.daemon_dir(runs_dir) / daemon_files.LOG_FILE))}")
        return
    out.print(f"daemon pid {answer['pid']} serves {escape(answer['runs_dir'])} (devices: "
              f"{','.join(answer['devices']) or 'none'}, max concurrent {answer['max_concurrent']}); "
              f"log: {escape(str(daemon_files.daemon_dir(runs_dir) / daemon_files.LOG_FILE))}")
    if answer.get("remote"):
        out.print(_remote_line(answer["remote"], runs_dir))


QUEUED_SHOWN = 20  # `daemon status` names this many queued runs on its line; --json names them all


def _first_of(queued: list[str]) -> str:
    """The queue as `daemon status` says it: its first runs, and how many more there are."""
    more = len(queued) - QUEUED_SHOWN
    return escape(", ".join(queued[:QUEUED_SHOWN]) or "none") + (f" and {more} more (`--json` lists them all)"
                                                                  if more > 0 else "")


def _remote_line(endpoint: str, runs_dir: Path) -> str:
    from . import daemon_files

    return (f"remote endpoint {escape(endpoint)}: clients need a key of `trainbus keys` and "
            f"{escape(str(daemon_files.daemon_dir(runs_dir) / daemon_files.REMOTE_FILE))} (--server-key)")


@daemon_app.command("stop")
def daemon_stop(runs_dir: Path = RUNS_DIR_OPTION,
                remote: Optional[str] = typer.Option(None, "--remote", hidden=True),
                key: Optional[str] = typer.Option(None, "--key", hidden=True),
                server_key: Optional[str] = typer.Option(None, "--server-key", hidden=True)) -> None:
    """Stop the daemon; its runs go on training and the next daemon adopts them."""
    from . import daemon_client, daemon_files
    from .runs import no_runs_dir

    if (remote, key, server_key) != (None, None, None):  # a key reaches no further than runs (docs/daemon.md)
        raise UserError("`daemon stop` is for the daemon's own host: run it there; a control key stops a run with "
                        "`daemon cancel RUN --remote HOST:PORT ...`")
    try:
        answer = daemon_client.stop(runs_dir)
    except daemon_files.DaemonError as exc:
        raise UserError(str(exc)) from None
    stuck = daemon_client.unanswering(runs_dir) if answer is None else None
    if stuck is not None:  # it lives, holding the directory: not "no daemon serves"
        pid, said = stuck
        raise UserError(said + (f"; `kill {pid}` stops it as `daemon stop` does (SIGTERM), its runs training on"
                                if pid is not None else ""))
    if answer is None and not runs_dir.is_dir():  # a typo in --runs-dir: an error, not a daemon stopped
        raise UserError(f"no daemon serves {runs_dir.resolve()}: {no_runs_dir(runs_dir)}")
    if answer is None:  # nothing to stop: done, as `systemctl stop` of a unit already stopped
        out.print(f"no daemon serves {escape(str(runs_dir.resolve()))}")
        return
    running = answer.get("running") or []
    out.print("daemon stopped" + (f"; still training (adopted by the next daemon): {', '.join(running)}"
                                  if running else ""))


REMOTE_OPTION = typer.Option(None, "--remote", metavar="HOST:PORT",
                             help="A daemon started with --listen, over TCP with CURVE (needs --key, --server-key).")
KEY_OPTION = typer.Option(None, "--key", parser=key_file_path,
                          help="With --remote: this client's secret key file (`trainbus keys`).")
SERVER_KEY_OPTION = typer.Option(None, "--server-key", parser=key_file_path,
                                 help="With --remote: the daemon host's public server key file, or its "
                                      ".daemon/remote.json.")


def _remote(remote: str | None, key: Path | None, server_key: Path | None, runs_dir: Path | None = None):
    """The remote daemon --remote names, or None; UserError for an option that would be dropped without a word:
    --key or --server-key without --remote (the local daemon was asked), --runs-dir with it."""
    from trainbus.proto.remote import KeyFileError

    from .daemon_client import RemoteDaemon

    if remote is None:
        given = "--key" if key is not None else "--server-key" if server_key is not None else None
        if given:
            raise UserError(f"{given} is for a remote daemon: give --remote HOST:PORT with it, or leave it out")
        return None
    if runs_dir is not None:
        raise UserError("--runs-dir is for a daemon on this host: a remote daemon serves its own runs directory; "
                        "leave --runs-dir out")
    if key is None or server_key is None:
        raise UserError("--remote needs --key (your secret key file) and --server-key (the daemon host's public key "
                        "file or .daemon/remote.json)")
    try:
        return RemoteDaemon(remote, key, server_key)
    except (KeyFileError, ValueError) as exc:  # as `trainbus attach --key` says them (sdk/attach.py target_of)
        raise UserError(str(exc)) from None


def _key_options(target) -> str:
    """`--key FILE --server-key FILE` of a suggested command, quoted as a shell takes them (`~/My Keys/...`)."""
    return f"--key {shlex.quote(str(target.key_file))} --server-key {shlex.quote(str(target.server_key))}"


def _ask(runs_dir: Path, remote, op: str, **fields) -> dict:
    """The daemon's answer, or one error line: none answering, or its refusal."""
    from trainbus.proto.remote import CannotConnect

    from . import daemon_client

    try:
        answer = daemon_client.request(runs_dir, op, remote=remote, **fields)
    except CannotConnect as exc:  # keys not taken (said at once), or nothing listening there (in seconds)
        raise UserError(str(exc)) from None
    where = remote.host_port if remote else str(runs_dir.resolve())  # printed as it is, not as markup
    if answer is None:
        raise UserError(f"no daemon answered at {where}" + (" (does a daemon listen there, and does this machine "
                                                            "reach it?)" if remote else ""))
    if not answer.get("ok"):
        raise UserError(f"the daemon at {where} refused: {answer.get('error')}")
    return answer


@daemon_app.command("submit", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def daemon_submit(
    ctx: typer.Context,
    remote: Optional[str] = REMOTE_OPTION, key: Optional[Path] = KEY_OPTION,
    server_key: Optional[Path] = SERVER_KEY_OPTION,
    gpus: Optional[int] = typer.Option(None, "--gpus", min=0, help="GPUs the run needs (as `run --gpus`)."),
    max_resumes: int = typer.Option(0, "--max-resumes", min=0, max=MAX_RESUMES,
                                    help="Times the daemon continues the run when its kernel dies (as `run "
                                         "--max-resumes`)."),
) -> None:
    """Queue `trainbus run ARGS...` on a remote daemon (`-- ARGS`, as they are to be run on that host, in the
    daemon's directory and environment); prints the run id. Locally, `trainbus run ... --detach` checks the
    arguments first and is the way."""
    from .cli import _click_exceptions, _option_given_twice  # it imports this module

    if (unknown := _unknown_before_dashes(ctx)) is not None:  # a typo of submit's own: said here, nothing sent
        raise _click_exceptions().NoSuchOption(unknown, ctx=ctx)
    twice = _option_given_twice(["run", *ctx.args])  # the command `trainbus run` would refuse, once started there
    if twice:
        raise UserError(f"the command's {twice}; nothing was submitted")
    # the daemon appends its own --runs-dir, which wins: one in ARGS (before or after `--`) would be dropped unsaid
    runs_dir_given = any(word.partition("=")[0] == "--runs-dir" for word in ctx.args)
    target = _remote(remote, key, server_key, Path(".") if runs_dir_given else None)
    if target is None:
        raise UserError("daemon submit is for a remote daemon (--remote); here, use `trainbus run ... --detach`")
    answer = _ask(Path("."), target, "submit", argv=list(ctx.args), gpus=gpus, max_resumes=max_resumes)
    print(answer["run"])
    print(f"trainbus: queued run {answer['run']} on {target.host_port}; `trainbus daemon status --remote "
          f"{target.host_port} {_key_options(target)}` shows it queued, running, "
          f"and how it ended", file=sys.stderr)


def _unknown_before_dashes(ctx: typer.Context) -> str | None:
    """The first option before `--` that `daemon submit` has not (`--gpu` for its --gpus): the command's ARGS come
    after `--`, so it is a mistake in submit's own, which click, taking unknown options as ARGS, would send to the
    daemon. None without `--`, where the words after submit's options are the command's."""
    words = sys.argv[sys.argv.index("submit", 1) + 1:] if "submit" in sys.argv[1:] else []  # not: called from Python
    if "--" not in words:
        return None
    own = {opt: param.is_flag for param in ctx.command.get_params(ctx) for opt in param.opts}
    before = iter(words[:words.index("--")])
    for word in before:
        name = word.partition("=")[0]
        if name in own:
            if "=" not in word and not own[name]:
                next(before, None)  # its value
        elif name.startswith("-") and name != "--runs-dir":  # that one is said with its fix (_remote)
            return name
    return None


@daemon_app.command("cancel")
def daemon_cancel(
    run: str = typer.Argument(..., help="A queued run's id, or a unique start of it."),
    runs_dir: Optional[Path] = LOCAL_RUNS_DIR_OPTION,
    remote: Optional[str] = REMOTE_OPTION, key: Optional[Path] = KEY_OPTION,
    server_key: Optional[Path] = SERVER_KEY_OPTION,
) -> None:
    """Take a queued run off the queue. With --remote, a running one is stopped at its next step boundary, its stop
    reason naming the key (here, `trainbus runs stop` stops it)."""
    from . import daemon_queue
    from .registry import JobError, cannot_read

    target = _remote(remote, key, server_key, runs_dir)
    runs_dir = runs_dir or Path("runs")
    if target is not None:
        answer = _ask(runs_dir, target, "cancel", run=run)
        run = str(answer.get("run", run))
        if answer.get("stopping"):
            out.print(f"stopping {escape(run)} at its next step boundary; `trainbus daemon status --remote "
                      f"{escape(target.host_port)} {escape(_key_options(target))}` shows how it ended")
            return
    else:
        try:
            run = daemon_queue.cancel(runs_dir, run)
        except JobError as exc:
            raise UserError(str(exc)) from None
        except sqlite3.Error as exc:  # a full disk: SQLite cannot open the queue (it was a traceback)
            raise UserError(f"cannot take run {run} off the queue: {cannot_read(runs_dir, exc)}") from None
    out.print(f"cancelled {escape(run)}")


@daemon_app.command("status")
def daemon_status(runs_dir: Optional[Path] = LOCAL_RUNS_DIR_OPTION,
                  as_json: bool = typer.Option(False, "--json", help="One JSON object."),
                  remote: Optional[str] = REMOTE_OPTION, key: Optional[Path] = KEY_OPTION,
                  server_key: Optional[Path] = SERVER_KEY_OPTION) -> None:
    """Whether a daemon serves the runs directory: its pid, devices, the runs it watches, the queue, the runs it
    ended last and how.
    Exit code 0 when one does, 3 when none (as `systemctl status`), 1 when one holds it but does not answer
    (starting, or stuck)."""
    from . import daemon_client
    from .runs import RunLookupError, check_readable, no_runs_dir

    target = _remote(remote, key, server_key, runs_dir)
    runs_dir = runs_dir or Path("runs")
    if target is None and runs_dir.is_dir():
        try:
            check_readable(runs_dir)
        except RunLookupError as exc:
            raise UserError(str(exc)) from None
    if target is not None:
        answer = _ask(runs_dir, target, "status")
    else:
        answer = daemon_client.request(runs_dir, "status") if runs_dir.is_dir() else None
        if answer is not None and not answer.get("ok"):  # an answer without the daemon's state: its reason
            raise UserError(f"the daemon of {escape(str(runs_dir.resolve()))} could not say its status: "
                            f"{answer.get('error')}")
    # a daemon that holds the directory but did not answer (starting, stuck): alive, said so, exit 1
    stuck = daemon_client.unanswering(runs_dir) if answer is None and target is None else None
    queued, ended = (answer or {}).get("queued", []), (answer or {}).get("ended", [])
    unreadable, orphans, gone, resumed, elsewhere = None, {}, [], {}, {}  # no daemon, no registry read: exit 3
    if answer is None:
        found = _queue_of_no_daemon(runs_dir, stuck)
        queued, ended, unreadable = found["queued"], found["ended"], found["unreadable"]
        orphans, gone, resumed, elsewhere = found["unwatched"], found["gone"], found["resumed"], found["elsewhere"]
    if answer is not None:
        answer = {k: v for k, v in answer.items() if k not in ("ok", "queued", "ended")}
    if as_json:
        print(json.dumps({"serving": answer is not None or stuck is not None, **(answer or {}), "queued": queued,
                          "ended": ended, **({"registry_error": unreadable} if unreadable else {}),
                          **({"answering": False, "pid": stuck[0], "error": stuck[1]} if stuck else {}),
                          **({"unwatched": orphans, "unwatched_gone": gone} if answer is None and not stuck else {}),
                          # whose queue this is, and a mistyped --runs-dir said, not taken for an idle queue
                          **({"runs_dir": str(runs_dir.resolve())} if answer is None else {}),
                          **({"runs_dir_error": no_runs_dir(runs_dir)} if answer is None and not runs_dir.is_dir()
                             else {})}))
    elif stuck is not None:
        out.print(escape(stuck[1]) + (f"; {len(queued)} run(s) queued" if queued else "")
                  + (f"; its queue is unknown: {escape(unreadable)}" if unreadable else ""))
    elif answer is None:
        _print_no_daemon(runs_dir, queued, unreadable, orphans, gone, resumed, elsewhere)
    else:
        _print_serving(answer, runs_dir, queued, here=target is None)
    if not as_json:
        for job in ended:  # a remote key's only view of how its submissions went
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(job["ended_ts"])) if job.get("ended_ts") else "?"
            # why it failed, or who stopped it and why (a remote `daemon cancel` names the key)
            why = job.get("error") or (job.get("status") == "stopped" and "; ".join(job.get("stop_reasons") or []))
            out.print(f"  ended {escape(str(job.get('run')))} {when}: {escape(str(job.get('status')))}"
                      + (f" ({escape(str(why))})" if why else ""))
    raise typer.Exit(code=0 if answer is not None else 1 if stuck is not None else 3)


def _print_no_daemon(runs_dir: Path, queued: list[str], unreadable: str | None, orphans: dict[str, int],
                     gone: list[str], resumed: dict[str, int], elsewhere: dict[str, int]) -> None:
    """`daemon status` with no daemon: what starts the runs queued, and the runs no daemon watches."""
    from . import daemon_queue
    from .runs import no_runs_dir

    out.print(f"no daemon serves {escape(str(runs_dir.resolve()))}"  # and what starts the ones queued
              + ("" if runs_dir.is_dir() else f": {escape(no_runs_dir(runs_dir))}")
              + (f"; {len(queued)} run(s) queued: `trainbus daemon start --runs-dir "
                 f"{escape(shlex.quote(str(runs_dir)))}` starts them" if queued else "")
              + (f"; its queue is unknown: {escape(unreadable)}" if unreadable else ""))
    for run_id, pid in orphans.items():
        out.print(f"  running {run_id} (pid {pid}), started by a daemon that is gone: `trainbus daemon start"
                  f"{escape(daemon_queue.runs_dir_option(runs_dir))}` watches it again")
    for run_id in gone:
        option = escape(daemon_queue.runs_dir_option(runs_dir))
        if run_id in elsewhere:
            out.print(f"  gone {run_id}: started by a daemon that is gone; the run goes on in a kernel the daemon did "
                      f"not start (pid {elsewhere[run_id]}), and `trainbus daemon start{option}` records the daemon's "
                      f"part as ended")
            continue
        out.print(f"  gone {run_id}: started by a daemon that is gone, and its kernel is gone too (`trainbus runs "
                  f"show {run_id}{option}` says how it ended; `trainbus daemon start{option}` "
                  + (f"resumes it from its newest checkpoint (--max-resumes: {resumed[run_id]} left))"
                     if run_id in resumed else "records it as ended)"))


def _print_serving(answer: dict[str, Any], runs_dir: Path, queued: list[str], here: bool) -> None:
    """`daemon status` of a daemon that answered: its devices, the runs it watches, its trouble and queue;
    `here`: asked on this machine, not over --remote (whose endpoint line it would repeat)."""
    watched = answer.get("running") or {}
    out.print(f"daemon pid {answer['pid']} serves {escape(answer['runs_dir'])}: devices "
              f"{','.join(answer['devices']) or 'none'}, max concurrent {answer['max_concurrent']}")
    if answer.get("remote") and here:
        out.print("  " + _remote_line(answer["remote"], runs_dir))
    for run_id, info in watched.items():
        out.print(f"  running {run_id} (pid {info['pid']}"
                  + (f", CUDA_VISIBLE_DEVICES={','.join(info['devices'])}" if info["devices"] else "") + ")"
                  + (f", listening on {escape(str(info['listen']))}" if info.get("listen") else "")
                  + (f", resumed if it dies (--max-resumes: {info['resumes_left']} left)"
                     if isinstance(info.get("resumes_left"), int) and info["resumes_left"] > 0 else ""))
    if answer.get("trouble") and not answer.get("registry_error"):  # that one is said below
        out.print(f"  trouble: {escape(answer['trouble'])}")
    if answer.get("registry_error"):
        out.print(f"  queued: unknown: {escape(answer['registry_error'])}")
    else:
        out.print(f"  queued: {_first_of(queued)}")


def _queue_of_no_daemon(runs_dir: Path, stuck: tuple[int, str] | None) -> dict[str, Any]:
    """What the registry says with no daemon answering: the queue, the runs ended last, and the runs a daemon
    started that no daemon watches now (training still: `unwatched`; their kernel gone too: `gone`, with the
    resumes left of those the next daemon resumes); `unreadable` when the registry cannot be read."""
    from . import daemon_queue
    from .kernel_pid import kernel_process
    from .pids import process_alive
    from .registry import Registry, RegistryError, cannot_read, has_registry

    queued: list[str] = []
    ended: list[dict[str, Any]] = []
    unreadable = None
    orphans: dict[str, int] = {}
    gone: list[str] = []
    resumed: dict[str, int] = {}
    elsewhere: dict[str, int] = {}
    if has_registry(runs_dir):
        try:
            with Registry(runs_dir) as registry:
                queued = registry.job_ids(["queued"])
                ended = daemon_queue.ended_jobs(registry)
                # runs a daemon started and still training while none watches them (it was killed): a daemon
                # started again adopts them
                started = registry.jobs(["starting", "running"]) if stuck is None else []  # the stuck one's
                orphans = {job["id"]: job["pid"] for job in started
                           if job["pid"] is not None and process_alive(job["pid"], job["pid_started"])}
                # and those whose kernel is gone too (killed with the daemon, or after it): ended, though no daemon
                # settled them yet; left out, the run a user looks for was in no line at all
                gone = [job["id"] for job in started if job["pid"] is not None and job["id"] not in orphans]
                # a --max-resumes run the next daemon resumes (a power cut), not records as ended
                resumed = {job["id"]: left for job in started if job["id"] in gone
                           and (left := daemon_queue.resumed_when_settled(runs_dir, job)) is not None}
                for run_id in gone:  # and those whose run goes on in a kernel no daemon started (resumed by hand)
                    pid, alive = kernel_process(runs_dir / run_id)
                    if alive:
                        elsewhere[run_id] = pid
        except RegistryError as exc:
            unreadable = str(exc)
        except sqlite3.Error as exc:  # a full disk: SQLite cannot even open it in WAL mode
            unreadable = cannot_read(runs_dir, exc)
    return {"queued": queued, "ended": ended, "unwatched": orphans, "gone": gone, "resumed": resumed,
            "elsewhere": elsewhere, "unreadable": unreadable}

