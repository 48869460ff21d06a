"""The key directory: the kernel host's CURVE pair, client pairs by role, revocation, who is authorized now.

Layout (0700, secret files 0600; pyzmq writes every file, `zmq.auth.create_certificates`):

    server.key  server.key_secret            the kernel host's pair; clients pin server.key
    monitor/NAME.key  monitor/NAME.key_secret    a client that may watch (events, replays, metric and log)
    control/NAME.key  control/NAME.key_secret    a client that may also steer (stop, checkpoint_now)
    revoked/NAME~FINGERPRINT.key                 a revoked client's public key, kept for `keys list`

A client is authorized while its public key is in monitor/ or control/: the ZAP authenticator asks at
every handshake, and the control socket at most once a second (`KeyRing.lookup`), so `trainbus keys
revoke` takes effect on a running kernel too. The secret halves of client pairs are for the clients'
machines: copy each one there and delete it here.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq.auth

from trainbus.proto.remote import (ROLES, SECRET_SUFFIX, SERVER_KEY, Z85_KEY_CHARS, KeyFileError, check_secret_file,
                                   is_z85_key, keys_dir)

from .private_dirs import make_dirs, others_can_write

REVOKED = "revoked"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
REFRESH_INTERVAL_S = 1.0  # how stale the control socket's view of revocations may be

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientKey:
    name: str
    role: str  # one of ROLES, or "revoked"
    public: str  # z85: the CURVE User-Id of its connections; "" for a file that holds no key (it lets nobody in)
    path: Path
    problem: str = ""  # why the file holds no key, naming it and the fix; "" for a key


class KeyStore:
    """One key directory: generate, list and revoke key pairs."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    @property
    def keys_dir_option(self) -> str:
        """` --keys-dir DIR` when this is not the default directory: a `trainbus keys` command we suggest must act
        on this one."""
        return "" if self.directory == keys_dir() else f" --keys-dir {self.directory}"

    @property
    def server_secret(self) -> Path:
        return self.directory / f"{SERVER_KEY}{SECRET_SUFFIX}"

    @property
    def server_public(self) -> Path:
        return self.directory / f"{SERVER_KEY}.key"

    def generate_server(self, force: bool = False) -> tuple[Path, Path]:
        if self.server_secret.exists() and not force:
            raise KeyFileError(f"{self.server_secret} exists; clients pin its public key, so replacing it locks "
                               f"them out: give --force to do it anyway")
        return self._create(self.directory, SERVER_KEY)

    def generate_client(self, name: str, role: str) -> tuple[Path, Path]:
        if role not in ROLES:
            raise KeyFileError(f"role {role!r} is not one of {', '.join(ROLES)}")
        if not NAME_PATTERN.fullmatch(name) or name == SERVER_KEY:
            raise KeyFileError(f"key name {name!r}: use letters, digits, _ . @ - (up to 64), not {SERVER_KEY!r}")
        held = [k for k in self.clients(unreadable=True) if k.name == name and k.role != REVOKED]
        if held and held[0].problem:
            raise KeyFileError(held[0].problem)
        if held:
            raise KeyFileError(f"a {held[0].role} key named {name!r} exists ({held[0].path}); revoke it first, "
                               f"or pick another name")
        return self._create(self.directory / role, name)

    def revoke(self, name: str) -> ClientKey:
        """Move the client's public key to revoked/ and delete its secret half; it is refused from now on."""
        for key in self.clients(unreadable=True):  # an unreadable file too: revoking is one of its fixes
            if key.name == name and key.role != REVOKED:
                # a name can be revoked twice; a file that holds no key has no fingerprint to tell them apart
                fingerprint = hashlib.sha256(key.public.encode()).hexdigest()[:8] if key.public else \
                    secrets.token_hex(4)
                try:
                    (self.directory / REVOKED).mkdir(mode=0o700, exist_ok=True)
                    key.path.replace(self.directory / REVOKED / f"{name}~{fingerprint}.key")
                except OSError as exc:  # a read-only mount, a directory of someone else's: nothing was moved
                    raise KeyFileError(f"cannot revoke {key.role} key {name}: {exc.strerror or exc} "
                                       f"({exc.filename}); it still lets its holder in: revoke it where its key "
                                       f"directory can be written (as its owner, on a mount that is not read-only), "
                                       f"or delete {key.path} there") from None
                key.path.with_suffix(SECRET_SUFFIX).unlink(missing_ok=True)
                return key
        revoked = [key for key in self.clients(unreadable=True) if key.name == name and key.role == REVOKED]
        if revoked:  # a second revoke: not a typo's "no such key", which keys list would contradict
            raise KeyFileError(f"client key {name!r} is revoked already ({revoked[-1].path}): it lets nothing in; "
                               f"`trainbus keys list{self.keys_dir_option}` shows the keys")
        if name == SERVER_KEY:  # `keys list` lists the host's pair as `server`: no client key may take that name
            raise KeyFileError(f"the server's pair is not revoked as a client key is: `trainbus keys generate server "
                               f"--force{self.keys_dir_option}` replaces it (every client then needs the new "
                               f"{self.server_public.name})")
        raise KeyFileError(f"no client key named {name!r} in {self.directory}; "
                           f"`trainbus keys list{self.keys_dir_option}` shows them")

    def clients(self, unreadable: bool = False) -> list[ClientKey]:
        """Every client key, authorized (by role) and revoked. A file gone by the time it is read (a revoke moved
        it) is left out. One that holds no key (being written by `keys generate`, garbled, a directory) lets nobody
        in and must not keep everyone else out: left out too, unless `unreadable`, where it comes with public ""
        and its `problem`, for `keys list` to show and `keys revoke` to move away."""
        found = []
        for role in (*ROLES, REVOKED):
            for path in sorted((self.directory / role).glob("*.key")):
                name = path.name.removesuffix(".key").partition("~")[0]
                try:
                    found.append(ClientKey(name, role, _read_public(path), path))
                except ValueError as exc:
                    if unreadable and path.exists():
                        fix = "delete it" if role == REVOKED else \
                            f"delete it, or `trainbus keys revoke {name}{self.keys_dir_option}`"
                        found.append(ClientKey(name, role, "", path, f"client key file {path} is not a readable "
                                                                     f"CURVE public key ({exc}): {fix}"))
        return found

    def check_secrets(self) -> None:
        """KeyFileError naming the first secret file here that is empty or readable by others, or what others could
        write (who_else_can_write)."""
        why = self.who_else_can_write()
        if why:
            raise KeyFileError(why)
        for path in sorted(self.directory.glob(f"**/*{SECRET_SUFFIX}")):
            try:
                check_secret_file(path)
            except KeyFileError:
                if path.is_file() and not path.is_symlink() and path.stat().st_size == 0 \
                        and not path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                    raise KeyFileError(self._empty_secret(path)) from None
                raise

    def _empty_secret(self, path: Path) -> str:
        """Why an empty secret file here is refused, with a fix that works as written: the server's pair made
        again (`keys generate server` keeps an existing one without --force), or a client's secret deleted, which
        the host never needs (its holder has a copy)."""
        where = self.keys_dir_option
        if path == self.server_secret:
            return (f"secret key file {path} is empty; fix: make the server's key pair again with `trainbus keys "
                    f"generate server --force{where}`, then give the clients the new {self.server_public.name}")
        name, role = path.name.removesuffix(SECRET_SUFFIX), path.parent.name
        again = (f"; to make that key again, `trainbus keys revoke {name}{where}`, then `trainbus keys generate "
                 f"client {name} --role {role}{where}`" if role in ROLES else "")
        return (f"secret key file {path} is empty; fix: delete it (`rm {path}`): the host needs only {name}.key, and "
                f"the client uses its own copy{again}")

    def who_else_can_write(self) -> str | None:
        """Why another user could change which keys are let in, naming the fix; None when nobody can. A key another
        user drops into control/ is let in with that role, and one who can rename this directory (a folder above
        it writable by others: `keys generate` under umask 000 made them so) can put a directory of theirs in its
        place, so who may write here, or above, decides who steers the run (and, on a daemon, runs code)."""
        for path in [self.directory, *sorted(p for p in self.directory.iterdir() if p.is_dir()),
                     *sorted(self.directory.glob("*/*.key")), *sorted(self.directory.glob("*.key"))]:
            try:
                info = path.stat()
            except FileNotFoundError:  # moved away as it was listed (`keys revoke`), or a link to nothing
                continue
            if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or info.st_uid != os.geteuid():
                what = "key directory" if path.is_dir() else "public key file"
                return (f"{what} {path} could be written by others (mode {stat.S_IMODE(info.st_mode):o}, owner uid "
                        f"{info.st_uid}); fix: chown it to yourself and chmod {'700' if path.is_dir() else '644'} "
                        f"{path}")
        # the directory itself is ours (above): what is left to look at is the folders above it
        return others_can_write(self.directory, stake="they could put a key directory of their own, with their keys, "
                                                      "in its place")

    def _create(self, directory: Path, name: str) -> tuple[Path, Path]:
        try:
            make_dirs(self.directory.parent)  # 0755 at most: Path.mkdir's parents are 0777 less the umask
            self.directory.mkdir(mode=0o700, exist_ok=True)
            self.directory.chmod(0o700)
            directory.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:  # a read-only mount, a folder of someone else's
            raise self._unwritable(directory, exc) from None
        pair = (directory / f"{name}.key", directory / f"{name}{SECRET_SUFFIX}")
        replaced = {path for path in pair if path.exists()}  # --force's: the old server pair
        try:
            # Inside a 0700 directory nobody else can open the secret file before it is tightened below
            # (pyzmq writes it with the umask's mode, 0644 by default).
            public, secret = zmq.auth.create_certificates(directory, name)
            Path(secret).chmod(0o600)
            Path(public).chmod(0o644)  # whatever the umask (002 makes it group-writable, which check_secrets refuses)
        except OSError as exc:  # a full disk: the half written goes, or a public key with no secret would stay
            for path in set(pair) - replaced:
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
            raise self._unwritable(directory, exc) from None
        return Path(public), Path(secret)

    @staticmethod
    def _unwritable(directory: Path, exc: OSError) -> KeyFileError:
        where = f" ({exc.filename})" if exc.filename and Path(exc.filename) != directory else ""
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        return KeyFileError(f"cannot write the key pair in {directory}: {exc.strerror or exc}{where}; "
                            f"{'free space on its disk, or ' if full else ''}give --keys-dir a directory of your own "
                            f"that you can write")


