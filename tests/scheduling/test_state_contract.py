"""One contract, three state stores (issue 10.1): SQLite, Redis and PostgreSQL behave the same.

Every test runs against each store (``kind``), with several store instances standing for several
replicas (separate connections, separate owners). Real servers: Redis at 127.0.0.1:6379 (db 13, a
key prefix per test, see ``tests/stateutil.py``) and a fresh PostgreSQL database per test. Time is
the ``now`` argument plus an injectable lease clock, never a sleep.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from stateutil import drop_redis_keys, pg_state_url, redis_state_url

from adapter.backends.protocol import Interval, SlotConflict
from adapter.scheduling.state import (
    DEFAULT_LEASE_SECONDS,
    Hold,
    HoldConflict,
    IdempotencyInProgress,
    IdempotencyMismatch,
    SqliteStateStore,
    StateUnavailable,
    StoredResponse,
    SyncStateStore,
    ThreadedStateStore,
)
from adapter.scheduling.stores import is_shared, open_state_store, state_url
from adapter.scheduling.stores.postgres_store import PostgresStateStore
from adapter.scheduling.stores.redis_store import RedisStateStore, split_url

UTC = dt.UTC
NOW = dt.datetime(2030, 3, 4, 14, 0, tzinfo=UTC)
KINDS = ["sqlite", "redis", "postgresql"]
OWNER_LEASE = 30.0


def hold(
    hid: str,
    start_min: int,
    minutes: int = 20,
    client: str | None = "a",
    prac: str = "P1",
    expires_in: int = 300,
    patients: tuple[str, ...] = (),
) -> Hold:
    start = NOW + dt.timedelta(hours=1, minutes=start_min)
    payload: dict[str, Any] = {"id": hid}
    if patients:
        payload["patient_ids"] = list(patients)  # where the domain puts them (see ``proposal_to_dict``)
    return Hold(
        hid,
        prac,
        "1",
        Interval(start, start + dt.timedelta(minutes=minutes)),
        NOW + dt.timedelta(seconds=expires_in),
        client,
        payload,
    )


def later(seconds: float) -> dt.datetime:
    return NOW + dt.timedelta(seconds=seconds)


class Stores:
    """Opens store instances ("replicas") of one kind on one shared state; closes them at the end."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind = kind
        self.url = url
        self.opened: list[Any] = []
        self.now = NOW.timestamp()  # the lease clock of the replicas opened without their own

    def set_time(self, t: dt.datetime) -> None:
        """Move the shared lease clock; live replicas' heartbeats renew at once (as they would by then)."""
        self.now = t.timestamp()
        for store in self.opened:
            if hasattr(store, "leases") and store.leases.running:
                store.leases.renew_now()

    def open(self, *, clock: Callable[[], float] | None = None) -> Any:
        clock = clock or (lambda: self.now)
        store: Any
        if self.kind == "sqlite":
            store = SqliteStateStore(self.url[len("sqlite:///") :])
        elif self.kind == "redis":
            store = RedisStateStore(self.url, owner_lease_seconds=OWNER_LEASE, clock=clock)
        else:
            store = PostgresStateStore(self.url, owner_lease_seconds=OWNER_LEASE, clock=clock)
        self.opened.append(store)
        return store

    def close_all(self) -> None:
        for store in self.opened:
            store.close()
        self.opened.clear()


@pytest.fixture(params=KINDS)
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    kind = request.param
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    elif kind == "redis":
        url = redis_state_url(request.getfixturevalue("redis_url"), request.node.name)
    else:
        url = pg_state_url(request.getfixturevalue("fresh_db")("postgresql", "state"))
    made = Stores(kind, url)
    try:
        yield made
    finally:
        made.close_all()
        if kind == "redis":
            drop_redis_keys(url)


@pytest.fixture
def store(stores: Stores) -> Any:
    return stores.open()


# --------------------------------------------------------------------------------------------------
# Holds
# --------------------------------------------------------------------------------------------------
def test_issue10_1_overlapping_hold_conflicts(store: SyncStateStore) -> None:
    assert store.place_hold(hold("h1", 0), NOW).id == "h1"
    with pytest.raises(SlotConflict):
        store.place_hold(hold("h2", 10, client="b"), NOW)
    with pytest.raises(SlotConflict):
        store.place_hold(hold("h3", 10, client="a"), NOW)
    with pytest.raises(SlotConflict):
        store.place_hold(hold("h3b", -10, client="b"), NOW)  # overlaps the start
    assert store.place_hold(hold("h4", 20, client="b"), NOW).id == "h4"  # adjacent
    assert store.place_hold(hold("h5", 0, prac="P2", client="b"), NOW).id == "h5"  # another practitioner


def test_issue10_1_same_id_returns_existing_hold_unchanged(store: SyncStateStore) -> None:
    first = store.place_hold(hold("h1", 0, expires_in=300), NOW)
    again = store.place_hold(hold("h1", 0, expires_in=900, client="b"), later(5))
    assert again.expires_at == first.expires_at and again.client == "a"
    got = store.get_hold("h1", later(5))
    assert got is not None and got == first


def test_issue10_1_hold_expiry_with_an_injected_clock(stores: Stores) -> None:
    a, b = stores.open(), stores.open()
    a.place_hold(hold("h1", 0, expires_in=60), NOW)
    window = Interval(NOW, later(86400))
    assert b.holds_by_practitioner(["P1", "P2"], window, later(59)) == {"P1": [hold("h1", 0).interval]}
    assert b.get_hold("h1", later(59)) is not None
    with pytest.raises(SlotConflict):
        b.place_hold(hold("h2", 5, client="b"), later(59))
    # One second after its expiry the hold is gone for every replica, before any sweep ran.
    assert b.get_hold("h1", later(60)) is None
    assert b.holds_by_practitioner(["P1"], window, later(60)) == {}
    b.check_free("P1", hold("x", 0).interval, later(60), own_hold=None, client="b")
    assert b.place_hold(hold("h2", 5, client="b"), later(60)).id == "h2"
    # The sweep removes what has expired and only that.
    assert a.sweep(later(60)) == 1
    assert b.get_hold("h2", later(61)) is not None
    assert a.sweep(later(400)) == 1
    assert a.sweep(later(400)) == 0


