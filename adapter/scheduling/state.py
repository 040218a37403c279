"""The adapter's own durable state: holds, stored proposals and idempotency records.

``StateStore`` is the small interface the domain uses; ``SqliteStateStore`` is the default
implementation: one SQLite file (WAL mode, so several uvicorn workers on one host share it),
next to the demo database unless configured elsewhere. A restart loses no hold.

Why a separate store instead of tables in the legacy database: the legacy schema is not ours to
change (a hospital DBA will not let an adapter add tables), and holds must work identically for a
message-based backend that has no database at all.

Concurrency: every mutating call is one ``BEGIN IMMEDIATE`` transaction, so check-then-insert is
atomic across processes. The *cross-system* atomicity (legacy calendar + holds) comes from the
backend calling ``place_hold`` / ``check_free`` inside its own booking lock.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol

from adapter.backends.protocol import Interval, SlotConflict

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


@dataclass(frozen=True, slots=True)
class Hold:
    id: str
    practitioner_id: str
    location_id: str
    interval: Interval
    expires_at: dt.datetime
    client: str | None
    payload: dict  # the proposal, so a hold can be rendered and booked without the original id


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status: int
    media_type: str
    body: bytes


class IdempotencyMismatch(Exception):
    """The Idempotency-Key was used before with a different request (HTTP 422)."""


class IdempotencyInProgress(Exception):
    """A request with this Idempotency-Key is still being processed (HTTP 409)."""


class StateStore(Protocol):
    def holds_by_practitioner(self, practitioner_ids: Iterable[str], window: Interval, now: dt.datetime) -> dict[str, list[Interval]]: ...
    def get_hold(self, hold_id: str, now: dt.datetime) -> Hold | None: ...
    def place_hold(self, hold: Hold, now: dt.datetime) -> Hold: ...
    def check_free(self, practitioner_id: str, interval: Interval, now: dt.datetime, own_hold: str | None) -> None: ...
    def release(self, hold_id: str) -> None: ...
    def sweep(self, now: dt.datetime) -> int: ...
    def put_proposal(self, proposal_id: str, payload: str, expires_at: dt.datetime) -> None: ...
    def get_proposal(self, proposal_id: str, now: dt.datetime) -> str | None: ...
    def idempotency_begin(self, client: str, key: str, operation: str, body_hash: str, now: dt.datetime) -> StoredResponse | None: ...
    def idempotency_finish(self, client: str, key: str, response: StoredResponse | None) -> None: ...
    def close(self) -> None: ...


def _ts(t: dt.datetime) -> float:
    return t.timestamp()


def _dt(s: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(s, tz=dt.timezone.utc)


class SqliteStateStore:
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._guard = threading.Lock()
        conn = self._conn()
        conn.executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=15.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
            with self._guard:
                self._all.append(conn)
        return conn

    def _tx(self) -> "_Tx":
        return _Tx(self._conn())

    # -- holds -------------------------------------------------------------------------------
    def holds_by_practitioner(self, practitioner_ids: Iterable[str], window: Interval,
                              now: dt.datetime) -> dict[str, list[Interval]]:
        ids = list(practitioner_ids)
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self._conn().execute(
            f"SELECT practitioner_id, start_s, end_s FROM holds WHERE practitioner_id IN ({marks}) "
            "AND expires_s > ? AND start_s < ? AND end_s > ?",
            [*ids, _ts(now), _ts(window.end), _ts(window.start)]).fetchall()
        out: dict[str, list[Interval]] = {}
        for prac, s, e in rows:
            out.setdefault(prac, []).append(Interval(_dt(s), _dt(e)))
        return out

    def _row_to_hold(self, row: tuple) -> Hold:
        hid, prac, loc, s, e, x, client, payload = row
        return Hold(hid, prac, loc, Interval(_dt(s), _dt(e)), _dt(x), client, json.loads(payload))

    def get_hold(self, hold_id: str, now: dt.datetime) -> Hold | None:
        row = self._conn().execute("SELECT * FROM holds WHERE id = ? AND expires_s > ?", (hold_id, _ts(now))).fetchone()
        return self._row_to_hold(row) if row else None

    def _conflicts(self, conn: sqlite3.Connection, practitioner_id: str, interval: Interval, now: dt.datetime,
                   own_hold: str | None) -> list[tuple]:
        return conn.execute(
            "SELECT id, start_s, end_s FROM holds WHERE practitioner_id = ? AND expires_s > ? "
            "AND start_s < ? AND end_s > ? AND id IS NOT ?",
            (practitioner_id, _ts(now), _ts(interval.end), _ts(interval.start), own_hold)).fetchall()

    def check_free(self, practitioner_id: str, interval: Interval, now: dt.datetime, own_hold: str | None) -> None:
        found = self._conflicts(self._conn(), practitioner_id, interval, now, own_hold)
        if found:
            raise SlotConflict(f"Practitioner/{practitioner_id} is held by another client from "
                               f"{_dt(found[0][1]).isoformat()} to {_dt(found[0][2]).isoformat()}")

    def place_hold(self, hold: Hold, now: dt.datetime) -> Hold:
        """Insert ``hold``; an active hold with the same id is returned unchanged (no extension)."""
        with self._tx() as conn:
            existing = conn.execute("SELECT * FROM holds WHERE id = ? AND expires_s > ?",
                                    (hold.id, _ts(now))).fetchone()
            if existing:
                return self._row_to_hold(existing)
            if self._conflicts(conn, hold.practitioner_id, hold.interval, now, hold.id):
                raise SlotConflict(f"Practitioner/{hold.practitioner_id} is already held by another client "
                                   f"between {hold.interval.start.isoformat()} and {hold.interval.end.isoformat()}")
            conn.execute("DELETE FROM holds WHERE id = ?", (hold.id,))  # an expired hold of the same slot
            conn.execute("INSERT INTO holds VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (hold.id, hold.practitioner_id, hold.location_id, _ts(hold.interval.start),
                          _ts(hold.interval.end), _ts(hold.expires_at), hold.client, json.dumps(hold.payload)))
        return hold

    def release(self, hold_id: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM holds WHERE id = ?", (hold_id,))

    def sweep(self, now: dt.datetime) -> int:
        with self._tx() as conn:
            n = conn.execute("DELETE FROM holds WHERE expires_s <= ?", (_ts(now),)).rowcount
            n += conn.execute("DELETE FROM proposals WHERE expires_s <= ?", (_ts(now),)).rowcount
            # Idempotency records are kept for a day: long enough for any client retry policy.
            conn.execute("DELETE FROM idempotency WHERE created_s <= ? AND state = 'done'", (_ts(now) - 86400,))
        return n

    # -- stored proposals ----------------------------------------------------------------------
    def put_proposal(self, proposal_id: str, payload: str, expires_at: dt.datetime) -> None:
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO proposals VALUES (?, ?, ?)", (proposal_id, payload, _ts(expires_at)))

    def get_proposal(self, proposal_id: str, now: dt.datetime) -> str | None:
        row = self._conn().execute("SELECT payload FROM proposals WHERE id = ? AND expires_s > ?",
                                   (proposal_id, _ts(now))).fetchone()
        return row[0] if row else None

    # -- idempotency -------------------------------------------------------------------------
    def idempotency_begin(self, client: str, key: str, operation: str, body_hash: str,
                          now: dt.datetime) -> StoredResponse | None:
        """None: go ahead (the key is now reserved). A StoredResponse: replay it."""
        with self._tx() as conn:
            row = conn.execute("SELECT operation, body_hash, state, status, media_type, body FROM idempotency "
                               "WHERE client = ? AND key = ?", (client, key)).fetchone()
            if row is None:
                conn.execute("INSERT INTO idempotency (client, key, operation, body_hash, state, created_s) "
                             "VALUES (?, ?, ?, ?, 'started', ?)", (client, key, operation, body_hash, _ts(now)))
                return None
        op, h, state, status, media_type, body = row
        if op != operation or h != body_hash:
            raise IdempotencyMismatch(f"Idempotency-Key {key!r} was already used with a different request")
        if state != "done":
            raise IdempotencyInProgress(f"a request with Idempotency-Key {key!r} is still being processed")
        return StoredResponse(status, media_type, bytes(body))

    def idempotency_finish(self, client: str, key: str, response: StoredResponse | None) -> None:
        with self._tx() as conn:
            if response is None:  # the request failed before any outcome worth replaying
                conn.execute("DELETE FROM idempotency WHERE client = ? AND key = ?", (client, key))
            else:
                conn.execute("UPDATE idempotency SET state = 'done', status = ?, media_type = ?, body = ? "
                             "WHERE client = ? AND key = ?",
                             (response.status, response.media_type, response.body, client, key))

    def close(self) -> None:
        with self._guard:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()


class _Tx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
