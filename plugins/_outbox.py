"""A durable mail outbox: messages are .eml files on disk, sent over SMTP with backoff by whoever holds its lock.

A message is written (fsynced, renamed into place) before the event that caused it is acknowledged,
so a crash of the e-mail plugin never loses it: the next incarnation, or the background sender the
plugin leaves behind when the run ends with mail still unsent, finds it here. Sent messages move to
sent/, and ones that could not go out within the retry window (or were refused for good) to failed/.
One flock on the folder makes sure two senders never send the same message.
"""

from __future__ import annotations

import email
import email.policy
import fcntl
import ipaddress
import json
import os
import smtplib
import socket
import ssl
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ._durable_files import fsync_directory

SECURITY_MODES = ("starttls", "ssl", "none")
DEFAULT_PORTS = {"starttls": 587, "ssl": 465, "none": 25}
IMPLICIT_TLS_PORT = 465  # mail submission over TLS from the first byte: only security = "ssl" speaks to it
SETTINGS_FILE = "smtp.json"  # what a background sender needs; never a password
LOCK_FILE = ".lock"
PERMANENT_SMTP_CODE = 500  # a 5xx reply (bad address, refused auth) will not get better by retrying

Say = Callable[[str, str], None]  # (text, level)


class SmtpConfigError(ValueError):
    """An SMTP setting that cannot work: the message names the setting and the fix."""


@dataclass
class SmtpConfig:
    host: str
    port: int
    security: str
    username: str
    password_env: str
    password_file: str
    timeout_s: float
    min_interval_s: float  # rate limit: at least this long between two messages
    retry_initial_s: float
    retry_max_s: float
    retry_window_s: float  # a message not sent this long after it was written is given up

    def check(self) -> None:
        if self.security not in SECURITY_MODES:
            raise SmtpConfigError(f"email security must be one of {', '.join(SECURITY_MODES)}, got {self.security!r}")
        if not self.host:
            raise SmtpConfigError("email host must name the SMTP server")
        name, _, port = self.host.rpartition(":")
        if name and ":" not in name and port.isdigit():  # one colon: a port (an IPv6 address has several)
            raise SmtpConfigError(f"email host {self.host!r} has a port in it, which would be looked up as part of "
                                  f"the name; give them apart: host = \"{name}\", port = {port}")
        if self.resolved_port() == IMPLICIT_TLS_PORT and self.security != "ssl":  # no greeting before TLS there
            raise SmtpConfigError(f"email port {IMPLICIT_TLS_PORT} speaks TLS from its first byte (RFC 8314), but "
                                  f"security = {self.security!r} waits for a plain-text greeting it never sends: set "
                                  f"security = \"ssl\" for port {IMPLICIT_TLS_PORT}, or port = 587 for starttls")
        if self.username and self.security == "none" and not _on_this_machine(self.host):
            raise SmtpConfigError(f"email username {self.username!r} with security = \"none\" would send its password "
                                  f"to {self.host} in plain text, for anyone on the path to read: set security = "
                                  f"\"starttls\" (port 587) or \"ssl\" (465); plain text only to a relay on this "
                                  f"machine (host = \"localhost\")")
        if self.password_file and not self.username:
            raise SmtpConfigError(f"email password_file {Path(self.password_file).expanduser()} is set but username "
                                  f"is not: no login is made, so no password is read; set username (the SMTP "
                                  f"login), or drop password_file")
        if self.username and self.password() is None:
            raise SmtpConfigError(f"email username {self.username!r} is set but no password is: export "
                                  f"{self.password_env or 'a variable named by password_env'} or set password_file")
        if self.retry_initial_s <= 0:  # the setting's min keeps it above 0; a config built by hand may not
            raise SmtpConfigError(f"email retry_initial_s = {self.retry_initial_s:g} is not allowed; give a number "
                                  f"of seconds > 0, e.g. 2")
        if self.retry_max_s < self.retry_initial_s:
            raise SmtpConfigError(f"email retry_max_s = {self.retry_max_s:g} is below retry_initial_s = "
                                  f"{self.retry_initial_s:g}: the wait before a retry starts at retry_initial_s and "
                                  f"doubles up to retry_max_s; set retry_max_s >= retry_initial_s")

    def resolved_port(self) -> int:
        return self.port or DEFAULT_PORTS[self.security]

    def password_source(self) -> str:
        """Where password() reads the password, for a line about a login the server refused."""
        if self.password_file:
            return f"password_file {Path(self.password_file).expanduser()}"
        return f"the environment variable {self.password_env}" if self.password_env else "nowhere (no password_env)"

    def password(self) -> str | None:
        """From password_file (which must be 0600 or stricter) or the variable password_env; never from config."""
        if self.password_file:
            path = Path(self.password_file).expanduser()
            try:
                mode = path.stat().st_mode
            except OSError as exc:
                raise SmtpConfigError(f"email password_file {path} cannot be read: {exc}") from None
            if not stat.S_ISREG(mode):
                raise SmtpConfigError(f"email password_file {path} is not a file; name the file that holds the "
                                      f"password (mode 0600)")
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise SmtpConfigError(f"email password_file {path} is readable by others (mode {mode & 0o777:o}); "
                                      f"chmod 600 it")
            try:
                password = path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise SmtpConfigError(f"email password_file {path} cannot be read: {exc}") from None
            except UnicodeDecodeError:
                raise SmtpConfigError(f"email password_file {path} is not UTF-8 text; write the password there as "
                                      f"one line") from None
            if not password:  # every login would fail, one mail at a time, till the run's end
                raise SmtpConfigError(f"email password_file {path} is empty; write the password there as one line")
            return password
        if self.password_env and self.password_env in os.environ:
            return os.environ[self.password_env]
        return None


