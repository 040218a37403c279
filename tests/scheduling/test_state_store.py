"""The adapter's state store: holds, idempotency records and the booking journal (SqliteStateStore).

Real SQLite files, several store instances (as several uvicorn workers have), real processes where
the question is cross-process atomicity. No mocks of the store itself.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import multiprocessing
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from adapter.backends.protocol import Interval, SlotConflict
from adapter.scheduling.proposals import Proposal, ProposalCodec, proposal_to_dict
from adapter.scheduling.service import SchedulingService
from adapter.scheduling.state import (
    Hold,
    IdempotencyInProgress,
    IdempotencyMismatch,
    SqliteStateStore,
    StateUnavailable,
    StoredResponse,
    ThreadedStateStore,
    owner_alive,
)

UTC = dt.UTC
NOW = dt.datetime(2030, 3, 4, 14, 0, tzinfo=UTC)


def hold(
    hid: str, start_min: int, minutes: int = 20, client: str | None = "a", prac: str = "P1", expires_in: int = 300
) -> Hold:
    start = NOW + dt.timedelta(hours=1, minutes=start_min)
    return Hold(
        hid,
        prac,
        "1",
        Interval(start, start + dt.timedelta(minutes=minutes)),
        NOW + dt.timedelta(seconds=expires_in),
        client,
        {"id": hid},
    )


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = SqliteStateStore(tmp_path / "state.sqlite")
    yield s
    s.close()


# --------------------------------------------------------------------------------------------------
# Holds
# --------------------------------------------------------------------------------------------------
def test_req_116_08_overlapping_hold_conflicts(store: SqliteStateStore) -> None:
    assert store.place_hold(hold("h1", 0), NOW).id == "h1"
    with pytest.raises(SlotConflict):
        store.place_hold(hold("h2", 10, client="b"), NOW)
    with pytest.raises(SlotConflict):
        store.place_hold(hold("h3", 10, client="a"), NOW)  # even the same client: one hold per time
    assert store.place_hold(hold("h4", 20, client="b"), NOW).id == "h4"  # adjacent, not overlapping
    assert store.place_hold(hold("h5", 0, prac="P2", client="b"), NOW).id == "h5"  # another practitioner


def test_req_116_11_same_id_returns_existing_hold_unchanged(store: SqliteStateStore) -> None:
    first = store.place_hold(hold("h1", 0, expires_in=300), NOW)
    again = store.place_hold(hold("h1", 0, expires_in=900), NOW + dt.timedelta(seconds=5))
    assert again.expires_at == first.expires_at  # not extended


def test_req_116_07_expired_hold_no_longer_blocks(store: SqliteStateStore) -> None:
    store.place_hold(hold("h1", 0, expires_in=60), NOW)
    later = NOW + dt.timedelta(seconds=61)
    assert store.get_hold("h1", later) is None
    assert store.holds_by_practitioner(["P1"], Interval(NOW, NOW + dt.timedelta(days=1)), later) == {}
    store.check_free("P1", hold("x", 0).interval, later, own_hold=None)
    assert store.place_hold(hold("h1", 0, client="b"), later).client == "b"  # same id, new owner
    assert store.sweep(later + dt.timedelta(seconds=400)) == 1


def test_req_116_08_check_free_own_hold_only_for_its_client(store: SqliteStateStore) -> None:
    """Booking the held id itself passes only for the holder (or for anyone when the hold is anonymous)."""
    store.place_hold(hold("h1", 0, client="a"), NOW)
    iv = hold("x", 0).interval
    store.check_free("P1", iv, NOW, own_hold="h1", client="a")
    with pytest.raises(SlotConflict):
        store.check_free("P1", iv, NOW, own_hold="h1", client="b")
    with pytest.raises(SlotConflict):
        store.check_free("P1", iv, NOW, own_hold="h1", client=None)
    with pytest.raises(SlotConflict):
        store.check_free("P1", iv, NOW, own_hold="other", client="a")
    store.place_hold(hold("anon", 60, client=None), NOW)
    store.check_free("P1", hold("y", 60).interval, NOW, own_hold="anon", client="whoever")


def _place_in_process(path: str, index: int, start: Any, results: Any) -> None:
    store = SqliteStateStore(path)
    start.wait()
    try:
        store.place_hold(hold(f"h{index}", index % 3, client=f"c{index}"), NOW)
        results.put(("ok", index))
    except SlotConflict:
        results.put(("conflict", index))
    finally:
        store.close()


def test_req_116_08_holds_are_atomic_across_processes(tmp_path: Path) -> None:
    """12 processes place overlapping holds on one file at once: exactly one wins."""
    path = str(tmp_path / "state.sqlite")
    SqliteStateStore(path).close()
    ctx = multiprocessing.get_context("fork")  # separate processes, separate connections; fork is fast
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_place_in_process, args=(path, i, start, results)) for i in range(12)]
    for p in procs:
        p.start()
    start.set()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert sorted(o for o, _ in outcomes) == ["conflict"] * 11 + ["ok"]
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT COUNT(*) FROM holds").fetchone() == (1,)
    conn.close()


# --------------------------------------------------------------------------------------------------
# Idempotency
# --------------------------------------------------------------------------------------------------
def test_req_117_16_idempotency_replay_and_mismatch(store: SqliteStateStore) -> None:
    assert store.idempotency_begin("c", "k", "book", "h1", NOW) is None
    with pytest.raises(IdempotencyInProgress):
        store.idempotency_begin("c", "k", "book", "h1", NOW)
    store.idempotency_finish("c", "k", StoredResponse(200, "application/fhir+json", b"{}"))
    assert store.idempotency_begin("c", "k", "book", "h1", NOW) == StoredResponse(200, "application/fhir+json", b"{}")
    with pytest.raises(IdempotencyMismatch):
        store.idempotency_begin("c", "k", "book", "h2", NOW)
    with pytest.raises(IdempotencyMismatch):
        store.idempotency_begin("c", "k", "hold", "h1", NOW)
    assert store.idempotency_begin("other-client", "k", "book", "h2", NOW) is None  # scoped per client


def test_req_gen_21_failed_request_frees_its_key(store: SqliteStateStore) -> None:
    assert store.idempotency_begin("c", "k", "book", "h1", NOW) is None
    store.idempotency_finish("c", "k", None)
    assert store.idempotency_begin("c", "k", "book", "h2", NOW) is None  # a new request, any body


def _dead_pid() -> int:
    proc = multiprocessing.get_context("fork").Process(target=os.getpid)
    proc.start()
    proc.join()
    return proc.pid  # type: ignore[return-value]


def test_key_of_a_crashed_process_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    crashed = SqliteStateStore(path)
    assert crashed.idempotency_begin("c", "k", "book", "h1", NOW) is None
    crashed.close()  # this instance is gone, as a crashed worker would be
    survivor = SqliteStateStore(path)
    assert survivor.idempotency_begin("c", "k", "book", "h1", NOW) is None  # not "in progress" forever
    with pytest.raises(IdempotencyInProgress):
        SqliteStateStore(path).idempotency_begin("c", "k", "book", "h1", NOW)  # the survivor is alive
    # An owner in a process that no longer exists, on this host.
    conn = sqlite3.connect(path)
    host = survivor.owner.split(":")[0]
    conn.execute("UPDATE idempotency SET owner = ?", (f"{host}:{_dead_pid()}:abc",))
    conn.commit()
    conn.close()
    assert SqliteStateStore(path).idempotency_begin("c", "k", "book", "h1", NOW) is None
    survivor.close()


def test_stuck_key_is_taken_over_after_the_lease(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    a = SqliteStateStore(path, lease_seconds=30)
    b = SqliteStateStore(path, lease_seconds=30)
    assert a.idempotency_begin("c", "k", "book", "h1", NOW) is None
    with pytest.raises(IdempotencyInProgress):
        b.idempotency_begin("c", "k", "book", "h1", NOW + dt.timedelta(seconds=29))
    assert b.idempotency_begin("c", "k", "book", "h1", NOW + dt.timedelta(seconds=31)) is None
    a.close()
    b.close()


def test_owner_alive() -> None:
    assert not owner_alive(None)
    assert owner_alive("some-other-host:1:x")  # cannot tell: the lease decides
    import socket

    assert not owner_alive(f"{socket.gethostname()}:{_dead_pid()}:x")
    assert not owner_alive(f"{socket.gethostname()}:{os.getpid()}:not-a-live-store")


# --------------------------------------------------------------------------------------------------
# Booking journal
# --------------------------------------------------------------------------------------------------
def test_journal_intent_done_releases_hold(store: SqliteStateStore) -> None:
    store.place_hold(hold("t1", 0), NOW)
    store.journal_intent("t1", client="a", request_key=None, payload={"x": 1}, now=NOW)
    entry = store.journal_get("t1")
    assert entry is not None and entry.state == "intent" and entry.owner == store.owner
    assert store.journal_claim("t1", NOW) is None  # its owner is alive and within the lease
    store.journal_done("t1", "1234", NOW, release_hold=True)
    done = store.journal_get("t1")
    assert done is not None and (done.state, done.appointment_id) == ("done", "1234")
    assert store.get_hold("t1", NOW) is None
    assert store.journal_claim_stale(NOW + dt.timedelta(days=1)) == []  # done entries never go stale


def test_journal_abandoned_or_orphaned_intents_are_claimed_once(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    worker = SqliteStateStore(path)
    worker.journal_intent("t1", client="a", request_key=None, payload={}, now=NOW)
    worker.journal_intent("t2", client="b", request_key=None, payload={}, now=NOW)
    worker.journal_intent("t3", client="c", request_key=None, payload={}, now=NOW)
    worker.journal_abandon("t1", NOW)  # commit outcome unknown, request gave up
    others = [SqliteStateStore(path) for _ in range(4)]
    assert [e.token for e in others[0].journal_claim_stale(NOW)] == ["t1"]
    worker.close()  # t2 and t3 are orphaned now
    claimed: list[str] = []
    lock = threading.Lock()

    def claim(s: SqliteStateStore) -> None:
        got = s.journal_claim_stale(NOW)
        with lock:
            claimed.extend(e.token for e in got)

    threads = [threading.Thread(target=claim, args=(s,)) for s in others[1:]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == ["t2", "t3"]  # each exactly once, although three workers asked
    others[1].journal_drop("t2")
    assert others[1].journal_get("t2") is None
    for s in others:
        s.close()


def test_migrates_a_first_release_state_file(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE idempotency (client TEXT NOT NULL, key TEXT NOT NULL, operation TEXT NOT NULL,
          body_hash TEXT NOT NULL, state TEXT NOT NULL, status INTEGER, media_type TEXT, body BLOB,
          created_s REAL NOT NULL, PRIMARY KEY (client, key));
        INSERT INTO idempotency VALUES ('c', 'k', 'book', 'h', 'done', 200, 'application/fhir+json', x'7b7d', 1.0);
    """)
    conn.commit()
    conn.close()
    store = SqliteStateStore(path)
    assert store.idempotency_begin("c", "k", "book", "h", NOW).status == 200  # type: ignore[union-attr]
    store.journal_intent("t", client=None, request_key="k", payload={}, now=NOW)
    store.close()
    SqliteStateStore(path).close()  # opening again migrates nothing twice


