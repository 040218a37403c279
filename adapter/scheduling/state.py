"""The adapter's own durable state: holds, stored proposals, idempotency records and the booking journal.

``StateStore`` is the small ASYNC interface the domain uses: nothing it does blocks the event loop.
Its ``gate`` is a synchronous view (``StateGate``: place a hold, check for foreign holds, journal a
booking intent) for the one place that must block: the backend's conflict gate, which runs in the
backend's DB thread inside the legacy booking lock. ``SqliteStateStore`` is the default, blocking
implementation: one SQLite file (WAL mode, so several uvicorn workers on one host share it), next
to the demo database unless configured elsewhere; ``ThreadedStateStore`` runs its calls in a small
thread pool of their own. A restart loses no hold.

Faults: a call that cannot get the file's lock within its time (``timeout_s``, or what is left of
the backend's write unit when called through the gate), or finds the file read-only or full, raises
``StateUnavailable`` (HTTP 503 with ``Retry-After``), never a bare SQLite error.

Why a separate store instead of tables in the legacy database: the legacy schema is not ours to
change (a hospital DBA will not let an adapter add tables), and holds must work identically for a
message-based backend that has no database at all.

Concurrency: every mutating call is one ``BEGIN IMMEDIATE`` transaction, so check-then-insert is
atomic across processes. The *cross-system* atomicity (legacy calendar + holds) comes from the
backend calling ``place_hold`` / ``check_free`` / ``journal_intent`` inside its own booking lock.
Lock order is always "legacy lock, then this file", never the reverse, so the two cannot deadlock.

Crash safety. Two databases cannot commit together, so a booking leaves a trace here *before* the
legacy commit and settles it after:

* ``journal_intent`` (inside the legacy lock, after the conflict checks): "token T is being booked
  for this slot by this client, owned by process instance P";
* after the legacy COMMIT, ``journal_done`` records the appointment id and releases the hold in
  one transaction.

An intent that is still there when its owner is gone (the process died, detected by pid on this
host), was given up (``journal_abandon``: the connection broke during COMMIT, outcome unknown) or
is older than the lease, is *stale*: ``journal_claim`` hands it to exactly one reconciler, which
looks the booking up in the legacy system and settles it (done + hold released, or dropped).
Idempotency records use the same owner/lease rule, so a key whose request died with its process
can be retried at once instead of answering "still in progress" forever.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import os
import secrets
import socket
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

from adapter.deadline import Deadline, bounded, remaining
from adapter.scheduling.change_counters import CALENDAR, HOLDS, ChangeCounters, FileCounters
from adapter.scheduling.domain import Interval, SlotConflict
from adapter.sqlite_wal import enable_wal

P = ParamSpec("P")
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS holds (
  id TEXT PRIMARY KEY,
  practitioner_id TEXT NOT NULL,
  location_id TEXT NOT NULL,
  start_s REAL NOT NULL,
  end_s REAL NOT NULL,
  expires_s REAL NOT NULL,
  client TEXT,
  payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS holds_prac ON holds (practitioner_id, start_s);
CREATE INDEX IF NOT EXISTS holds_exp ON holds (expires_s);
CREATE TABLE IF NOT EXISTS proposals (
  id TEXT PRIMARY KEY,
  payload TEXT NOT NULL,
  expires_s REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotency (
  client TEXT NOT NULL,
  key TEXT NOT NULL,
  operation TEXT NOT NULL,
  body_hash TEXT NOT NULL,
  state TEXT NOT NULL,
  status INTEGER,
  media_type TEXT,
  body BLOB,
  created_s REAL NOT NULL,
  PRIMARY KEY (client, key)
);
"""

