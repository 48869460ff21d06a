"""Who may speak to a run: the per-run secret, each plugin's token, the attach credential, owner-only paths."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
from pathlib import Path

from .keys import ClientKey, KeyRing
from .private_dirs import process_scratch_dir, remove_scratch_dir

CREDENTIAL_FILE = "credential"  # in the run directory, 0600: what a plugin attached by hand proves itself with
ATTACH = "attach"  # the token of the credential file: any name no spawned plugin holds
SECRET_ENV = "TRAINBUS_SECRET"
SUN_PATH_MAX = 100  # sockaddr_un.sun_path holds 108 bytes on Linux, 104 on macOS; keep a margin


def _same(token: str, expected: str) -> bool:
    """A constant-time comparison of a peer's secret with ours, as bytes: compare_digest refuses a str with a character
    outside ASCII (TypeError), which any peer may send (a credential read with a byte-order mark)."""
    return hmac.compare_digest(token.encode(), expected.encode())


class Credentials:
    """One run's secret and the tokens derived from it.

    A spawned plugin gets the token for its own name (HMAC of the run secret), so a plugin can claim no
    other plugin's name; the credential file's token lets a hand-started plugin take any name that no
    spawned plugin holds. A remote peer proves itself by its CURVE key instead (ZAP's User-Id): a key in
    the key directory, whose role (monitor, control) says what it may send (kernel/peers.py).
    """

    def __init__(self, keyring: KeyRing | None = None) -> None:
        self._secret = secrets.token_bytes(32)
        self.keyring = keyring  # the authorized CURVE keys when the run listens on TCP (kernel/keys.py)

    def token_for(self, name: str) -> str:
        return hmac.new(self._secret, f"plugin:{name}".encode(), hashlib.sha256).hexdigest()

    def attach_token(self) -> str:
        return hmac.new(self._secret, ATTACH.encode(), hashlib.sha256).hexdigest()

    def check(self, name: str, token: str, spawned: bool) -> tuple[str, str] | None:
        """None when `token` proves the right to `name`; else (the refusal's code, why not)."""
        if not token:
            return "hello_secret", ("no secret in hello (spawned plugins read TRAINBUS_SECRET; attached ones the run's "
                                    "credential file)")
        if _same(token, self.token_for(name)):
            return None
        if _same(token, self.attach_token()):
            return ("hello_name_spawned", f"name {name!r} belongs to a plugin this run spawned") if spawned else None
        return "hello_secret", "wrong secret"

    def proves_owner(self, token: str) -> bool:
        """`token` is the credential file's: its sender can read the run's owner-only directory, so it is the owner."""
        return bool(token) and _same(token, self.attach_token())

    def remote_key(self, user_id: str, now: float) -> ClientKey | None:
        """The authorized key a TCP connection's User-Id (its z85 CURVE key) names, now; None once revoked."""
        return self.keyring.lookup(user_id, now) if self.keyring is not None else None

    def write_attach_file(self, run_dir: Path) -> Path:
        """The attach token, owner-only, in the run directory (never world-readable, not even briefly)."""
        path = Path(run_dir) / CREDENTIAL_FILE
        path.unlink(missing_ok=True)  # a continued run: the previous kernel's credential is void
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.attach_token() + "\n")
        return path


def socket_dir(run_dir: Path) -> Path:
    """Where the run's ipc sockets go: the run directory, or, when its path is too long for a Unix socket (or not
    UTF-8, which zmq cannot bind, or holding whitespace), a fresh directory of this kernel's own in an owner-only one
    of the temp dir (close_bus removes it; one of a kernel killed with SIGKILL is removed by the next kernel that
    makes one: private_dirs.process_scratch_dir), or of /tmp when the temp dir's path is too long or holds
    whitespace too. Whitespace: kernel.log's `sockets:` line names the endpoints for a client attached by hand, each
    read as `\\S+` (PROTOCOL.md §2), so a `~/My Drive/runs` run's could not be read."""
    if _socket_path_ok(run_dir):
        return run_dir
    name = f"trainbus-sockets-{os.getuid()}"
    for temp in dict.fromkeys([tempfile.gettempdir(), "/tmp"]):
        short = process_scratch_dir(name, temp)
        if _socket_path_ok(short):
            return short
        remove_scratch_dir(short)
    raise OSError(f"no socket path short enough and without whitespace under {tempfile.gettempdir()} or /tmp; set "
                  f"TMPDIR to a short directory")


def _socket_path_ok(directory: Path) -> bool:
    return bindable(directory / "control.sock") and not any(char.isspace() for char in str(directory))


def bindable(path: Path) -> bool:
    """Whether zmq can bind an ipc socket at path: its addresses are UTF-8 text (a byte of another encoding, a lone
    surrogate in os.fsdecode's text, cannot be one), and sun_path's limit counts bytes, not characters."""
    try:
        return len(str(path).encode()) < SUN_PATH_MAX
    except UnicodeEncodeError:
        return False