# --------------------------------------------------------------------------------------------------
# Reconciliation through a backend without ``find_booked`` (the protocol's search is used)
# --------------------------------------------------------------------------------------------------
def _service(store: SqliteStateStore, backend: Any) -> SchedulingService:
    threaded = ThreadedStateStore(store)  # the domain's async view of the same store
    codec = ProposalCodec(b"0123456789abcdef0123", threaded, dt.timedelta(hours=1))
    return SchedulingService(backend, threaded, codec, hold_ttl=dt.timedelta(minutes=5))


def _real_backend(url: str):
    from apputil import DEMO_MAPPING

    from adapter.backends.sql.backend import SqlBackend
    from adapter.backends.sql.db import Database
    from adapter.mapping.loader import load_mapping

    return SqlBackend(load_mapping(DEMO_MAPPING), Database(url, timeout_s=2))


@pytest.fixture
def legacy(tmp_path: Path) -> tuple[str, tuple[str, int, dt.datetime, int]]:
    """The demo legacy database and one of its future booked appointments (prac, patient, start, minutes)."""
    from zoneinfo import ZoneInfo

    from adapter.demo.seed import ensure_demo_database

    path = tmp_path / "legacy.sqlite"
    ensure_demo_database(path, today=dt.date.today())
    con = sqlite3.connect(path)
    appt_id, prac, pat, day, hhmm, minutes = con.execute(
        "SELECT APPT_ID, PROV_ID, PAT_ID, APPT_DT, APPT_TM, DUR_MIN FROM APPT WHERE STATUS_CD = 'S' AND APPT_DT > ? "
        "ORDER BY APPT_ID LIMIT 1",
        (int(dt.date.today().strftime("%Y%m%d")),),
    ).fetchone()
    start = dt.datetime.strptime(f"{day}{hhmm:04d}", "%Y%m%d%H%M").replace(tzinfo=ZoneInfo("America/New_York"))
    return f"sqlite:///{path}", (str(appt_id), prac.strip(), pat, start.astimezone(UTC), minutes)


