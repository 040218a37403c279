"""``PostgresSiuStore``: the SIU inbox and mirror in the shared state database (``state.url = postgresql://...``).

Every replica runs its own MLLP listener and applier over the same tables (``sched_hl7_*``, created on first use),
so a message may reach any replica and any replica's reads see what any applier applied.

* ACK path: one ``INSERT ... ON CONFLICT (sender, control_id) DO NOTHING`` in autocommit: when it returns the
  transaction has committed (``synchronous_commit`` as the server has it, normally on), so the ACK that follows
  never precedes durability, and the unique key de-duplicates across replicas.
* Applier: a batch is one transaction. Its claim is ``SELECT ... FOR UPDATE SKIP LOCKED``, so two replicas'
  claims take disjoint messages and never wait for each other; marks and mirror writes commit with it, or the
  messages are waiting again. Mirror writes (batches and confirmed SRRs alike) take one transaction-scoped
  advisory lock first: they take turns, so the read-decide-write of the version rule needs no retry and two
  batches never lock appointment rows in opposite orders (no deadlock).
* Retention: ``purge_applied`` is one transaction that deletes applied messages (a partial index by
  ``received_at``, the database server's clock) picked ``FOR UPDATE SKIP LOCKED``, with their stale records.
  Applied is final (only a committed batch marks a message; a claim takes waiting rows only), so a purge never
  meets a waiting or claimed message; purges of two replicas skip each other's rows instead of waiting.
* Text columns cannot hold NUL in PostgreSQL: NUL characters in parsed text (not in the raw inbox message, kept as
  ``BYTEA``) are stored as U+FFFD.

Three connections per store object (ACK path, applier, readers), each behind its own lock; a connection that
failed is dropped and the next call connects again. Errors are raised as ``SiuStoreUnavailable``.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, ParamSpec, TypeVar

import psycopg

from adapter.hl7v2.store import (
    APPLIED,
    FAILED,
    WAITING,
    ActorKind,
    ApplyResult,
    InboxMessage,
    MirroredAppointment,
    MirrorWrite,
    SiuStoreUnavailable,
    appointment_from_row,
    mirror_row,
    supersedes,
    utc_text,
)

P = ParamSpec("P")
T = TypeVar("T")

_SCHEMA_LOCK = "sched_hl7_schema"  # advisory lock names (hashtextextended): one creator of the tables at a time
_MIRROR_LOCK = "sched_hl7_mirror"  # mirror writers take turns

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS sched_hl7_inbox (
  id BIGSERIAL PRIMARY KEY, sender TEXT NOT NULL, control_id TEXT NOT NULL, message_type TEXT NOT NULL,
  received_at TIMESTAMPTZ NOT NULL DEFAULT now(), raw BYTEA NOT NULL,
  state SMALLINT NOT NULL DEFAULT 0,  -- 0 waiting, 1 applied, 2 failed (see error)
  error TEXT, UNIQUE (sender, control_id))""",
    "CREATE INDEX IF NOT EXISTS sched_hl7_inbox_waiting ON sched_hl7_inbox (id) WHERE state = 0",
    "CREATE INDEX IF NOT EXISTS sched_hl7_inbox_applied ON sched_hl7_inbox (received_at, id) WHERE state = 1",
    """CREATE TABLE IF NOT EXISTS sched_hl7_appointment (
  filler_id TEXT PRIMARY KEY, placer_id TEXT NOT NULL, status TEXT, legacy_status TEXT NOT NULL,
  status_reason TEXT, start_utc TEXT, end_utc TEXT, start_local TEXT, end_local TEXT, service TEXT NOT NULL,
  reason TEXT NOT NULL, patient_family TEXT NOT NULL, patient_given TEXT NOT NULL, version TEXT NOT NULL,
  last_trigger TEXT NOT NULL, last_control_id TEXT NOT NULL, sender TEXT NOT NULL, raw TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS sched_hl7_appointment_placer ON sched_hl7_appointment (placer_id)",
    """CREATE TABLE IF NOT EXISTS sched_hl7_actor (
  filler_id TEXT NOT NULL, kind TEXT NOT NULL, actor_id TEXT NOT NULL, position INTEGER NOT NULL,
  PRIMARY KEY (kind, actor_id, filler_id))""",
    "CREATE INDEX IF NOT EXISTS sched_hl7_actor_by_appt ON sched_hl7_actor (filler_id, position)",
    """CREATE TABLE IF NOT EXISTS sched_hl7_stale (
  inbox_id BIGINT PRIMARY KEY, filler_id TEXT NOT NULL, trigger TEXT NOT NULL, version TEXT NOT NULL)""",
]

COLUMNS = (
    "filler_id, placer_id, status, legacy_status, status_reason, start_utc, end_utc, start_local, end_local, "
    "service, reason, patient_family, patient_given, version, last_trigger, last_control_id, sender"
)
_A_COLUMNS = ", ".join("a." + c.strip() for c in COLUMNS.split(","))
_UPDATE = ", ".join(f"{c.strip()} = EXCLUDED.{c.strip()}" for c in (COLUMNS + ", raw").split(",")[1:])


def _unavailable_on_error(method: Callable[P, T]) -> Callable[P, T]:
    @functools.wraps(method)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(*args, **kwargs)
        except psycopg.Error as exc:
            raise SiuStoreUnavailable(f"the SIU store (PostgreSQL) failed: {exc}") from exc

    return guarded


def _text(value: str | None) -> str | None:
    return None if value is None else value.replace("\x00", "\ufffd")


def _load(cur: psycopg.Cursor[Any], rows: Sequence[Sequence[Any]]) -> list[MirroredAppointment]:
    if not rows:
        return []
    ids = [str(r[0]) for r in rows]
    cur.execute(
        "SELECT filler_id, kind, actor_id FROM sched_hl7_actor WHERE filler_id = ANY(%s) ORDER BY position", (ids,)
    )
    actors: dict[str, dict[str, list[str]]] = {}
    for fid, kind, actor in cur.fetchall():
        actors.setdefault(fid, {}).setdefault(kind, []).append(actor)
    return [appointment_from_row(r, actors.get(str(r[0]), {})) for r in rows]


def _lock_mirror(cur: psycopg.Cursor[Any]) -> None:
    """Wait for the mirror's advisory lock; held until the transaction ends."""
    cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (_MIRROR_LOCK,))


