"""Text through the ODBC connections the adapter opens: whatever the driver reports a column as (CHAR, VARCHAR,
TEXT; SQL_CHAR or SQL_WCHAR), names with accents, characters outside the BMP and HL7 delimiters come back exactly as
stored, on a kept (re-used) cursor as on a fresh one. MariaDB's text is fetched as UTF-8 rather than UTF-16
(``Database.connection``; part of issue 14's ODBC speed-up), so this is what that choice must keep."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pyodbc
import pytest
from dbutil import KINDS

from adapter.backends.sql.db import Database

NAMES = ["Müller-Łukasz", "O'Brien|^~\\&", "Zoë 😀 田中", "x" * 300 + "é"]


@pytest.mark.parametrize("kind", KINDS)
def test_issue14_odbc_text_reads_back_exactly_as_stored(kind: str, fresh_db: Callable[..., str]) -> None:
    dsn = fresh_db(kind, "text")
    # Written through plain pyodbc: an independent path in (UTF-8 parameters on MariaDB, whose Unicode driver
    # garbles UTF-16 parameters longer than 127 characters).
    with pyodbc.connect(dsn, autocommit=True) as conn:
        if kind == "mariadb":
            conn.setencoding(encoding="utf-8")
        conn.execute("CREATE TABLE T (ID INTEGER, A VARCHAR(400), B CHAR(12), C TEXT)")
        for i, name in enumerate(NAMES):
            conn.execute("INSERT INTO T VALUES (?, ?, ?, ?)", i, name, name[:12], name)
    db = Database("odbc:" + dsn)

    def read(conn: object) -> list[tuple[object, ...]]:
        cur = db.select(conn, "SELECT ID, A, B, C FROM T WHERE ID >= :low ORDER BY ID", {"low": 0})
        return [tuple(r) for r in cur.fetchall()]

    async def twice() -> list[list[tuple[object, ...]]]:
        try:
            return [await db.run(read) for _ in range(2)]  # the second read runs on the kept cursor
        finally:
            await db.close()

    for rows in asyncio.run(twice()):
        assert [r[1] for r in rows] == NAMES
        assert [str(r[2]).rstrip() for r in rows] == [n[:12].rstrip() for n in NAMES]
        assert [r[3] for r in rows] == NAMES