def _intent_for(store: SqliteStateStore, token: str, prac: str, patient: str, start: dt.datetime, minutes: int) -> None:
    p = Proposal(prac, "1", start, minutes, "FOLLOW", (patient,), NOW, start, start + dt.timedelta(minutes=minutes))
    store.place_hold(Hold(token, prac, "1", Interval(start, p.end), NOW + dt.timedelta(minutes=5), "a", {}), NOW)
    store.journal_intent(
        token, client="a", request_key=None, payload=proposal_to_dict(p) | {"patient_id": patient}, now=NOW
    )
    store.journal_abandon(token, NOW)


def _intent(store: SqliteStateStore, token: str) -> None:
    start = NOW + dt.timedelta(hours=2)
    p = Proposal("P1", "1", start, 20, "FOLLOW", ("5",), NOW, start, start + dt.timedelta(minutes=20))
    store.place_hold(Hold(token, "P1", "1", Interval(start, p.end), NOW + dt.timedelta(minutes=5), "a", {}), NOW)
    store.journal_intent(
        token, client="a", request_key=None, payload=proposal_to_dict(p) | {"patient_id": "5"}, now=NOW
    )
    store.journal_abandon(token, NOW)


def test_reconcile_records_a_booking_found_in_the_legacy_system(store: SqliteStateStore, legacy) -> None:
    url, (appt_id, prac, patient, start, minutes) = legacy
    _intent_for(store, "t1", prac, str(patient), start, minutes)
    assert asyncio.run(_service(store, _real_backend(url)).reconcile(NOW)) == 1
    entry = store.journal_get("t1")
    assert entry is not None and (entry.state, entry.appointment_id) == ("done", appt_id)
    assert store.get_hold("t1", NOW) is None


