"""What one remote key's connections can have queued in the kernel, bounded in bytes (KEY_QUEUED_MAX_BYTES).

A TCP connection queues at most CONTROL_SNDHWM messages (kernel/remote.py), plus the one libzmq is writing, so what
it holds is at most the sizes of the last QUEUED_PER_CONNECTION replies sent to it. A client that asks for replay
batches or snapshots and never reads them kept that much for each of its connections: one monitor key's 56 peers
(and the connections of peers forgotten as silent, up to the socket's 256) held up to 8 x 512 KiB each, ~100 MB of
the kernel's memory measured in 15 s, 1 GiB at worst. The ledger keeps those last sizes per connection and their
sum per key; a batch is cut to the room the key has left (one event always goes: a client reading catches up,
and its small replies push its old big ones out of the count). A connection's sizes are dropped when libzmq says
its descriptor closed (the socket monitor: kernel/remote.py Crowd), or when the control socket is replaced.
"""

from __future__ import annotations

import collections

from .remote import CONTROL_SNDHWM

KEY_QUEUED_MAX_BYTES = 24 * 1024 * 1024  # a key's connections together; one reading client needs 4.5 MiB at most
QUEUED_PER_CONNECTION = CONTROL_SNDHWM + 1  # the queue's messages, and the one being written


class ReplyLedger:
    """Per remote connection (routing id), the sizes of its last replies; per key, their sum."""

    def __init__(self, max_bytes: int = KEY_QUEUED_MAX_BYTES):
        self.max_bytes = max_bytes
        self._sizes: dict[bytes, collections.deque] = {}  # identity -> last QUEUED_PER_CONNECTION sizes
        self._key: dict[bytes, str] = {}  # identity -> its CURVE key (z85)
        self._fd: dict[bytes, int] = {}  # identity -> the descriptor its messages came from
        self._totals: collections.Counter = collections.Counter()  # key -> the sum of its connections' sizes

    def heard(self, identity: bytes, key: str, fd: int) -> None:
        """A message came from `identity`, authenticated as `key`, on descriptor `fd`."""
        if self._key.get(identity, key) != key:  # another key on that routing id: not the same connection
            self._drop(identity)
        self._key[identity] = key
        self._fd[identity] = fd

    def room(self, identity: bytes) -> int:
        """Bytes the next reply to `identity` may take and keep its key within the bound (<= 0: none)."""
        key = self._key.get(identity)
        if key is None:
            return self.max_bytes
        sizes = self._sizes.get(identity, ())
        leaving = sizes[0] if len(sizes) == QUEUED_PER_CONNECTION else 0  # pushed out of the count by this one
        return self.max_bytes - (self._totals[key] - leaving)

    def sent(self, identity: bytes, size: int) -> None:
        key = self._key.get(identity)
        if key is None:
            return
        sizes = self._sizes.setdefault(identity, collections.deque(maxlen=QUEUED_PER_CONNECTION))
        if len(sizes) == QUEUED_PER_CONNECTION:
            self._totals[key] -= sizes[0]
        sizes.append(size)
        self._totals[key] += size

    def closed(self, fds: list[int]) -> None:
        """Those descriptors' connections are gone, and what was queued for them with them."""
        gone = set(fds)
        for identity in [i for i, fd in self._fd.items() if fd in gone]:
            self._drop(identity)

    def clear(self) -> None:
        """The control socket was replaced: every connection, and its queue, went with it."""
        self._sizes.clear(), self._key.clear(), self._fd.clear(), self._totals.clear()

    def queued_bound(self, key: str) -> int:
        return self._totals[key]

    def _drop(self, identity: bytes) -> None:
        key = self._key.pop(identity, None)
        self._fd.pop(identity, None)
        sizes = self._sizes.pop(identity, ())
        if key is not None:
            self._totals[key] -= sum(sizes)
            if not self._totals[key]:
                del self._totals[key]
