"""`trainbus keys`: CURVE key pairs for remote plugins, attach and the daemon's remote endpoint."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.markup import escape
from rich.table import Table

from .cli_common import KEYS_DIR_HELP, UserError, _wide, keys_dir_path, out

if TYPE_CHECKING:
    from .keys import KeyStore

keys_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                       help="CURVE keys for remote plugins and attach: a server pair per host, a client pair "
                            "per person.")


def _store(keys_dir: Optional[Path]) -> KeyStore:
    """The KeyStore of --keys-dir, else $TRAINBUS_KEYS_DIR, else the default directory; UserError when that path,
    or the nearest folder above it that is there, is a file: the directory is made, with its parents, when
    missing."""
    from trainbus.proto.remote import KEYS_DIR_ENV, keys_dir as default_keys_dir

    from .keys import KeyStore

    directory = default_keys_dir(keys_dir)
    there = next((path for path in (directory, *directory.parents) if path.exists()), directory)
    if there.exists() and not there.is_dir():
        below = "" if there == directory else f": {there}"
        if keys_dir is None and not os.environ.get(KEYS_DIR_ENV):
            raise UserError(f"key directory {directory}{below} is a file, not a directory: move it away, or give "
                            f"--keys-dir DIR")
        given = "--keys-dir" if keys_dir is not None else f"${KEYS_DIR_ENV}"
        raise UserError(f"{given} {directory}{below} is a file, not a directory: give a directory (created if "
                        f"missing)")
    return KeyStore(directory)


@keys_app.command("generate")
def keys_generate(
    kind: str = typer.Argument(..., help="server (this kernel host's pair) or client (one person or machine)."),
    name: Optional[str] = typer.Argument(None, help="The client's name, e.g. alice or gpu-box-3."),
    role: Optional[str] = typer.Option(None, "--role", help="A client's: monitor (events, replays, metric and log; "
                                                             "the default when left out) or control (also stop and "
                                                             "checkpoint_now, and a daemon's submit and cancel)."),
    force: bool = typer.Option(False, "--force", help="Replace the server pair (clients pinned to it are locked out)."),
    keys_dir: Optional[Path] = typer.Option(None, "--keys-dir", parser=keys_dir_path, help=KEYS_DIR_HELP),
) -> None:
    """Make a CURVE key pair: public NAME.key and secret NAME.key_secret (0600, in a 0700 directory)."""
    from trainbus.proto.remote import KeyFileError

    if kind == "server" and name is not None:  # a client named NAME was likely meant: not dropped without a word
        raise UserError(f"`server` takes no NAME (there is one server pair per host): for a client's pair, give "
                        f"`client {name}`")
    if kind == "server" and role is not None:  # a server pair has no role: the role is each client key's
        raise UserError(f"`server` takes no --role (roles are the client keys'): give `client NAME --role {role}`")
    store = _store(keys_dir)
    try:
        if kind == "server":
            public, secret = store.generate_server(force)
        elif kind == "client" and name:
            public, secret = store.generate_client(name, role or "monitor")
        else:
            raise UserError("give `server`, or `client NAME --role monitor|control`")
    except KeyFileError as exc:
        raise UserError(str(exc)) from None
    out.print(escape(f"public key: {public}\nsecret key: {secret}"))  # paths, as they are: never markup
    if kind == "client":
        out.print(escape(_role_said(name, role, store)))
        keys = f"--key {secret.name} --server-key {store.server_public.name}"
        steer = "; --control to stop it or checkpoint" if role == "control" else ""
        # a client key made before the host's pair: the server.key to copy is not there yet, and says so
        server = (f"{store.server_public}" if store.server_public.exists() else
                  f"{store.server_public} (not made yet: `trainbus keys generate server{store.keys_dir_option}` "
                  f"makes it)")
        out.print(escape(f"Copy {secret} and {server} to the client's machine (then delete {secret} "
                         f"here); there: trainbus attach HOST:PORT {keys} (a run's --listen HOST:PORT{steer}) watches "
                         f"a run, and python -m trainbus.sdk MODULE:CLASS --connect HOST:PORT {keys} runs a plugin "
                         f"against it"))
    try:  # what `run --listen` would refuse these keys for, said before they are copied to the clients
        store.check_secrets()
    except KeyFileError as exc:
        print(f"trainbus: warning: a kernel or daemon refuses --listen with this key directory until this is fixed: "
              f"{exc}", file=sys.stderr)


def _role_said(name: str, role: Optional[str], store: KeyStore) -> str:
    """The role a client key got, and what it may do; a monitor key's owner learns what a control key adds and how
    to make one of that name, before a refused stop tells them."""
    if role == "control":
        return "role: control: may also stop a run and ask it to checkpoint, and submit and cancel a daemon's runs"
    given = "" if role else ", as no --role was given"
    option = store.keys_dir_option
    return (f"role: monitor (the default{given}): may watch runs (events, replays), report metrics and logs, and ask "
            f"a daemon's status, not stop or steer; for a control key of this name: `trainbus keys revoke {name}"
            f"{option}`, then `trainbus keys generate client {name} --role control{option}`")


@keys_app.command("list")
def keys_list(keys_dir: Optional[Path] = typer.Option(None, "--keys-dir", parser=keys_dir_path,
                                                      help=KEYS_DIR_HELP)) -> None:
    """The server key and every client key with its role (revoked ones too)."""
    from trainbus.proto.remote import KeyFileError, load_public

    store = _store(keys_dir)
    if not store.directory.is_dir():
        said = f"no key directory {store.directory}"
        if keys_dir is not None:  # named, so likely mistyped
            raise UserError(f"{said} (is --keys-dir right? `trainbus keys generate server{store.keys_dir_option}` "
                            f"makes one)")
        out.print(f"{escape(said)} yet: `trainbus keys generate server` makes it")
        return
    clients = store.clients(unreadable=True)
    if not clients and not store.server_public.exists():
        out.print(f"no keys in {escape(str(store.directory))} yet: `trainbus keys generate "
                  f"server{escape(store.keys_dir_option)}` makes the server's pair")
        return
    table = Table("name", "role", "public key", "file")
    problems = []
    if store.server_public.exists():
        try:
            # keys are z85 text, brackets included: escaped, or rich takes "[...]" for markup and drops it
            public = escape(load_public(store.server_public).decode())
        except KeyFileError:
            public = "unreadable"
            problems.append(f"server key file {store.server_public} is not a readable CURVE public key: `trainbus "
                            f"keys generate server --force{store.keys_dir_option}` makes a new pair (every client "
                            f"then needs the new server.key)")
        table.add_row("server", "server", public, escape(str(store.server_public)))
    for key in clients:
        table.add_row(escape(key.name), key.role, escape(key.public) or "unreadable", escape(str(key.path)))
    try:  # what a kernel would refuse to start with (an empty secret, one others can read), said here first
        store.check_secrets()
    except KeyFileError as exc:
        problems.append(str(exc))
    _wide().print(table)  # piped or narrow, keys and paths whole: they are copied and scripted
    if not clients:
        out.print(f"no client keys yet: `trainbus keys generate client NAME --role monitor|control"
                  f"{escape(store.keys_dir_option)}` makes one")
    for problem in problems + [key.problem for key in clients if key.problem]:  # below the table, whole: the fix
        out.print(escape(problem))


@keys_app.command("revoke")
def keys_revoke(
    name: str = typer.Argument(..., help="The client key's name (`trainbus keys list`)."),
    keys_dir: Optional[Path] = typer.Option(None, "--keys-dir", parser=keys_dir_path, help=KEYS_DIR_HELP),
) -> None:
    """Take a client's authorization away: new connections with its key fail the handshake, a running kernel
    refuses its control messages within a second; its public key is kept under revoked/."""
    from trainbus.proto.remote import KeyFileError

    store = _store(keys_dir)
    try:
        key = store.revoke(name)
    except KeyFileError as exc:
        raise UserError(str(exc)) from None
    # z85 has [ and ]: not markup
    out.print(escape(f"revoked {key.role} key {key.name} ({key.public or 'unreadable'})"))