def test_reconcile_drops_an_intent_that_never_reached_the_legacy_system(store: SqliteStateStore, legacy) -> None:
    url, (_, prac, patient, start, minutes) = legacy
    _intent_for(store, "t1", prac, str(patient), start + dt.timedelta(days=400), minutes)  # nothing booked then
    asyncio.run(_service(store, _real_backend(url)).reconcile(NOW))
    assert store.journal_get("t1") is None
    assert store.get_hold("t1", NOW) is not None  # the hold was not the booking's to release


def test_reconcile_keeps_the_intent_while_the_legacy_system_is_down(
    store: SqliteStateStore, tmp_path: Path, legacy
) -> None:
    _, (_, prac, patient, start, minutes) = legacy
    _intent_for(store, "t1", prac, str(patient), start, minutes)
    unreachable = f"sqlite:///{tmp_path / 'no-such-dir' / 'legacy.sqlite'}"
    asyncio.run(_service(store, _real_backend(unreachable)).housekeeping(NOW))
    entry = store.journal_get("t1")
    assert entry is not None and entry.state == "intent" and entry.owner is None  # next run retries


# --------------------------------------------------------------------------------------------------
# Faults (issue 7, item 5): a state file locked by another process is StateUnavailable, in bounded time
# --------------------------------------------------------------------------------------------------
_LOCK_HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(30)
"""


@contextmanager
def locked_by_another_process(path: Path) -> Iterator[None]:
    """``path`` (a state file) held under BEGIN EXCLUSIVE by another process while the block runs."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield
    finally:
        proc.kill()
        proc.communicate(timeout=10)  # reaps it and closes its pipe


def test_issue7_5_locked_state_file_is_unavailable_within_the_timeout(tmp_path: Path) -> None:
    import time

    store = ThreadedStateStore(SqliteStateStore(tmp_path / "state.sqlite", timeout_s=0.5), timeout_s=0.5)

    async def attempt() -> float:
        started = time.monotonic()
        with pytest.raises(StateUnavailable):
            await store.bump_calendar_version()
        took = time.monotonic() - started
        assert await store.get_hold("nothing", NOW) is None  # reads do not wait for the writer (WAL)
        return took

    with locked_by_another_process(tmp_path / "state.sqlite"):
        took = asyncio.run(attempt())
    assert 0.4 < took < 1.5, took
    asyncio.run(store.close())