def send_message(raw: bytes, config: SmtpConfig) -> dict[str, tuple[int, bytes]]:
    """One SMTP session for one message; raises OSError or smtplib.SMTPException when it does not go out. Returns
    the recipients the server refused while it took the others (address -> (code, reply)): the mail went."""
    message = email.message_from_bytes(raw, policy=email.policy.SMTP)
    local = socket.gethostname()  # not getfqdn(): that may wait on DNS for seconds
    if config.security == "ssl":
        client = smtplib.SMTP_SSL(config.host, config.resolved_port(), local_hostname=local,
                                  timeout=config.timeout_s, context=ssl.create_default_context())
    else:
        client = smtplib.SMTP(config.host, config.resolved_port(), local_hostname=local, timeout=config.timeout_s)
    with client:
        if config.security == "starttls":
            client.starttls(context=ssl.create_default_context())
        if config.username:
            client.ehlo_or_helo_if_needed()  # after STARTTLS the server says again what it offers
            if not client.has_extn("auth"):
                raise LoginNotOffered("SMTP AUTH extension not supported by server")
            client.login(config.username, config.password() or "")
        return client.send_message(message)


class LoginNotOffered(smtplib.SMTPNotSupportedError):
    """A username is set, but the server offers no login (over this connection): the settings, not its state."""


@dataclass
class _Attempts:
    count: int = 0
    next_at: float = 0.0  # monotonic
    backoff_s: float = 0.0
    last_error: str = ""  # why the last try failed, for the run's summary


