"""Lock-owner leases for state stores shared by several hosts.

On one host the SQLite store tells a dead owner by its pid. Across hosts a pid means nothing, so a
shared store (Redis, PostgreSQL) keeps, per process instance, a lease ("owner X is alive until t")
that a background thread renews every third of its length. An idempotency key or a booking intent
whose owner's lease has run out (the process died, or its host vanished) is stale at once, without
waiting for the much longer request lease (``DEFAULT_LEASE_SECONDS``). A store closed cleanly
drops its lease, so its leftovers are stale immediately.

The lease clock is injectable (``clock``), so tests move time instead of sleeping.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable

log = logging.getLogger("adapter.state")

DEFAULT_OWNER_LEASE_SECONDS = 30.0


def new_owner() -> str:
    """``host:pid:token``: the same shape as the SQLite store's owners (diagnostics read the pid)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(6)}"


class LeaseKeeper:
    """Renews ``renew(expires_s)`` every ``seconds / 3`` on a daemon thread until ``stop``."""

    def __init__(self, renew: Callable[[float], None], seconds: float, clock: Callable[[], float]) -> None:
        self._renew = renew
        self.seconds = seconds
        self._clock = clock
        self._stop = threading.Event()
        try:
            self.renew_now()  # the first lease is written before the store serves anything
        except Exception as exc:  # the store is down at startup: serve 503s (not ready) until it is back
            log.warning("could not write the state-store owner lease: %s", exc)
        self._thread = threading.Thread(target=self._run, name="adapter-state-lease", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return not self._stop.is_set()

    def renew_now(self) -> None:
        self._renew(self._clock() + self.seconds)

    def _run(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self.renew_now()
            except Exception as exc:  # the store is down: keep trying; the lease runs out meanwhile
                log.warning("could not renew the state-store owner lease: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(5)


def wall_clock() -> float:
    return time.time()