def test_issue7_5_the_gate_waits_no_longer_than_the_write_unit_has_left(tmp_path: Path) -> None:
    """Called through the gate (inside a backend write unit), the state store's wait ends with the
    unit's deadline, not after its own (longer) timeout."""
    import time

    from adapter.deadline import Deadline, bounded

    store = SqliteStateStore(tmp_path / "state.sqlite", timeout_s=20)
    with locked_by_another_process(tmp_path / "state.sqlite"):
        started = time.monotonic()
        with bounded(Deadline.after(0.3)), pytest.raises(StateUnavailable):
            store.journal_intent("t", client=None, request_key=None, payload={}, now=NOW)
        assert time.monotonic() - started < 1.0
    store.close()


# --------------------------------------------------------------------------------------------------
# Issue 14: holds read without a thread hop while the holds counter stands still
# --------------------------------------------------------------------------------------------------
def test_issue14_cached_holds_answer_like_the_store_and_see_every_worker_change_at_once(tmp_path: Path) -> None:
    """Worker A reads holds through its ``ThreadedStateStore`` (cached by the holds counter); worker B (another
    store on the same file) places, releases and books holds. Every read of A equals what the SQL gives at that
    ``now``, a change by B shows in A's very next read, and an expiry shows by ``now`` alone (no bump)."""
    path = tmp_path / "state.sqlite"
    raw_a, b = SqliteStateStore(path), SqliteStateStore(path)
    a = ThreadedStateStore(raw_a)
    window = Interval(NOW, NOW + dt.timedelta(days=1))
    hops = 0
    rows_of = raw_a.hold_rows

    def counted(*args: Any) -> Any:
        nonlocal hops
        hops += 1
        return rows_of(*args)

    raw_a.hold_rows = counted  # type: ignore[method-assign]  # the real read, counted

    async def read(now: dt.datetime) -> dict[str, list[Interval]]:
        got = await a.holds_by_practitioner(("P1", "P2"), window, now)
        assert got == b.holds_by_practitioner(("P1", "P2"), window, now)  # what the store itself answers
        return got

    async def scenario() -> None:
        assert await read(NOW) == {}
        assert await read(NOW) == {} and hops == 1  # nothing changed: no second read of the file
        b.place_hold(hold("h1", 0, expires_in=60), NOW)
        assert [i.start for i in (await read(NOW))["P1"]] == [NOW + dt.timedelta(hours=1)]
        b.place_hold(hold("h2", 30, prac="P2"), NOW)
        assert set(await read(NOW)) == {"P1", "P2"}
        hops_before = hops
        assert set(await read(NOW + dt.timedelta(seconds=61))) == {"P2"}  # h1 ran out: by now, no bump
        assert hops == hops_before
        b.release("h2")
        assert await read(NOW + dt.timedelta(seconds=61)) == {}
        b.place_hold(hold("h3", 60), NOW)
        b.journal_intent("h3", client="a", request_key=None, payload={"x": 1}, now=NOW)
        assert set(await read(NOW)) == {"P1"}
        b.journal_done("h3", "appt-1", NOW, release_hold=True)
        assert "P1" not in await read(NOW + dt.timedelta(seconds=61))

    try:
        asyncio.run(scenario())
    finally:
        asyncio.run(a.close())
        b.close()


def test_issue14_cached_patient_holds_answer_like_the_store(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    raw_a, b = SqliteStateStore(path), SqliteStateStore(path)
    a = ThreadedStateStore(raw_a)
    window = Interval(NOW, NOW + dt.timedelta(days=1))

    def for_patient(hid: str, start_min: int, expires_in: int = 300) -> Hold:
        h = hold(hid, start_min, expires_in=expires_in, prac=f"P-{hid}")
        return Hold(h.id, h.practitioner_id, h.location_id, h.interval, h.expires_at, h.client, {"patient_ids": ["7"]})

    async def read(now: dt.datetime) -> list[Interval]:
        got = await a.holds_by_patient(("7", "8"), window, now)
        assert got == b.holds_by_patient(("7", "8"), window, now)
        return got

    async def scenario() -> None:
        assert await read(NOW) == []
        b.place_hold(for_patient("h1", 0, expires_in=60), NOW)
        assert len(await read(NOW)) == 1  # another worker's hold: seen at once
        b.place_hold(for_patient("h2", 60), NOW)
        assert len(await read(NOW)) == 2
        assert len(await read(NOW + dt.timedelta(seconds=61))) == 1  # h1 ran out
        b.release("h2")
        assert await read(NOW) == [Interval(NOW + dt.timedelta(hours=1), NOW + dt.timedelta(hours=1, minutes=20))]

    try:
        asyncio.run(scenario())
    finally:
        asyncio.run(a.close())
        b.close()