# Schema changes after the first release, applied in order; PRAGMA user_version counts them.
_MIGRATIONS = [
    "ALTER TABLE idempotency ADD COLUMN owner TEXT",
    """CREATE TABLE IF NOT EXISTS journal (
  token TEXT PRIMARY KEY,
  client TEXT,
  request_key TEXT,
  payload TEXT NOT NULL,
  state TEXT NOT NULL,
  appointment_id TEXT,
  owner TEXT,
  created_s REAL NOT NULL,
  updated_s REAL NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS journal_state ON journal (state, updated_s)",
    # Bumped by every change the adapter makes to the legacy calendar; workers drop their
    # availability caches when it moves (scheduling/availability_cache.py).
    "CREATE TABLE IF NOT EXISTS calendar (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)",
    # The patients a hold is for, as "|5|7|" (NULL: a proposal issued without a patient), so a
    # patient's holds block that patient's other bookings whoever the practitioner (issue 7.1).
    "ALTER TABLE holds ADD COLUMN patients TEXT",
]

DEFAULT_LEASE_SECONDS = 120.0
"""How long a request may own an idempotency key or a booking intent before others may take it over
even though its process still seems alive (a hung request). Far above any legacy timeout."""

_HOST = socket.gethostname()
_LIVE_INSTANCES: set[str] = set()  # owner tokens of the stores open in this process
_LIVE_GUARD = threading.Lock()


@dataclass(frozen=True, slots=True)
class Hold:
    id: str
    practitioner_id: str
    location_id: str
    interval: Interval
    expires_at: dt.datetime
    client: str | None
    payload: dict[str, Any]  # the proposal, so a hold can be rendered and booked without the original id


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status: int
    media_type: str
    body: bytes


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One booking of a proposed id: ``intent`` until the legacy outcome is recorded, then ``done``."""

    token: str
    client: str | None
    request_key: str | None
    payload: dict[str, Any]  # the proposal plus "patient_id": enough to find the legacy row again
    state: str  # intent | done
    appointment_id: str | None
    owner: str | None
    created_at: dt.datetime
    updated_at: dt.datetime


class HoldConflict(SlotConflict):
    """An active hold overlaps the requested time. Carries the facts so that the domain can state
    the times in the mapping's zone (the store knows only instants). The hold's id is not named: an
    anonymous hold can be booked by whoever knows its id."""

    def __init__(self, practitioner_id: str, interval: Interval, patient_id: str | None = None) -> None:
        self.practitioner_id = practitioner_id
        self.interval = interval
        self.patient_id = patient_id
        super().__init__(self.describe(dt.UTC))

    def describe(self, zone: dt.tzinfo) -> str:
        start = self.interval.start.astimezone(zone).isoformat()
        end = self.interval.end.astimezone(zone).isoformat()
        if self.patient_id is not None:
            return (
                f"Patient/{self.patient_id} already has an appointment held with Practitioner/{self.practitioner_id} "
                f"from {start} to {end}"
            )
        return f"Practitioner/{self.practitioner_id} is held by another client from {start} to {end}"


class IdempotencyMismatch(Exception):
    """The Idempotency-Key was used before with a different request (HTTP 422)."""


class IdempotencyInProgress(Exception):
    """A request with this Idempotency-Key is still being processed (HTTP 409)."""


class StateUnavailable(Exception):
    """The adapter's state store cannot be used now: its file is locked by another process beyond
    the timeout, read-only, full, or unreachable (HTTP 503 ``transient`` with ``Retry-After``)."""


class StateGate(Protocol):
    """The calls a backend makes INSIDE its booking lock, through the domain's conflict gate.

    Synchronous on purpose: the gate runs in the backend's DB thread, in the middle of the legacy
    transaction (after the legacy calendar check, before the legacy write), so these calls must
    finish there, in that thread, before the lock is let go. Hopping back to the event loop from
    inside a DB thread would need the loop to be free while that thread waits for it, and would
    hold the legacy lock across an event-loop round trip. Their waits draw on the write unit's
    deadline (``adapter.deadline``). A shared store (Redis, PostgreSQL) implements them with its
    synchronous client.
    """

    def place_hold(self, hold: Hold, now: dt.datetime) -> Hold: ...
    def check_free(
        self,
        practitioner_id: str,
        interval: Interval,
        now: dt.datetime,
        own_hold: str | None,
        client: str | None = None,
    ) -> None: ...
    def check_patient_free(
        self, patient_ids: Iterable[str], interval: Interval, now: dt.datetime, own_hold: str | None
    ) -> None: ...
    def journal_intent(
        self, token: str, *, client: str | None, request_key: str | None, payload: dict[str, Any], now: dt.datetime
    ) -> None: ...
    def journal_intent_exclusive(
        self,
        token: str,
        *,
        client: str | None,
        request_key: str | None,
        payload: dict[str, Any],
        now: dt.datetime,
        practitioner_id: str,
        patient_ids: Iterable[str],
        interval: Interval,
    ) -> None: ...
    def intents_overlapping(self, window: Interval) -> list[tuple[str, Interval, tuple[str, ...]]]: ...


class StateStore(Protocol):
    """What the scheduling domain uses: every call is awaited, none blocks the event loop.

    ``gate`` is the synchronous view for the conflict gate (see ``StateGate``). Signatures speak in
    domain terms only (no SQLite types), so a Redis or PostgreSQL store fits behind the same seam.
    Every method may raise ``StateUnavailable``.
    """

    @property
    def gate(self) -> StateGate: ...

    async def holds_by_practitioner(
        self, practitioner_ids: Iterable[str], window: Interval, now: dt.datetime
    ) -> dict[str, list[Interval]]: ...
    async def get_hold(self, hold_id: str, now: dt.datetime) -> Hold | None: ...
    async def holds_by_patient(
        self, patient_ids: Iterable[str], window: Interval, now: dt.datetime
    ) -> list[Interval]: ...
    async def release(self, hold_id: str) -> None: ...
    async def sweep(self, now: dt.datetime) -> int: ...
    async def put_proposal(self, proposal_id: str, payload: str, expires_at: dt.datetime) -> None: ...
    async def get_proposal(self, proposal_id: str, now: dt.datetime) -> str | None: ...
    async def idempotency_begin(
        self, client: str, key: str, operation: str, body_hash: str, now: dt.datetime
    ) -> StoredResponse | None: ...
    async def idempotency_finish(self, client: str, key: str, response: StoredResponse | None) -> None: ...
    async def journal_get(self, token: str) -> JournalEntry | None: ...
    async def intents_overlapping(self, window: Interval) -> list[tuple[str, Interval, tuple[str, ...]]]: ...
    async def calendar_version(self) -> int: ...
    async def bump_calendar_version(self) -> None: ...
    @property
    def counters(self) -> ChangeCounters: ...
    async def journal_done(self, token: str, appointment_id: str, now: dt.datetime, *, release_hold: bool) -> None: ...
    async def journal_abandon(self, token: str, now: dt.datetime) -> None: ...
    async def journal_drop(self, token: str) -> None: ...
    async def journal_claim(self, token: str, now: dt.datetime) -> JournalEntry | None: ...
    async def journal_claim_stale(self, now: dt.datetime, limit: int = 100) -> list[JournalEntry]: ...
    async def close(self) -> None: ...


class SyncStateStore(StateGate, Protocol):
    """A store whose calls block (the SQLite file; Redis and PostgreSQL through their sync clients);
    ``ThreadedStateStore`` makes it a ``StateStore``. The gate's calls are inherited from ``StateGate``."""

    def holds_by_practitioner(
        self, practitioner_ids: Iterable[str], window: Interval, now: dt.datetime
    ) -> dict[str, list[Interval]]: ...
    def get_hold(self, hold_id: str, now: dt.datetime) -> Hold | None: ...
    def holds_by_patient(self, patient_ids: Iterable[str], window: Interval, now: dt.datetime) -> list[Interval]: ...
    def release(self, hold_id: str) -> None: ...
    def sweep(self, now: dt.datetime) -> int: ...
    def put_proposal(self, proposal_id: str, payload: str, expires_at: dt.datetime) -> None: ...
    def get_proposal(self, proposal_id: str, now: dt.datetime) -> str | None: ...
    def idempotency_begin(
        self, client: str, key: str, operation: str, body_hash: str, now: dt.datetime
    ) -> StoredResponse | None: ...
    def idempotency_finish(self, client: str, key: str, response: StoredResponse | None) -> None: ...
    def journal_get(self, token: str) -> JournalEntry | None: ...
    def calendar_version(self) -> int: ...
    def bump_calendar_version(self) -> None: ...
    @property
    def counters(self) -> ChangeCounters: ...
    def journal_done(self, token: str, appointment_id: str, now: dt.datetime, *, release_hold: bool) -> None: ...
    def journal_abandon(self, token: str, now: dt.datetime) -> None: ...
    def journal_drop(self, token: str) -> None: ...
    def journal_claim(self, token: str, now: dt.datetime) -> JournalEntry | None: ...
    def journal_claim_stale(self, now: dt.datetime, limit: int = 100) -> list[JournalEntry]: ...
    def close(self) -> None: ...


def _ts(t: dt.datetime) -> float:
    return t.timestamp()


def _dt(s: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(s, tz=dt.UTC)


def owner_alive(owner: str | None) -> bool:
    """Is the process instance that wrote ``owner`` (``host:pid:token``) still running?

    Certain only on this host; an owner on another host counts as alive (its lease decides).
    """
    if not owner:
        return False
    host, _, rest = owner.partition(":")
    pid_text, _, _token = rest.partition(":")
    if host != _HOST or not pid_text.isdigit():
        return True
    pid = int(pid_text)
    if pid == os.getpid():
        with _LIVE_GUARD:
            return owner in _LIVE_INSTANCES
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unavailable_on_error(method: Callable[P, T]) -> Callable[P, T]:
    """SQLite's "cannot now" errors (locked beyond the timeout, read-only, full, I/O) -> StateUnavailable."""

    @functools.wraps(method)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(*args, **kwargs)
        except sqlite3.OperationalError as exc:
            raise StateUnavailable(f"the adapter's state store is not available: {exc}") from exc

    return guarded


DEFAULT_TIMEOUT_SECONDS = 10.0


class SqliteStateStore:
    """The state in one SQLite file. Blocking: use it through ``ThreadedStateStore`` (and its
    ``gate`` from inside a backend's write unit), never on the event loop."""

    def __init__(
        self,
        path: str | Path,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        timeout_s: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        self.path = str(path)
        self.lease_seconds = lease_seconds
        self.timeout_s = timeout_s
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._guard = threading.Lock()
        self._writing = threading.Lock()  # one write transaction per process at a time (see _Tx)
        self.owner = f"{_HOST}:{os.getpid()}:{secrets.token_hex(6)}"
        # Beside the state file, shared by every process that opens it (scheduling.change_counters).
        self._counters = FileCounters(self.path + ".counters")
        with _LIVE_GUARD:
            _LIVE_INSTANCES.add(self.owner)
        with self._tx() as c:  # one process at a time creates and migrates the schema
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    c.execute(stmt)
            version = c.execute("PRAGMA user_version").fetchone()[0]
            for n, stmt in enumerate(_MIGRATIONS[version:], start=version + 1):
                try:
                    c.execute(stmt)
                except sqlite3.OperationalError as exc:
                    if "duplicate column" not in str(exc):
                        raise
                c.execute(f"PRAGMA user_version = {n}")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path, timeout=remaining(self.timeout_s), isolation_level=None, check_same_thread=False
            )
            enable_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
            with self._guard:
                self._all.append(conn)
        # A wait for another process's lock ends with the caller's unit of work (the backend's
        # write unit when called through the gate), or after timeout_s.
        conn.execute(f"PRAGMA busy_timeout = {max(1, int(remaining(self.timeout_s) * 1000))}")
        return conn

    def _tx(self) -> _Tx:
        return _Tx(self._conn(), self._writing, self.timeout_s)

    @property
    def counters(self) -> FileCounters:
        """Bumped right after each commit that changed holds or the calendar, before the caller answers."""
        return self._counters

    def _stale(self, owner: str | None, updated_s: float, now: dt.datetime) -> bool:
        return owner is None or not owner_alive(owner) or updated_s <= _ts(now) - self.lease_seconds

    # -- holds -------------------------------------------------------------------------------
    @_unavailable_on_error
    def holds_by_practitioner(
        self, practitioner_ids: Iterable[str], window: Interval, now: dt.datetime
    ) -> dict[str, list[Interval]]:
        ids = list(practitioner_ids)
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = (
            self._conn()
            .execute(
                f"SELECT practitioner_id, start_s, end_s FROM holds WHERE practitioner_id IN ({marks}) "
                "AND expires_s > ? AND start_s < ? AND end_s > ?",
                [*ids, _ts(now), _ts(window.end), _ts(window.start)],
            )
            .fetchall()
        )
        out: dict[str, list[Interval]] = {}
        for prac, s, e in rows:
            out.setdefault(prac, []).append(Interval(_dt(s), _dt(e)))
        return out

    @_unavailable_on_error
    def hold_rows(self, practitioner_ids: Iterable[str], window: Interval) -> list[tuple[str, float, float, float]]:
        """(practitioner, start, end, expiry) of every hold of ``practitioner_ids`` in ``window``, expired or not:
        what ``ThreadedStateStore`` caches until the holds counter moves, filtering by ``now`` itself."""
        ids = list(practitioner_ids)
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        rows: list[tuple[str, float, float, float]] = (
            self._conn()
            .execute(
                f"SELECT practitioner_id, start_s, end_s, expires_s FROM holds WHERE practitioner_id IN ({marks}) "
                "AND start_s < ? AND end_s > ?",
                [*ids, _ts(window.end), _ts(window.start)],
            )
            .fetchall()
        )
        return rows

    @_unavailable_on_error
    def patient_hold_rows(self, patient_ids: Iterable[str], window: Interval) -> list[tuple[str, float, float, float]]:
        """(patient, start, end, expiry) of the holds for ``patient_ids`` in ``window``, expired or not (see
        ``hold_rows``), in the order ``holds_by_patient`` gives them."""
        out: list[tuple[str, float, float, float]] = []
        for pid in patient_ids:
            rows = (
                self._conn()
                .execute(
                    "SELECT start_s, end_s, expires_s FROM holds WHERE instr(patients, ?) > 0 "
                    "AND start_s < ? AND end_s > ?",
                    (f"|{pid}|", _ts(window.end), _ts(window.start)),
                )
                .fetchall()
            )
            out.extend((pid, s, e, x) for s, e, x in rows)
        return out

    def _row_to_hold(self, row: tuple[Any, ...]) -> Hold:
        hid, prac, loc, s, e, x, client, payload = row[:8]
        return Hold(hid, prac, loc, Interval(_dt(s), _dt(e)), _dt(x), client, json.loads(payload))

    @_unavailable_on_error
    def get_hold(self, hold_id: str, now: dt.datetime) -> Hold | None:
        row = self._conn().execute("SELECT * FROM holds WHERE id = ? AND expires_s > ?", (hold_id, _ts(now))).fetchone()
        return self._row_to_hold(row) if row else None

    def _conflicts(
        self,
        conn: sqlite3.Connection,
        practitioner_id: str,
        interval: Interval,
        now: dt.datetime,
        own_hold: str | None,
        client: str | None,
    ) -> list[tuple[Any, ...]]:
        """Active holds overlapping ``interval`` except ``own_hold`` when it is the caller's own.

        A hold is the caller's own when it was placed anonymously (whoever knows its id may book
        it) or by the same client. A hold by a known client is foreign to everybody else.
        """
        rows = conn.execute(
            "SELECT id, start_s, end_s, client FROM holds WHERE practitioner_id = ? AND expires_s > ? "
            "AND start_s < ? AND end_s > ?",
            (practitioner_id, _ts(now), _ts(interval.end), _ts(interval.start)),
        ).fetchall()
        return [r for r in rows if not (r[0] == own_hold and (r[3] is None or r[3] == client))]

    @_unavailable_on_error
    def check_free(
        self,
        practitioner_id: str,
        interval: Interval,
        now: dt.datetime,
        own_hold: str | None,
        client: str | None = None,
    ) -> None:
        found = self._conflicts(self._conn(), practitioner_id, interval, now, own_hold, client)
        if found:
            raise HoldConflict(practitioner_id, Interval(_dt(found[0][1]), _dt(found[0][2])))

    def _patient_conflict(
        self,
        conn: sqlite3.Connection,
        patient_ids: Iterable[str],
        interval: Interval,
        now: dt.datetime,
        own_hold: str | None,
    ) -> HoldConflict | None:
        for pid in patient_ids:
            row = conn.execute(
                "SELECT practitioner_id, start_s, end_s FROM holds WHERE instr(patients, ?) > 0 AND expires_s > ? "
                "AND start_s < ? AND end_s > ? AND id IS NOT ? ORDER BY start_s LIMIT 1",
                (f"|{pid}|", _ts(now), _ts(interval.end), _ts(interval.start), own_hold),
            ).fetchone()
            if row:
                return HoldConflict(row[0], Interval(_dt(row[1]), _dt(row[2])), patient_id=pid)
        return None

    @_unavailable_on_error
    def check_patient_free(
        self, patient_ids: Iterable[str], interval: Interval, now: dt.datetime, own_hold: str | None
    ) -> None:
        """No active hold for any of these patients overlaps ``interval`` (except ``own_hold``).

        Call inside the legacy lock (the backend locks the patient too), like ``check_free``."""
        found = self._patient_conflict(self._conn(), patient_ids, interval, now, own_hold)
        if found is not None:
            raise found

    @_unavailable_on_error
    def holds_by_patient(self, patient_ids: Iterable[str], window: Interval, now: dt.datetime) -> list[Interval]:
        out: list[Interval] = []
        for pid in patient_ids:
            rows = (
                self._conn()
                .execute(
                    "SELECT start_s, end_s FROM holds WHERE instr(patients, ?) > 0 AND expires_s > ? "
                    "AND start_s < ? AND end_s > ?",
                    (f"|{pid}|", _ts(now), _ts(window.end), _ts(window.start)),
                )
                .fetchall()
            )
            out.extend(Interval(_dt(s), _dt(e)) for s, e in rows)
        return out

    @_unavailable_on_error
    def place_hold(self, hold: Hold, now: dt.datetime) -> Hold:
        """Insert ``hold``; an active hold with the same id is returned unchanged (no extension)."""
        with self._tx() as conn:
            existing = conn.execute(
                "SELECT * FROM holds WHERE id = ? AND expires_s > ?", (hold.id, _ts(now))
            ).fetchone()
            if existing:
                return self._row_to_hold(existing)
            found = [
                r
                for r in self._conflicts(conn, hold.practitioner_id, hold.interval, now, None, None)
                if r[0] != hold.id
            ]
            if found:
                raise HoldConflict(hold.practitioner_id, Interval(_dt(found[0][1]), _dt(found[0][2])))
            patient_ids = [str(p) for p in hold.payload.get("patient_ids") or ()]
            own = self._patient_conflict(conn, patient_ids, hold.interval, now, hold.id)
            if own is not None:
                raise own
            conn.execute("DELETE FROM holds WHERE id = ?", (hold.id,))  # an expired hold of the same slot
            conn.execute(
                "INSERT INTO holds (id, practitioner_id, location_id, start_s, end_s, expires_s, client, payload, "
                "patients) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    hold.id,
                    hold.practitioner_id,
                    hold.location_id,
                    _ts(hold.interval.start),
                    _ts(hold.interval.end),
                    _ts(hold.expires_at),
                    hold.client,
                    json.dumps(hold.payload),
                    "|" + "|".join(patient_ids) + "|" if patient_ids else None,
                ),
            )
        self._counters.bump(HOLDS)
        return hold

    @_unavailable_on_error
    def release(self, hold_id: str) -> None:
        with self._tx() as conn:
            gone = conn.execute("DELETE FROM holds WHERE id = ?", (hold_id,)).rowcount
        if gone:
            self._counters.bump(HOLDS)

    @_unavailable_on_error
    def sweep(self, now: dt.datetime) -> int:
        day_ago = _ts(now) - 86400
        with self._tx() as conn:
            n = conn.execute("DELETE FROM holds WHERE expires_s <= ?", (_ts(now),)).rowcount
            n += conn.execute("DELETE FROM proposals WHERE expires_s <= ?", (_ts(now),)).rowcount
            # Idempotency records and settled journal entries are kept for a day: longer than any
            # client retry policy and than a proposed id lives. Unfinished idempotency records that
            # old belong to requests that died long ago.
            conn.execute("DELETE FROM idempotency WHERE created_s <= ?", (day_ago,))
            conn.execute("DELETE FROM journal WHERE state = 'done' AND updated_s <= ?", (day_ago,))
        return n

    # -- stored proposals ----------------------------------------------------------------------
    @_unavailable_on_error
    def put_proposal(self, proposal_id: str, payload: str, expires_at: dt.datetime) -> None:
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO proposals VALUES (?, ?, ?)", (proposal_id, payload, _ts(expires_at)))

    @_unavailable_on_error
    def get_proposal(self, proposal_id: str, now: dt.datetime) -> str | None:
        row = (
            self._conn()
            .execute("SELECT payload FROM proposals WHERE id = ? AND expires_s > ?", (proposal_id, _ts(now)))
            .fetchone()
        )
        return row[0] if row else None

    # -- idempotency -------------------------------------------------------------------------
    @_unavailable_on_error
    def idempotency_begin(
        self, client: str, key: str, operation: str, body_hash: str, now: dt.datetime
    ) -> StoredResponse | None:
        """None: go ahead (the key is now reserved by this process). A StoredResponse: replay it.

        A reservation whose request died (its process is gone, or it is older than the lease) is
        taken over, so a client retrying after a crash is served instead of told to wait forever.
        """
        with self._tx() as conn:
            row = conn.execute(
                "SELECT operation, body_hash, state, status, media_type, body, owner, created_s "
                "FROM idempotency WHERE client = ? AND key = ?",
                (client, key),
            ).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO idempotency (client, key, operation, body_hash, state, created_s, owner) "
                    "VALUES (?, ?, ?, ?, 'started', ?, ?)",
                    (client, key, operation, body_hash, _ts(now), self.owner),
                )
                return None
            op, h, state, status, media_type, body, owner, created_s = row
            if op != operation or h != body_hash:
                raise IdempotencyMismatch(f"Idempotency-Key {key!r} was already used with a different request")
            if state == "done":
                return StoredResponse(status, media_type, bytes(body))
            if not self._stale(owner, created_s, now):
                raise IdempotencyInProgress(f"a request with Idempotency-Key {key!r} is still being processed")
            conn.execute(
                "UPDATE idempotency SET owner = ?, created_s = ? WHERE client = ? AND key = ?",
                (self.owner, _ts(now), client, key),
            )
            return None

    @_unavailable_on_error
    def idempotency_finish(self, client: str, key: str, response: StoredResponse | None) -> None:
        with self._tx() as conn:
            if response is None:  # the request failed before any outcome worth replaying
                conn.execute(
                    "DELETE FROM idempotency WHERE client = ? AND key = ? AND state = 'started'", (client, key)
                )
            else:
                conn.execute(
                    "UPDATE idempotency SET state = 'done', status = ?, media_type = ?, body = ?, owner = NULL "
                    "WHERE client = ? AND key = ?",
                    (response.status, response.media_type, response.body, client, key),
                )

    # -- booking journal -----------------------------------------------------------------------
    # -- calendar version ----------------------------------------------------------------------
    @_unavailable_on_error
    def calendar_version(self) -> int:
        row = self._conn().execute("SELECT version FROM calendar WHERE id = 1").fetchone()
        return row[0] if row else 0

    @_unavailable_on_error
    def bump_calendar_version(self) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO calendar (id, version) VALUES (1, 1) ON CONFLICT (id) DO UPDATE SET version = version + 1"
            )
        self._counters.bump(CALENDAR)

    def _row_to_entry(self, row: tuple[Any, ...]) -> JournalEntry:
        token, client, request_key, payload, state, appt_id, owner, created_s, updated_s = row
        return JournalEntry(
            token, client, request_key, json.loads(payload), state, appt_id, owner, _dt(created_s), _dt(updated_s)
        )

    @_unavailable_on_error
    def journal_get(self, token: str) -> JournalEntry | None:
        row = self._conn().execute("SELECT * FROM journal WHERE token = ?", (token,)).fetchone()
        return self._row_to_entry(row) if row else None

    @_unavailable_on_error
    def journal_intent(
        self, token: str, *, client: str | None, request_key: str | None, payload: dict[str, Any], now: dt.datetime
    ) -> None:
        """Record that this process is about to write the legacy booking of ``token`` (call under the
        legacy lock, after the conflict checks, before the legacy write)."""
        with self._tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO journal VALUES (?, ?, ?, ?, 'intent', NULL, ?, ?, ?)",
                (token, client, request_key, json.dumps(payload), self.owner, _ts(now), _ts(now)),
            )
        self._counters.bump(HOLDS)  # a booking in flight is busy time for $find (see journal_intent_exclusive)

    @staticmethod
    def _intent_rows(conn: sqlite3.Connection) -> list[tuple[str, str, Interval, tuple[str, ...]]]:
        """Every booking in flight: (token, practitioner, interval, patients), read from the intents' payloads."""
        out = []
        for token, payload in conn.execute("SELECT token, payload FROM journal WHERE state = 'intent'").fetchall():
            d = json.loads(payload)
            start = dt.datetime.fromisoformat(d["start"])
            end = start + dt.timedelta(minutes=int(d["minutes"]))
            patients = tuple(str(x) for x in (d.get("patient_ids") or ()))
            if d.get("patient_id"):
                patients += (str(d["patient_id"]),)
            out.append((str(token), str(d["practitioner_id"]), Interval(start, end), patients))
        return out

    @_unavailable_on_error
    def intents_overlapping(self, window: Interval) -> list[tuple[str, Interval, tuple[str, ...]]]:
        """Bookings in flight (their outcome not yet known) overlapping ``window``: (practitioner, interval,
        patients). For a backend without locks they are busy time for every other request (issue 8.1)."""
        return [(p, i, pats) for _, p, i, pats in self._intent_rows(self._conn()) if i.overlaps(window)]

    @_unavailable_on_error
    def journal_intent_exclusive(
        self,
        token: str,
        *,
        client: str | None,
        request_key: str | None,
        payload: dict[str, Any],
        now: dt.datetime,
        practitioner_id: str,
        patient_ids: Iterable[str],
        interval: Interval,
    ) -> None:
        """``journal_intent`` for a backend that cannot lock: in ONE transaction, refuse (``HoldConflict``) when a
        foreign hold or another booking in flight overlaps the practitioner's or a patient's time, else record the
        intent. The in-flight intents are what stands in for the legacy lock: two requests can never both pass
        this check before the first one's outcome is known."""
        patients = set(patient_ids)
        with self._tx() as conn:
            found = self._conflicts(conn, practitioner_id, interval, now, token, client)
            if found:
                raise HoldConflict(practitioner_id, Interval(_dt(found[0][1]), _dt(found[0][2])))
            own = self._patient_conflict(conn, patients, interval, now, token)
            if own is not None:
                raise own
            for _token, prac, span, pats in self._intent_rows(conn):
                if not span.overlaps(interval):
                    continue
                if prac == practitioner_id:
                    raise HoldConflict(practitioner_id, span)
                shared = patients.intersection(pats)
                if shared:
                    raise HoldConflict(prac, span, patient_id=sorted(shared)[0])
            conn.execute(
                "INSERT OR REPLACE INTO journal VALUES (?, ?, ?, ?, 'intent', NULL, ?, ?, ?)",
                (token, client, request_key, json.dumps(payload), self.owner, _ts(now), _ts(now)),
            )
        self._counters.bump(HOLDS)  # a booking in flight is busy time for $find (see journal_intent_exclusive)

    @_unavailable_on_error
    def journal_done(self, token: str, appointment_id: str, now: dt.datetime, *, release_hold: bool) -> None:
        """The legacy booking of ``token`` is committed as ``appointment_id``; its hold goes, atomically."""
        with self._tx() as conn:
            # The owner stays: which process recorded the booking (diagnostics; done rows never go stale).
            conn.execute(
                "UPDATE journal SET state = 'done', appointment_id = ?, owner = ?, updated_s = ? WHERE token = ?",
                (appointment_id, self.owner, _ts(now), token),
            )
            if release_hold:
                conn.execute("DELETE FROM holds WHERE id = ?", (token,))
        self._counters.bump(HOLDS)  # its hold, and its time as a booking in flight, are gone

    @_unavailable_on_error
    def journal_abandon(self, token: str, now: dt.datetime) -> None:
        """Outcome unknown and this request gives up: the next claimant reconciles it at once."""
        with self._tx() as conn:
            conn.execute(
                "UPDATE journal SET owner = NULL, updated_s = ? WHERE token = ? AND state = 'intent'", (_ts(now), token)
            )

    @_unavailable_on_error
    def journal_drop(self, token: str) -> None:
        """The legacy write certainly did not happen: forget the intent."""
        with self._tx() as conn:
            gone = conn.execute("DELETE FROM journal WHERE token = ? AND state = 'intent'", (token,)).rowcount
        if gone:
            self._counters.bump(HOLDS)

    @_unavailable_on_error
    def journal_claim(self, token: str, now: dt.datetime) -> JournalEntry | None:
        """Take over the stale intent of ``token`` for reconciliation; None when there is none to take."""
        with self._tx() as conn:
            row = conn.execute("SELECT * FROM journal WHERE token = ? AND state = 'intent'", (token,)).fetchone()
            if row is None or not self._stale(row[6], row[8], now):
                return None
            conn.execute("UPDATE journal SET owner = ?, updated_s = ? WHERE token = ?", (self.owner, _ts(now), token))
        return self._row_to_entry(row)

    @_unavailable_on_error
    def journal_claim_stale(self, now: dt.datetime, limit: int = 100) -> list[JournalEntry]:
        """Every stale intent (up to ``limit``), each claimed by this process for reconciliation."""
        with self._tx() as conn:
            rows = conn.execute("SELECT * FROM journal WHERE state = 'intent' ORDER BY updated_s").fetchall()
            stale = [r for r in rows if self._stale(r[6], r[8], now)][:limit]
            for r in stale:
                conn.execute(
                    "UPDATE journal SET owner = ?, updated_s = ? WHERE token = ?", (self.owner, _ts(now), r[0])
                )
        return [self._row_to_entry(r) for r in stale]

    def close(self) -> None:
        with _LIVE_GUARD:
            _LIVE_INSTANCES.discard(self.owner)
        self._counters.close()
        with self._guard:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()