def test_issue10_1_check_free_own_hold_only_for_its_client(store: SyncStateStore) -> None:
    store.place_hold(hold("h1", 0, client="a"), NOW)
    store.place_hold(hold("anon", 60, client=None), NOW)
    iv, anon_iv = hold("h1", 0).interval, hold("anon", 60).interval
    store.check_free("P1", iv, NOW, own_hold="h1", client="a")
    with pytest.raises(SlotConflict):
        store.check_free("P1", iv, NOW, own_hold="h1", client="b")
    with pytest.raises(SlotConflict):
        store.check_free("P1", iv, NOW, own_hold=None, client="a")
    store.check_free("P1", anon_iv, NOW, own_hold="anon", client="whoever")
    store.check_free("P2", iv, NOW, own_hold=None)
    store.release("h1")
    store.check_free("P1", iv, NOW, own_hold=None, client="b")


def test_issue10_1_holds_by_practitioner_window(store: SyncStateStore) -> None:
    store.place_hold(hold("h1", 0), NOW)
    store.place_hold(hold("h2", 120, prac="P2"), NOW)
    h1 = hold("h1", 0).interval
    assert store.holds_by_practitioner(["P1"], Interval(h1.end, later(86400)), NOW) == {}
    assert store.holds_by_practitioner(["P1"], Interval(NOW, h1.start), NOW) == {}
    got = store.holds_by_practitioner(["P1", "P2", "P3"], Interval(NOW, later(86400)), NOW)
    assert got == {"P1": [h1], "P2": [hold("h2", 120).interval]}
    assert store.holds_by_practitioner([], Interval(NOW, later(86400)), NOW) == {}


def test_issue10_1_conflicts_are_hold_conflicts(store: SyncStateStore) -> None:
    """Every store raises HoldConflict (the facts, not a UTC message), so the domain can state the
    times in the mapping's zone."""
    store.place_hold(hold("h1", 0), NOW)
    with pytest.raises(HoldConflict) as placed:
        store.place_hold(hold("h2", 10, client="b"), NOW)
    assert placed.value.practitioner_id == "P1" and placed.value.interval == hold("h1", 0).interval
    assert placed.value.patient_id is None
    with pytest.raises(HoldConflict) as checked:
        store.check_free("P1", hold("x", 5).interval, NOW, own_hold=None, client="b")
    assert checked.value.practitioner_id == "P1" and checked.value.interval == hold("h1", 0).interval


# --------------------------------------------------------------------------------------------------
# A patient's holds (issue 7.1): one patient, one place at a time, whoever the practitioner
# --------------------------------------------------------------------------------------------------
def test_issue7_1_patient_hold_refuses_another_practitioner_at_an_overlapping_time(stores: Stores) -> None:
    a, b = stores.open(), stores.open()
    a.place_hold(hold("h1", 0, prac="P1", patients=("5",)), NOW)
    with pytest.raises(HoldConflict) as refused:
        b.place_hold(hold("h2", 10, prac="P2", client="b", patients=("5",)), NOW)
    assert refused.value.patient_id == "5" and refused.value.practitioner_id == "P1"
    assert refused.value.interval == hold("h1", 0).interval
    assert "Patient/5" in refused.value.describe(UTC)
    with pytest.raises(HoldConflict) as by_one_of_them:
        b.place_hold(hold("h3", -10, prac="P3", client="a", patients=("7", "5")), NOW)  # the same client too
    assert by_one_of_them.value.patient_id == "5"
    # Adjacent, another patient, or a hold for no patient: all free.
    assert b.place_hold(hold("h4", 20, prac="P2", patients=("5",)), NOW).id == "h4"
    assert b.place_hold(hold("h5", 0, prac="P2", patients=("6",)), NOW).id == "h5"
    assert b.place_hold(hold("h6", 0, prac="P3"), NOW).id == "h6"
    # The refused holds left nothing behind: patient 7 is free at that time.
    assert b.holds_by_patient(["7"], Interval(NOW, later(86400)), NOW) == []
    b.check_patient_free(["7"], hold("h3", -10).interval, NOW, own_hold=None)
    # Placing the same id again returns the existing hold, not a conflict with itself.
    assert a.place_hold(hold("h1", 0, prac="P1", patients=("5",)), later(1)).id == "h1"


def test_issue7_1_check_patient_free_own_hold_release_and_expiry(stores: Stores) -> None:
    a, b = stores.open(), stores.open()
    a.place_hold(hold("h1", 0, prac="P1", expires_in=60, patients=("5", "8")), NOW)
    iv = hold("x", 10, prac="P2").interval
    b.check_patient_free(["5"], iv, NOW, own_hold="h1")  # booking its own hold
    for pats in (["5"], ["8"], ["9", "8"]):
        with pytest.raises(HoldConflict) as refused:
            b.check_patient_free(pats, iv, NOW, own_hold=None)
        assert refused.value.patient_id == pats[-1] and refused.value.practitioner_id == "P1"
    with pytest.raises(HoldConflict):
        b.check_patient_free(["5"], iv, NOW, own_hold="another")
    b.check_patient_free(["6"], iv, NOW, own_hold=None)
    b.check_patient_free([], iv, NOW, own_hold=None)
    b.check_patient_free(["5"], hold("x", 20).interval, NOW, own_hold=None)  # adjacent
    # Expiry frees the patient for every replica, before any sweep ran.
    with pytest.raises(HoldConflict):
        b.check_patient_free(["5"], iv, later(59), own_hold=None)
    b.check_patient_free(["5"], iv, later(60), own_hold=None)
    assert b.place_hold(hold("h2", 10, prac="P2", patients=("5",)), later(60)).id == "h2"
    # Release frees it too.
    with pytest.raises(HoldConflict):
        a.check_patient_free(["5"], iv, later(61), own_hold=None)
    a.release("h2")
    a.check_patient_free(["5"], iv, later(61), own_hold=None)
    assert a.holds_by_patient(["5", "8"], Interval(NOW, later(86400)), later(61)) == []


