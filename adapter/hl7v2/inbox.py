"""The durable SIU inbox: store first, acknowledge second, parse and apply later.

``SiuListener.handle`` is the ``MLLPServer`` handler. For each inbound message it reads only MSH (sender, MSH-10,
type, ack mode: microseconds), inserts the raw message into SQLite (WAL, ``synchronous=FULL``, one commit per
message, ``INSERT OR IGNORE`` on (sender, MSH-10)) and only then returns the ACK. If the store fails, the handler
raises, the listener closes the connection without an ACK and the sender resends: no message is acknowledged
that is not on disk. A duplicate (same sender and MSH-10) is acknowledged again and not stored twice.

Parsing and applying to the mirror happens after the ACK (``adapter.hl7v2.mirror.InboxApplier``).
All SQLite work runs on one dedicated writer thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from adapter.mllp.ack import build_ack, read_msh
from adapter.mllp.server import Peer
from adapter.sqlite_wal import enable_wal

T = TypeVar("T")

SCHEMA = """
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
"""

WAITING, APPLIED, FAILED = 0, 1, 2


def connect(path: str | Path) -> sqlite3.Connection:
    """A connection with the durability settings the inbox relies on."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
    enable_wal(conn)
    # FULL: the commit is on disk (WAL fsync) before store() returns, so the ACK never precedes durability.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


class SiuInbox:
    """Durable store of raw inbound messages, de-duplicated by (sender, MSH-10)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hl7-inbox")
        self._conn: sqlite3.Connection | None = None
        self.stored = 0
        self.duplicates = 0

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = connect(self.path)
            self._conn.executescript(SCHEMA)
        return self._conn

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def open(self) -> None:
        await self._run(self._db)

    def store_sync(self, sender: str, control_id: str, message_type: str, raw: bytes) -> bool:
        """Insert and commit; True if new, False for a duplicate (sender, MSH-10)."""
        cur = self._db().execute(
            "INSERT OR IGNORE INTO hl7_inbox (sender, control_id, message_type, received_at, raw) "
            "VALUES (?, ?, ?, ?, ?)",
            (sender, control_id, message_type, datetime.now(UTC).isoformat(), raw),
        )
        return cur.rowcount == 1

    async def store(self, sender: str, control_id: str, message_type: str, raw: bytes) -> bool:
        new = await self._run(lambda: self.store_sync(sender, control_id, message_type, raw))
        if new:
            self.stored += 1
        else:
            self.duplicates += 1
        return new

    def count_sync(self, state: int | None = None) -> int:
        if state is None:
            row = self._db().execute("SELECT count(*) FROM hl7_inbox").fetchone()
        else:
            row = self._db().execute("SELECT count(*) FROM hl7_inbox WHERE state = ?", (state,)).fetchone()
        return int(row[0])

    async def count(self, state: int | None = None) -> int:
        return await self._run(lambda: self.count_sync(state))

    async def close(self) -> None:
        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._run(_close)
        self._executor.shutdown(wait=True)


class SiuListener:
    """The MLLP handler of the adapter's SIU listener.

    Original mode: ACK with MSA-1 AA once stored (AA again for a duplicate). Enhanced mode (MSH-15 set): a commit
    ACK (CA) once stored; the application acknowledgement is not sent because processing happens later, from the
    inbox (interface agreements should set MSH-16 to NE). Messages other than SIU are refused with AR and not stored.
    ``on_stored`` is called after each new message (e.g. to wake the applier).
    """

    def __init__(
        self,
        inbox: SiuInbox,
        *,
        accepted_types: frozenset[str] = frozenset({"SIU"}),
        on_stored: Callable[[], None] | None = None,
        ack_application: str = "",
        ack_facility: str = "",
    ) -> None:
        self.inbox = inbox
        self.accepted_types = accepted_types
        self.on_stored = on_stored
        self._app = ack_application
        self._fac = ack_facility
        self._ack_seq = 0

    def _ack_id(self) -> str:
        self._ack_seq += 1
        return f"A{datetime.now(UTC).strftime('%Y%m%d%H%M%S')}{self._ack_seq}"

    async def handle(self, message: bytes, peer: Peer) -> bytes:
        try:
            msh = read_msh(message)
        except ValueError:
            # Nothing to correlate an ACK with; the frame is dropped and the sender times out.
            raise ValueError("inbound frame without MSH") from None
        commit = msh.enhanced_mode
        if msh.message_type not in self.accepted_types or not msh.control_id:
            code = "CR" if commit else "AR"
            reason = f"message type {msh.message_type!r} not accepted" if msh.control_id else "MSH-10 is empty"
            return build_ack(msh, code, control_id=self._ack_id(), text=reason, error="200")
        new = await self.inbox.store(msh.sender, msh.control_id, msh.message_type, message)
        if new and self.on_stored is not None:
            self.on_stored()
        return build_ack(msh, "CA" if commit else "AA", control_id=self._ack_id())
