"""``SqliteSiuStore``: the SIU inbox and mirror in one host-local SQLite file (WAL).

Three connections, each behind its own lock: the ACK path's (``synchronous=FULL``: the commit is on disk before
``store_message`` returns, so the ACK never precedes durability), the applier's (``synchronous=NORMAL``: the mirror
is derived from the inbox and each batch marks its inbox rows in the same transaction, so a power cut that loses
the last batches reverts their rows to waiting together with the mirror) and the readers'. SQLite's file lock
(``BEGIN IMMEDIATE``) keeps claims of other processes on the same file apart.

``received_at`` is the storing host's clock in UTC as ``datetime.isoformat`` writes it
(``2026-01-05T09:00:00.123456+00:00``, the fraction left out when it is zero): text order is time order, so
``purge_applied`` compares it as text with ``before`` written the same way (``received_text``), through a partial
index of the applied messages by receipt time (built when a connection first opens a file that lacks it). A purge
is one ``BEGIN IMMEDIATE`` transaction of at most ``limit`` messages on the applier's connection: applied is final
(only a committed batch marks a message), so it never meets a waiting or claimed one.

Inbox ids must only grow (they order events of the same MSH-7, see ``event_version``), but SQLite numbers a row
one above the largest id *in the table*: a purge that deleted the newest rows would let new messages take their ids
again. So a purge records the highest id it deleted (``hl7_inbox_purged``) and ``store_message`` numbers a new
message above both.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from adapter.hl7v2.store import (
    APPLIED,
    FAILED,
    WAITING,
    ActorKind,
    ApplyResult,
    InboxMessage,
    MirroredAppointment,
    MirrorWrite,
    appointment_from_row,
    mirror_row,
    supersedes,
    utc_text,
)
from adapter.sqlite_wal import enable_wal

INBOX_SCHEMA = """
CREATE TABLE IF NOT EXISTS hl7_inbox (
    id INTEGER PRIMARY KEY,
    sender TEXT NOT NULL,
    control_id TEXT NOT NULL,
    message_type TEXT NOT NULL,
    received_at TEXT NOT NULL,
    raw BLOB NOT NULL,
    state INTEGER NOT NULL DEFAULT 0,  -- 0 waiting, 1 applied, 2 failed (see error)
    error TEXT,
    UNIQUE (sender, control_id)
);
CREATE INDEX IF NOT EXISTS hl7_inbox_waiting ON hl7_inbox (state, id);
CREATE INDEX IF NOT EXISTS hl7_inbox_applied ON hl7_inbox (received_at, id) WHERE state = 1;
CREATE TABLE IF NOT EXISTS hl7_inbox_purged (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    last_id INTEGER NOT NULL  -- the highest inbox id purge_applied deleted: new ids stay above it
);
"""

MIRROR_SCHEMA = """
CREATE TABLE IF NOT EXISTS hl7_mirror_appointment (
    filler_id TEXT PRIMARY KEY,
    placer_id TEXT NOT NULL,
    status TEXT,
    legacy_status TEXT NOT NULL,
    status_reason TEXT,
    start_utc TEXT,
    end_utc TEXT,
    start_local TEXT,
    end_local TEXT,
    service TEXT NOT NULL,
    reason TEXT NOT NULL,
    patient_family TEXT NOT NULL,
    patient_given TEXT NOT NULL,
    version TEXT NOT NULL,
    last_trigger TEXT NOT NULL,
    last_control_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    raw TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS hl7_mirror_placer ON hl7_mirror_appointment (placer_id);
CREATE TABLE IF NOT EXISTS hl7_mirror_actor (
    filler_id TEXT NOT NULL,
    kind TEXT NOT NULL,  -- practitioner | location | patient
    actor_id TEXT NOT NULL,
    UNIQUE (kind, actor_id, filler_id)
);
CREATE INDEX IF NOT EXISTS hl7_mirror_actor_by_appt ON hl7_mirror_actor (filler_id);
CREATE TABLE IF NOT EXISTS hl7_mirror_stale (
    inbox_id INTEGER PRIMARY KEY,
    filler_id TEXT NOT NULL,
    trigger TEXT NOT NULL,
    version TEXT NOT NULL
);
"""

_NEXT_ID = (
    "max(coalesce((SELECT max(id) FROM hl7_inbox), 0), "
    "coalesce((SELECT last_id FROM hl7_inbox_purged WHERE one = 1), 0)) + 1"
)
"""The id of a new inbox message: above every stored and every purged one (see the module docstring)."""

COLUMNS = (
    "filler_id, placer_id, status, legacy_status, status_reason, start_utc, end_utc, start_local, end_local, "
    "service, reason, patient_family, patient_given, version, last_trigger, last_control_id, sender"
)
_A_COLUMNS = ", ".join("a." + c.strip() for c in COLUMNS.split(","))


def received_text(moment: datetime) -> str:
    """``hl7_inbox.received_at`` of a moment (UTC, ``isoformat``): compared as text, in time order."""
    return moment.astimezone(UTC).isoformat()


def connect(path: str | Path) -> sqlite3.Connection:
    """A connection with the durability settings the inbox relies on."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
    enable_wal(conn)
    # FULL: the commit is on disk (WAL fsync) before store() returns, so the ACK never precedes durability.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def load(conn: sqlite3.Connection, rows: Sequence[Sequence[object]]) -> list[MirroredAppointment]:
    """Appointments from rows of ``COLUMNS``, with their actors (in the order the event named them)."""
    out = []
    for r in rows:
        fid = str(r[0])
        actors = conn.execute(
            "SELECT kind, actor_id FROM hl7_mirror_actor WHERE filler_id = ? ORDER BY rowid", (fid,)
        ).fetchall()
        by_kind: dict[str, list[str]] = {"practitioner": [], "location": [], "patient": []}
        for kind, actor in actors:
            by_kind[kind].append(actor)
        out.append(appointment_from_row(r, by_kind))
    return out


def apply_write(conn: sqlite3.Connection, write: MirrorWrite) -> ApplyResult:
    """One mirror write inside the caller's transaction (see ``SiuBatch.apply``)."""
    a = write.appointment
    row = conn.execute("SELECT version FROM hl7_mirror_appointment WHERE filler_id = ?", (a.filler_id,)).fetchone()
    if not supersedes(a.version, None if row is None else str(row[0])):
        conn.execute(
            "INSERT OR IGNORE INTO hl7_mirror_stale (inbox_id, filler_id, trigger, version) VALUES (?, ?, ?, ?)",
            (write.inbox_id, a.filler_id, a.last_trigger, a.version),
        )
        return "stale"
    values = mirror_row(write)
    conn.execute(
        f"INSERT OR REPLACE INTO hl7_mirror_appointment ({COLUMNS}, raw) VALUES ({', '.join('?' * 18)})", values
    )
    conn.execute("DELETE FROM hl7_mirror_actor WHERE filler_id = ?", (a.filler_id,))
    actors = [("practitioner", x) for x in a.practitioner_ids]
    actors += [("location", x) for x in a.location_ids]
    actors += [("patient", x) for x in a.patient_ids]
    conn.executemany(
        "INSERT OR IGNORE INTO hl7_mirror_actor (filler_id, kind, actor_id) VALUES (?, ?, ?)",
        [(a.filler_id, kind, actor) for kind, actor in actors],
    )
    return "applied"


class _SqliteBatch:
    def __init__(self, conn: sqlite3.Connection, messages: list[InboxMessage]) -> None:
        self.conn = conn
        self.messages: Sequence[InboxMessage] = messages
        self.marks: list[tuple[int, str | None, int]] = []

    def apply(self, write: MirrorWrite) -> ApplyResult:
        return apply_write(self.conn, write)

    def mark_applied(self, inbox_id: int) -> None:
        self.marks.append((APPLIED, None, inbox_id))

    def mark_failed(self, inbox_id: int, error: str) -> None:
        self.marks.append((FAILED, error, inbox_id))


class SqliteSiuStore:
    """``SiuStore`` over one SQLite file (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._ack_lock = threading.Lock()
        self._apply_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._ack: sqlite3.Connection | None = None
        self._apply: sqlite3.Connection | None = None
        self._read: sqlite3.Connection | None = None

    def _open(self, synchronous: str) -> sqlite3.Connection:
        conn = connect(self.path)
        conn.executescript(INBOX_SCHEMA + MIRROR_SCHEMA)
        conn.execute(f"PRAGMA synchronous={synchronous}")
        return conn

    def _ack_conn(self) -> sqlite3.Connection:
        if self._ack is None:
            self._ack = self._open("FULL")
        return self._ack

    def _apply_conn(self) -> sqlite3.Connection:
        if self._apply is None:
            self._apply = self._open("NORMAL")
        return self._apply

    def _read_conn(self) -> sqlite3.Connection:
        if self._read is None:
            self._read = self._open("NORMAL")
        return self._read

    # --- inbox ---
    def store_message(self, sender: str, control_id: str, message_type: str, raw: bytes) -> bool:
        with self._ack_lock:
            cur = self._ack_conn().execute(
                "INSERT OR IGNORE INTO hl7_inbox (id, sender, control_id, message_type, received_at, raw) "
                f"VALUES ({_NEXT_ID}, ?, ?, ?, ?, ?)",
                (sender, control_id, message_type, received_text(datetime.now(UTC)), raw),
            )
            return cur.rowcount == 1

    def count_messages(self, state: int | None = None) -> int:
        with self._read_lock:
            conn = self._read_conn()
            if state is None:
                row = conn.execute("SELECT count(*) FROM hl7_inbox").fetchone()
            else:
                row = conn.execute("SELECT count(*) FROM hl7_inbox WHERE state = ?", (state,)).fetchone()
            return int(row[0])

    def purge_applied(self, before: datetime, limit: int) -> int:
        with self._apply_lock:
            conn = self._apply_conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                # ``state = 1`` written out: the partial index hl7_inbox_applied serves only that literal.
                ids = [
                    (int(r[0]),)
                    for r in conn.execute(
                        f"SELECT id FROM hl7_inbox WHERE state = {APPLIED} AND received_at < ? "
                        "ORDER BY received_at, id LIMIT ?",
                        (received_text(before), limit),
                    )
                ]
                conn.executemany("DELETE FROM hl7_mirror_stale WHERE inbox_id = ?", ids)
                conn.executemany(f"DELETE FROM hl7_inbox WHERE id = ? AND state = {APPLIED}", ids)
                if ids:
                    conn.execute(
                        "INSERT INTO hl7_inbox_purged (one, last_id) VALUES (1, ?) "
                        "ON CONFLICT (one) DO UPDATE SET last_id = max(last_id, excluded.last_id)",
                        (max(i for (i,) in ids),),
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return len(ids)

    # --- applier ---
    @contextmanager
    def claim(self, limit: int) -> Iterator[_SqliteBatch]:
        with self._apply_lock:
            conn = self._apply_conn()
            query = "SELECT id, raw FROM hl7_inbox WHERE state = ? ORDER BY id LIMIT ?"
            # Look before taking the file's write lock: an idle applier must not contend with the ACK path.
            if conn.execute(query, (WAITING, 1)).fetchone() is None:
                yield _SqliteBatch(conn, [])
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                rows = conn.execute(query, (WAITING, limit)).fetchall()
                batch = _SqliteBatch(conn, [InboxMessage(int(i), bytes(raw)) for i, raw in rows])
                yield batch
                conn.executemany("UPDATE hl7_inbox SET state = ?, error = ? WHERE id = ?", batch.marks)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def record(self, write: MirrorWrite) -> ApplyResult:
        with self._apply_lock:
            conn = self._apply_conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = apply_write(conn, write)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return result

    # --- reads ---
    def _select(self, where: str, params: tuple[object, ...]) -> list[MirroredAppointment]:
        with self._read_lock:
            conn = self._read_conn()
            rows = conn.execute(f"SELECT {COLUMNS} FROM hl7_mirror_appointment {where}", params).fetchall()
            return load(conn, rows)

    def by_filler_id(self, filler_id: str) -> MirroredAppointment | None:
        found = self._select("WHERE filler_id = ?", (filler_id,))
        return found[0] if found else None

    def by_placer_id(self, placer_id: str) -> list[MirroredAppointment]:
        return self._select("WHERE placer_id = ?", (placer_id,))

    def for_actor(
        self,
        kind: ActorKind,
        actor_id: str,
        start: datetime,
        end: datetime,
        *,
        statuses: frozenset[str] | None = None,
    ) -> list[MirroredAppointment]:
        with self._read_lock:
            conn = self._read_conn()
            rows = conn.execute(
                f"SELECT {_A_COLUMNS} "
                "FROM hl7_mirror_actor x JOIN hl7_mirror_appointment a ON a.filler_id = x.filler_id "
                "WHERE x.kind = ? AND x.actor_id = ? AND a.start_utc < ? AND a.end_utc > ? ORDER BY a.start_utc",
                (kind, actor_id, utc_text(end), utc_text(start)),
            ).fetchall()
            found = load(conn, rows)
        if statuses is not None:
            found = [f for f in found if f.status in statuses]
        return found

    def all_appointments(self) -> list[MirroredAppointment]:
        return self._select("", ())

    def patient_names(self) -> dict[str, tuple[str, str]]:
        with self._read_lock:
            rows = (
                self._read_conn()
                .execute(
                    "SELECT x.actor_id, a.patient_family, a.patient_given FROM hl7_mirror_actor x "
                    "JOIN hl7_mirror_appointment a ON a.filler_id = x.filler_id WHERE x.kind = 'patient' "
                    "ORDER BY a.version"
                )
                .fetchall()
            )
        return {str(r[0]): (str(r[1]), str(r[2])) for r in rows}

    def count(self) -> int:
        with self._read_lock:
            return int(self._read_conn().execute("SELECT count(*) FROM hl7_mirror_appointment").fetchone()[0])

    def stale_count(self) -> int:
        with self._read_lock:
            return int(self._read_conn().execute("SELECT count(*) FROM hl7_mirror_stale").fetchone()[0])

    def close(self) -> None:
        for lock, name in ((self._ack_lock, "_ack"), (self._apply_lock, "_apply"), (self._read_lock, "_read")):
            with lock:
                conn = getattr(self, name)
                if conn is not None:
                    conn.close()
                    setattr(self, name, None)
