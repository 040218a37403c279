"""The state store on PostgreSQL (``state.url = postgresql://user:pw@host:port/db``).

For several hosts that already run PostgreSQL and would rather not add Redis. The tables
(``sched_*``, created on first start) live in the database the URL names; it must not be the
legacy database (the legacy schema is not ours to change).

How the guarantees of ``SqliteStateStore`` carry over:

* Atomic claims: each check-then-write is one transaction. Placing a hold first takes a
  transaction-scoped advisory lock on its practitioner (``pg_advisory_xact_lock``), so two replicas
  placing overlapping holds queue instead of both seeing "free"; idempotency keys and journal
  entries are row-locked (``SELECT ... FOR UPDATE``); the reconciler claims stale intents with
  ``FOR UPDATE SKIP LOCKED``, so two replicas sweeping at once split the work instead of waiting.
* Expiry: rows carry their expiry; reads compare it with the caller's ``now`` (an injected clock
  works), the sweep deletes what has run out.
* Lock-owner liveness: leases (``stores.leases``) in ``sched_owners``.
* Change counters (``scheduling.change_counters``): ``sched_calendar`` and ``sched_holds_version``, one row
  each, bumped in the transaction that records the change (a calendar change; a hold placed, released or
  booked), which also sends ``NOTIFY sched_calendar`` / ``NOTIFY sched_holds``. A listener connection per
  process (LISTEN, in a thread) keeps local copies (``counters``), re-read on every (re)connection and every
  second; this process's own bumps are visible here at once. A cached ``$find`` reads the local copy; holds
  themselves are still read from PostgreSQL on every ``$find``, so another host's hold is never offered during
  a notification's delay.
* Waits: every transaction sets ``lock_timeout`` and ``statement_timeout`` to what is left of the
  caller's unit of work (``adapter.deadline``), so a lock held elsewhere ends in ``StateUnavailable``.

Blocking (psycopg 3, one connection per thread): run it through ``ThreadedStateStore``; its
``gate`` is this object, called from the backend's DB thread inside the legacy booking lock.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

import psycopg

from adapter.backends.protocol import Interval
from adapter.deadline import remaining
from adapter.scheduling.change_counters import CALENDAR, HOLDS, WatchedCounters
from adapter.scheduling.state import (
    DEFAULT_LEASE_SECONDS,
    DEFAULT_TIMEOUT_SECONDS,
    Hold,
    HoldConflict,
    IdempotencyInProgress,
    IdempotencyMismatch,
    JournalEntry,
    StateUnavailable,
    StoredResponse,
)
from adapter.scheduling.stores.intents import in_flight
from adapter.scheduling.stores.leases import DEFAULT_OWNER_LEASE_SECONDS, LeaseKeeper, new_owner, wall_clock

log = logging.getLogger("adapter.state")

P = ParamSpec("P")
T = TypeVar("T")

RETENTION_SECONDS = 86400
_SCHEMA_LOCK = 0x5C4ED  # advisory lock id: one process at a time creates the tables

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS sched_holds (
  id TEXT PRIMARY KEY, practitioner_id TEXT NOT NULL, location_id TEXT NOT NULL,
  start_s DOUBLE PRECISION NOT NULL, end_s DOUBLE PRECISION NOT NULL, expires_s DOUBLE PRECISION NOT NULL,
  client TEXT, payload TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS sched_holds_prac ON sched_holds (practitioner_id, start_s)",
    "CREATE INDEX IF NOT EXISTS sched_holds_exp ON sched_holds (expires_s)",
    # The patients a hold is for (empty: a proposal issued without a patient), so a patient's holds
    # block that patient's other bookings whoever the practitioner; GIN answers "holds of patient X".
    # Checked first: an ALTER TABLE locks the table exclusively even when it finds nothing to do.
    """DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema()
                 AND table_name = 'sched_holds' AND column_name = 'patients') THEN
    ALTER TABLE sched_holds ADD COLUMN patients TEXT[] NOT NULL DEFAULT '{}';
  END IF;
