"""Proves the shared fixtures reach real services and run real servers."""

from __future__ import annotations

import os
import textwrap

import dbutil
import httpx
import pyodbc
import pytest
from serverutil import free_port, process_log


def _count_providers(dsn: str) -> int:
    conn = pyodbc.connect(dsn, timeout=10)
    try:
        (n,) = conn.execute("SELECT COUNT(*) FROM PROVIDER").fetchone()
        conn.rollback()  # end the unit of work (MariaDB REPEATABLE READ)
        return n
    finally:
        conn.close()


def test_postgresql_demo_database_is_seeded(pg_demo_dsn: str) -> None:
    assert _count_providers(pg_demo_dsn) >= 20


def test_mariadb_demo_database_is_seeded(mariadb_demo_dsn: str) -> None:
    assert _count_providers(mariadb_demo_dsn) >= 20


@pytest.mark.parametrize("kind", [dbutil.POSTGRESQL, dbutil.MARIADB])
def test_fresh_database_is_created_and_dropped(kind: str, fresh_db) -> None:
    dsn = fresh_db(kind, "infra probe")
    name = dbutil.database_name_from_dsn(dsn)
    assert name.startswith(f"sched_t_infra_probe_{os.getpid()}_")
    conn = pyodbc.connect(dsn, timeout=10)
    try:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, label VARCHAR(20))")
        conn.execute("INSERT INTO t (id, label) VALUES (?, ?)", 1, "überprüft")
        conn.commit()
        assert conn.execute("SELECT label FROM t").fetchone()[0] == "überprüft"
        conn.rollback()
    finally:
        conn.close()
    assert name in dbutil.list_test_databases(kind)
    dbutil.drop_database(kind, name)
    assert name not in dbutil.list_test_databases(kind)


@pytest.mark.parametrize("kind", [dbutil.POSTGRESQL, dbutil.MARIADB])
def test_stale_databases_of_dead_processes_are_dropped(kind: str, fresh_db) -> None:
    fresh_db(kind, "x")  # makes sure the server is reachable (fails otherwise)
    # A pid above pid_max can never be alive.
    stale = "sched_t_stale_99999999_1"
    conn = dbutil.admin_connect(kind)
    try:
        conn.execute(f"CREATE DATABASE {stale}")
    finally:
        conn.close()
    assert stale in dbutil.drop_stale_databases(kind)
    assert stale not in dbutil.list_test_databases(kind)


def test_drop_database_refuses_non_test_names() -> None:
    with pytest.raises(ValueError):
        dbutil.drop_database(dbutil.POSTGRESQL, "postgres")


def test_sqlite_dsn_points_at_file(tmp_path) -> None:
    path = tmp_path / "x.sqlite"
    conn = pyodbc.connect(dbutil.sqlite_dsn(path), autocommit=True)
    try:
        conn.execute("CREATE TABLE t (x INTEGER)")
    finally:
        conn.close()
    assert path.exists()


def _tiny_app():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def hello(request):
        return JSONResponse({"hello": "world", "path": request.url.path})

    return Starlette(routes=[Route("/hello", hello)])


def test_live_server_serves_asgi_app(live_server) -> None:
    base_url = live_server(_tiny_app())
    r = httpx.get(f"{base_url}/hello", timeout=5)
    assert r.status_code == 200
    assert r.json() == {"hello": "world", "path": "/hello"}


def test_live_server_accepts_app_factory(live_server) -> None:
    base_url = live_server(_tiny_app)
    with httpx.Client(base_url=base_url, timeout=5) as client:
        assert client.get("/hello").json()["hello"] == "world"
        assert client.get("/missing").status_code == 404


def test_live_server_process_start_restart_stop(live_server_process, tmp_path) -> None:
    app_file = tmp_path / "tinyapp.py"
    app_file.write_text(
        textwrap.dedent(
            """
            import os
            from starlette.applications import Starlette
            from starlette.responses import JSONResponse
            from starlette.routing import Route

            async def who(request):
                return JSONResponse({"pid": os.getpid(), "flavour": os.environ.get("FLAVOUR")})

            app = Starlette(routes=[Route("/who", who)])
            """
        )
    )
    argv = [
        "python",
        "-m",
        "uvicorn",
        "tinyapp:app",
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--log-level",
        "warning",
        "--app-dir",
        str(tmp_path),
    ]
    p = live_server_process.start(argv, env={"FLAVOUR": "vanilla"}, port=free_port())
    first = httpx.get(f"{p.base_url}/who", timeout=5).json()
    assert first == {"pid": p.pid, "flavour": "vanilla"}, process_log(p)

    p2 = live_server_process.restart(p)
    assert p.poll() is not None  # the first one is gone
    second = httpx.get(f"{p2.base_url}/who", timeout=5).json()
    assert p2.port == p.port and second["pid"] == p2.pid != p.pid

    assert live_server_process.stop(p2) is not None
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{p2.base_url}/who", timeout=2)


def test_fresh_pg_demo_database_is_private(fresh_pg_demo_dsn: str, pg_demo_dsn: str) -> None:
    assert dbutil.database_name_from_dsn(fresh_pg_demo_dsn) != dbutil.database_name_from_dsn(pg_demo_dsn)
    assert _count_providers(fresh_pg_demo_dsn) >= 20


def test_fresh_mariadb_demo_database_is_private(fresh_mariadb_demo_dsn: str, mariadb_demo_dsn: str) -> None:
    assert dbutil.database_name_from_dsn(fresh_mariadb_demo_dsn) != dbutil.database_name_from_dsn(mariadb_demo_dsn)
    assert _count_providers(fresh_mariadb_demo_dsn) >= 20


def test_sqlite_demo_database_is_seeded(sqlite_demo_path, sqlite_demo_dsn: str) -> None:
    assert sqlite_demo_path.exists()
    assert _count_providers(sqlite_demo_dsn) >= 20


def test_a_process_that_connects_to_postgresql_leaves_no_driver_log_in_tmp(pg_admin_dsn: str) -> None:
    """`make system-deps` turns psqlODBC's CommLog off: with Debian's CommLog=1 every connecting process (each
    adapter worker, each restart) left a /tmp/psqlodbc_<program>_<user><pid>.log behind."""
    import subprocess
    import sys
    from pathlib import Path

    probe = textwrap.dedent(
        """
        import os, sys, pyodbc
        conn = pyodbc.connect(sys.argv[1], timeout=10)
        conn.execute("SELECT 1").fetchall()
        conn.close()
        print(os.getpid())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, pg_admin_dsn], capture_output=True, text=True, timeout=60, check=True
    )
    pid = done.stdout.strip()
    left = sorted(str(p) for p in Path("/tmp").glob(f"psqlodbc_*{pid}.log"))
    assert left == [], f"psqlODBC wrote {left}: set CommLog = 0 for [PostgreSQL Unicode] (make system-deps does)"
