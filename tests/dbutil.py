"""Helpers for tests that need real databases reached over ODBC.

Every database created here is named ``sched_t_<hint>_<pid>_<counter>`` so that
a later run can recognise (and drop) databases left behind by a test process
that no longer exists. Databases created by this process are remembered and
dropped by :func:`drop_created_databases` (called at session end by
``tests/conftest.py``).

pyodbc reminders: a connection must not be shared between threads; autocommit
is off by default; MariaDB under REPEATABLE READ gives stale reads until the
transaction ends -- commit or roll back after every unit of work.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import os
import re
import sqlite3
import threading
from typing import Any

import pyodbc

POSTGRESQL = "postgresql"
MARIADB = "mariadb"
KINDS = (POSTGRESQL, MARIADB)

DB_PREFIX = "sched_t_"
MAX_NAME_LEN = 63  # PostgreSQL's identifier limit (MariaDB allows 64)

DEFAULT_ADMIN_DSN = {
    POSTGRESQL: "DRIVER={PostgreSQL Unicode};SERVER=127.0.0.1;PORT=5432;DATABASE=postgres;UID=postgres;PWD=",
    MARIADB: "DRIVER={MariaDB Unicode};SERVER=127.0.0.1;PORT=3306;DATABASE=mysql;UID=root;PWD=;CHARSET=utf8mb4",
}
ADMIN_DSN_ENV = {POSTGRESQL: "SCHED_TEST_PG_DSN", MARIADB: "SCHED_TEST_MARIADB_DSN"}
SERVICE_NAME = {POSTGRESQL: "PostgreSQL", MARIADB: "MariaDB"}

_counter = itertools.count(1)
_lock = threading.Lock()
_created: set[tuple[str, str]] = set()


class ServiceUnavailable(RuntimeError):
    """A test service (database, cache) could not be reached."""


# ---------------------------------------------------------------------------
# DSNs
# ---------------------------------------------------------------------------
def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown database kind {kind!r}; expected one of {KINDS}")
    return kind


def admin_dsn(kind: str) -> str:
    """The administrative ODBC DSN for *kind* (env override or default)."""
    _check_kind(kind)
    return os.environ.get(ADMIN_DSN_ENV[kind]) or DEFAULT_ADMIN_DSN[kind]


_DATABASE_ATTR = re.compile(r"(?i)(^|;)\s*DATABASE\s*=\s*(\{[^}]*\}|[^;]*)")


def dsn_with_database(dsn: str, database: str) -> str:
    """Return *dsn* with its ``DATABASE=`` attribute set to *database*."""
    if _DATABASE_ATTR.search(dsn):
        return _DATABASE_ATTR.sub(lambda m: f"{m.group(1)}DATABASE={database}", dsn, count=1)
    return dsn.rstrip(";") + f";DATABASE={database}"


def sqlite_dsn(path: str | os.PathLike[str]) -> str:
    """ODBC DSN for the SQLite file at *path* (Debian driver name ``SQLite3``)."""
    return f"DRIVER={{SQLite3}};Database={os.fspath(path)}"


def database_dsn(kind: str, name: str) -> str:
    """ODBC DSN for database *name* on the *kind* server."""
    return dsn_with_database(admin_dsn(kind), name)


# ---------------------------------------------------------------------------
# Connections
# ---------------------------------------------------------------------------
def unavailable_message(kind: str, error: BaseException | str) -> str:
    env = ADMIN_DSN_ENV[kind]
    return (
        f"{SERVICE_NAME[kind]} is not reachable through ODBC ({error}). "
        f"Start it with `make services` (scripts/start-services.sh); ODBC drivers come from "
        f"`make system-deps`; or point {env} at a reachable server."
    )


def admin_connect(kind: str, *, timeout: int = 10) -> pyodbc.Connection:
    """Autocommit connection to the *kind* server's admin database.

    Raises :class:`ServiceUnavailable` naming the service if it cannot connect.
    """
    dsn = admin_dsn(kind)
    try:
        conn = pyodbc.connect(dsn, autocommit=True, timeout=timeout)
    except pyodbc.Error as exc:
        raise ServiceUnavailable(unavailable_message(kind, exc)) from exc
    if kind == MARIADB:
        # Never wait a year for a metadata lock while dropping a database.
        conn.execute("SET SESSION lock_wait_timeout = 20")
    return conn


def check_server(kind: str) -> None:
    """Raise :class:`ServiceUnavailable` unless the server answers ``SELECT 1``."""
    conn = admin_connect(kind)
    try:
        conn.execute("SELECT 1").fetchall()
    finally:
        conn.close()


# ---------------------------------------------------------------------------
# Create / drop
# ---------------------------------------------------------------------------
def _sanitize_hint(hint: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "_", hint.lower()).strip("_")
    return s or "db"


def new_database_name(name_hint: str) -> str:
    pid = os.getpid()
    n = next(_counter)
    tail = f"_{pid}_{n}"
    room = MAX_NAME_LEN - len(DB_PREFIX) - len(tail)
    hint = _sanitize_hint(name_hint)[:room].rstrip("_") or "db"
    return f"{DB_PREFIX}{hint}{tail}"


def fresh_database(kind: str, name_hint: str) -> str:
    """Create an empty, uniquely named database on *kind*; return its ODBC DSN.

    *kind* is ``"postgresql"`` or ``"mariadb"``. The database is recorded and
    dropped by :func:`drop_created_databases` unless dropped earlier with
    :func:`drop_database` (use :func:`database_name_from_dsn` to get its name).
    """
    _check_kind(kind)
    name = new_database_name(name_hint)
    conn = admin_connect(kind)
    try:
        if kind == POSTGRESQL:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8'")
        else:
            conn.execute(f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")
    finally:
        conn.close()
    with _lock:
        _created.add((kind, name))
    return database_dsn(kind, name)


def database_name_from_dsn(dsn: str) -> str:
    m = _DATABASE_ATTR.search(dsn)
    if not m:
        raise ValueError(f"no DATABASE= in DSN {dsn!r}")
    return m.group(2).strip("{}")


def _valid_test_name(name: str) -> None:
    if not re.fullmatch(r"[a-z0-9_]+", name) or not name.startswith(DB_PREFIX):
        raise ValueError(f"refusing to drop {name!r}: not a test database ({DB_PREFIX}...)")


def _drop_with(conn: pyodbc.Connection, kind: str, name: str) -> None:
    _valid_test_name(name)
    if kind == POSTGRESQL:
        try:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        except pyodbc.Error:
            # PostgreSQL < 13 has no FORCE: end the sessions, then drop.
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = ? AND pid <> pg_backend_pid()",
                name,
            ).fetchall()
            conn.execute(f"DROP DATABASE IF EXISTS {name}")
    else:
        # Connections still inside that database could hold metadata locks.
        ids = [
            row[0]
            for row in conn.execute(
                "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = ? AND ID <> CONNECTION_ID()",
                name,
            ).fetchall()
        ]
        for conn_id in ids:
            try:
                conn.execute(f"KILL CONNECTION {int(conn_id)}")
            except pyodbc.Error:
                pass  # already gone
        conn.execute(f"DROP DATABASE IF EXISTS {name}")


def drop_database(kind: str, name: str) -> None:
    """Drop test database *name* (must start with ``sched_t_``) on *kind*."""
    _check_kind(kind)
    conn = admin_connect(kind)
    try:
        _drop_with(conn, kind, name)
    finally:
        conn.close()
    with _lock:
        _created.discard((kind, name))


def drop_created_databases() -> list[str]:
    """Drop every database this process created and has not dropped yet.

    Returns a list of error messages (empty when all went well).
    """
    errors: list[str] = []
    with _lock:
        pending = sorted(_created)
    for kind, name in pending:
        try:
            drop_database(kind, name)
        except Exception as exc:
            errors.append(f"{kind} {name}: {exc}")
    return errors


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_pid(name: str) -> int | None:
    """The pid part of ``sched_t_<hint>_<pid>_<counter>``, or None."""
    parts = name.rsplit("_", 2)
    if len(parts) != 3 or not parts[0].startswith(DB_PREFIX.rstrip("_")):
        return None
    if not (parts[1].isdigit() and parts[2].isdigit()):
        return None
    return int(parts[1])


def list_test_databases(kind: str) -> list[str]:
    _check_kind(kind)
    conn = admin_connect(kind)
    try:
        if kind == POSTGRESQL:
            sql = "SELECT datname FROM pg_database WHERE datname LIKE ?"
        else:
            sql = "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE ?"
        return [row[0] for row in conn.execute(sql, "sched\\_t\\_%").fetchall()]
    finally:
        conn.close()


def drop_stale_databases(kind: str) -> list[str]:
    """Drop ``sched_t_*`` databases whose owning pid is no longer alive.

    Databases of live processes (this one, or a concurrent test run) are left
    alone. Returns the names dropped.
    """
    dropped: list[str] = []
    me = os.getpid()
    conn = admin_connect(kind)
    try:
        for name in list_test_databases(kind):
            pid = _owner_pid(name)
            if pid is None or pid == me or _pid_alive(pid):
                continue
            try:
                _drop_with(conn, kind, name)
                dropped.append(name)
            except (pyodbc.Error, ValueError):
                pass  # a concurrent run may be dropping it too
    finally:
        conn.close()
    return dropped


# ---------------------------------------------------------------------------
# Demo data
# ---------------------------------------------------------------------------
def seed_demo_database(kind: str, name_hint: str, *, today: _dt.date | None = None) -> str:
    """Fresh database on *kind* with the demo schema created and seeded.

    Uses ``adapter.demo.seed.create_schema`` and ``seed_demo``; returns the DSN.
    """
    from adapter.demo import seed  # imported late: the module is optional at collection

    dsn = fresh_database(kind, name_hint)
    conn = pyodbc.connect(dsn, timeout=10)
    try:
        seed.create_schema(conn)
        seed.seed_demo(conn, today=today or _dt.date.today())
        conn.commit()
    finally:
        conn.close()
    return dsn


def legacy_rows(kind: str, target: str, sql: str, *params: Any) -> list[tuple]:
    """Rows of a query against a legacy database, read directly (not through the adapter): what
    tests check writes against. ``kind`` 'sqlite' takes a file path, anything else an ODBC DSN."""
    if kind == "sqlite":
        conn = sqlite3.connect(target)
        try:
            return [tuple(r) for r in conn.execute(sql, params).fetchall()]
        finally:
            conn.close()
    import pyodbc

    conn = pyodbc.connect(target, autocommit=True)
    try:
        return [tuple(r) for r in conn.execute(sql, *params).fetchall()]
    finally:
        conn.close()
