"""Several processes (here: threads with their own connections) opening a new SQLite file at once all get it in
WAL mode; before ``enable_wal`` the losers got "database is locked" and a worker's audit thread died."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from adapter.sqlite_wal import enable_wal


def test_concurrent_first_opens_all_switch_to_wal(tmp_path: Path) -> None:
    # The plain pragma lost this race in about 3 trials of 20 here: 20 fresh files make it near certain.
    for trial in range(20):
        _race(tmp_path / f"fresh-{trial}.sqlite")


def _race(path: Path) -> None:
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def open_it() -> None:
        conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        try:
            start.wait()
            enable_wal(conn)
            conn.execute("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=open_it) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