def _apply(cur: psycopg.Cursor[Any], write: MirrorWrite) -> ApplyResult:
    """One mirror write inside the caller's transaction, which holds the mirror's advisory lock."""
    a = write.appointment
    cur.execute("SELECT version FROM sched_hl7_appointment WHERE filler_id = %s", (a.filler_id,))
    row = cur.fetchone()
    if not supersedes(a.version, None if row is None else str(row[0])):
        cur.execute(
            "INSERT INTO sched_hl7_stale (inbox_id, filler_id, trigger, version) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (inbox_id) DO NOTHING",
            (write.inbox_id, _text(a.filler_id), _text(a.last_trigger), a.version),
        )
        return "stale"
    values = mirror_row(write)
    cur.execute(
        f"INSERT INTO sched_hl7_appointment ({COLUMNS}, raw) VALUES ({', '.join(['%s'] * 18)}) "
        f"ON CONFLICT (filler_id) DO UPDATE SET {_UPDATE}",
        [_text(v) for v in values],
    )
    cur.execute("DELETE FROM sched_hl7_actor WHERE filler_id = %s", (_text(a.filler_id),))
    actors = [("practitioner", x) for x in a.practitioner_ids]
    actors += [("location", x) for x in a.location_ids]
    actors += [("patient", x) for x in a.patient_ids]
    if actors:
        cur.executemany(
            "INSERT INTO sched_hl7_actor (filler_id, kind, actor_id, position) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT DO NOTHING",
            [(_text(a.filler_id), kind, _text(actor), n) for n, (kind, actor) in enumerate(actors)],
        )
    return "applied"


class _Connection:
    """One lazily opened autocommit connection behind a lock; dropped when it fails."""

    def __init__(self, store: PostgresSiuStore) -> None:
        self.store = store
        self.lock = threading.Lock()
        self.conn: psycopg.Connection[Any] | None = None

    @contextmanager
    def use(self) -> Iterator[psycopg.Connection[Any]]:
        with self.lock:
            if self.conn is None or self.conn.closed:
                self.conn = self.store.connect()
            try:
                yield self.conn
            except (psycopg.OperationalError, psycopg.InterfaceError):
                self.conn.close()  # lost or timed out: the next call connects again
                self.conn = None
                raise

    def close(self) -> None:
        with self.lock:
            if self.conn is not None:
                self.conn.close()
                self.conn = None