class _Tx:
    """One write transaction. Threads of this process queue on ``writing`` first, so SQLite's busy
    handler (which sleeps and polls) only arbitrates between processes: with the state store's own
    threads and the backends' gate calls all polling the file, one of them was starved for seconds."""

    def __init__(self, conn: sqlite3.Connection, writing: threading.Lock, timeout_s: float) -> None:
        self.conn = conn
        self.writing = writing
        self.timeout_s = timeout_s

    def __enter__(self) -> sqlite3.Connection:
        if not self.writing.acquire(timeout=remaining(self.timeout_s)):
            raise sqlite3.OperationalError("database is locked (other writers of this process took the time)")
        try:
            self.conn.execute(f"PRAGMA busy_timeout = {max(1, int(remaining(self.timeout_s) * 1000))}")
            self.conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.writing.release()
            raise
        return self.conn

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        try:
            if exc_type is not None:
                self.conn.execute("ROLLBACK")
                return
            try:
                self.conn.execute("COMMIT")
            except sqlite3.Error:
                # A failed COMMIT (disk full, I/O) leaves the transaction open: close it, or every later
                # call on this connection would fail with "cannot start a transaction within a transaction".
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
        finally:
            self.writing.release()


HoldRow = tuple[str, float, float, float]  # practitioner, start, end, expiry (epoch seconds)
_HOLD_ROWS_CACHED = 256


