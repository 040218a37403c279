"""Units of work on ODBC connections: a read unit runs in autocommit, a write unit is one transaction.

At READ COMMITTED (both servers, ``Database.connection``) every statement of a read takes its own snapshot,
so wrapping a read in a transaction bought nothing but statements: psqlODBC put a SAVEPOINT/RELEASE around each
query and the unit ended with a COMMIT (8 statements per uncached ``$find`` instead of 3 on PostgreSQL; issue
14). What the change must keep: a read sees what other connections committed since the last read on the same
kept connection, and a write unit that fails leaves nothing behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pyodbc
import pytest
from dbutil import KINDS

from adapter.backends.sql.db import Database


def _table(dsn: str) -> None:
    with pyodbc.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE T (ID INTEGER NOT NULL PRIMARY KEY, NOTE VARCHAR(20))")


@pytest.mark.parametrize("kind", KINDS)
def test_issue14_3_a_read_unit_runs_in_autocommit_and_sees_each_new_commit(
    kind: str, fresh_db: Callable[..., str]
) -> None:
    dsn = fresh_db(kind, "reads")
    _table(dsn)
    db = Database("odbc:" + dsn, pool_size=1)  # one reader thread: every read runs on the same kept connection

    def read(conn: Any) -> tuple[bool, list[int]]:
        cur = db.select(conn, "SELECT ID FROM T WHERE ID >= :low ORDER BY ID", {"low": 0})
        return conn.autocommit, [r[0] for r in cur.fetchall()]

    async def scenario() -> list[tuple[bool, list[int]]]:
        seen = []
        try:
            with pyodbc.connect(dsn, autocommit=True) as other:
                for i in range(3):
                    seen.append(await db.run(read))
                    other.execute("INSERT INTO T VALUES (?, 'x')", i)
                seen.append(await db.run(read))
        finally:
            await db.close()
        return seen

    seen = asyncio.run(scenario())
    assert all(autocommit for autocommit, _ in seen)
    assert [ids for _, ids in seen] == [[], [0], [0, 1], [0, 1, 2]]


@pytest.mark.parametrize("kind", KINDS)
def test_issue14_3_a_write_unit_is_one_transaction_that_a_failure_rolls_back(
    kind: str, fresh_db: Callable[..., str]
) -> None:
    dsn = fresh_db(kind, "writes")
    _table(dsn)
    db = Database("odbc:" + dsn, pool_size=1)

    def write_then_fail(conn: Any) -> None:
        assert not conn.autocommit
        cur = conn.cursor()
        cur.execute("INSERT INTO T VALUES (1, 'kept?')")
        raise RuntimeError("the unit fails after its first statement")

    def write(conn: Any) -> None:
        conn.cursor().execute("INSERT INTO T VALUES (2, 'kept')")

    async def scenario() -> list[int]:
        try:
            with pytest.raises(RuntimeError):
                await db.run(write_then_fail, write=True)
            await db.run(write, write=True)
            return await db.run(lambda conn: [r[0] for r in db.select(conn, "SELECT ID FROM T", {}).fetchall()])
        finally:
            await db.close()

    assert asyncio.run(scenario()) == [2]