class _PostgresBatch:
    def __init__(self, cur: psycopg.Cursor[Any], messages: list[InboxMessage]) -> None:
        self.cur = cur
        self.messages: Sequence[InboxMessage] = messages
        self.marks: list[tuple[int, str | None, int]] = []
        self.locked = False

    def apply(self, write: MirrorWrite) -> ApplyResult:
        if not self.locked:  # taken at the first write only: a batch of stale or failed messages does not wait
            _lock_mirror(self.cur)
            self.locked = True
        return _apply(self.cur, write)

    def mark_applied(self, inbox_id: int) -> None:
        self.marks.append((APPLIED, None, inbox_id))

    def mark_failed(self, inbox_id: int, error: str) -> None:
        self.marks.append((FAILED, _text(error), inbox_id))


class PostgresSiuStore:
    """``SiuStore`` over PostgreSQL tables shared by every replica (see the module docstring)."""

    def __init__(self, url: str, *, timeout_s: float = 30.0) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._schema_ready = False
        self._ack = _Connection(self)
        self._apply = _Connection(self)
        self._read = _Connection(self)

    def connect(self) -> psycopg.Connection[Any]:
        ms = max(1, int(self.timeout_s * 1000))
        conn = psycopg.connect(
            self.url,
            autocommit=True,
            connect_timeout=max(1, int(self.timeout_s)),
            # No statement or lock wait outlives the timeout: the ACK path then closes without an ACK.
            options=f"-c statement_timeout={ms} -c lock_timeout={ms}",
        )
        if not self._schema_ready:
            try:
                self._create_schema(conn)
            except BaseException:
                conn.close()
                raise
            self._schema_ready = True
        return conn

    @staticmethod
    def _create_schema(conn: psycopg.Connection[Any]) -> None:
        """The tables and indexes, if missing: one creator at a time (a session advisory lock), each statement
        committed on its own. ``CREATE INDEX IF NOT EXISTS`` locks its table (SHARE) even when the index exists; in
        one transaction that lock on the inbox would be held while waiting for the mirror tables, which another
        replica's batch holds while it waits to mark inbox rows: a deadlock."""
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (_SCHEMA_LOCK,))
            try:
                # No statement timeout here: the first start after an upgrade builds sched_hl7_inbox_applied over
                # an inbox that may hold millions of rows (once; a timed-out build would be retried forever).
                cur.execute("SET statement_timeout = 0")
                for stmt in _SCHEMA:
                    cur.execute(stmt)
            finally:
                if not conn.closed and not conn.broken:
                    cur.execute("RESET statement_timeout")
                    cur.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (_SCHEMA_LOCK,))

    # --- inbox ---
    @_unavailable_on_error
    def store_message(self, sender: str, control_id: str, message_type: str, raw: bytes) -> bool:
        with self._ack.use() as conn:
            cur = conn.execute(
                "INSERT INTO sched_hl7_inbox (sender, control_id, message_type, raw) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (sender, control_id) DO NOTHING",
                (_text(sender), _text(control_id), _text(message_type), raw),
            )
            return cur.rowcount == 1

    @_unavailable_on_error
    def count_messages(self, state: int | None = None) -> int:
        with self._read.use() as conn:
            if state is None:
                row = conn.execute("SELECT count(*) FROM sched_hl7_inbox").fetchone()
            else:
                row = conn.execute("SELECT count(*) FROM sched_hl7_inbox WHERE state = %s", (state,)).fetchone()
            return int(row[0]) if row else 0

    @_unavailable_on_error
    def purge_applied(self, before: datetime, limit: int) -> int:
        with self._apply.use() as conn, conn.transaction(), conn.cursor() as cur:
            # ``state = 1`` written out: the partial index sched_hl7_inbox_applied serves only that literal.
            cur.execute(
                f"DELETE FROM sched_hl7_inbox WHERE id IN (SELECT id FROM sched_hl7_inbox WHERE state = {APPLIED} "
                "AND received_at < %s ORDER BY received_at, id LIMIT %s FOR UPDATE SKIP LOCKED) "
                f"AND state = {APPLIED} RETURNING id",
                (before, limit),
            )
            ids = [int(r[0]) for r in cur.fetchall()]
            if ids:
                cur.execute("DELETE FROM sched_hl7_stale WHERE inbox_id = ANY(%s)", (ids,))
            return len(ids)

    # --- applier ---
    @contextmanager
    def claim(self, limit: int) -> Iterator[_PostgresBatch]:
        try:
            with self._apply.use() as conn:
                # Look first: an idle applier opens no transaction.
                idle = conn.execute("SELECT 1 FROM sched_hl7_inbox WHERE state = %s LIMIT 1", (WAITING,)).fetchone()
                if idle is None:
                    with conn.cursor() as cur:
                        yield _PostgresBatch(cur, [])
                    return
                with conn.transaction(), conn.cursor() as cur:
                    cur.execute(
                        "SELECT id, raw FROM sched_hl7_inbox WHERE state = %s ORDER BY id LIMIT %s "
                        "FOR UPDATE SKIP LOCKED",
                        (WAITING, limit),
                    )
                    batch = _PostgresBatch(cur, [InboxMessage(int(i), bytes(raw)) for i, raw in cur.fetchall()])
                    yield batch
                    if batch.marks:
                        cur.executemany("UPDATE sched_hl7_inbox SET state = %s, error = %s WHERE id = %s", batch.marks)
        except psycopg.Error as exc:
            raise SiuStoreUnavailable(f"the SIU store (PostgreSQL) failed: {exc}") from exc

    @_unavailable_on_error
    def record(self, write: MirrorWrite) -> ApplyResult:
        with self._apply.use() as conn, conn.transaction(), conn.cursor() as cur:
            _lock_mirror(cur)
            return _apply(cur, write)

    # --- reads ---
    def _select(self, sql: str, params: Sequence[Any]) -> list[MirroredAppointment]:
        with self._read.use() as conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return _load(cur, cur.fetchall())

    @_unavailable_on_error
    def by_filler_id(self, filler_id: str) -> MirroredAppointment | None:
        found = self._select(f"SELECT {COLUMNS} FROM sched_hl7_appointment WHERE filler_id = %s", (_text(filler_id),))
        return found[0] if found else None

    @_unavailable_on_error
    def by_placer_id(self, placer_id: str) -> list[MirroredAppointment]:
        return self._select(f"SELECT {COLUMNS} FROM sched_hl7_appointment WHERE placer_id = %s", (_text(placer_id),))

    @_unavailable_on_error
    def for_actor(
        self,
        kind: ActorKind,
        actor_id: str,
        start: datetime,
        end: datetime,
        *,
        statuses: frozenset[str] | None = None,
    ) -> list[MirroredAppointment]:
        found = self._select(
            f"SELECT {_A_COLUMNS} FROM sched_hl7_actor x JOIN sched_hl7_appointment a ON a.filler_id = x.filler_id "
            "WHERE x.kind = %s AND x.actor_id = %s AND a.start_utc < %s AND a.end_utc > %s "
            "ORDER BY a.start_utc, a.filler_id",
            (kind, _text(actor_id), utc_text(end), utc_text(start)),
        )
        if statuses is not None:
            found = [f for f in found if f.status in statuses]
        return found

    @_unavailable_on_error
    def all_appointments(self) -> list[MirroredAppointment]:
        return self._select(f"SELECT {COLUMNS} FROM sched_hl7_appointment", ())

    @_unavailable_on_error
    def patient_names(self) -> dict[str, tuple[str, str]]:
        with self._read.use() as conn:
            rows = conn.execute(
                "SELECT x.actor_id, a.patient_family, a.patient_given FROM sched_hl7_actor x "
                "JOIN sched_hl7_appointment a ON a.filler_id = x.filler_id WHERE x.kind = 'patient' "
                "ORDER BY a.version"
            ).fetchall()
        return {str(r[0]): (str(r[1]), str(r[2])) for r in rows}

    @_unavailable_on_error
    def count(self) -> int:
        with self._read.use() as conn:
            row = conn.execute("SELECT count(*) FROM sched_hl7_appointment").fetchone()
            return int(row[0]) if row else 0

    @_unavailable_on_error
    def stale_count(self) -> int:
        with self._read.use() as conn:
            row = conn.execute("SELECT count(*) FROM sched_hl7_stale").fetchone()
            return int(row[0]) if row else 0

    def close(self) -> None:
        for connection in (self._ack, self._apply, self._read):
            connection.close()