@dataclass
class Outbox:
    """The folder: <name>.eml waiting, sent/<name>.eml done, failed/<name>.eml given up."""

    path: Path
    _attempts: dict[str, _Attempts] = field(default_factory=dict)
    _last_sent_at: float = float("-inf")
    _lock_fd: int | None = None
    # (message, server, monotonic start) of the try under way: one still waiting for a silent server is a failure too
    _in_flight: tuple[str, str, float] | None = None

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        for folder in (self.path, self.path / "sent", self.path / "failed"):
            folder.mkdir(parents=True, exist_ok=True)

    # writing

    def put(self, name: str, raw: bytes) -> bool:
        """Store a message durably under `name`; False if one of that name was stored before (a replayed event)."""
        if self.known(name):
            return False
        temporary = self.path / f".{name}.tmp"
        with open(temporary, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self.path / name)
        fsync_directory(self.path)
        return True

    def known(self, name: str) -> bool:
        return any((folder / name).exists() for folder in (self.path, self.path / "sent", self.path / "failed"))

    def pending(self) -> list[Path]:
        return sorted(self.path.glob("*.eml"))

    def last_failure(self) -> str:
        """Why the last failed try of a message still pending failed ("" when none of them failed yet)."""
        pending = {path.name for path in self.pending()}
        attempts = list(self._attempts.items())  # a copy: the sender thread may still be adding or removing one
        failed = next((a.last_error for name, a in reversed(attempts) if name in pending and a.last_error), "")
        in_flight = self._in_flight
        if not failed and in_flight is not None and in_flight[0] in pending:
            name, server, started = in_flight
            return f"no answer from {server} in {time.monotonic() - started:.1f} s, still waiting"
        return failed

    def count(self) -> int:
        return sum(len(list(folder.glob("*.eml"))) for folder in (self.path, self.path / "sent", self.path / "failed"))

    def save_config(self, config: SmtpConfig) -> None:
        temporary = self.path / f".{SETTINGS_FILE}.tmp"
        temporary.write_text(json.dumps(asdict(config)))
        os.replace(temporary, self.path / SETTINGS_FILE)

    def load_config(self) -> SmtpConfig:
        return SmtpConfig(**json.loads((self.path / SETTINGS_FILE).read_text()))

    # the lock: one sender at a time

    def try_lock(self) -> bool:
        if self._lock_fd is not None:
            return True
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    # sending

    def deliver_due(self, config: SmtpConfig, say: Say) -> float | None:
        """Send every message whose time has come (the lock must be held); return seconds until the next is due.

        None means nothing is pending. Never raises for the network: a failure schedules a retry with a
        doubling backoff, a 5xx refusal or an expired retry window moves the message to failed/.
        """
        waits = []
        for path in self.pending():
            now = time.monotonic()
            attempts = self._attempts.setdefault(path.name, _Attempts(backoff_s=config.retry_initial_s))
            if now < attempts.next_at:
                waits.append(attempts.next_at - now)
                continue
            if time.time() - path.stat().st_mtime > config.retry_window_s:
                self._give_up(path, f"not sent within retry_window_s {config.retry_window_s:g} "
                                    f"({attempts.count} attempts)", say)
                continue
            spacing = self._last_sent_at + config.min_interval_s - now
            if spacing > 0:  # rate limit
                waits.append(spacing)
                break
            self._in_flight = (path.name, f"{config.host}:{config.resolved_port()}", now)
            try:
                refused = send_message(path.read_bytes(), config)
            except (OSError, smtplib.SMTPException) as exc:
                attempts.count += 1
                attempts.last_error = _why_not_sent(exc, config)
                code = _smtp_code(exc)
                if isinstance(exc, smtplib.SMTPAuthenticationError) and code >= PERMANENT_SMTP_CODE:
                    self._give_up(path, f"{config.host}:{config.resolved_port()} refused the login ({code} "
                                        f"{_reply_text(exc)}): check username {config.username!r} and the password "
                                        f"from {config.password_source()}", say)
                    continue
                if code >= PERMANENT_SMTP_CODE:
                    self._give_up(path, f"refused by the server: {code} {exc}", say)
                    continue
                if isinstance(exc, LoginNotOffered):  # `security` was not the setting at fault: do not name it so
                    self._give_up(path, f"{config.host}:{config.resolved_port()} offers no login (SMTP AUTH) over "
                                        f"this connection, but username {config.username!r} is set: leave username "
                                        f"empty for a server that takes mail without one, or use security = "
                                        f"\"starttls\" or \"ssl\" where it offers login only over TLS", say)
                    continue
                if isinstance(exc, ssl.SSLError) and exc.reason == "WRONG_VERSION_NUMBER":  # plain text came back
                    self._give_up(path, f"{config.host}:{config.resolved_port()} speaks no TLS at once, yet security = "
                                        f"\"ssl\" ({exc}): set security = \"starttls\" for a port that starts in "
                                        f"plain text (587), or \"none\" for a server that offers no encryption", say)
                    continue
                if isinstance(exc, ssl.SSLCertVerificationError):  # no retry makes it trusted: this machine's setup
                    self._give_up(path, f"{config.host}:{config.resolved_port()}'s TLS certificate is not trusted "
                                        f"here ({exc.verify_message or exc}): set host to the name its certificate "
                                        f"is for, or have this machine trust the CA that signed it (SSL_CERT_FILE="
                                        f"/path/to/ca.pem in the run's environment)", say)
                    continue
                if isinstance(exc, smtplib.SMTPNotSupportedError):  # the settings, not the server's state: no retry
                    self._give_up(path, f"{config.host}:{config.resolved_port()} does not support what `security` "
                                        f"asks ({exc}): set security = \"ssl\" for a TLS port (465), or \"none\" for a "
                                        f"server that offers no encryption (a relay on this machine)", say)
                    continue
                attempts.next_at = now + attempts.backoff_s
                attempts.backoff_s = min(attempts.backoff_s * 2, config.retry_max_s)
                if attempts.count == 1:
                    say(f"e-mail {path.name} not sent ({attempts.last_error}); retrying with backoff "
                        f"for up to {config.retry_window_s:g} s", "warning")
                waits.append(attempts.next_at - now)
                continue
            finally:
                self._in_flight = None
            self._last_sent_at = time.monotonic()
            os.replace(path, self.path / "sent" / path.name)
            self._attempts.pop(path.name, None)
            if refused:  # a typo among the addresses: those get nothing, and no retry changes that
                said = "; ".join(f"{address} ({code} {_reply_text_of(reply)})" for address, (code, reply)
                                 in refused.items())
                say(f"e-mail {path.name} sent, but {config.host}:{config.resolved_port()} refused recipient(s) "
                    f"{said}: they get no mail; fix them in the email plugin's recipients", "error")
        if not self.pending():
            return None
        return max(0.0, min(waits)) if waits else 0.0

    def _give_up(self, path: Path, why: str, say: Say) -> None:
        os.replace(path, self.path / "failed" / path.name)
        self._attempts.pop(path.name, None)
        say(f"e-mail {path.name} given up: {why}; it is kept in {self.path / 'failed'}", "error")