class ThreadedStateStore:
    """A ``StateStore`` over a blocking store: each call runs in a small pool of its own threads.

    The pool is separate from the legacy database's, so a state file locked by another process
    delays only the requests that need it, never the event loop nor the legacy reads. Each call gets
    one deadline of ``timeout_s``: the wait for a thread and the wait for the file's lock draw on
    it, and a call still queued when it expires is dropped. Either way: ``StateUnavailable`` (503).

    ``gate`` is the blocking store itself, for the backend's conflict gate (see ``StateGate``).
    """

    def __init__(self, store: SyncStateStore, *, threads: int = 4, timeout_s: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        self._store = store
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="adapter-state")
        # (practitioners, window) -> (holds counter when read, the rows with their expiry); see holds_by_practitioner.
        self._hold_rows: OrderedDict[tuple[str, tuple[str, ...], float, float], tuple[int, list[HoldRow]]] = (
            OrderedDict()
        )

    @property
    def gate(self) -> SyncStateStore:
        return self._store

    @property
    def counters(self) -> ChangeCounters:
        return self._store.counters

    async def _run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        deadline = Deadline.after(self.timeout_s)

        def call() -> T:
            if deadline.expired():
                raise StateUnavailable(f"the adapter's state store is busy: no thread free within {self.timeout_s:g} s")
            with bounded(deadline):
                return fn(*args, **kwargs)

        future = self._pool.submit(call)
        waiting = asyncio.wrap_future(future)
        try:
            return await asyncio.wait_for(asyncio.shield(waiting), deadline.remaining())
        except TimeoutError:
            if future.cancel():
                raise StateUnavailable(
                    f"the adapter's state store is busy: no thread free within {self.timeout_s:g} s"
                ) from None
            return await waiting  # started: its lock wait ends at the same deadline

    async def holds_by_practitioner(
        self, practitioner_ids: Iterable[str], window: Interval, now: dt.datetime
    ) -> dict[str, list[Interval]]:
        """The active holds, without a thread hop while nothing changed (issue 14).

        With exact change counters (one host: ``FileCounters``) the rows of a (practitioners, window) are kept with
        their expiry until the holds counter moves, which every placement, release and booking does in every
        worker before its answer goes out; expiry is filtered here by ``now``, exactly as the SQL does, so a held
        slot is never offered (ITI-115 SHALL). Shared stores (Redis, PostgreSQL) read the store on every call:
        another host's hold must not wait for a message.
        """
        ids = tuple(practitioner_ids)
        rows = await self._cached_rows("hold_rows", ids, window)
        if rows is None:
            return await self._run(self._store.holds_by_practitioner, ids, window, now)
        t = _ts(now)
        out: dict[str, list[Interval]] = {}
        for prac, start_s, end_s, expires_s in rows:
            if expires_s > t:
                out.setdefault(prac, []).append(Interval(_dt(start_s), _dt(end_s)))
        return out

    async def get_hold(self, hold_id: str, now: dt.datetime) -> Hold | None:
        return await self._run(self._store.get_hold, hold_id, now)

    async def holds_by_patient(self, patient_ids: Iterable[str], window: Interval, now: dt.datetime) -> list[Interval]:
        """The active holds of these patients; cached like ``holds_by_practitioner`` (same rules)."""
        rows = await self._cached_rows("patient_hold_rows", tuple(patient_ids), window)
        if rows is None:
            return await self._run(self._store.holds_by_patient, tuple(patient_ids), window, now)
        t = _ts(now)
        return [Interval(_dt(start_s), _dt(end_s)) for _, start_s, end_s, expires_s in rows if expires_s > t]

    async def _cached_rows(self, reader: str, ids: tuple[str, ...], window: Interval) -> list[HoldRow] | None:
        """Rows of ``reader`` (a method of the store) for ``ids``, from this process's cache while the holds counter
        stands still; None when the store has no exact counters (a shared store: read it every time)."""
        read = getattr(self._store, reader, None)
        counters = self._store.counters
        if read is None or not counters.exact:
            return None
        key = (reader, ids, window.start.timestamp(), window.end.timestamp())
        version = counters.holds()  # before the read: a change meanwhile leaves the rows under the old version
        cached = self._hold_rows.get(key)
        if cached is None or cached[0] != version:
            cached = (version, await self._run(read, ids, window))
            self._hold_rows[key] = cached
            while len(self._hold_rows) > _HOLD_ROWS_CACHED:
                self._hold_rows.popitem(last=False)
        else:
            self._hold_rows.move_to_end(key)
        return cached[1]

    async def release(self, hold_id: str) -> None:
        await self._run(self._store.release, hold_id)

    async def sweep(self, now: dt.datetime) -> int:
        return await self._run(self._store.sweep, now)

    async def put_proposal(self, proposal_id: str, payload: str, expires_at: dt.datetime) -> None:
        await self._run(self._store.put_proposal, proposal_id, payload, expires_at)

    async def get_proposal(self, proposal_id: str, now: dt.datetime) -> str | None:
        return await self._run(self._store.get_proposal, proposal_id, now)

    async def idempotency_begin(
        self, client: str, key: str, operation: str, body_hash: str, now: dt.datetime
    ) -> StoredResponse | None:
        return await self._run(self._store.idempotency_begin, client, key, operation, body_hash, now)

    async def idempotency_finish(self, client: str, key: str, response: StoredResponse | None) -> None:
        await self._run(self._store.idempotency_finish, client, key, response)

    async def journal_get(self, token: str) -> JournalEntry | None:
        return await self._run(self._store.journal_get, token)

    async def intents_overlapping(self, window: Interval) -> list[tuple[str, Interval, tuple[str, ...]]]:
        return await self._run(self._store.intents_overlapping, window)

    async def calendar_version(self) -> int:
        return await self._run(self._store.calendar_version)

    async def bump_calendar_version(self) -> None:
        await self._run(self._store.bump_calendar_version)

    async def journal_done(self, token: str, appointment_id: str, now: dt.datetime, *, release_hold: bool) -> None:
        await self._run(self._store.journal_done, token, appointment_id, now, release_hold=release_hold)

    async def journal_abandon(self, token: str, now: dt.datetime) -> None:
        await self._run(self._store.journal_abandon, token, now)

    async def journal_drop(self, token: str) -> None:
        await self._run(self._store.journal_drop, token)

    async def journal_claim(self, token: str, now: dt.datetime) -> JournalEntry | None:
        return await self._run(self._store.journal_claim, token, now)

    async def journal_claim_stale(self, now: dt.datetime, limit: int = 100) -> list[JournalEntry]:
        return await self._run(self._store.journal_claim_stale, now, limit)

    async def close(self) -> None:
        # Let running calls finish (off the loop) before their connections are closed.
        await asyncio.get_running_loop().run_in_executor(None, functools.partial(self._pool.shutdown, wait=True))
        self._store.close()
