"""Shared fixtures: real PostgreSQL, MariaDB and Redis, plus live HTTP servers.

The suite runs against REAL services (see scripts/start-services.sh, run by
`make services` / `make test`). A service that cannot be reached makes the
tests that need it FAIL -- never skip -- with a message naming the service and
the make target that starts it.

Environment overrides:
    SCHED_TEST_PG_DSN       admin ODBC DSN for PostgreSQL
    SCHED_TEST_MARIADB_DSN  admin ODBC DSN for MariaDB
    SCHED_TEST_REDIS_URL    Redis URL (default redis://127.0.0.1:6379/15)

Fixtures (scope):
    pg_admin_dsn, mariadb_admin_dsn (session)   admin DSN, server checked
    pg_demo_dsn, mariadb_demo_dsn (session)     seeded demo database, shared
    fresh_pg_demo_dsn, fresh_mariadb_demo_dsn   seeded demo database per test
    fresh_db (function)                          factory: fresh_db(kind, hint, seed=False) -> DSN
    sqlite_demo_path, sqlite_demo_dsn (function) seeded SQLite file in tmp_path
    redis_url (session)                          Redis URL, test db flushed at start
    live_server (function)                       factory: live_server(app) -> base_url
    live_server_process (function)               ProcessServers: .start(argv, env, port) / .stop / .restart
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dbutil
from dbutil import (
    MARIADB,
    POSTGRESQL,
    ServiceUnavailable,
    drop_database,
    fresh_database,
    sqlite_dsn,
)
from serverutil import ProcessServers, ThreadServer

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"


def _fail(message: str) -> None:
    pytest.fail(message, pytrace=False)


def _require_server(kind: str) -> str:
    problem = None
    try:
        dbutil.check_server(kind)
    except ServiceUnavailable as exc:
        problem = str(exc)
    if problem:
        _fail(problem)  # outside the except block: no chained traceback noise
    dbutil.drop_stale_databases(kind)
    return dbutil.admin_dsn(kind)


def _seeded(kind: str, hint: str) -> str:
    problem = ""
    try:
        return dbutil.seed_demo_database(kind, hint, today=dt.date.today())
    except ServiceUnavailable as exc:
        problem = str(exc)
    _fail(problem)
    raise AssertionError("unreachable")


@pytest.fixture(scope="session", autouse=True)
def _drop_test_databases_at_exit() -> Iterator[None]:
    """Drop every database this session created (only touches servers it used)."""
    yield
    errors = dbutil.drop_created_databases()
    if errors:
        print("\nWARNING: could not drop test databases:\n  " + "\n  ".join(errors), file=sys.stderr)


# ---------------------------------------------------------------------------
# Databases
# ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def pg_admin_dsn() -> str:
    """Admin ODBC DSN of the PostgreSQL server (checked; stale test DBs dropped)."""
    return _require_server(POSTGRESQL)


@pytest.fixture(scope="session")
def mariadb_admin_dsn() -> str:
    """Admin ODBC DSN of the MariaDB server (checked; stale test DBs dropped)."""
    return _require_server(MARIADB)


@pytest.fixture(scope="session")
def pg_demo_dsn(pg_admin_dsn: str) -> str:
    """Seeded demo database on PostgreSQL, shared by the session: read-only use."""
    return _seeded(POSTGRESQL, "demo")


@pytest.fixture(scope="session")
def mariadb_demo_dsn(mariadb_admin_dsn: str) -> str:
    """Seeded demo database on MariaDB, shared by the session: read-only use."""
    return _seeded(MARIADB, "demo")


@pytest.fixture
def fresh_db(request: pytest.FixtureRequest) -> Iterator[Callable[..., str]]:
    """Factory ``fresh_db(kind, hint="t", seed=False) -> DSN``; dropped after the test."""
    made: list[tuple[str, str]] = []

    def make(kind: str, hint: str = "t", seed: bool = False) -> str:
        request.getfixturevalue("pg_admin_dsn" if kind == POSTGRESQL else "mariadb_admin_dsn")
        dsn = dbutil.seed_demo_database(kind, hint) if seed else fresh_database(kind, hint)
        made.append((kind, dbutil.database_name_from_dsn(dsn)))
        return dsn

    yield make
    for kind, name in made:
        drop_database(kind, name)


@pytest.fixture
def fresh_pg_demo_dsn(fresh_db: Callable[..., str], request: pytest.FixtureRequest) -> str:
    """Seeded demo database on PostgreSQL for this test alone (write freely)."""
    return fresh_db(POSTGRESQL, request.node.name, seed=True)


@pytest.fixture
def fresh_mariadb_demo_dsn(fresh_db: Callable[..., str], request: pytest.FixtureRequest) -> str:
    """Seeded demo database on MariaDB for this test alone (write freely)."""
    return fresh_db(MARIADB, request.node.name, seed=True)


@pytest.fixture
def sqlite_demo_path(tmp_path: Path) -> Path:
    """A seeded SQLite demo database file in tmp_path."""
    from adapter.demo.seed import ensure_demo_database

    path = tmp_path / "demo.sqlite"
    ensure_demo_database(path, today=dt.date.today())
    return path


@pytest.fixture
def sqlite_demo_dsn(sqlite_demo_path: Path) -> str:
    """ODBC DSN of :func:`sqlite_demo_path`."""
    return sqlite_dsn(sqlite_demo_path)


# ---------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of a real Redis (default db 15, flushed once at session start)."""
    import redis

    url = os.environ.get("SCHED_TEST_REDIS_URL") or DEFAULT_REDIS_URL
    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    problem = None
    try:
        client.ping()
        client.flushdb()
    except redis.RedisError as exc:
        problem = str(exc)
    finally:
        client.close()
    if problem:
        _fail(
            f"Redis is not reachable at {url} ({problem}). Start it with `make services` "
            f"(scripts/start-services.sh) or point SCHED_TEST_REDIS_URL at a reachable server."
        )
    return url


# ---------------------------------------------------------------------------
# Live HTTP servers
# ---------------------------------------------------------------------------
@pytest.fixture
def live_server() -> Iterator[Callable[..., str]]:
    """Factory ``live_server(app_or_factory, *, factory=None, **uvicorn_config) -> base_url``.

    Runs uvicorn (lifespan on) in a background thread on a free 127.0.0.1
    port, waits until it accepts connections, stops it after the test. The
    ThreadServer objects are available as ``live_server.servers``.
    """
    servers: list[ThreadServer] = []

    def start(app: Any, *, factory: bool | None = None, **config: Any) -> str:
        server = ThreadServer(app, factory=factory, **config)
        servers.append(server)
        return server.start()

    start.servers = servers  # type: ignore[attr-defined]
    yield start
    errors = []
    for server in reversed(servers):
        try:
            server.stop()
        except Exception as exc:
            errors.append(str(exc))
    if errors:
        pytest.fail("; ".join(errors), pytrace=False)


@pytest.fixture
def live_server_process() -> Iterator[ProcessServers]:
    """Servers in subprocesses: ``.start(argv, env=None, port=None) -> Popen``,
    ``.stop(p)``, ``.restart(p)``; every one still running is killed at teardown.

    ``p.base_url``/``p.port`` tell where it listens; ``{port}`` in argv is
    substituted; ``"python"`` as argv[0] means this interpreter.
    """
    servers = ProcessServers()
    yield servers
    servers.stop_all()
