"""Change counters: "has the calendar or a hold changed?" answered without I/O or a thread hop (issue 14).

Every state store keeps two counters: ``calendar`` (bumped after every change the adapter makes to the legacy
calendar, and on every legacy change notice) and ``holds`` (bumped after every hold placed, released or turned into
a booking, and every booking in flight recorded or ended, since those are busy time too for a backend without a
lock; an expiry needs no bump because every read of holds filters by ``now``). Readers compare them with what
they saw last to know whether what they derived from the state (an availability cache, a memoised ``$find`` answer)
still holds. Reading them is a memory read: it may run on the event loop.

* ``FileCounters`` (SQLite, one host): two 64-bit integers in a small memory-mapped file beside the state file. A
  writer increments one under ``fcntl.flock`` right after the commit that changed the state and before its HTTP
  answer goes out, so any request that starts after that answer, in any worker process, reads the new value
  (``exact``: read-your-writes across workers, as with the state file itself).
* ``WatchedCounters`` (Redis, PostgreSQL: several hosts): local copies kept current by a listener thread on the
  store's change channel (Redis pub/sub, PostgreSQL LISTEN/NOTIFY), by this process's own writes at once, and by a
  re-read of the store's counters on every (re)subscription and every ``resync_seconds``: a lost message hides a
  change for at most that long. Not ``exact``: what must never be missed (another host's hold) is still read from
  the store on every request.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

log = logging.getLogger("adapter.state")

_LAYOUT = struct.Struct("<QQ")  # calendar, holds
CALENDAR = 0
HOLDS = 1


class ChangeCounters(Protocol):
    """The two counters of a state store; reads never block."""

    @property
    def exact(self) -> bool:
        """True when a read sees every bump committed before it, by any process sharing the store."""
        ...

    def calendar(self) -> int: ...

    def holds(self) -> int: ...


class FileCounters:
    """The counters of one host in a 16-byte file shared by memory mapping (see the module docstring)."""

    exact = True

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self._local = threading.Lock()  # flock does not exclude threads sharing one open file
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            if os.fstat(self._fd).st_size < _LAYOUT.size:
                os.ftruncate(self._fd, _LAYOUT.size)  # zero-filled: both counters start at 0
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._map = mmap.mmap(self._fd, _LAYOUT.size)

    def _read(self) -> tuple[int, int]:
        values: tuple[int, int] = _LAYOUT.unpack_from(self._map, 0)
        return values

    def calendar(self) -> int:
        return self._read()[CALENDAR]

    def holds(self) -> int:
        return self._read()[HOLDS]

    def bump(self, which: int) -> None:
        """Add one to a counter (``CALENDAR`` or ``HOLDS``), atomically across the processes of this host."""
        with self._local:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                values = list(self._read())
                values[which] += 1
                _LAYOUT.pack_into(self._map, 0, *values)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._local:
            if self._fd < 0:
                return
            self._map.close()
            os.close(self._fd)
            self._fd = -1


class WatchedCounters:
    """Local copies of a shared store's counters, kept current by ``watch`` in a thread (module docstring).

    ``watch(on_message, stop)`` is the store's listener loop: it subscribes, calls ``on_message()`` once subscribed
    and for every message, returns when ``stop`` is set, and raises on a lost connection (it is called again after a
    pause). ``fetch()`` reads both counters from the store.
    """

    exact = False

    def __init__(
        self,
        fetch: Callable[[], tuple[int, int]],
        watch: Callable[[Callable[[], None], threading.Event], None],
        *,
        resync_seconds: float = 1.0,
        name: str = "state",
    ) -> None:
        self._fetch = fetch
        self._watch = watch
        self.resync_seconds = resync_seconds
        self._values = (0, 0)
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._dirty = threading.Event()  # a message arrived: re-read the store's counters
        try:
            self._store(fetch())
        except Exception as exc:  # the store is down at start: the threads catch up once it is back
            log.warning("change counters: cannot read them yet (%s)", exc)
        self._threads = [
            threading.Thread(target=self._listen, name=f"{name}-counters-listen", daemon=True),
            threading.Thread(target=self._resync, name=f"{name}-counters-resync", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def calendar(self) -> int:
        return self._values[CALENDAR]

    def holds(self) -> int:
        return self._values[HOLDS]

    def _store(self, values: tuple[int, int]) -> None:
        """Never go back: a re-read that raced a newer message or an own bump must not undo it."""
        with self._guard:
            cur = self._values
            self._values = (max(cur[0], values[0]), max(cur[1], values[1]))

    def seen(self, which: int, value: int) -> None:
        """This process changed the store and got the counter's new value back: visible here at once."""
        with self._guard:
            values = list(self._values)
            values[which] = max(values[which], value)
            self._values = (values[0], values[1])

    def _on_message(self) -> None:
        self._dirty.set()

    def _listen(self) -> None:
        pause = 0.1
        while not self._stop.is_set():
            try:
                self._watch(self._on_message, self._stop)
                pause = 0.1
            except Exception as exc:
                log.warning("change counters: listener lost its connection (%s); resubscribing", exc)
                self._stop.wait(pause)
                pause = min(pause * 2, 5.0)

    def _resync(self) -> None:
        while not self._stop.is_set():
            self._dirty.wait(self.resync_seconds)
            self._dirty.clear()
            if self._stop.is_set():
                return
            try:
                self._store(self._fetch())
            except Exception as exc:
                log.debug("change counters: re-read failed (%s)", exc)

    def close(self) -> None:
        self._stop.set()
        self._dirty.set()
        for t in self._threads:
            t.join(timeout=2.0)
