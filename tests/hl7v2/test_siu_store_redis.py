"""Issue 10: the SIU inbox and mirror in Redis, what the shared contract cannot show by itself.

Real Redis at 127.0.0.1:6379 (db 13, a key prefix per test, see ``tests/stateutil.py``): the version rule in Lua
agrees with ``store.supersedes``; concurrent replicas store a resent message once and never apply one message
twice; a crashed applier's claim is handed out again after the visibility timeout and its late commit changes
nothing; two feeds (two replicas' listeners and appliers) on one ``redis://`` state.url serve one inbox and mirror.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from hl7v2util import demo_mapping, run, send_for_acks, siu
from stateutil import drop_redis_keys, redis_state_url

from adapter.hl7v2.feed import SiuFeed
from adapter.hl7v2.inbox import SiuInbox, SiuListener
from adapter.hl7v2.mirror import InboxApplier
from adapter.hl7v2.store import (
    APPLIED,
    WAITING,
    MirroredAppointment,
    MirrorWrite,
    SiuStoreUnavailable,
    event_version,
    open_siu_store,
    supersedes,
)
from adapter.hl7v2.store_redis import BYTES_LE, RedisSiuStore, persistence_problem
from adapter.mllp import MLLPServer, encode_frame
from adapter.redis_connect import split_url

T0 = dt.datetime(2030, 5, 6, 9, 0, tzinfo=dt.UTC)


@pytest.fixture
def siu_url(redis_url: str, request: pytest.FixtureRequest) -> Iterator[str]:
    url = redis_state_url(redis_url, request.node.name)
    yield url
    drop_redis_keys(url)


@pytest.fixture
def stores(siu_url: str) -> Iterator[Callable[..., RedisSiuStore]]:
    """Opens store objects ("replicas") on one shared Redis key space; closes them at the end."""
    opened: list[RedisSiuStore] = []

    def open_store(**options: Any) -> RedisSiuStore:
        store = RedisSiuStore(siu_url, **options)
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()


def appointment(filler: str, version: str, *, start: dt.datetime = T0, minutes: int = 20) -> MirroredAppointment:
    return MirroredAppointment(
        filler_id=filler,
        placer_id=f"P-{filler}",
        status="booked",
        legacy_status="Booked",
        status_reason=None,
        start=start,
        end=start + dt.timedelta(minutes=minutes),
        service="CHECKUP",
        reason="",
        patient_family="Doe",
        patient_given="Jo",
        version=version,
        last_trigger="S12",
        last_control_id="C1",
        sender="LEGACY|FAC",
        practitioner_ids=("DOC1",),
        location_ids=("ROOM1",),
        patient_ids=("PAT1",),
    )


def test_issue10_lua_version_rule_agrees_with_supersedes(redis_url: str) -> None:
    """The commit script compares versions as bytes; Python's ``supersedes`` compares str: same answers."""
    rng = random.Random(10)
    versions = ["0000#000000000000", "0000#000000000007", event_version(None, 3), event_version(T0, 0)]
    for _ in range(300):
        moment = T0 + dt.timedelta(seconds=rng.randint(-(10**6), 10**6), microseconds=rng.randint(0, 999_999))
        versions.append(event_version(moment if rng.random() > 0.05 else None, rng.randint(0, 10**7)))
    pairs = [(rng.choice(versions), rng.choice(versions)) for _ in range(600)] + [(v, v) for v in versions[:20]]
    client = redis.Redis.from_url(split_url(redis_url)[0])
    try:
        flat = [v for pair in pairs for v in pair]
        script = (
            BYTES_LE
            + "local out = {} for i = 1, #ARGV, 2 do out[#out + 1] = bytes_le(ARGV[i], ARGV[i + 1]) and 1 or 0 end return out"
        )
        answers = client.eval(script, 0, *flat)
    finally:
        client.close()
    # bytes_le(new, stored) means "not newer": the event is stale.
    assert [not bool(stale) for stale in answers] == [supersedes(new, stored) for new, stored in pairs]


def test_issue10_state_url_redis_opens_the_redis_siu_store(siu_url: str) -> None:
    store = open_siu_store(siu_url)
    try:
        assert isinstance(store, RedisSiuStore)
        assert store.prefix == split_url(siu_url)[1]
    finally:
        store.close()