def test_issue7_1_an_expired_hold_id_reused_for_another_patient(stores: Stores) -> None:
    """A proposal id is a hold id: placed again after expiry, for another patient, the first
    patient is no longer held by it."""
    a, b = stores.open(), stores.open()
    a.place_hold(hold("h1", 0, expires_in=60, patients=("5",)), NOW)
    a.place_hold(hold("h1", 0, expires_in=600, patients=("6",)), later(61))
    window = Interval(NOW, later(86400))
    assert b.holds_by_patient(["5"], window, later(62)) == []
    assert b.holds_by_patient(["6"], window, later(62)) == [hold("h1", 0).interval]
    b.check_patient_free(["5"], hold("h1", 0).interval, later(62), own_hold=None)
    assert b.place_hold(hold("h2", 0, prac="P2", patients=("5",)), later(62)).id == "h2"


def test_issue7_1_holds_by_patient(stores: Stores) -> None:
    a, b = stores.open(), stores.open()
    a.place_hold(hold("h1", 0, prac="P1", patients=("5",)), NOW)
    a.place_hold(hold("h2", 120, prac="P2", expires_in=60, patients=("5", "6")), NOW)
    a.place_hold(hold("h3", 240, prac="P3", patients=("6",)), NOW)
    a.place_hold(hold("h4", 0, prac="P4"), NOW)
    h1, h2, h3 = hold("h1", 0).interval, hold("h2", 120).interval, hold("h3", 240).interval
    day = Interval(NOW, later(86400))
    assert sorted(b.holds_by_patient(["5"], day, NOW), key=lambda i: i.start) == [h1, h2]
    assert sorted(b.holds_by_patient(["6"], day, NOW), key=lambda i: i.start) == [h2, h3]
    assert b.holds_by_patient(["7"], day, NOW) == []
    assert b.holds_by_patient([], day, NOW) == []
    assert b.holds_by_patient(["5"], Interval(h1.end, h2.start), NOW) == []  # the window is half-open
    assert b.holds_by_patient(["5"], Interval(NOW, h1.start + dt.timedelta(minutes=1)), NOW) == [h1]
    assert b.holds_by_patient(["5"], day, later(60)) == [h1]  # h2 expired
    a.journal_intent("h1", client="a", request_key=None, payload={"n": 1}, now=NOW)
    a.journal_done("h1", "APPT1", later(1), release_hold=True)
    assert b.holds_by_patient(["5"], day, later(1)) == [h2]
    assert a.sweep(later(400)) >= 1
    assert b.holds_by_patient(["5", "6"], day, later(400)) == []


