"""One contract, every ``SiuStore`` (issue 10): the SIU inbox and mirror behave the same on each store.

Each test runs against each kind in ``SIU_STORE_KINDS``, with several store objects standing for several hosts
(separate connections) on one shared state: a SQLite file, a fresh PostgreSQL database per test, a key prefix of
its own per test on the Redis at 127.0.0.1:6379 (db 13, see ``tests/stateutil.py``). Another store
joins by adding its kind to ``SIU_STORE_KINDS`` and a branch to ``open_shared_state``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hl7v2util import demo_mapping, siu
from stateutil import drop_redis_keys, pg_state_url, redis_state_url

from adapter.hl7v2.inbound import parse_siu
from adapter.hl7v2.mirror import InboxApplier, mirror_write
from adapter.hl7v2.store import (
    APPLIED,
    FAILED,
    RECORD_INBOX_ID,
    WAITING,
    SiuStore,
    event_version,
    open_siu_store,
    supersedes,
)

SIU_STORE_KINDS = ["sqlite", "postgresql", "redis"]


class SharedState:
    """Opens store objects ("hosts") of one kind on one shared state; closes them at the end."""

    def __init__(self, url: str, sqlite_path: Path | None, *, claims_wait: bool = False) -> None:
        self.url = url
        self.claims_wait = claims_wait  # a claim waits while another is open (SQLite's one writer at a time)
        self.sqlite_path = sqlite_path
        self.opened: list[SiuStore] = []

    def open(self) -> SiuStore:
        store = open_siu_store(self.url, sqlite_path=self.sqlite_path, timeout_s=30)
        self.opened.append(store)
        return store

    def close_all(self) -> None:
        for store in self.opened:
            store.close()
        if self.url.startswith("redis://"):
            drop_redis_keys(self.url)


def open_shared_state(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> SharedState:
    if kind == "sqlite":
        return SharedState(f"sqlite:///{tmp_path / 'state.sqlite'}", tmp_path / "hl7v2-inbox.sqlite", claims_wait=True)
    if kind == "postgresql":
        return SharedState(pg_state_url(request.getfixturevalue("fresh_db")("postgresql", "siu")), None)
    if kind == "redis":
        return SharedState(redis_state_url(request.getfixturevalue("redis_url"), request.node.name), None)
    raise AssertionError(f"no shared state for {kind!r}")


@pytest.fixture(params=SIU_STORE_KINDS)
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SharedState]:
    state = open_shared_state(request.param, request, tmp_path)
    try:
        yield state
    finally:
        state.close_all()


def applier(store: SiuStore) -> InboxApplier:
    return InboxApplier(store, demo_mapping(), batch_size=3)


def store_siu(store: SiuStore, *messages: bytes) -> list[bool]:
    out = []
    for m in messages:
        control_id = m.split(b"\r", 1)[0].split(b"|")[9].decode()
        out.append(store.store_message("LEGACY|FAC", control_id, "SIU", m))
    return out


# --------------------------------------------------------------------------------------------------
# The inbox
# --------------------------------------------------------------------------------------------------
def test_siu_store_duplicate_from_another_host_is_not_stored_twice(shared: SharedState) -> None:
    a, b = shared.open(), shared.open()
    assert a.store_message("LEGACY|FAC", "C1", "SIU", b"one") is True
    # Committed when store_message returns: the other host sees it at once and refuses the duplicate.
    assert b.count_messages(WAITING) == 1
    assert b.store_message("LEGACY|FAC", "C1", "SIU", b"one again") is False
    assert a.store_message("OTHER|FAC", "C1", "SIU", b"same MSH-10, other sender") is True
    assert (a.count_messages(), b.count_messages(WAITING), b.count_messages(APPLIED)) == (2, 2, 0)


def test_siu_store_raw_message_is_kept_byte_for_byte(shared: SharedState) -> None:
    a, b = shared.open(), shared.open()
    raw = b"MSH|^~\\&|A|B|C|D|20260101||SIU^S12|X1|P|2.5\r\x00garbage \xff\xfe\r"
    a.store_message("A|B", "X1", "SIU", raw)
    with b.claim(10) as batch:
        assert [m.raw for m in batch.messages] == [raw]
        batch.mark_applied(batch.messages[0].inbox_id)


def test_siu_store_claims_oldest_first_and_marked_messages_are_not_claimed_again(shared: SharedState) -> None:
    store = shared.open()
    for n in range(5):
        store.store_message("S", f"C{n}", "SIU", f"m{n}".encode())
    with store.claim(3) as batch:
        assert [m.raw for m in batch.messages] == [b"m0", b"m1", b"m2"]
        batch.mark_applied(batch.messages[0].inbox_id)
        batch.mark_failed(batch.messages[1].inbox_id, "cannot parse")
        batch.mark_applied(batch.messages[2].inbox_id)
    with store.claim(10) as batch:
        assert [m.raw for m in batch.messages] == [b"m3", b"m4"]
        for m in batch.messages:
            batch.mark_applied(m.inbox_id)
    with store.claim(10) as batch:
        assert list(batch.messages) == []
    assert (store.count_messages(APPLIED), store.count_messages(FAILED), store.count_messages(WAITING)) == (4, 1, 0)


def test_siu_store_batch_that_fails_leaves_its_messages_waiting_and_its_writes_undone(shared: SharedState) -> None:
    store = shared.open()
    store_siu(store, siu("C1", "S12"))
    with pytest.raises(RuntimeError), store.claim(10) as batch:
        event = parse_siu(batch.messages[0].raw, demo_mapping())
        write = mirror_write(event, batch.messages[0].inbox_id)
        assert write is not None and batch.apply(write) == "applied"
        batch.mark_applied(batch.messages[0].inbox_id)
        raise RuntimeError("the applier crashed")
    assert store.count_messages(WAITING) == 1
    assert store.by_filler_id("F1") is None
    assert applier(store).drain() == 1
    found = store.by_filler_id("F1")
    assert found is not None and found.status == "booked"


def test_siu_store_claims_open_at_once_on_two_hosts_hold_different_messages(shared: SharedState) -> None:
    a, b = shared.open(), shared.open()
    for n in range(6):
        a.store_message("S", f"C{n}", "SIU", f"m{n}".encode())
    taken_by_b: list[int] = []

    def claim_on_b() -> None:
        with b.claim(10) as batch:
            taken_by_b.extend(m.inbox_id for m in batch.messages)
            for m in batch.messages:
                batch.mark_applied(m.inbox_id)

    with a.claim(3) as batch:
        taken_by_a = [m.inbox_id for m in batch.messages]
        other = threading.Thread(target=claim_on_b)
        other.start()  # runs while a's claim is open (SQLite: waits for the file's lock; PostgreSQL: skips a's rows)
        other.join(0.5 if shared.claims_wait else 30)
        assert other.is_alive() is shared.claims_wait
        for m in batch.messages:
            batch.mark_applied(m.inbox_id)
    other.join(30)
    assert not other.is_alive()
    assert len(taken_by_a) == 3 and len(taken_by_b) == 3
    assert not set(taken_by_a) & set(taken_by_b)
    assert a.count_messages(APPLIED) == 6


def test_siu_store_concurrent_appliers_on_two_hosts_apply_each_message_once(shared: SharedState) -> None:
    a, b = shared.open(), shared.open()
    count = 120
    for n in range(count):
        store_siu(a if n % 2 else b, siu(f"C{n}", "S12", filler=f"F{n}", placer=f"P{n}"))
    seen: dict[str, list[int]] = {"a": [], "b": []}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def drain(name: str, store: SiuStore) -> None:
        try:
            start.wait()
            while True:
                with store.claim(7) as batch:
                    if not batch.messages:
                        return
                    for m in batch.messages:
                        write = mirror_write(parse_siu(m.raw, demo_mapping()), m.inbox_id)
                        assert write is not None
                        assert batch.apply(write) == "applied"
                        batch.mark_applied(m.inbox_id)
                        seen[name].append(m.inbox_id)
        except BaseException as exc:  # reported below: an exception in a thread would pass unnoticed
            errors.append(exc)

    threads = [threading.Thread(target=drain, args=(n, s)) for n, s in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    every = seen["a"] + seen["b"]
    assert len(every) == count and len(set(every)) == count
    assert a.count() == count and b.stale_count() == 0 and b.count_messages(WAITING) == 0


# --------------------------------------------------------------------------------------------------
# The mirror: the version rule
# --------------------------------------------------------------------------------------------------
def test_siu_store_s14_before_s12_keeps_the_newer_state(shared: SharedState) -> None:
    a, b = shared.open(), shared.open()
    s12 = siu("C1", "S12", msg_time="20260105100000+0100", start="20260110090000+0100")
    s14 = siu("C2", "S14", msg_time="20260105110000+0100", start="20260110100000+0100", end="20260110103000+0100")
    store_siu(a, s14)
    store_siu(b, s12)  # the creation arrives second, at another host
    applied = applier(b)
    applied.drain()
    assert (applied.stats.applied, applied.stats.stale) == (1, 1)
    found = a.by_filler_id("F1")
    assert found is not None and found.last_trigger == "S14"
    assert found.start == datetime(2026, 1, 10, 9, 0, tzinfo=UTC)
    assert a.stale_count() == 1


def test_siu_store_s17_leaves_a_tombstone_a_late_s12_does_not_resurrect(shared: SharedState) -> None:
    store = shared.open()
    store_siu(store, siu("C1", "S12", msg_time="20260105100000+0100"))
    applier(store).drain()
    store_siu(
        store,
        siu("C2", "S17", msg_time="20260105120000+0100", status="Deleted"),
        siu("C3", "S12", msg_time="20260105100500+0100"),  # late: older than the deletion
    )
    applier(store).drain()
    found = store.by_filler_id("F1")
    assert found is not None and found.last_trigger == "S17" and found.status == "entered-in-error"
    assert store.count() == 1 and store.stale_count() == 1
    assert [a.filler_id for a in store.all_appointments()] == ["F1"]


def test_siu_store_the_same_message_time_is_ordered_by_arrival(shared: SharedState) -> None:
    store = shared.open()
    store_siu(
        store,
        siu("C1", "S12", msg_time="20260105100000+0100", status="Booked"),
        siu("C2", "S15", msg_time="20260105100000+0100", status="Cancelled"),
    )
    applier(store).drain()
    found = store.by_filler_id("F1")
    assert found is not None and found.status == "cancelled"


def test_siu_store_confirmed_srr_is_recorded_and_a_later_siu_still_wins(shared: SharedState) -> None:
    a, b = shared.open(), shared.open()
    srr = parse_siu(siu("SRR", "S12", msg_time="20260105100000+0100", placer="PL-1"), demo_mapping())
    write = mirror_write(srr, RECORD_INBOX_ID)
    assert write is not None and a.record(write) == "applied"
    assert [x.filler_id for x in b.by_placer_id("PL-1")] == ["F1"]
    assert a.record(write) == "stale"  # the same version again changes nothing
    store_siu(b, siu("C9", "S14", msg_time="20260105100001+0100", placer="PL-1", practitioner="DOC2"))
    applier(b).drain()
    found = a.by_filler_id("F1")
    assert found is not None and found.practitioner_ids == ("DOC2",) and found.last_trigger == "S14"


def test_siu_store_version_rule_is_one_pure_function() -> None:
    t = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    assert event_version(t, 7) == "2026-01-05T09:00:00.000000Z#000000000007"
    assert supersedes(event_version(t, 2), None)
    assert supersedes(event_version(t, 2), event_version(t, 1))
    assert not supersedes(event_version(t, 1), event_version(t, 2))
    assert not supersedes(event_version(t, 1), event_version(t, 1))
    assert not supersedes(event_version(None, 9), event_version(t, 1))


# --------------------------------------------------------------------------------------------------
# The mirror: reads
# --------------------------------------------------------------------------------------------------
def test_siu_store_reads_by_ids_actor_window_and_patient_names(shared: SharedState) -> None:
    a, b = shared.open(), shared.open()
    store_siu(
        a,
        siu("C1", "S12", filler="F1", placer="P1", start="20260110090000+0100", end="20260110093000+0100"),
        siu("C2", "S12", filler="F2", placer="P2", start="20260110100000+0100", end="20260110103000+0100"),
        siu("C3", "S12", filler="F3", placer="P3", start="20260110080000+0100", end="20260110083000+0100"),
        siu("C4", "S15", filler="F2", placer="P2", msg_time="20260105110000+0100", status="Cancelled"),
        siu("C5", "S12", filler="F4", placer="P4", practitioner="DOC2", patient="PAT2", family="Roe"),
        siu("C6", "S14", filler="F1", placer="P1", msg_time="20260105120000+0100", family="Doe-Smith"),
    )
    applier(a).drain()
    f1 = b.by_filler_id("F1")
    assert f1 is not None
    assert (f1.placer_id, f1.practitioner_ids, f1.location_ids, f1.patient_ids) == (
        "P1",
        ("DOC1",),
        ("ROOM1",),
        ("PAT1",),
    )
    assert (
        f1.start is not None
        and f1.start.utcoffset() is not None
        and f1.start.isoformat() == "2026-01-10T09:00:00+01:00"
    )
    assert b.by_filler_id("nope") is None
    assert [x.filler_id for x in b.by_placer_id("P2")] == ["F2"]
    window = (datetime(2026, 1, 10, 7, 15, tzinfo=UTC), datetime(2026, 1, 10, 9, 15, tzinfo=UTC))
    assert [x.filler_id for x in b.for_actor("practitioner", "DOC1", *window)] == ["F3", "F1", "F2"]
    live = b.for_actor("practitioner", "DOC1", *window, statuses=frozenset({"booked"}))
    assert [x.filler_id for x in live] == ["F3", "F1"]
    # [start, end) overlaps: an appointment ending at the window's start is outside.
    between = (datetime(2026, 1, 10, 8, 30, tzinfo=UTC), datetime(2026, 1, 10, 9, 0, tzinfo=UTC))
    assert b.for_actor("practitioner", "DOC1", *between) == []
    assert [x.filler_id for x in b.for_actor("patient", "PAT2", *window)] == ["F4"]
    assert b.for_actor("location", "ROOM9", *window) == []
    assert sorted(x.filler_id for x in b.all_appointments()) == ["F1", "F2", "F3", "F4"]
    assert b.count() == 4
    names = b.patient_names()
    assert names == {"PAT1": ("Doe-Smith", "Jo"), "PAT2": ("Roe", "Jo")}


def test_siu_store_a_closed_store_connects_again(shared: SharedState) -> None:
    store = shared.open()
    store.store_message("S", "C1", "SIU", b"m")
    store.close()
    assert store.count_messages() == 1
    assert store.store_message("S", "C2", "SIU", b"m") is True


def test_siu_store_postgresql_unreachable_means_no_ack_and_the_listener_keeps_running() -> None:
    """The shared store down: the listener starts anyway, and a message gets no ACK (the sender resends)."""
    import asyncio

    from serverutil import free_port

    from adapter.hl7v2.inbox import SiuInbox, SiuListener
    from adapter.hl7v2.store import SiuStoreUnavailable
    from adapter.mllp import MLLPServer, encode_frame

    store = open_siu_store(f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere", timeout_s=1)
    with pytest.raises(SiuStoreUnavailable):
        store.count_messages()

    async def main() -> None:
        inbox = SiuInbox(store)
        await inbox.open()  # logged, not raised
        async with MLLPServer(SiuListener(inbox).handle) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(encode_frame(siu("C1", "S12")))
            await writer.drain()
            assert await reader.read() == b""  # closed without an ACK
            writer.close()
            await writer.wait_closed()
        await inbox.close()

    asyncio.run(asyncio.wait_for(main(), 30))
    store.close()


# --------------------------------------------------------------------------------------------------
# Retention: purge_applied
# --------------------------------------------------------------------------------------------------
LATER = timedelta(days=1)  # a ``before`` in the future: every applied message counts as old


def apply_all(store: SiuStore) -> None:
    """Claim every waiting message and mark it applied (no mirror writes)."""
    while True:
        with store.claim(100) as batch:
            if not batch.messages:
                return
            for m in batch.messages:
                batch.mark_applied(m.inbox_id)


def test_retention_old_applied_messages_are_purged_with_their_dedup_keys(shared: SharedState) -> None:
    a, b = shared.open(), shared.open()
    for n in range(3):
        a.store_message("S", f"OLD{n}", "SIU", b"old")
    apply_all(a)
    cut = datetime.now(UTC)  # the old messages were received before it, the recent ones after
    for n in range(2):
        a.store_message("S", f"NEW{n}", "SIU", b"new")
    apply_all(a)
    assert b.purge_applied(cut, 100) == 3
    assert b.purge_applied(cut, 100) == 0
    assert (a.count_messages(), a.count_messages(APPLIED), a.count_messages(WAITING)) == (2, 2, 0)
    # The purged keys are free again (a new message), the kept ones still de-duplicate.
    assert b.store_message("S", "OLD0", "SIU", b"old again") is True
    assert a.store_message("S", "NEW0", "SIU", b"new again") is False
    assert (a.count_messages(), a.count_messages(WAITING), a.count_messages(APPLIED)) == (3, 1, 2)
    with a.claim(10) as batch:
        assert [m.raw for m in batch.messages] == [b"old again"]
        batch.mark_applied(batch.messages[0].inbox_id)
    # A ``before`` in the past purges nothing; one in the future purges every applied message.
    assert a.purge_applied(datetime.now(UTC) - LATER, 100) == 0
    assert a.purge_applied(datetime.now(UTC) + LATER, 100) == 3
    assert (a.count_messages(), a.count_messages(APPLIED), a.count_messages(FAILED)) == (0, 0, 0)


def test_retention_waiting_and_failed_messages_and_the_mirror_are_kept(shared: SharedState) -> None:
    store = shared.open()
    store_siu(store, siu("C1", "S14", msg_time="20260105110000+0100"), siu("C2", "S12"))
    applier(store).drain()  # C2 (older MSH-7) is recorded stale
    assert (store.count(), store.stale_count()) == (1, 1)
    store_siu(store, siu("C3", "S14", msg_time="20260105120000+0100"), siu("C4", "S15"), siu("C5", "S14"))
    with store.claim(2) as batch:  # C3 failed, C4 claimed and given back, C5 never claimed: both waiting
        batch.mark_failed(batch.messages[0].inbox_id, "cannot parse")
    assert store.purge_applied(datetime.now(UTC) + LATER, 100) == 2
    assert (store.count_messages(FAILED), store.count_messages(WAITING), store.count_messages(APPLIED)) == (1, 2, 0)
    assert store.count_messages() == 3
    assert store.stale_count() == 0  # purged with its message
    found = store.by_filler_id("F1")
    assert found is not None and found.last_trigger == "S14" and store.count() == 1
    assert store_siu(store, siu("C3", "S14"), siu("C4", "S15"), siu("C5", "S14")) == [False, False, False]


def test_retention_limit_is_honoured_oldest_first(shared: SharedState) -> None:
    store = shared.open()
    for n in range(5):
        store.store_message("S", f"C{n}", "SIU", f"m{n}".encode())
    apply_all(store)
    before = datetime.now(UTC) + LATER
    assert [store.purge_applied(before, 2) for _ in range(4)] == [2, 2, 1, 0]
    store2 = shared.open()
    for n in range(5):
        store2.store_message("T", f"C{n}", "SIU", f"m{n}".encode())
    apply_all(store2)
    assert store2.purge_applied(before, 2) == 2
    # The two oldest are gone (their keys are free), the rest are still de-duplicated.
    assert [store.store_message("T", f"C{n}", "SIU", b"again") for n in range(5)] == [True, True, False, False, False]
    assert (store.count_messages(), store.count_messages(APPLIED), store.count_messages(WAITING)) == (5, 3, 2)


def test_retention_a_purge_racing_with_store_and_claim_never_deletes_a_waiting_or_claimed_message(
    shared: SharedState,
) -> None:
    listener, worker, purger = shared.open(), shared.open(), shared.open()
    count = 150
    purged: list[int] = []
    errors: list[BaseException] = []
    stored = threading.Event()

    def listen() -> None:
        try:
            for n in range(count):
                store_siu(listener, siu(f"C{n}", "S12", filler=f"F{n}", placer=f"P{n}"))
        except BaseException as exc:  # reported below: an exception in a thread would pass unnoticed
            errors.append(exc)
        finally:
            stored.set()

    def apply() -> None:
        try:
            while not stored.is_set() or worker.count_messages(WAITING):
                InboxApplier(worker, demo_mapping(), batch_size=7).drain()
        except BaseException as exc:
            errors.append(exc)

    def purge() -> None:
        try:
            while not stored.is_set() or purger.count_messages(WAITING):
                # Every applied message is old: only the state keeps waiting and claimed messages safe.
                purged.append(purger.purge_applied(datetime.now(UTC) + LATER, 5))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=f) for f in (listen, apply, purge)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and not any(t.is_alive() for t in threads)
    InboxApplier(worker, demo_mapping()).drain()
    # Every message was applied (a purged waiting or claimed message would be missing from the mirror) ...
    assert worker.count() == count and {a.filler_id for a in worker.all_appointments()} == {
        f"F{n}" for n in range(count)
    }
    # ... and the counts add up: what was not purged is still there, applied.
    left = count - sum(purged)
    assert (purger.count_messages(), purger.count_messages(APPLIED), purger.count_messages(WAITING)) == (left, left, 0)
    assert purger.purge_applied(datetime.now(UTC) + LATER, count) == left
    assert purger.count_messages() == 0 and purger.count() == count


def test_retention_a_resend_after_purge_does_not_roll_back_a_later_change(shared: SharedState) -> None:
    store = shared.open()
    s12 = siu("C1", "S12", msg_time="20260105100000+0100", start="20260110090000+0100")
    s14 = siu("C2", "S14", msg_time="20260105110000+0100", start="20260110100000+0100", end="20260110103000+0100")
    store_siu(store, s12, s14)
    applier(store).drain()
    assert store.purge_applied(datetime.now(UTC) + LATER, 100) == 2
    # The sender replays its archive: no longer a duplicate, stored and applied again, with a higher inbox id ...
    assert store_siu(store, s12) == [True]
    again = applier(store)
    again.drain()
    # ... but its MSH-7 is older than the S14's: stale, the appointment keeps the change.
    assert (again.stats.applied, again.stats.stale) == (0, 1)
    found = store.by_filler_id("F1")
    assert found is not None and found.last_trigger == "S14"
    assert found.start == datetime(2026, 1, 10, 9, 0, tzinfo=UTC)
    # A resend of the newest event is applied again with the same content: nothing changes.
    store.purge_applied(datetime.now(UTC) + LATER, 100)
    assert store_siu(store, s14) == [True]
    applier(store).drain()
    same = store.by_filler_id("F1")
    assert same is not None and same.last_trigger == "S14" and same.start == found.start and same.end == found.end
    assert same.version > found.version  # the same MSH-7, a later arrival


def test_retention_inbox_ids_keep_growing_after_the_newest_messages_were_purged(shared: SharedState) -> None:
    """Inbox ids order events of one MSH-7 (``event_version``): a purge must not let new messages reuse them."""
    store = shared.open()
    for n in range(3):
        store.store_message("S", f"C{n}", "SIU", b"m")
    with store.claim(10) as batch:
        highest = max(m.inbox_id for m in batch.messages)
        for m in batch.messages:
            batch.mark_applied(m.inbox_id)
    assert store.purge_applied(datetime.now(UTC) + LATER, 100) == 3 and store.count_messages() == 0
    store.store_message("S", "C9", "SIU", b"m")
    with store.claim(10) as batch:
        assert [m.inbox_id > highest for m in batch.messages] == [True]
        batch.mark_applied(batch.messages[0].inbox_id)