def _read_public(path: Path) -> str:
    """The z85 public key of a client key file; ValueError saying why it holds none."""
    try:
        public = zmq.auth.load_certificate(path)[0]
    except OSError as exc:
        raise ValueError(exc.strerror or str(exc)) from None
    except ValueError:
        raise ValueError("no public-key line") from None
    text = public.decode("ascii", "replace")
    if not is_z85_key(text):  # `public-key = ""`, or a key cut short: no client could hold it
        raise ValueError(f"its public-key is not {Z85_KEY_CHARS} characters of z85")
    return text


class KeyRing:
    """Who is authorized now: z85 public key -> ClientKey, read from the role directories.

    Re-read at every handshake (a few small files) and otherwise at most once every REFRESH_INTERVAL_S.
    Read from two threads (the ZAP authenticator's and the bus's); the map is swapped whole.
    """

    def __init__(self, store: KeyStore):
        self.store = store
        self._lock = threading.Lock()
        self._checked = float("-inf")
        self._by_public: dict[str, ClientKey] = {}
        self._revocations = 0  # times an authorized key was found gone
        self._unsafe: str | None = None  # why another user could change the key directory, when they could

    def lookup(self, public: str, now: float | None = None, fresh: bool = False) -> ClientKey | None:
        """The authorized key with this z85 public key, or None."""
        now = time.monotonic() if now is None else now
        if fresh or now - self._checked >= REFRESH_INTERVAL_S:
            self._refresh(now)
        return self._by_public.get(public)

    def revocations(self, now: float | None = None) -> int:
        """How many times so far a key this ring authorized was found gone (revoked), the directory re-read if
        it was last read REFRESH_INTERVAL_S ago or more: a count that grows means someone must be cut off."""
        now = time.monotonic() if now is None else now
        if now - self._checked >= REFRESH_INTERVAL_S:
            self._refresh(now)
        return self._revocations

    @property
    def unsafe(self) -> str | None:
        """Why no key is let in now (another user could change the key directory), as last read; None when safe."""
        return self._unsafe

    def callback(self, domain: str, key: bytes) -> bool:
        """zmq.auth's credentials provider: asked at every CURVE handshake with the client's z85 key."""
        return self.lookup(key.decode("ascii", "replace"), fresh=True) is not None

    def _refresh(self, now: float) -> None:
        with self._lock:
            self._checked = now
            # Per file, not all or nothing: a key another `trainbus keys` command is writing or moving at this
            # handshake once refused everyone, and libzmq never retries a connection ZAP refused.
            try:
                unsafe = self.store.who_else_can_write()
                keys = [] if unsafe else [k for k in self.store.clients() if k.role in ROLES]
            except OSError:  # the directory itself unreadable: nobody new gets in meanwhile
                unsafe, keys = None, []
            if unsafe and unsafe != self._unsafe:  # said once: every handshake looks again
                log.error("no client key is let in while another user could change the key directory: %s", unsafe)
            self._unsafe = unsafe
            by_public = {k.public: k for k in keys}
            if self._by_public.keys() - by_public.keys():
                self._revocations += 1
            self._by_public = by_public