def race(
    replicas: list[Any], attempt: Callable[[int, Any], object], lost: type[BaseException] = HoldConflict
) -> list[str | BaseException]:
    """Every replica runs ``attempt(i, replica)`` at the same instant, each in its own thread: per replica "won",
    "lost" (it raised ``lost``) or what else it raised."""
    barrier = threading.Barrier(len(replicas))
    outcome: list[str | BaseException] = ["none"] * len(replicas)

    def run(i: int, replica: Any) -> None:
        try:
            barrier.wait(10)
            attempt(i, replica)
            outcome[i] = "won"
        except lost:
            outcome[i] = "lost"
        except BaseException as exc:
            outcome[i] = exc

    threads = [threading.Thread(target=run, args=(i, r)) for i, r in enumerate(replicas)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return outcome


def exactly_one_won(outcome: list[str | BaseException]) -> bool:
    return sorted(map(str, outcome)) == ["lost"] * (len(outcome) - 1) + ["won"]


def test_issue7_1_concurrent_holds_of_one_patient_exactly_one_wins(stores: Stores) -> None:
    """Eight replicas race to hold one patient with eight practitioners at overlapping times."""
    replicas = [stores.open() for _ in range(8)]
    outcome = race(
        replicas,
        lambda i, r: r.place_hold(hold(f"p{i}", i % 3 * 5, prac=f"P{i}", client=f"c{i}", patients=("5",)), NOW),
    )
    assert exactly_one_won(outcome), outcome
    assert len(replicas[0].holds_by_patient(["5"], Interval(NOW, later(86400)), NOW)) == 1


def test_issue10_1_concurrent_claims_exactly_one_wins(stores: Stores) -> None:
    """Eight replicas (own connections, own threads) race for overlapping holds: exactly one wins."""
    replicas = [stores.open() for _ in range(8)]
    for rnd in range(3):
        outcome = race(
            replicas,
            lambda i, r, rnd=rnd: r.place_hold(hold(f"r{rnd}-{i}", rnd * 100 + i % 3 * 5, client=f"c{i}"), NOW),
            lost=SlotConflict,
        )
        assert exactly_one_won(outcome), outcome
        window = Interval(NOW, later(86400))
        assert len(replicas[0].holds_by_practitioner(["P1"], window, NOW)["P1"]) == rnd + 1


def test_issue10_1_concurrent_idempotency_begin_exactly_one_proceeds(stores: Stores) -> None:
    replicas = [stores.open() for _ in range(6)]
    barrier = threading.Barrier(len(replicas))
    outcomes: list[str] = []

    def begin(replica: Any) -> None:
        barrier.wait(10)
        try:
            outcomes.append("go" if replica.idempotency_begin("c", "k", "book", "h", NOW) is None else "replay")
        except IdempotencyInProgress:
            outcomes.append("busy")

    threads = [threading.Thread(target=begin, args=(r,)) for r in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["busy"] * (len(replicas) - 1) + ["go"]


# --------------------------------------------------------------------------------------------------
# Proposals, calendar version, secret
# --------------------------------------------------------------------------------------------------
def test_issue10_1_proposals_expire(stores: Stores) -> None:
    a, b = stores.open(), stores.open()
    a.put_proposal("p1", '{"x": 1}', later(60))
    assert b.get_proposal("p1", later(59)) == '{"x": 1}'
    assert b.get_proposal("p1", later(60)) is None
    assert b.get_proposal("nope", NOW) is None
    a.put_proposal("p1", '{"x": 2}', later(120))  # stored again (same id): replaced
    assert b.get_proposal("p1", later(100)) == '{"x": 2}'
    assert a.sweep(later(121)) == 1
    assert b.get_proposal("p1", NOW) is None


def test_issue10_1_calendar_version_is_shared(stores: Stores) -> None:
    a, b = stores.open(), stores.open()
    start = b.calendar_version()
    a.bump_calendar_version()
    a.bump_calendar_version()
    assert b.calendar_version() == start + 2


def _eventually(check: Callable[[], bool], within: float) -> bool:
    """``check`` true within ``within`` seconds (a listener thread of another replica catching up)."""
    deadline = time.monotonic() + within
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


# A shared store's listener hears a bump within milliseconds; a lost message is made good by the 1 s re-read.
COUNTER_BOUND_SECONDS = 3.0


def test_issue14_change_counters_see_every_holds_and_calendar_change_of_any_replica(stores: Stores) -> None:
    """A bump by replica A is seen by replica B through its counters: at once on one host (SQLite: exact, the
    same mapped file), within a bound on Redis and PostgreSQL (pub/sub / LISTEN, 1 s re-read); A sees its own
    at once everywhere (read-your-writes). Reading the counters does no I/O (see ``change_counters``)."""
    a, b = stores.open(), stores.open()
    assert a.counters.exact is (stores.kind == "sqlite")
    bound = 0.0 if stores.kind == "sqlite" else COUNTER_BOUND_SECONDS

    def moved(read: Callable[[], int], before: int) -> bool:
        return _eventually(lambda: read() > before, bound)

    steps: list[tuple[str, Callable[[], object]]] = [
        ("holds", lambda: a.place_hold(hold("h1", 0), NOW)),
        ("holds", lambda: a.release("h1")),
        ("holds", lambda: a.place_hold(hold("h2", 30), NOW)),
        ("calendar", a.bump_calendar_version),
    ]
    for which, change in steps:
        before_a, before_b = getattr(a.counters, which)(), getattr(b.counters, which)()
        change()
        assert getattr(a.counters, which)() > before_a, which  # own change: at once
        assert moved(getattr(b.counters, which), before_b), which
    # Booking a held slot releases its hold in the same call: a holds change as well.
    a.journal_intent("h2", client="a", request_key=None, payload={"x": 1}, now=NOW)
    before_b = b.counters.holds()
    a.journal_done("h2", "appt-1", NOW, release_hold=True)
    assert moved(b.counters.holds, before_b)
    # An expiry needs no bump (every read filters by ``now``), and a hold refused for a conflict makes none.
    a.place_hold(hold("h3", 60), NOW)
    held = a.counters.holds()
    with pytest.raises(HoldConflict):
        b.place_hold(hold("h4", 60), NOW)
    assert a.counters.holds() == held and b.counters.holds() <= held
    # A replica opened later starts from the store's values, not from zero.
    c = stores.open()
    assert _eventually(lambda: c.counters.holds() == a.counters.holds(), bound)
    assert _eventually(lambda: c.counters.calendar() == a.counters.calendar(), bound)


@pytest.mark.parametrize("kind", ["redis", "postgresql"])
def test_issue14_a_lost_change_message_is_made_good_by_the_periodic_re_read(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """A bump whose message nobody heard (written straight into the store, no PUBLISH/NOTIFY) still reaches
    the local counters within the re-read period (1 s) plus a margin. (SQLite's counters are the shared file
    itself: no message to lose.)"""
    if kind == "redis":
        url = redis_state_url(request.getfixturevalue("redis_url"), "lost-message")
    else:
        url = pg_state_url(request.getfixturevalue("fresh_db")("postgresql", "lost"))
    stores = Stores(kind, url)
    request.addfinalizer(stores.close_all)
    if kind == "redis":
        request.addfinalizer(lambda: drop_redis_keys(url))
    a = stores.open()
    before = a.counters.calendar()
    if kind == "redis":
        a.r.incr(a._k("calendar"))
    else:
        with a._tx() as cur:
            cur.execute("UPDATE sched_calendar SET version = version + 1 WHERE id = 1")
            if cur.rowcount == 0:
                cur.execute("INSERT INTO sched_calendar (id, version) VALUES (1, 1)")
    assert _eventually(lambda: a.counters.calendar() > before, COUNTER_BOUND_SECONDS)


@pytest.mark.parametrize("kind", ["redis", "postgresql"])
def test_issue10_2_shared_signing_secret_from_the_store(kind: str, request: pytest.FixtureRequest) -> None:
    if kind == "redis":
        url = redis_state_url(request.getfixturevalue("redis_url"), "secret")
    else:
        url = pg_state_url(request.getfixturevalue("fresh_db")("postgresql", "secret"))
    made = Stores(kind, url)
    try:
        first = made.open().shared_secret()
        assert len(first) >= 32
        assert made.open().shared_secret() == first
    finally:
        made.close_all()
        if kind == "redis":
            drop_redis_keys(url)


# --------------------------------------------------------------------------------------------------
# Idempotency and owner liveness
# --------------------------------------------------------------------------------------------------
def test_issue10_1_idempotency_replay_mismatch_and_failure(stores: Stores) -> None:
    a, b = stores.open(), stores.open()
    assert a.idempotency_begin("c", "k", "book", "h1", NOW) is None
    with pytest.raises(IdempotencyInProgress):
        b.idempotency_begin("c", "k", "book", "h1", later(1))
    with pytest.raises(IdempotencyMismatch):
        b.idempotency_begin("c", "k", "book", "other", later(1))
    a.idempotency_finish("c", "k", StoredResponse(200, "application/fhir+json", b"\x00{body}"))
    replay = b.idempotency_begin("c", "k", "book", "h1", later(2))
    assert replay == StoredResponse(200, "application/fhir+json", b"\x00{body}")
    assert b.idempotency_begin("other-client", "k", "book", "h1", later(2)) is None  # keys are per client
    b.idempotency_finish("other-client", "k", None)  # failed: the key is free again
    assert a.idempotency_begin("other-client", "k", "book", "h1", later(3)) is None


def test_issue10_2_key_of_a_closed_replica_is_taken_over_at_once(stores: Stores) -> None:
    a, b = stores.open(), stores.open()
    assert a.idempotency_begin("c", "k", "book", "h", NOW) is None
    a.close()
    stores.opened.remove(a)
    assert b.idempotency_begin("c", "k", "book", "h", later(1)) is None


def test_issue10_2_stuck_key_is_taken_over_after_the_request_lease(stores: Stores) -> None:
    clock = [NOW.timestamp()]
    a = stores.open(clock=lambda: clock[0])
    b = stores.open()
    assert a.idempotency_begin("c", "k", "book", "h", NOW) is None

    def renew(at: dt.datetime) -> None:  # owner A stays alive (its heartbeat, moved along with the clock)
        clock[0] = at.timestamp()
        if hasattr(a, "leases"):
            a.leases.renew_now()

    renew(later(DEFAULT_LEASE_SECONDS - 5))
    with pytest.raises(IdempotencyInProgress):
        b.idempotency_begin("c", "k", "book", "h", later(DEFAULT_LEASE_SECONDS - 1))
    # A is alive but its request hangs: the request lease decides.
    renew(later(DEFAULT_LEASE_SECONDS))
    assert b.idempotency_begin("c", "k", "book", "h", later(DEFAULT_LEASE_SECONDS + 1)) is None


@pytest.mark.parametrize("kind", ["redis", "postgresql"])
def test_issue10_2_owner_liveness_is_a_lease_not_a_pid(kind: str, request: pytest.FixtureRequest) -> None:
    """A replica that vanished without closing (host lost) stops renewing its lease: its keys and
    intents become stale when the lease runs out, long before the request lease; a live one's do not."""
    url = (
        redis_state_url(request.getfixturevalue("redis_url"), "lease")
        if kind == "redis"
        else pg_state_url(request.getfixturevalue("fresh_db")("postgresql", "lease"))
    )
    made = Stores(kind, url)
    try:
        a, b = made.open(), made.open()
        assert a.idempotency_begin("c", "k", "book", "h", NOW) is None
        a.journal_intent("t1", client="c", request_key="k", payload={"p": 1}, now=NOW)
        a.leases.stop()  # the host is gone: no more renewals, nothing deleted
        with pytest.raises(IdempotencyInProgress):
            b.idempotency_begin("c", "k", "book", "h", later(OWNER_LEASE - 1))
        assert b.journal_claim("t1", later(OWNER_LEASE - 1)) is None
        assert b.idempotency_begin("c", "k", "book", "h", later(OWNER_LEASE + 1)) is None
        claimed = b.journal_claim("t1", later(OWNER_LEASE + 1))
        assert claimed is not None and claimed.payload == {"p": 1}
    finally:
        made.close_all()
        if kind == "redis":
            drop_redis_keys(url)


# --------------------------------------------------------------------------------------------------
# Booking journal
# --------------------------------------------------------------------------------------------------
def test_issue10_1_journal_intent_done_releases_hold(stores: Stores) -> None:
    a, b = stores.open(), stores.open()
    a.place_hold(hold("t1", 0), NOW)
    a.journal_intent("t1", client="a", request_key="k1", payload={"slot": 1}, now=NOW)
    entry = b.journal_get("t1")
    assert entry is not None and entry.state == "intent" and entry.client == "a" and entry.request_key == "k1"
    assert entry.payload == {"slot": 1} and entry.owner == a.owner and entry.created_at == NOW
    a.journal_done("t1", "APPT9", later(1), release_hold=True)
    done = b.journal_get("t1")
    assert done is not None and done.state == "done" and done.appointment_id == "APPT9"
    assert done.updated_at == later(1)
    assert b.get_hold("t1", later(1)) is None
    assert b.holds_by_practitioner(["P1"], Interval(NOW, later(86400)), later(1)) == {}
    assert b.journal_claim("t1", later(10_000)) is None  # done entries are never stale
    assert b.journal_get("missing") is None


def test_issue10_1_abandoned_intents_are_claimed_exactly_once(stores: Stores) -> None:
    a, b, c = stores.open(), stores.open(), stores.open()
    a.journal_intent("t1", client="a", request_key=None, payload={"n": 1}, now=NOW)
    a.journal_intent("t2", client=None, request_key=None, payload={"n": 2}, now=NOW)
    a.journal_intent("t3", client=None, request_key=None, payload={"n": 3}, now=NOW)
    assert b.journal_claim("t1", later(1)) is None  # its owner is alive and within the lease
    assert b.journal_claim_stale(later(1)) == []
    a.journal_abandon("t1", later(2))
    claimed = b.journal_claim("t1", later(3))
    assert claimed is not None and claimed.token == "t1" and claimed.client == "a"
    assert c.journal_claim("t1", later(4)) is None  # b owns it now
    a.journal_drop("t2")
    assert b.journal_get("t2") is None
    # Past the request lease, every intent is stale: the two reconcilers split them, nothing twice.
    t = later(DEFAULT_LEASE_SECONDS + 10)
    stores.set_time(t)
    first = b.journal_claim_stale(t)
    second = c.journal_claim_stale(t)
    assert sorted(e.token for e in first) == ["t1", "t3"]
    assert second == []
    b.journal_done("t3", "A3", t, release_hold=False)
    assert b.journal_get("t3").state == "done"  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------------
# Bookings in flight for a backend that cannot lock (issue 8.1): the intents stand in for the lock
# --------------------------------------------------------------------------------------------------
def booking(
    start_min: int, minutes: int = 20, prac: str = "P1", patients: tuple[str, ...] = ("5",)
) -> tuple[dict[str, Any], Interval]:
    """An intent's payload as the domain writes it (the proposal plus the booking's patient) and its time."""
    start = NOW + dt.timedelta(hours=1, minutes=start_min)
    payload: dict[str, Any] = {
        "start": start.isoformat(),
        "minutes": minutes,
        "practitioner_id": prac,
        "patient_ids": list(patients),
    }
    if patients:
        payload["patient_id"] = patients[0]
    return payload, Interval(start, start + dt.timedelta(minutes=minutes))


def exclusive(
    store: Any,
    token: str,
    start_min: int,
    prac: str = "P1",
    patients: tuple[str, ...] = ("5",),
    client: str | None = "a",
) -> Interval:
    payload, span = booking(start_min, prac=prac, patients=patients)
    store.journal_intent_exclusive(
        token,
        client=client,
        request_key=None,
        payload=payload,
        now=NOW,
        practitioner_id=prac,
        patient_ids=patients,
        interval=span,
    )
    return span


DAY = Interval(NOW, later(86400))


def by_time(found: list[tuple[str, Interval, tuple[str, ...]]]) -> list[tuple[str, Interval, tuple[str, ...]]]:
    return sorted(found, key=lambda x: (x[0], x[1].start))


def test_issue8_1_an_intent_in_flight_shows_in_intents_overlapping(stores: Stores) -> None:
    a, b = stores.open(), stores.open()
    payload, span = booking(0, prac="P1", patients=("5",))
    a.journal_intent("t1", client="a", request_key=None, payload=payload, now=NOW)
    span2 = exclusive(a, "t2", 60, prac="P2", patients=("6", "7"))
    assert by_time(b.intents_overlapping(DAY)) == by_time([("P1", span, ("5", "5")), ("P2", span2, ("6", "7", "6"))])
    assert b.intents_overlapping(Interval(span.start + dt.timedelta(minutes=19), span.end)) == [
        ("P1", span, ("5", "5"))
    ]
    # Adjacent windows on either side and a window elsewhere do not overlap.
    assert b.intents_overlapping(Interval(span.start - dt.timedelta(minutes=30), span.start)) == []
    assert b.intents_overlapping(Interval(span.end, span2.start)) == []
    assert b.intents_overlapping(Interval(later(86400), later(2 * 86400))) == []
    entry = b.journal_get("t2")
    assert entry is not None and entry.state == "intent" and entry.client == "a" and entry.owner == a.owner
    assert entry.payload == booking(60, prac="P2", patients=("6", "7"))[0] and entry.created_at == NOW


def test_issue8_1_exclusive_intent_refuses_another_in_flight_for_the_practitioner_or_a_patient(
    stores: Stores,
) -> None:
    a, b = stores.open(), stores.open()
    first = exclusive(a, "t1", 0, prac="P1", patients=("5",))
    with pytest.raises(HoldConflict) as same_practitioner:
        exclusive(b, "t2", 10, prac="P1", patients=("6",), client="b")
    assert same_practitioner.value.practitioner_id == "P1" and same_practitioner.value.interval == first
    assert same_practitioner.value.patient_id is None
    with pytest.raises(HoldConflict) as same_patient:
        exclusive(b, "t3", -10, prac="P2", patients=("7", "5"), client="a")  # the same client too
    assert same_patient.value.practitioner_id == "P1" and same_patient.value.interval == first
    assert same_patient.value.patient_id == "5"
    # The refused intents left nothing behind.
    assert b.journal_get("t2") is None and b.journal_get("t3") is None
    assert b.intents_overlapping(DAY) == [("P1", first, ("5", "5"))]
    # Another practitioner and patient at the same time, and the same ones adjacent: accepted.
    other = exclusive(b, "t4", 0, prac="P2", patients=("6",), client="b")
    after = exclusive(b, "t5", 20, prac="P1", patients=("5",), client="b")
    assert by_time(a.intents_overlapping(DAY)) == by_time(
        [("P1", first, ("5", "5")), ("P2", other, ("6", "6")), ("P1", after, ("5", "5"))]
    )


def test_issue8_1_exclusive_intent_refuses_a_foreign_hold(stores: Stores) -> None:
    a, b = stores.open(), stores.open()
    a.place_hold(hold("h1", 0, client="a", prac="P1"), NOW)
    with pytest.raises(HoldConflict) as foreign:
        exclusive(b, "t1", 10, prac="P1", patients=("5",), client="b")
    assert foreign.value.practitioner_id == "P1" and foreign.value.interval == hold("h1", 0).interval
    assert foreign.value.patient_id is None
    with pytest.raises(HoldConflict):
        exclusive(b, "h1", 0, prac="P1", patients=("5",), client="b")  # its id, but another client's hold
    # The hold being booked by its own client (the token is the hold's id) is no conflict.
    exclusive(a, "h1", 0, prac="P1", patients=("5",), client="a")
    # A patient's hold refuses that patient with another practitioner.
    a.place_hold(hold("h2", 60, client="a", prac="P2", patients=("7",)), NOW)
    with pytest.raises(HoldConflict) as patient:
        exclusive(b, "t2", 70, prac="P3", patients=("7",), client="b")
    assert patient.value.practitioner_id == "P2" and patient.value.interval == hold("h2", 60).interval
    assert patient.value.patient_id == "7"
    assert [p for p, _, _ in b.intents_overlapping(DAY)] == ["P1"]


def test_issue8_1_done_drop_and_claims_keep_the_intents_in_flight(stores: Stores) -> None:
    a, b = stores.open(), stores.open()
    exclusive(a, "t1", 0, prac="P1")
    exclusive(a, "t2", 0, prac="P2", patients=("6",))
    third = exclusive(a, "t3", 0, prac="P3", patients=("7",))
    a.journal_done("t1", "A1", later(1), release_hold=False)
    b.journal_drop("t2")
    a.journal_abandon("t3", later(2))
    assert b.intents_overlapping(DAY) == [("P3", third, ("7", "7"))]  # abandoned: outcome still unknown
    claimed = b.journal_claim("t3", later(3))
    assert claimed is not None and claimed.token == "t3"
    assert b.intents_overlapping(DAY) == [("P3", third, ("7", "7"))]  # claimed for reconciliation: still unknown
    # The slots of the settled intents are free again for the next booking in flight.
    exclusive(b, "t4", 0, prac="P1", patients=("5",), client="b")
    exclusive(b, "t5", 0, prac="P2", patients=("6",), client="b")
    with pytest.raises(HoldConflict):
        exclusive(b, "t6", 0, prac="P3", patients=("8",), client="b")
    b.journal_done("t3", "A3", later(4), release_hold=False)
    exclusive(b, "t6", 0, prac="P3", patients=("8",), client="b")
    assert sorted(p for p, _, _ in a.intents_overlapping(DAY)) == ["P1", "P2", "P3"]


@pytest.mark.parametrize("shared", ["practitioner", "patient"])
def test_issue8_1_concurrent_exclusive_intents_for_one_slot_exactly_one_wins(stores: Stores, shared: str) -> None:
    """Eight replicas (own connections, own threads) race to book overlapping times of one practitioner, or
    of one patient with eight practitioners: exactly one intent is recorded."""
    replicas = [stores.open() for _ in range(8)]

    def claim(i: int, replica: Any) -> None:
        prac, patients = ("P1", (f"{i}",)) if shared == "practitioner" else (f"P{i}", ("5",))
        exclusive(replica, f"t{i}", i % 3 * 5, prac=prac, patients=patients, client=f"c{i}")

    outcome = race(replicas, claim)
    assert exactly_one_won(outcome), outcome
    assert len(replicas[0].intents_overlapping(DAY)) == 1


# --------------------------------------------------------------------------------------------------
# The async view, the factory and faults
# --------------------------------------------------------------------------------------------------
def test_issue10_1_async_view_over_each_store(stores: Stores) -> None:
    async def scenario() -> None:
        threaded = ThreadedStateStore(stores.open())
        other = ThreadedStateStore(stores.open())
        try:
            threaded.gate.place_hold(hold("h1", 0), NOW)
            got = await other.get_hold("h1", NOW)
            assert got is not None and got.client == "a"
            assert await other.idempotency_begin("c", "k", "hold", "h", NOW) is None
            await other.idempotency_finish("c", "k", StoredResponse(201, "application/fhir+json", b"{}"))
            assert (await threaded.idempotency_begin("c", "k", "hold", "h", NOW)) is not None
            v = await threaded.calendar_version()
            await other.bump_calendar_version()
            assert await threaded.calendar_version() == v + 1
            await threaded.release("h1")
            assert await other.get_hold("h1", NOW) is None
        finally:
            await threaded.close()
            await other.close()

    asyncio.run(scenario())
    stores.opened.clear()  # closed above


def test_issue10_1_factory_picks_the_store_by_url(stores: Stores) -> None:
    async def scenario() -> None:
        s = open_state_store(stores.url, timeout_s=5)
        try:
            assert (
                type(s.gate).__name__
                == {
                    "sqlite": "SqliteStateStore",
                    "redis": "RedisStateStore",
                    "postgresql": "PostgresStateStore",
                }[stores.kind]
            )
            assert await s.calendar_version() >= 0
        finally:
            await s.close()

    asyncio.run(scenario())
    assert is_shared(stores.url) == (stores.kind != "sqlite")


def test_issue10_1_state_url_defaults_to_state_path(tmp_path: Path) -> None:
    assert state_url(None, tmp_path / "s.sqlite") == f"sqlite:///{tmp_path / 's.sqlite'}"
    assert state_url("redis://h:6379/2", tmp_path / "s.sqlite") == "redis://h:6379/2"
    with pytest.raises(ValueError):
        open_state_store("mongodb://nope")
    assert split_url("redis://h:1/2?key_prefix=abc:&ssl_cert_reqs=none") == ("redis://h:1/2?ssl_cert_reqs=none", "abc:")


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:{port}/0", "postgresql://postgres@127.0.0.1:{port}/postgres"],
    ids=["redis", "postgresql"],
)
def test_issue10_1_unreachable_shared_store_is_state_unavailable(url: str) -> None:
    from serverutil import free_port

    store: Any = (RedisStateStore if url.startswith("redis") else PostgresStateStore)(
        url.format(port=free_port()), timeout_s=2
    )
    try:
        with pytest.raises(StateUnavailable):
            store.get_hold("h1", NOW)
        with pytest.raises(StateUnavailable):
            store.place_hold(hold("h1", 0), NOW)
        with pytest.raises(StateUnavailable):
            store.calendar_version()
    finally:
        store.close()


def test_issue10_1_redis_keys_expire_by_themselves(request: pytest.FixtureRequest) -> None:
    """Holds and proposals carry a Redis TTL (remaining life + grace): no sweep is needed to reclaim them."""
    import redis

    url = redis_state_url(request.getfixturevalue("redis_url"), "ttl")
    store = RedisStateStore(url)
    try:
        now = dt.datetime.now(UTC)
        h = Hold(
            "h1", "P1", "1", Interval(now, now + dt.timedelta(minutes=20)), now + dt.timedelta(seconds=60), "a", {}
        )
        store.place_hold(h, now)
        store.put_proposal("p1", "{}", now + dt.timedelta(seconds=60))
        plain, prefix = split_url(url)
        client = redis.Redis.from_url(plain)
        try:
            for key in (f"{prefix}h:h1", f"{prefix}p:p1"):
                ttl = client.pttl(key)
                assert 0 < ttl <= (60 + 3600) * 1000, (key, ttl)
        finally:
            client.close()
    finally:
        store.close()
        drop_redis_keys(url)


def test_issue10_1_redis_sentinel_url(tmp_path: Path) -> None:
    """``redis+sentinel://`` finds the primary through Sentinel: a throwaway primary and a throwaway
    Sentinel (``redis-server --sentinel``) on free ports, then the store works through them."""
    import shutil
    import subprocess
    import time

    from serverutil import free_port, port_accepts

    binary = shutil.which("redis-server")
    assert binary, "redis-server is needed (apt-get install redis-server)"
    primary, sentinel = free_port(), free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {sentinel}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {primary} 1\n", encoding="utf-8"
    )
    procs = [
        subprocess.Popen(
            [binary, "--port", str(primary), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [binary, str(conf), "--sentinel"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        ),
    ]
    try:
        deadline = time.monotonic() + 20
        while not (port_accepts(primary) and port_accepts(sentinel)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "redis did not start"
            time.sleep(0.05)
        store = RedisStateStore(f"redis+sentinel://127.0.0.1:{sentinel}/mymaster/2?key_prefix=s:", timeout_s=5)
        try:
            store.place_hold(hold("h1", 0), NOW)
            with pytest.raises(SlotConflict):
                store.place_hold(hold("h2", 5, client="b"), NOW)
            assert store.get_hold("h1", NOW) is not None
        finally:
            store.close()
        import redis

        direct = redis.Redis(port=primary, db=2)
        try:
            assert direct.exists("s:h:h1") == 1  # it went to the primary Sentinel named, db 2
        finally:
            direct.close()
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


@pytest.mark.parametrize("kind", ["redis", "postgresql"])
def test_issue10_2_leases_of_long_gone_replicas_are_forgotten(kind: str, request: pytest.FixtureRequest) -> None:
    url = (
        redis_state_url(request.getfixturevalue("redis_url"), "gone")
        if kind == "redis"
        else pg_state_url(request.getfixturevalue("fresh_db")("postgresql", "gone"))
    )
    made = Stores(kind, url)
    try:
        gone, alive = made.open(), made.open()
        gone.leases.stop()  # killed: its lease is never dropped
        alive.sweep(later(3600))
        assert alive.idempotency_begin("c", "k", "book", "h", NOW) is None  # sanity: the store works
        made.set_time(later(2 * 86400))  # the live replica's heartbeat goes on; the dead one's does not
        alive.sweep(later(2 * 86400))
        owners = _owners(kind, url)
        assert alive.owner in owners and gone.owner not in owners
    finally:
        made.close_all()
        if kind == "redis":
            drop_redis_keys(url)


def _owners(kind: str, url: str) -> set[str]:
    if kind == "redis":
        import redis

        plain, prefix = split_url(url)
        client = redis.Redis.from_url(plain, decode_responses=True)
        try:
            return set(client.hkeys(f"{prefix}owners"))
        finally:
            client.close()
    import psycopg

    with psycopg.connect(url) as conn:
        return {row[0] for row in conn.execute("SELECT owner FROM sched_owners").fetchall()}


def test_issue8_1_exact_counters_move_when_a_booking_in_flight_starts_and_ends(stores: Stores) -> None:
    """For a backend without a lock a booking in flight is busy time for ``$find``, which a one-host worker derives
    from the holds counter (its cached holds, the ``$find`` memo): recording an intent, and ending it (done or
    dropped), must move that counter in every process. (Shared stores' counters are not exact; there ``$find``
    reads the intents every time.)"""
    a, b = stores.open(), stores.open()
    exact = a.counters.exact
    for end in ("done", "drop", "exclusive-done"):
        before = b.counters.holds()
        if end.startswith("exclusive"):
            span = exclusive(a, "t-" + end, 0)
        else:
            payload, span = booking(0)
            a.journal_intent("t-" + end, client="a", request_key=None, payload=payload, now=NOW)
        if exact:
            assert b.counters.holds() > before, f"intent recorded ({end})"
        assert [p for p, _, _ in b.intents_overlapping(span)] == ["P1"], f"intent busy ({end})"
        before = b.counters.holds()
        if end.endswith("done"):
            a.journal_done("t-" + end, "appt-" + end, NOW, release_hold=False)
        else:
            a.journal_drop("t-" + end)
        if exact:
            assert b.counters.holds() > before, f"intent ended ({end})"
        assert b.intents_overlapping(span) == [], f"intent no longer busy ({end})"