def test_issue10_a_resend_racing_on_many_replicas_is_stored_once(stores: Callable[..., RedisSiuStore]) -> None:
    replicas = [stores() for _ in range(6)]
    answers: list[bool] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(replicas) * 4)

    def send(store: RedisSiuStore) -> None:
        barrier.wait()
        new = store.store_message("LEGACY|FAC", "RACE1", "SIU", b"MSH|...")
        with lock:
            answers.append(new)

    threads = [threading.Thread(target=send, args=(s,)) for s in replicas for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(answers) == [False] * 23 + [True]
    assert replicas[0].count_messages() == 1 and replicas[3].count_messages(WAITING) == 1


def test_issue10_concurrent_appliers_of_two_replicas_apply_each_message_once(
    stores: Callable[..., RedisSiuStore],
) -> None:
    a, b = stores(), stores()
    n = 400
    for i in range(n):
        (a if i % 2 else b).store_message("LEGACY|FAC", f"M{i}", "SIU", siu(f"M{i}", "S12", filler=f"F{i}"))
    appliers = [InboxApplier(s, demo_mapping(), batch_size=25) for s in (a, b)]
    threads = [threading.Thread(target=ap.drain) for ap in appliers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(ap.stats.applied for ap in appliers) == n
    assert all(ap.stats.applied > 0 for ap in appliers), "both appliers took part"
    assert a.count_messages(APPLIED) == n and b.count_messages(WAITING) == 0
    assert a.count() == n and a.stale_count() == 0


def test_issue10_a_crashed_appliers_claim_is_handed_out_again_and_its_late_commit_changes_nothing(
    stores: Callable[..., RedisSiuStore],
) -> None:
    crashed, survivor = stores(visibility_seconds=0.3), stores(visibility_seconds=0.3)
    crashed.store_message("LEGACY|FAC", "C1", "SIU", b"one")
    crashed.store_message("LEGACY|FAC", "C2", "SIU", b"two")
    frozen = crashed.claim(10)  # entered and never left in time: the applier "died" holding its claim
    stuck = frozen.__enter__()
    assert [m.raw for m in stuck.messages] == [b"one", b"two"]
    with survivor.claim(10) as batch:
        assert batch.messages == [], "a live claim is nobody else's"
    time.sleep(0.45)
    with survivor.claim(10) as batch:
        assert [m.raw for m in batch.messages] == [b"one", b"two"]
        assert batch.apply(MirrorWrite(appointment("F1", event_version(T0, 1)), "raw", 1)) == "applied"
        batch.mark_applied(1)
        batch.mark_applied(2)
    # The first applier wakes up and commits a write of the same message: its claim is gone, so nothing changes.
    stuck.apply(MirrorWrite(appointment("F1", event_version(T0 + dt.timedelta(hours=1), 1)), "late", 1))
    stuck.mark_failed(1, "late")
    frozen.__exit__(None, None, None)
    found = survivor.by_filler_id("F1")
    assert found is not None and found.version == event_version(T0, 1)
    assert survivor.count_messages(APPLIED) == 2 and survivor.count_messages(WAITING) == 0
    with crashed.claim(10) as batch:
        assert batch.messages == []


def test_issue10_window_query_finds_long_appointments_that_start_before_the_window(
    stores: Callable[..., RedisSiuStore],
) -> None:
    """Starts are the index; the search reaches back by the longest appointment seen."""
    store = stores()
    store.record(MirrorWrite(appointment("LONG", event_version(T0, 0), minutes=8 * 60), "raw", 0))
    store.record(MirrorWrite(appointment("SHORT", event_version(T0, 0), start=T0 + dt.timedelta(hours=7)), "r", 0))
    window = (T0 + dt.timedelta(hours=6), T0 + dt.timedelta(hours=6, minutes=30))
    assert [a.filler_id for a in store.for_actor("practitioner", "DOC1", *window)] == ["LONG"]
    wider = (T0 + dt.timedelta(hours=6), T0 + dt.timedelta(hours=7, minutes=1))
    assert [a.filler_id for a in store.for_actor("patient", "PAT1", *wider)] == ["LONG", "SHORT"]
    end = (T0 + dt.timedelta(hours=8), T0 + dt.timedelta(hours=9))  # [start, end): touching is no overlap
    assert store.for_actor("location", "ROOM1", *end) == []


def test_issue10_persistence_settings_are_reported_as_the_server_has_them(stores: Callable[..., RedisSiuStore]) -> None:
    store = stores()
    settings = {k: store.r.config_get(k)[k] for k in ("appendonly", "appendfsync")}
    safe = settings == {"appendonly": b"yes", "appendfsync": b"always"} or settings == {
        "appendonly": "yes",
        "appendfsync": "always",
    }
    assert (store.persistence_warning is None) == safe
    if not safe:
        assert "appendonly" in (store.persistence_warning or "") or "appendfsync" in (store.persistence_warning or "")


def test_issue10_persistence_check_does_not_fail_where_config_is_disabled() -> None:
    class NoConfig:  # a managed Redis that renamed CONFIG away
        def config_get(self, name: str) -> dict[str, str]:
            raise redis.ResponseError("unknown command 'CONFIG'")

    assert persistence_problem(NoConfig()) is None  # type: ignore[arg-type]


def test_issue10_two_replicas_on_one_redis_state_url_share_the_siu_feed(siu_url: str) -> None:
    """SIU sent to replica A is in replica B's mirror; the same message resent to B is acknowledged, not stored."""

    async def main() -> None:
        feeds = [
            SiuFeed(open_siu_store(siu_url), demo_mapping(), host="127.0.0.1", port=0, poll_seconds=0.05)
            for _ in range(2)
        ]
        a, b = feeds
        for feed in feeds:
            await feed.start()
        try:
            message = siu("MULTI1", "S12", filler="FX1", placer="PX1", practitioner="DOC9")
            assert await send_for_acks(a.port, message) == ["AA"]
            deadline = time.monotonic() + 10
            while (found := await asyncio.to_thread(b.mirror().by_filler_id, "FX1")) is None:
                assert time.monotonic() < deadline, "replica B never saw what replica A acknowledged"
                await asyncio.sleep(0.05)
            assert found.practitioner_ids == ("DOC9",) and found.placer_id == "PX1"
            assert await send_for_acks(b.port, message) == ["AA"]
            assert (a.inbox.stored, b.inbox.stored, b.inbox.duplicates) == (1, 0, 1)
            assert await b.inbox.count() == 1
            cancel = siu(
                "MULTI2", "S15", filler="FX1", placer="PX1", msg_time="20260105110000+0100", status="Cancelled"
            )
            assert await send_for_acks(b.port, cancel) == ["AA"]
            deadline = time.monotonic() + 10
            while (await asyncio.to_thread(a.mirror().by_filler_id, "FX1")).last_trigger != "S15":  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "replica A never saw the cancellation B acknowledged"
                await asyncio.sleep(0.05)
        finally:
            for feed in feeds:
                await feed.stop()
                await asyncio.to_thread(feed.store.close)

    run(main())


def test_issue10_unreachable_redis_means_no_ack_and_the_listener_keeps_running() -> None:
    """Nothing answers at the Redis address: the store says ``SiuStoreUnavailable``, the listener starts anyway and
    closes each connection without an ACK (the sender resends later), as for a full disk with SQLite."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again at once: nothing listens there

    store = RedisSiuStore(f"redis://127.0.0.1:{port}/0", timeout_s=1)
    with pytest.raises(SiuStoreUnavailable):
        store.count_messages()
    with pytest.raises(SiuStoreUnavailable), store.claim(10):
        pass

    async def main() -> None:
        inbox = SiuInbox(store)
        await inbox.open()  # logged, not raised: the listener starts and answers once Redis is back
        async with MLLPServer(SiuListener(inbox).handle) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(encode_frame(siu("DOWN1", "S12")))
            await writer.drain()
            assert await reader.read() == b""
            writer.close()
            await writer.wait_closed()
        await inbox.close()

    run(main())
    store.close()


def test_issue10_non_ascii_names_and_ids_survive_the_lua_json_round_trip(stores: Callable[..., RedisSiuStore]) -> None:
    store = stores()
    a = dataclasses.replace(
        appointment("FÜ-1", event_version(T0, 0)),
        patient_family="Müller-Świątek",
        patient_given="Zoë",
        practitioner_ids=("DR-Øst",),
        patient_ids=("PAT-ß",),
        reason="Kontrolle \u201cnach OP\u201d",
    )
    assert store.record(MirrorWrite(a, "MSH|^~\\&|Ä", 0)) == "applied"
    assert store.by_filler_id("FÜ-1") == a
    assert store.for_actor("practitioner", "DR-Øst", T0, T0 + dt.timedelta(minutes=1)) == [a]
    assert store.patient_names() == {"PAT-ß": ("Müller-Świątek", "Zoë")}


def test_retention_redis_purge_finds_applied_messages_by_receipt_and_handles_older_data(
    stores: Callable[..., RedisSiuStore],
) -> None:
    """``siu:applied`` holds the applied messages scored by receipt time (``ts``); data written before it existed:
    a message stored without ``ts`` is scored when it is applied, one applied before is kept (and counted)."""
    store = stores()
    r = store.r
    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    for n in range(3):
        store.store_message("LEGACY|FAC", f"C{n}", "SIU", b"m")
    assert r.hget(store._k("msg:1"), "ts") is not None
    r.hdel(store._k("msg:2"), "ts")  # stored by the previous version: no receipt score
    with store.claim(10) as batch:
        for m in batch.messages:
            batch.mark_applied(m.inbox_id)
    scores = dict(r.zrange(store._k("applied"), 0, -1, withscores=True))
    assert scores.keys() == {b"1", b"2", b"3"}
    assert scores[b"1"] < scores[b"3"] < scores[b"2"]  # 2: scored at the commit, after 3 was received
    r.zrem(store._k("applied"), "3")  # applied by the previous version: never in siu:applied
    assert store.purge_applied(future, 100) == 2
    assert (store.count_messages(), store.count_messages(APPLIED)) == (1, 1)
    assert r.exists(store._k("msg:3")) and not r.exists(store._k("msg:1"), store._k("msg:2"))
    assert not r.exists(store._k("seen:LEGACY|FAC\nC0"), store._k("seen:LEGACY|FAC\nC1"))
    assert r.exists(store._k("seen:LEGACY|FAC\nC2"))
    assert r.zcard(store._k("applied")) == 0 and r.hget(store._k("n"), "purged") == b"2"
