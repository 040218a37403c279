"""Switching an SQLite file to WAL mode when several processes open it at the same moment.

``PRAGMA journal_mode=WAL`` needs the file's exclusive lock once, the first time; when two uvicorn workers
open a new file together, one of them gets "database is locked" at once (SQLite does not run the busy
handler for this pragma), which killed the audit thread of the losing worker. Once the file is in WAL
mode the pragma is a no-op that needs no lock, so a short retry is enough.
"""

from __future__ import annotations

import sqlite3
import time


def enable_wal(conn: sqlite3.Connection, timeout_s: float = 30.0) -> None:
    """Put ``conn``'s database in WAL mode, retrying while another connection holds the lock."""
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc).lower() or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