END $$""",
    "CREATE INDEX IF NOT EXISTS sched_holds_patients ON sched_holds USING GIN (patients)",
    """CREATE TABLE IF NOT EXISTS sched_proposals (
  id TEXT PRIMARY KEY, payload TEXT NOT NULL, expires_s DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS sched_idempotency (
  client TEXT NOT NULL, key TEXT NOT NULL, operation TEXT NOT NULL, body_hash TEXT NOT NULL, state TEXT NOT NULL,
  status INTEGER, media_type TEXT, body BYTEA, owner TEXT, created_s DOUBLE PRECISION NOT NULL,
  PRIMARY KEY (client, key))""",
    """CREATE TABLE IF NOT EXISTS sched_journal (
  token TEXT PRIMARY KEY, client TEXT, request_key TEXT, payload TEXT NOT NULL, state TEXT NOT NULL,
  appointment_id TEXT, owner TEXT, created_s DOUBLE PRECISION NOT NULL, updated_s DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS sched_journal_state ON sched_journal (state, updated_s)",
    "CREATE TABLE IF NOT EXISTS sched_calendar (id INTEGER PRIMARY KEY CHECK (id = 1), version BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS sched_holds_version (id INTEGER PRIMARY KEY CHECK (id = 1), version BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS sched_owners (owner TEXT PRIMARY KEY, expires_s DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE IF NOT EXISTS sched_secrets (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
]

# An owner/updated pair is stale when the owner is gone, its lease ran out, or the request lease is over.
_STALE_SQL = (
    "({t}.owner IS NULL OR NOT EXISTS (SELECT 1 FROM sched_owners o WHERE o.owner = {t}.owner "
    "AND o.expires_s > %(now)s) OR {t}.{updated} <= %(now)s - %(lease)s)"
)
_JOURNAL_COLS = "token, client, request_key, payload, state, appointment_id, owner, created_s, updated_s"


def _unavailable_on_error(method: Callable[P, T]) -> Callable[P, T]:
    """ "Cannot now" errors (unreachable, lock or statement timeout, read-only, shutting down) -> StateUnavailable."""

    @functools.wraps(method)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(*args, **kwargs)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise StateUnavailable(f"the adapter's state store (PostgreSQL) is not available: {exc}") from exc
        except psycopg.errors.ReadOnlySqlTransaction as exc:
            raise StateUnavailable(f"the adapter's state store (PostgreSQL) is read-only: {exc}") from exc

    return guarded


def _dt(s: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(s, tz=dt.UTC)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class PostgresStateStore:
    """The state in PostgreSQL tables (see the module docstring). Use it through ``ThreadedStateStore``."""

    def __init__(
        self,
        url: str,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        timeout_s: float = DEFAULT_TIMEOUT_SECONDS,
        owner_lease_seconds: float = DEFAULT_OWNER_LEASE_SECONDS,
        clock: Callable[[], float] = wall_clock,
        pool_size: int = 4,
    ) -> None:
        self.url = url
        self.lease_seconds = lease_seconds
        self.timeout_s = timeout_s
        self.owner = new_owner()
        self._guard = threading.Lock()
        self._idle: list[psycopg.Connection[Any]] = []
        self._slots = threading.BoundedSemaphore(pool_size)
        self._closed = False
        self._schema_ready = False
        try:
            self._ensure_schema()
        except StateUnavailable as exc:  # down at startup: not ready (503) until it is back
            log.warning("%s", exc)
        self.leases = LeaseKeeper(self._renew_lease, owner_lease_seconds, clock)
        self._counters = WatchedCounters(self._fetch_counters, self._watch_counters, name="postgres")

    @property
    def counters(self) -> WatchedCounters:
        return self._counters

    def _fetch_counters(self) -> tuple[int, int]:
        rows = self._read(
            "SELECT (SELECT version FROM sched_calendar WHERE id = 1), (SELECT version FROM sched_holds_version WHERE id = 1)"
        )
        return int(rows[0][0] or 0), int(rows[0][1] or 0)

    def _watch_counters(self, on_message: Callable[[], None], stop: threading.Event) -> None:
        with psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, int(self.timeout_s))) as conn:
            conn.execute("LISTEN sched_calendar")
            conn.execute("LISTEN sched_holds")
            on_message()  # listening: re-read, a bump may have gone by while nobody listened
            while not stop.is_set():
                for _ in conn.notifies(timeout=0.5, stop_after=1):
                    on_message()

    @staticmethod
    def _bump_holds(cur: psycopg.Cursor[Any]) -> int:
        """In the transaction that changed holds: the holds counter, and a notice to every listener."""
        cur.execute(
            "INSERT INTO sched_holds_version (id, version) VALUES (1, 1) "
            "ON CONFLICT (id) DO UPDATE SET version = sched_holds_version.version + 1 RETURNING version"
        )
        row = cur.fetchone()
        cur.execute("NOTIFY sched_holds")
        return int(row[0]) if row else 0

    # -- connections -----------------------------------------------------------------------------
    # A small bounded pool shared by every thread of the process (the state pool, the backend's DB
    # threads through the gate, the lease thread): a PostgreSQL server has a hard connection limit
    # shared by every replica, and each call holds a connection only for its own transaction.
    def _acquire(self) -> psycopg.Connection[Any]:
        if not self._slots.acquire(timeout=remaining(self.timeout_s)):
            raise StateUnavailable(
                f"the adapter's state store (PostgreSQL) is busy: no connection free within {self.timeout_s:g} s"
            )
        try:
            with self._guard:
                conn = self._idle.pop() if self._idle else None
            if conn is None or conn.closed:
                conn = psycopg.connect(
                    self.url, autocommit=True, connect_timeout=max(1, int(remaining(self.timeout_s)))
                )
            if not self._schema_ready:
                self._create_schema(conn)
            return conn
        except BaseException:
            self._slots.release()
            raise

    def _give_back(self, conn: psycopg.Connection[Any], broken: bool) -> None:
        try:
            if broken or conn.closed or self._closed:
                conn.close()
            else:
                with self._guard:
                    self._idle.append(conn)
        finally:
            self._slots.release()

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Cursor[Any]]:
        conn = self._acquire()
        broken = False
        try:
            with conn.transaction(), conn.cursor() as cur:
                # Lock waits and statements end with the caller's unit of work (or timeout_s).
                ms = _ms(remaining(self.timeout_s))
                cur.execute(f"SET LOCAL lock_timeout = {ms}")
                cur.execute(f"SET LOCAL statement_timeout = {ms}")
                yield cur
        except (psycopg.OperationalError, psycopg.InterfaceError):
            broken = True  # a lost or timed-out connection is not reused
            raise
        finally:
            self._give_back(conn, broken)

    def _read(self, sql: str, params: dict[str, Any] | tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._tx() as cur:
            cur.execute(sql, params)
            return cur.fetchall()

    @_unavailable_on_error
    def _ensure_schema(self) -> None:
        self._give_back(self._acquire(), broken=False)

    def _create_schema(self, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for stmt in _SCHEMA:
                cur.execute(stmt)
        self._schema_ready = True

    def _renew_lease(self, until_s: float) -> None:
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO sched_owners (owner, expires_s) VALUES (%s, %s) "
                "ON CONFLICT (owner) DO UPDATE SET expires_s = EXCLUDED.expires_s",
                (self.owner, until_s),
            )

    @_unavailable_on_error
    def ping(self) -> None:
        self._read("SELECT 1")

    def _stale_params(self, now: dt.datetime) -> dict[str, Any]:
        return {"now": now.timestamp(), "lease": self.lease_seconds}

    # -- holds -------------------------------------------------------------------------------
    @_unavailable_on_error
    def holds_by_practitioner(
        self, practitioner_ids: Iterable[str], window: Interval, now: dt.datetime
    ) -> dict[str, list[Interval]]:
        ids = list(practitioner_ids)
        if not ids:
            return {}
        rows = self._read(
            "SELECT practitioner_id, start_s, end_s FROM sched_holds WHERE practitioner_id = ANY(%s) "
            "AND expires_s > %s AND start_s < %s AND end_s > %s",
            (ids, now.timestamp(), window.end.timestamp(), window.start.timestamp()),
        )
        out: dict[str, list[Interval]] = {}
        for prac, s, e in rows:
            out.setdefault(prac, []).append(Interval(_dt(s), _dt(e)))
        return out

    def _row_to_hold(self, row: tuple[Any, ...]) -> Hold:
        hid, prac, loc, s, e, x, client, payload = row[:8]
        return Hold(hid, prac, loc, Interval(_dt(s), _dt(e)), _dt(x), client, json.loads(payload))

    @_unavailable_on_error
    def get_hold(self, hold_id: str, now: dt.datetime) -> Hold | None:
        rows = self._read("SELECT * FROM sched_holds WHERE id = %s AND expires_s > %s", (hold_id, now.timestamp()))
        return self._row_to_hold(rows[0]) if rows else None

    def _conflicts(
        self,
        cur: psycopg.Cursor[Any],
        practitioner_id: str,
        interval: Interval,
        now: dt.datetime,
        own_hold: str | None,
        client: str | None,
    ) -> list[tuple[Any, ...]]:
        """Active holds overlapping ``interval`` except ``own_hold`` when it is the caller's own
        (anonymous, or placed by the same client), as in the SQLite store."""
        cur.execute(
            "SELECT id, start_s, end_s, client FROM sched_holds WHERE practitioner_id = %s AND expires_s > %s "
            "AND start_s < %s AND end_s > %s",
            (practitioner_id, now.timestamp(), interval.end.timestamp(), interval.start.timestamp()),
        )
        return [r for r in cur.fetchall() if not (r[0] == own_hold and (r[3] is None or r[3] == client))]

    @_unavailable_on_error
    def check_free(
        self,
        practitioner_id: str,
        interval: Interval,
        now: dt.datetime,
        own_hold: str | None,
        client: str | None = None,
    ) -> None:
        with self._tx() as cur:
            found = self._conflicts(cur, practitioner_id, interval, now, own_hold, client)
        if found:
            raise HoldConflict(practitioner_id, Interval(_dt(found[0][1]), _dt(found[0][2])))

    def _patient_conflict(
        self,
        cur: psycopg.Cursor[Any],
        patient_ids: Iterable[str],
        interval: Interval,
        now: dt.datetime,
        own_hold: str | None,
    ) -> HoldConflict | None:
        for pid in patient_ids:
            cur.execute(
                "SELECT practitioner_id, start_s, end_s FROM sched_holds WHERE patients @> ARRAY[%s]::text[] "
                "AND expires_s > %s AND start_s < %s AND end_s > %s AND id IS DISTINCT FROM %s "
                "ORDER BY start_s LIMIT 1",
                (pid, now.timestamp(), interval.end.timestamp(), interval.start.timestamp(), own_hold),
            )
            row = cur.fetchone()
            if row:
                return HoldConflict(row[0], Interval(_dt(row[1]), _dt(row[2])), patient_id=pid)
        return None

    @_unavailable_on_error
    def check_patient_free(
        self, patient_ids: Iterable[str], interval: Interval, now: dt.datetime, own_hold: str | None
    ) -> None:
        """No active hold for any of these patients overlaps ``interval`` (except ``own_hold``).

        Call inside the legacy lock (the backend locks the patient too), like ``check_free``."""
        pats = [str(p) for p in patient_ids]
        if not pats:
            return
        with self._tx() as cur:
            found = self._patient_conflict(cur, pats, interval, now, own_hold)
        if found is not None:
            raise found

    @_unavailable_on_error
    def holds_by_patient(self, patient_ids: Iterable[str], window: Interval, now: dt.datetime) -> list[Interval]:
        out: list[Interval] = []
        pats = [str(p) for p in patient_ids]
        if not pats:
            return out
        with self._tx() as cur:
            for pid in pats:
                cur.execute(
                    "SELECT start_s, end_s FROM sched_holds WHERE patients @> ARRAY[%s]::text[] AND expires_s > %s "
                    "AND start_s < %s AND end_s > %s",
                    (pid, now.timestamp(), window.end.timestamp(), window.start.timestamp()),
                )
                out.extend(Interval(_dt(s), _dt(e)) for s, e in cur.fetchall())
        return out

    @_unavailable_on_error
    def place_hold(self, hold: Hold, now: dt.datetime) -> Hold:
        """Insert ``hold``; an active hold with the same id is returned unchanged (no extension)."""
        patient_ids = [str(p) for p in hold.payload.get("patient_ids") or ()]
        # Serialises hold placement per practitioner and per patient across every replica until this
        # commits. Taken in one sorted order, so two placements sharing locks cannot deadlock.
        locks = sorted({hold.practitioner_id, *(f"Patient/{p}" for p in patient_ids)})
        with self._tx() as cur:
            for name in locks:
                cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (name,))
            cur.execute("SELECT * FROM sched_holds WHERE id = %s AND expires_s > %s", (hold.id, now.timestamp()))
            existing = cur.fetchone()
            if existing:
                return self._row_to_hold(existing)
            found = [
                r for r in self._conflicts(cur, hold.practitioner_id, hold.interval, now, None, None) if r[0] != hold.id
            ]
            if found:
                raise HoldConflict(hold.practitioner_id, Interval(_dt(found[0][1]), _dt(found[0][2])))
            own = self._patient_conflict(cur, patient_ids, hold.interval, now, hold.id)
            if own is not None:
                raise own
            cur.execute("DELETE FROM sched_holds WHERE id = %s", (hold.id,))
            cur.execute(
                "INSERT INTO sched_holds (id, practitioner_id, location_id, start_s, end_s, expires_s, client, "
                "payload, patients) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    hold.id,
                    hold.practitioner_id,
                    hold.location_id,
                    hold.interval.start.timestamp(),
                    hold.interval.end.timestamp(),
                    hold.expires_at.timestamp(),
                    hold.client,
                    json.dumps(hold.payload),
                    patient_ids,
                ),
            )
            version = self._bump_holds(cur)
        self._counters.seen(HOLDS, version)
        return hold

    @_unavailable_on_error
    def release(self, hold_id: str) -> None:
        with self._tx() as cur:
            cur.execute("DELETE FROM sched_holds WHERE id = %s", (hold_id,))
            version = self._bump_holds(cur) if cur.rowcount else 0
        self._counters.seen(HOLDS, version)

    @_unavailable_on_error
    def sweep(self, now: dt.datetime) -> int:
        t = now.timestamp()
        with self._tx() as cur:
            cur.execute("DELETE FROM sched_holds WHERE expires_s <= %s", (t,))
            n = cur.rowcount
            cur.execute("DELETE FROM sched_proposals WHERE expires_s <= %s", (t,))
            n += cur.rowcount
            cur.execute("DELETE FROM sched_idempotency WHERE created_s <= %s", (t - RETENTION_SECONDS,))
            cur.execute("DELETE FROM sched_journal WHERE state = 'done' AND updated_s <= %s", (t - RETENTION_SECONDS,))
            cur.execute("DELETE FROM sched_owners WHERE expires_s <= %s", (t - RETENTION_SECONDS,))
        return n

    # -- stored proposals ----------------------------------------------------------------------
    @_unavailable_on_error
    def put_proposal(self, proposal_id: str, payload: str, expires_at: dt.datetime) -> None:
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO sched_proposals VALUES (%s, %s, %s) ON CONFLICT (id) DO UPDATE "
                "SET payload = EXCLUDED.payload, expires_s = EXCLUDED.expires_s",
                (proposal_id, payload, expires_at.timestamp()),
            )

    @_unavailable_on_error
    def get_proposal(self, proposal_id: str, now: dt.datetime) -> str | None:
        rows = self._read(
            "SELECT payload FROM sched_proposals WHERE id = %s AND expires_s > %s", (proposal_id, now.timestamp())
        )
        return rows[0][0] if rows else None

    # -- idempotency -------------------------------------------------------------------------
    @_unavailable_on_error
    def idempotency_begin(
        self, client: str, key: str, operation: str, body_hash: str, now: dt.datetime
    ) -> StoredResponse | None:
        """None: go ahead (the key is now reserved by this process). A StoredResponse: replay it."""
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO sched_idempotency (client, key, operation, body_hash, state, created_s, owner) "
                "VALUES (%s, %s, %s, %s, 'started', %s, %s) ON CONFLICT (client, key) DO NOTHING",
                (client, key, operation, body_hash, now.timestamp(), self.owner),
            )
            if cur.rowcount == 1:
                return None
            cur.execute(
                "SELECT i.operation, i.body_hash, i.state, i.status, i.media_type, i.body, "
                + _STALE_SQL.format(t="i", updated="created_s")
                + " FROM sched_idempotency i WHERE client = %(client)s AND key = %(key)s FOR UPDATE OF i",
                {"client": client, "key": key, **self._stale_params(now)},
            )
            row = cur.fetchone()
            if row is None:  # finished and forgotten between the two statements: take it
                cur.execute(
                    "INSERT INTO sched_idempotency (client, key, operation, body_hash, state, created_s, owner) "
                    "VALUES (%s, %s, %s, %s, 'started', %s, %s)",
                    (client, key, operation, body_hash, now.timestamp(), self.owner),
                )
                return None
            op, h, state, status, media_type, body, stale = row
            if op != operation or h != body_hash:
                raise IdempotencyMismatch(f"Idempotency-Key {key!r} was already used with a different request")
            if state == "done":
                return StoredResponse(status, media_type, bytes(body))
            if not stale:
                raise IdempotencyInProgress(f"a request with Idempotency-Key {key!r} is still being processed")
            cur.execute(
                "UPDATE sched_idempotency SET owner = %s, created_s = %s WHERE client = %s AND key = %s",
                (self.owner, now.timestamp(), client, key),
            )
            return None

    @_unavailable_on_error
    def idempotency_finish(self, client: str, key: str, response: StoredResponse | None) -> None:
        with self._tx() as cur:
            if response is None:
                cur.execute(
                    "DELETE FROM sched_idempotency WHERE client = %s AND key = %s AND state = 'started'", (client, key)
                )
            else:
                cur.execute(
                    "UPDATE sched_idempotency SET state = 'done', status = %s, media_type = %s, body = %s, "
                    "owner = NULL WHERE client = %s AND key = %s",
                    (response.status, response.media_type, response.body, client, key),
                )

    # -- calendar version ----------------------------------------------------------------------
    @_unavailable_on_error
    def calendar_version(self) -> int:
        rows = self._read("SELECT version FROM sched_calendar WHERE id = 1")
        return int(rows[0][0]) if rows else 0

    @_unavailable_on_error
    def bump_calendar_version(self) -> None:
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO sched_calendar (id, version) VALUES (1, 1) "
                "ON CONFLICT (id) DO UPDATE SET version = sched_calendar.version + 1 RETURNING version"
            )
            row = cur.fetchone()
            cur.execute("NOTIFY sched_calendar")
        self._counters.seen(CALENDAR, int(row[0]) if row else 0)

    # -- signing secret ------------------------------------------------------------------------
    @_unavailable_on_error
    def shared_secret(self) -> bytes:
        """The signing secret every replica on this store uses (created once, by whoever comes first)."""
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO sched_secrets VALUES ('signing', %s) ON CONFLICT (name) DO NOTHING",
                (secrets.token_urlsafe(32),),
            )
            cur.execute("SELECT value FROM sched_secrets WHERE name = 'signing'")
            row = cur.fetchone()
        assert row is not None  # inserted just above unless someone else did
        return str(row[0]).encode("utf-8")

    # -- booking journal -----------------------------------------------------------------------
    def _row_to_entry(self, row: tuple[Any, ...]) -> JournalEntry:
        token, client, request_key, payload, state, appt_id, owner, created_s, updated_s = row
        return JournalEntry(
            token, client, request_key, json.loads(payload), state, appt_id, owner, _dt(created_s), _dt(updated_s)
        )

    @_unavailable_on_error
    def journal_get(self, token: str) -> JournalEntry | None:
        rows = self._read(f"SELECT {_JOURNAL_COLS} FROM sched_journal WHERE token = %s", (token,))
        return self._row_to_entry(rows[0]) if rows else None

    @_unavailable_on_error
    def journal_intent(
        self, token: str, *, client: str | None, request_key: str | None, payload: dict[str, Any], now: dt.datetime
    ) -> None:
        with self._tx() as cur:
            self._write_intent(cur, token, client, request_key, payload, now)

    def _write_intent(
        self,
        cur: psycopg.Cursor[Any],
        token: str,
        client: str | None,
        request_key: str | None,
        payload: dict[str, Any],
        now: dt.datetime,
    ) -> None:
        t = now.timestamp()
        cur.execute(
            f"INSERT INTO sched_journal ({_JOURNAL_COLS}) VALUES (%s, %s, %s, %s, 'intent', NULL, %s, %s, %s) "
            "ON CONFLICT (token) DO UPDATE SET client = EXCLUDED.client, request_key = EXCLUDED.request_key, "
            "payload = EXCLUDED.payload, state = 'intent', appointment_id = NULL, owner = EXCLUDED.owner, "
            "created_s = EXCLUDED.created_s, updated_s = EXCLUDED.updated_s",
            (token, client, request_key, json.dumps(payload), self.owner, t, t),
        )

    @staticmethod
    def _intents(cur: psycopg.Cursor[Any]) -> list[tuple[str, str, Interval, tuple[str, ...]]]:
        """Every booking in flight: (token, practitioner, interval, patients), read from the intents' payloads
        as the SQLite store reads them; an intent that is not the booking of a slot occupies nothing."""
        cur.execute("SELECT token, payload FROM sched_journal WHERE state = 'intent'")
        out = []
        for token, payload in cur.fetchall():
            try:
                prac, span, pats = in_flight(json.loads(payload))
            except (KeyError, TypeError, ValueError):
                continue
            out.append((str(token), prac, span, pats))
        return out

    @_unavailable_on_error
    def intents_overlapping(self, window: Interval) -> list[tuple[str, Interval, tuple[str, ...]]]:
        """Bookings in flight overlapping ``window``: (practitioner, interval, patients), as in the SQLite store."""
        with self._tx() as cur:
            return [(p, i, pats) for _, p, i, pats in self._intents(cur) if i.overlaps(window)]

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
        """``journal_intent`` for a backend that cannot lock (see the SQLite store): in ONE transaction, refuse
        (``HoldConflict``) a foreign hold or another booking in flight overlapping the practitioner's or a
        patient's time, else record the intent. The advisory locks of ``place_hold`` (same names, same sorted
        order) serialise it with every hold placement and every other exclusive intent sharing the practitioner
        or a patient, across replicas."""
        patients = {str(p) for p in patient_ids}
        locks = sorted({practitioner_id, *(f"Patient/{p}" for p in patients)})
        with self._tx() as cur:
            for name in locks:
                cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (name,))
            found = self._conflicts(cur, practitioner_id, interval, now, token, client)
            if found:
                raise HoldConflict(practitioner_id, Interval(_dt(found[0][1]), _dt(found[0][2])))
            own = self._patient_conflict(cur, sorted(patients), interval, now, token)
            if own is not None:
                raise own
            for _token, prac, span, pats in self._intents(cur):
                if not span.overlaps(interval):
                    continue
                if prac == practitioner_id:
                    raise HoldConflict(practitioner_id, span)
                shared = patients.intersection(pats)
                if shared:
                    raise HoldConflict(prac, span, patient_id=sorted(shared)[0])
            self._write_intent(cur, token, client, request_key, payload, now)

    @_unavailable_on_error
    def journal_done(self, token: str, appointment_id: str, now: dt.datetime, *, release_hold: bool) -> None:
        with self._tx() as cur:
            cur.execute(
                "UPDATE sched_journal SET state = 'done', appointment_id = %s, owner = %s, updated_s = %s "
                "WHERE token = %s",
                (appointment_id, self.owner, now.timestamp(), token),
            )
            version = 0
            if release_hold:
                cur.execute("DELETE FROM sched_holds WHERE id = %s", (token,))
                version = self._bump_holds(cur) if cur.rowcount else 0
        self._counters.seen(HOLDS, version)

    @_unavailable_on_error
    def journal_abandon(self, token: str, now: dt.datetime) -> None:
        with self._tx() as cur:
            cur.execute(
                "UPDATE sched_journal SET owner = NULL, updated_s = %s WHERE token = %s AND state = 'intent'",
                (now.timestamp(), token),
            )

    @_unavailable_on_error
    def journal_drop(self, token: str) -> None:
        with self._tx() as cur:
            cur.execute("DELETE FROM sched_journal WHERE token = %s AND state = 'intent'", (token,))

    def _claim(self, now: dt.datetime, limit: int, token: str | None) -> list[JournalEntry]:
        params: dict[str, Any] = {**self._stale_params(now), "limit": limit, "token": token}
        with self._tx() as cur:
            cur.execute(
                f"SELECT {', '.join('j.' + c for c in _JOURNAL_COLS.split(', '))} FROM sched_journal j "
                "WHERE j.state = 'intent' AND (%(token)s::text IS NULL OR j.token = %(token)s) AND "
                + _STALE_SQL.format(t="j", updated="updated_s")
                + " ORDER BY j.updated_s LIMIT %(limit)s FOR UPDATE OF j SKIP LOCKED",
                params,
            )
            rows = cur.fetchall()
            for row in rows:
                cur.execute(
                    "UPDATE sched_journal SET owner = %s, updated_s = %s WHERE token = %s",
                    (self.owner, now.timestamp(), row[0]),
                )
        return [self._row_to_entry(r) for r in rows]

    @_unavailable_on_error
    def journal_claim(self, token: str, now: dt.datetime) -> JournalEntry | None:
        claimed = self._claim(now, 1, token)
        return claimed[0] if claimed else None

    @_unavailable_on_error
    def journal_claim_stale(self, now: dt.datetime, limit: int = 100) -> list[JournalEntry]:
        return self._claim(now, limit, None)

    def close(self) -> None:
        self.leases.stop()
        self._counters.close()
        try:
            with self._tx() as cur:  # our leftovers are stale at once
                cur.execute("DELETE FROM sched_owners WHERE owner = %s", (self.owner,))
        except psycopg.Error as exc:
            log.info("could not drop the owner lease (it runs out by itself): %s", exc)
        self._closed = True
        with self._guard:
            conns, self._idle = self._idle, []
        for conn in conns:
            conn.close()