def deliver_until_empty(outbox: Outbox, config: SmtpConfig, say: Say, poll_s: float = 1.0) -> None:
    """The background sender's loop (the lock must be held): send, wait for the next due time, until none is left."""
    while True:
        wait = outbox.deliver_due(config, say)
        if wait is None:
            return
        time.sleep(min(max(wait, 0.01), poll_s))


def _why_not_sent(exc: Exception, config: SmtpConfig) -> str:
    """A failed try, as its reader can act on it: a name that does not resolve is most often a typo in `host`, but
    may be a resolver down for a while, so the mail is still tried again."""
    if isinstance(exc, socket.gaierror):
        return (f"{config.host} does not resolve ({exc.strerror or exc}): check `host` in the email plugin's "
                f"settings, and this machine's DNS")
    if isinstance(exc, ConnectionRefusedError):
        return (f"{config.host}:{config.resolved_port()} refused the connection: is an SMTP server listening there "
                f"(`host`, `port`)?")
    return f"{type(exc).__name__}: {exc}"


def _reply_text(exc: smtplib.SMTPResponseException) -> str:
    """The server's reply text, as it said it (not the bytes' repr)."""
    return _reply_text_of(exc.smtp_error)


def _reply_text_of(text: bytes | str) -> str:
    return (text.decode(errors="replace") if isinstance(text, bytes) else str(text)).replace("\n", " ")


def _smtp_code(exc: Exception) -> int:
    """The server's reply code for a refusal (every recipient refused counts as its lowest code); 0 for
    network errors."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused) and exc.recipients:
        return min(code for code, _ in exc.recipients.values())
    return getattr(exc, "smtp_code", 0) or 0


def _on_this_machine(host: str) -> bool:
    """A host name or address that is this machine's loopback (what never leaves it)."""
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
