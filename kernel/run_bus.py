"""A run's bus from start to end: its TCP endpoints, the bus with everything it serves (supervisor, credentials,
peers, the checkpoint half), the waits for the plugins' hello and for the durable ones to catch up, and the close."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable

from trainbus.proto import JOURNAL_NAME
from trainbus.proto.checkpoint_format import CHECKPOINT_DIR
from trainbus.proto.codec import CONTROL_MAX_MESSAGE_BYTES
from trainbus.proto.remote import KeyFileError, write_connection_file

from .publishers import BURSTS_HWM
from .bus import Bus
from .checkpointing import Checkpointer, persister_directory
from .config import ConfigError
from .control import Dispatcher
from .credentials import Credentials, socket_dir
from .journal import BACKLOG_MAX_BYTES, SEGMENT_BYTES, Journal
from .kernel_log import KEEP
from .keys import KeyStore
from .limits import PeerLimits
from .peers import Peers
from .private_dirs import remove_scratch_dir
from .remote import TCP_EVENTS_HWM, ListenError, Listener
from .snapshot import SnapshotBuffers
from .liveness import HEARTBEAT_INTERVAL_S
from .supervisor import PluginSpec, Supervisor

log = logging.getLogger("trainbus.kernel")

PLUGIN_EXIT_TIMEOUT_S = 5.0  # after the last event, plugins get this long to exit on their own


def listen_on(listen: str, keys: KeyStore) -> Listener:
    """The run's TCP endpoints, bound (`--listen HOST:PORT`); ConfigError naming what stops them."""
    try:
        return Listener(listen, keys, TCP_EVENTS_HWM, BURSTS_HWM, CONTROL_MAX_MESSAGE_BYTES)
    except (ListenError, KeyFileError) as exc:
        raise ConfigError(str(exc)) from None


def open_bus(run_id: str, run_dir: Path, plugins: list[PluginSpec], limits: PeerLimits | None = None,
             buffers: SnapshotBuffers | None = None, every_n_epochs: int = 0, every_n_steps: int = 0,
             journal_backlog_bytes: int = BACKLOG_MAX_BYTES, journal_segment_bytes: int = SEGMENT_BYTES,
             remote: Listener | None = None, stalled_after_s: float = 0.0,
             journal_compact: bool = True) -> tuple[Bus, Checkpointer | None, Path]:
    """The run's bus with everything it serves: supervisor, credentials and peers, the checkpoint half; with
    `remote` (_listen's), its TCP endpoints too, described in <run_dir>/connection.json.

    Returns the bus (not started), the checkpointer (None without buffers) and the sockets' directory.
    """
    if remote is not None:
        write_connection_file(run_dir, run_id, remote.control_endpoint, remote.events_endpoint, remote.bursts_endpoint,
                              remote.server_key)
        log.info("listening on TCP (CURVE): control %s events %s bursts %s", remote.control_endpoint,
                 remote.events_endpoint, remote.bursts_endpoint, extra=KEEP)
    credentials = Credentials(remote.keyring if remote else None)
    credentials.write_attach_file(run_dir)
    journal = Journal(run_dir / JOURNAL_NAME, backlog_max_bytes=journal_backlog_bytes,
                      segment_bytes=journal_segment_bytes, compact=journal_compact)
    sockets = socket_dir(run_dir)
    bus = Bus(run_id, journal, sockets, HEARTBEAT_INTERVAL_S, remote, stalled_after_s)
    # Where a hand-attached client finds them when they are not in the run directory (PROTOCOL.md, environment).
    log.info("sockets: events %s control %s bursts %s", bus.events_endpoint, bus.control_endpoint, bus.bursts_endpoint,
             extra=KEEP)
    env = dict(os.environ, TRAINBUS_RUN_ID=run_id, TRAINBUS_RUN_DIR=str(run_dir), RUN_ID=run_id, RUN_DIR=str(run_dir),
               TRAINBUS_EVENTS=bus.events_endpoint, TRAINBUS_CONTROL=bus.control_endpoint,
               TRAINBUS_KERNEL_PID=str(os.getpid()))
    supervisor = Supervisor(plugins, env, run_dir, bus.emit, HEARTBEAT_INTERVAL_S, token_for=credentials.token_for)
    peers = Peers(credentials, supervisor, limits or PeerLimits(), supervisor.liveness_s)
    checkpointer = None
    if buffers is not None:
        # A persister's checkpoint_saved must name a file here: the run's checkpoints/, or a dirpath its config set
        # (the checkpoint plugin declares dirpath a PATH setting: relative, inside the run directory).
        directories = [run_dir / CHECKPOINT_DIR] + [d for p in plugins
                                                    if (d := persister_directory(run_dir, p.settings)) is not None]
        checkpointer = Checkpointer(buffers, peers, every_n_epochs, every_n_steps, directories,
                                    first_seq=journal.last_seq + 1)
    bus.serve(supervisor, Dispatcher(bus, supervisor, peers, checkpointer))
    return bus, checkpointer, sockets


def close_bus(bus: Bus, run_dir: Path, sockets: Path, plugin_exit_timeout_s: float = PLUGIN_EXIT_TIMEOUT_S,
              abort: Callable[[], bool] = lambda: False) -> OSError | None:
    """Flush, let plugins exit (bounded, or until abort()), stop the bus with its journal and sockets, remove a
    sockets' directory of its own; the journal's last error, if any."""
    bus.flush_now()
    bus.supervisor.shutdown(plugin_exit_timeout_s, abort)
    # after the plugins' last words (a final checkpoint_saved): a client that got bus_closing has had every event
    # of the run (`attach --json` ends on it); the bus thread numbers it last, as it stops
    bus.announce_close = True
    error = bus.close()
    if sockets != run_dir:
        remove_scratch_dir(sockets)
    return error


def wait_ready(bus: Bus, timeout_s: float) -> list[str]:
    """Wait until every spawned plugin said hello (or failed); return the names still missing."""
    def missing() -> list[str]:
        welcomed = bus.control.peers.welcomed_names()
        return [n for n in bus.supervisor.live_names() if n not in welcomed]
    bus.wait(lambda: not missing(), timeout_s)
    bus.fast_heartbeats = False
    bus.supervisor.training_starts()  # the ones still missing finish starting below training
    return missing()


def wait_drained(bus: Bus, timeout_s: float, abort: Callable[[], bool] = lambda: False) -> dict[str, int]:
    """Wait until every durable plugin that may still return acked the final event; return {name: acked} of laggards."""
    bus.flush_now()
    # Drained is the final event acked. A flush held up past flush_now's wait (the journal's disk) may not have
    # numbered it yet: until then no plugin has it, whatever it acked, and every durable one is behind.
    final = lambda: bus.final_seq if bus.ended else bus.last_seq + 1  # noqa: E731
    behind = lambda seq: bus.control.peers.durable_behind(seq, time.monotonic())  # noqa: E731

    def reachable() -> int:
        """What a plugin can have: while the journal's disk refuses, its backlog is published to none (journal
        first), so the wait is for what was journaled; a disk that takes it again makes it the final event."""
        return min(final(), bus.journal.written_seq) if bus.journal.error is not None else final()
    bus.wait(lambda: not behind(reachable()) or abort(), timeout_s)
    return behind(final())
