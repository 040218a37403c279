"""Issue 7, items 5 and 6: faults are bounded and recoverable, and the event loop is never blocked.

Real faults only: a second OS process holds the legacy SQLite file, the adapter's state file or the
per-host writer lock file; a second connection holds the booking row lock on PostgreSQL/MariaDB;
the legacy database is made read-only (an immutable file as root, chmod otherwise; PostgreSQL's
``default_transaction_read_only``) and then writable again. Every server runs for real (uvicorn in
a thread, HTTP over loopback).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dbutil
from conformance import assert_operation_outcome
from test_hold_book_http import (
    SPEARS,
    Api,
    assert_success,
    parameters,
    parse_instant,
    ref_param,
    running_api,
    seeded,
)

from adapter.backends.sql.db import host_lock_path

TIMEOUT = 2  # backend.timeout_seconds of these servers
FAST = 0.1  # what a request that needs no lock may take while another one waits (issue 7, item 6)
STAGGER = 0.5  # seconds between the starts of requests that wait for one lock


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
_HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""

_FLOCK_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


@contextmanager
def held_by_another_process(script: str, path: str | Path, seconds: float) -> Iterator[subprocess.Popen[str]]:
    """A second Python process that takes a lock on ``path`` and keeps it ``seconds`` (or until the block ends)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(path), str(seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "locked", (
            f"the lock holder did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}"
        )
        yield proc
    finally:
        proc.kill()
        proc.communicate(timeout=10)  # reaps it and closes its pipes


def timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    resp = call()
    return resp, time.monotonic() - started


def assert_transient(resp: httpx.Response) -> None:
    """503 ``transient`` with Retry-After, as an OperationOutcome (or a failure Bundle carrying one)."""
    assert resp.status_code == 503, resp.text
    assert resp.headers.get("Retry-After"), resp.headers
    body = resp.json()
    outcome = body if body["resourceType"] == "OperationOutcome" else body["entry"][0]["resource"]
    assert_operation_outcome(outcome)
    assert outcome["issue"][0]["code"] == "transient", outcome
    assert "Traceback" not in resp.text


def booked_appointment(api: Api) -> str:
    """The id of an appointment the demo database already has (for reads while something is locked)."""
    rows = api.db.rows("SELECT APPT_ID FROM APPT WHERE TRIM(PROV_ID) = ? ORDER BY APPT_ID", SPEARS)
    return str(rows[0][0])


def no_lock_needed(api: Api, appt_id: str) -> list[tuple[str, Callable[[], httpx.Response]]]:
    """Requests that need neither the legacy write lock nor the state file's."""
    http = api.http
    return [
        ("metadata", lambda: http.get("/metadata")),
        ("read", lambda: http.get(f"/Appointment/{appt_id}")),
        ("search", lambda: http.get("/Appointment", params={"practitioner": f"Practitioner/{SPEARS}", "_count": 5})),
        ("practitioner", lambda: http.get(f"/Practitioner/{SPEARS}")),
    ]


def assert_fast_while(api: Api, appt_id: str, waiting: list[Any]) -> None:
    """Every request that needs no lock answers within FAST while ``waiting`` (futures) still wait."""
    for name, call in no_lock_needed(api, appt_id):
        resp, took = timed(call)
        assert resp.status_code == 200, f"{name}: {resp.text}"
        assert took < FAST, f"{name} took {took * 1000:.0f} ms while a booking waited for a lock"
    assert any(not f.done() for f in waiting), "the locked requests were not waiting any more: nothing was measured"


def warm_up(api: Api, appt_id: str) -> None:
    """First calls load the reference caches and open connections: measure steady state only."""
    for _, call in no_lock_needed(api, appt_id):
        assert call().status_code == 200


def run_bounded(
    calls: list[Callable[[], httpx.Response]], check: Callable[[Api, str, list[Any]], None], api: Api, appt_id: str
) -> list[tuple[httpx.Response, float]]:
    """Start the lock-needing ``calls`` STAGGER seconds apart; while they wait, run ``check``; return
    their answers and how long each took from its own start.

    Staggered, because waits that add up show only then: a call that arrives while another holds the
    process writer lock first waits for that one, then for the file; each wait alone was bounded.
    """

    def later(i: int, call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
        time.sleep(i * STAGGER)
        return timed(call)

    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(later, i, c) for i, c in enumerate(calls)]
        time.sleep(0.3 + (len(calls) - 1) * STAGGER)  # every call is now waiting for the lock
        check(api, appt_id, futures)
        return [f.result() for f in futures]


def _fresh_client(api: Api) -> httpx.Client:
    return httpx.Client(base_url=api.base, timeout=60)


# --------------------------------------------------------------------------------------------------
# Item 6 (and 5): a locked legacy SQLite file, a locked state file, a held host lock
# --------------------------------------------------------------------------------------------------
def test_issue7_6_locked_legacy_sqlite_delays_only_the_writes(tmp_path: Path) -> None:
    """Another process holds the legacy file under BEGIN EXCLUSIVE for 5 s: metadata, reads and
    searches answer within 100 ms meanwhile; $book and $hold answer 503 within timeout + 1 s."""
    target = seeded("sqlite", tmp_path)
    with running_api(tmp_path, "sqlite", target, backend={"timeout_seconds": TIMEOUT}) as api:
        first, second = api.find()[:2]
        appt_id = booked_appointment(api)
        warm_up(api, appt_id)
        before = api.db.count_appts()
        with held_by_another_process(_HOLDER, target, 5):
            clients = [_fresh_client(api) for _ in range(3)]
            try:
                calls = [
                    lambda: clients[0].post(
                        "/Appointment/$book", json=parameters(ref_param(first["id"])), headers={"X-Client-Id": "a"}
                    ),
                    lambda: clients[1].post(
                        "/Appointment/$book", json=parameters(ref_param(second["id"])), headers={"X-Client-Id": "b"}
                    ),
                    lambda: clients[2].post(
                        "/Appointment/$hold", json=parameters(ref_param(second["id"])), headers={"X-Client-Id": "c"}
                    ),
                ]
                answers = run_bounded(calls, assert_fast_while, api, appt_id)
            finally:
                for c in clients:
                    c.close()
            for resp, took in answers:
                assert_transient(resp)
                assert took < TIMEOUT + 1, f"a write waited {took:.1f} s with a {TIMEOUT} s timeout"
        assert api.db.count_appts() == before
        assert api.state_rows("SELECT COUNT(*) FROM holds") == [(0,)]
        assert api.state_rows("SELECT COUNT(*) FROM journal WHERE state = 'intent'") == [(0,)]
        # The lock is gone: the same booking now works.
        assert_success(api.book(first["id"], "a"), "booked")


def test_issue7_6_locked_state_store_delays_only_what_needs_it(tmp_path: Path) -> None:
    """Another process holds the adapter's state file under BEGIN EXCLUSIVE: reads, searches and
    $find answer at once; $hold, $book and an Idempotency-Key answer 503 within timeout + 1 s (never 500)."""
    target = seeded("sqlite", tmp_path)
    with running_api(tmp_path, "sqlite", target, backend={"timeout_seconds": TIMEOUT}) as api:
        first, second = api.find()[:2]
        appt_id = booked_appointment(api)
        warm_up(api, appt_id)
        before = api.db.count_appts()
        with held_by_another_process(_HOLDER, api.state_path, 5):
            clients = [_fresh_client(api) for _ in range(3)]
            try:
                calls = [
                    lambda: clients[0].post(
                        "/Appointment/$book", json=parameters(ref_param(first["id"])), headers={"X-Client-Id": "a"}
                    ),
                    lambda: clients[1].post(
                        "/Appointment/$hold", json=parameters(ref_param(second["id"])), headers={"X-Client-Id": "b"}
                    ),
                    lambda: clients[2].post(
                        "/Appointment/$book",
                        json=parameters(ref_param(second["id"])),
                        headers={"X-Client-Id": "c", "Idempotency-Key": "while-locked"},
                    ),
                ]

                def check(api: Api, appt_id: str, waiting: list[Any]) -> None:
                    assert_fast_while(api, appt_id, waiting)
                    found, took = timed(
                        lambda: api.post(
                            "/Appointment/$find",
                            parameters(
                                {"name": "start", "valueDateTime": first["start"]},
                                {"name": "end", "valueDateTime": first["end"]},
                                {"name": "practitioner", "valueReference": {"reference": f"Practitioner/{SPEARS}"}},
                            ),
                        )
                    )
                    assert found.status_code == 200 and took < FAST, (found.status_code, took)

                answers = run_bounded(calls, check, api, appt_id)
            finally:
                for c in clients:
                    c.close()
            for resp, took in answers:
                assert_transient(resp)
                assert took < TIMEOUT + 1, (
                    f"a request waited {took:.1f} s for the state file with a {TIMEOUT} s timeout"
                )
        assert api.db.count_appts() == before  # the legacy write unit rolled back with the gate
        assert api.state_rows("SELECT COUNT(*) FROM holds") == [(0,)]
        assert api.state_rows("SELECT COUNT(*) FROM idempotency") == [(0,)]
        assert_success(api.book(first["id"], "a"), "booked")
        assert_success(api.book(second["id"], "c", key="while-locked"), "booked")


def test_issue7_5_host_writer_lock_held_elsewhere_is_503_within_the_timeout(tmp_path: Path) -> None:
    """Another process keeps the per-host writer lock file (as a hung worker would): the wait for it
    is bounded too (it used to be a blocking flock without any limit), and writes resume after."""
    target = seeded("sqlite", tmp_path)
    with running_api(tmp_path, "sqlite", target, backend={"timeout_seconds": TIMEOUT}) as api:
        first, second = api.find()[:2]
        with held_by_another_process(_FLOCK_HOLDER, host_lock_path(target), 60):
            for token in (first["id"], second["id"]):  # the second inherits the first one's waiter
                resp, took = timed(lambda t=token: api.book(t, "a"))
                assert_transient(resp)
                assert TIMEOUT - 0.5 < took < TIMEOUT + 1, took
        assert_success(api.book(first["id"], "a"), "booked")
        assert_success(api.book(second["id"], "a"), "booked")


# --------------------------------------------------------------------------------------------------
# Item 5: the booking row lock held on a server database
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [dbutil.POSTGRESQL, dbutil.MARIADB])
def test_issue7_5_booking_lock_held_on_the_server_is_503_within_the_timeout(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    import pyodbc

    dsn = request.getfixturevalue("fresh_pg_demo_dsn" if kind == dbutil.POSTGRESQL else "fresh_mariadb_demo_dsn")
    with running_api(tmp_path, kind, dsn, backend={"timeout_seconds": TIMEOUT}) as api:
        first = api.find()[0]
        appt_id = booked_appointment(api)
        warm_up(api, appt_id)
        before = api.db.count_appts()
        holder = pyodbc.connect(dsn, autocommit=False)
        try:
            rows = holder.execute("SELECT PROV_ID FROM PROVIDER WHERE TRIM(PROV_ID) = ? FOR UPDATE", SPEARS).fetchall()
            assert len(rows) == 1
            client = _fresh_client(api)
            try:
                answers = run_bounded(
                    [
                        lambda: client.post(
                            "/Appointment/$book", json=parameters(ref_param(first["id"])), headers={"X-Client-Id": "a"}
                        )
                    ],
                    assert_fast_while,
                    api,
                    appt_id,
                )
            finally:
                client.close()
            resp, took = answers[0]
            assert_transient(resp)
            assert took < TIMEOUT + 1, f"the booking waited {took:.1f} s for the row lock with a {TIMEOUT} s timeout"
        finally:
            holder.rollback()
            holder.close()
        assert api.db.count_appts() == before
        assert_success(api.book(first["id"], "a"), "booked")


# --------------------------------------------------------------------------------------------------
# Item 5: a legacy database that refuses writes, then accepts them again
# --------------------------------------------------------------------------------------------------
@contextmanager
def read_only_file(path: Path) -> Iterator[None]:
    """The file cannot be opened for writing: immutable when running as root (root ignores file
    modes), mode 0444 otherwise. New SQLite connections then open it read-only."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], check=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        mode = path.stat().st_mode
        path.chmod(0o444)
        try:
            yield
        finally:
            path.chmod(mode)


def _concurrently(calls: list[Callable[[], httpx.Response]]) -> list[httpx.Response]:
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda c: c(), calls))


def _writes(api: Api, op: str, slots: list[dict[str, Any]], client: str) -> list[Callable[[], httpx.Response]]:
    """``op`` ($hold or $book) of each slot, each on its own connection, to be run at once."""

    def call(token: str) -> httpx.Response:
        with _fresh_client(api) as http:
            return http.post(f"/Appointment/{op}", json=parameters(ref_param(token)), headers={"X-Client-Id": client})

    return [lambda t=s["id"]: call(t) for s in slots]


def _same_time(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return parse_instant(a["start"]) < parse_instant(b["end"]) and parse_instant(b["start"]) < parse_instant(a["end"])


def _distinct_slots(api: Api, n: int) -> list[dict[str, Any]]:
    """``n`` offered slots, no two of them overlapping in time (they are all for one patient, who can be
    in one place at a time)."""
    chosen: list[dict[str, Any]] = []
    for a in api.find(practitioner=None, count=500, days=(1, 15)):
        if all(not _same_time(a, b) for b in chosen):
            chosen.append(a)
        if len(chosen) == n:
            return chosen
    raise AssertionError(f"fewer than {n} separate free slots offered")


POOL = 2  # backend.pool_size of the read-only tests: more writes than pooled connections


def test_issue7_5_read_only_sqlite_is_503_and_writes_resume_on_every_connection(tmp_path: Path) -> None:
    """While the legacy file cannot be written, bookings are 503 transient (the write threads open
    read-only connections meanwhile); once it can, more bookings than pooled connections all succeed."""
    target = Path(seeded("sqlite", tmp_path))
    with running_api(tmp_path, "sqlite", str(target), backend={"timeout_seconds": TIMEOUT, "pool_size": POOL}) as api:
        slots = _distinct_slots(api, 4 * POOL)
        refused, later = slots[: 2 * POOL], slots[2 * POOL :]
        with read_only_file(target):
            answers = _concurrently(_writes(api, "$book", refused, "ro"))
            for resp in answers:
                assert_transient(resp)  # not 422 business-rule: nothing is wrong with the request
            assert "readonly" in answers[0].text
            assert api.read(booked_appointment(api)).status_code == 200  # reads still work
        # Writable again: every write succeeds at once, on every pooled connection, no restart.
        for resp in _concurrently(_writes(api, "$book", refused + later, "rw")):
            assert_success(resp, "booked")


def test_issue7_5_read_only_postgresql_is_503_and_writes_resume_without_restart(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """``ALTER DATABASE ... SET default_transaction_read_only`` plus a reconnect (the DBA's
    maintenance switch): writes are 503 transient; when it is switched off, the sessions that were
    opened read-only are gone, so the next writes succeed on every pooled connection."""
    import pyodbc

    dsn = request.getfixturevalue("fresh_pg_demo_dsn")
    name = dbutil.database_name_from_dsn(dsn)
    admin = pyodbc.connect(dbutil.admin_dsn(dbutil.POSTGRESQL), autocommit=True)
    try:
        with running_api(
            tmp_path, dbutil.POSTGRESQL, dsn, backend={"timeout_seconds": TIMEOUT, "pool_size": POOL}
        ) as api:
            slots = _distinct_slots(api, 4 * POOL)
            refused, later = slots[: 2 * POOL], slots[2 * POOL :]
            admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = ? AND pid <> pg_backend_pid()",
                name,
            )
            seen_read_only = False
            deadline = time.monotonic() + 30
            while not seen_read_only:  # the first writes may only see the terminated sessions
                assert time.monotonic() < deadline, "the read-only database never refused a write"
                for resp in _concurrently(_writes(api, "$book", refused, "ro")):
                    assert_transient(resp)
                    seen_read_only |= "read-only" in resp.text
            assert api.read(booked_appointment(api)).status_code == 200  # reads still work
            admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = off')
            for resp in _concurrently(_writes(api, "$book", refused + later, "rw")):
                assert_success(resp, "booked")
    finally:
        admin.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        admin.close()


def test_issue7_5_refusals_are_transient_not_business_rules(tmp_path: Path) -> None:
    """Real driver errors of a database that refuses writes are classified as retryable."""
    import sqlite3

    from adapter.backends.sql.db import _is_connection_error, _is_refusal

    full = sqlite3.connect(tmp_path / "full.sqlite")
    full.execute("CREATE TABLE t (b BLOB)")
    full.execute("PRAGMA max_page_count = 2")
    with pytest.raises(sqlite3.OperationalError) as disk_full:
        full.execute("INSERT INTO t VALUES (zeroblob(100000))")
    path = tmp_path / "ro.sqlite"
    sqlite3.connect(path).execute("CREATE TABLE t (a)").connection.close()
    ro = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    with pytest.raises(sqlite3.OperationalError) as read_only:
        ro.execute("INSERT INTO t VALUES (1)")
    for exc in (disk_full.value, read_only.value):
        assert _is_refusal(exc) and _is_connection_error(exc), exc
    assert not _is_refusal(sqlite3.IntegrityError("UNIQUE constraint failed: t.a"))
