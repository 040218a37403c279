"""One time budget per unit of work, shared by every wait inside it.

Why: a booking waits on several locks in a row (a DB thread, the process writer lock, the per-host
lock file, SQLite's busy handler or a server row lock, then the adapter's state file). Bounding each
wait by the full timeout let one request wait several timeouts (a booking answered after 29.8 s
with a 10 s setting). A unit of work now starts one ``Deadline`` and every wait inside it uses what
is left of it, so the whole unit ends within the configured timeout.

The current deadline lives in a ``ContextVar``: code several layers down (the state store, called
by the backend's conflict gate inside the write unit) reads it without it being passed through
every signature. It is set in the thread that carries out the unit (``bounded``), so threads never
see each other's deadlines.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Deadline:
    end: float  # time.monotonic() value

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.end


_current: ContextVar[Deadline | None] = ContextVar("sched_adapter_deadline", default=None)


def current() -> Deadline | None:
    return _current.get()


def remaining(default: float) -> float:
    """Seconds a wait may take now: ``default``, or less when the current unit of work ends sooner."""
    deadline = _current.get()
    return default if deadline is None else min(default, deadline.remaining())


@contextmanager
def bounded(deadline: Deadline) -> Iterator[Deadline]:
    """Make ``deadline`` the current one (in this thread/task) while the block runs.

    An enclosing deadline that ends sooner stays in force: a unit never outlives its caller's budget.
    """
    outer = _current.get()
    effective = outer if outer is not None and outer.end < deadline.end else deadline
    token = _current.set(effective)
    try:
        yield effective
    finally:
        _current.reset(token)
