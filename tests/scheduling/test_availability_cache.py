"""The availability cache answers exactly what the legacy system answers, and never hides the
adapter's own changes from another worker (real SQL backend over the demo SQLite database)."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
from pathlib import Path

import pytest
from apputil import DEMO_MAPPING

from adapter.backends.protocol import AvailabilityQuery, Interval, ResourceAvailability
from adapter.backends.sql.backend import SqlBackend
from adapter.backends.sql.db import Database
from adapter.demo.seed import ensure_demo_database
from adapter.mapping.loader import load_mapping
from adapter.scheduling.availability_cache import AvailabilityCache
from adapter.scheduling.candidates import FreeTime, free_time
from adapter.scheduling.state import SqliteStateStore, ThreadedStateStore

UTC = dt.UTC
PRACS = ("SPEARSB", "OKAFORC", "GOLDBERM")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cache") / "demo.sqlite"
    ensure_demo_database(path, today=dt.date.today())
    return path


async def _unchanged() -> int:
    """A calendar version nobody bumps."""
    return 0


def _backend(path: Path) -> SqlBackend:
    return SqlBackend(load_mapping(DEMO_MAPPING), Database(f"sqlite:///{path}"))


def _bookable(result) -> dict[tuple[str, str], list[tuple[int, int]]]:
    """Backend answers (ResourceAvailability) and cache answers (FreeTime) as comparable spans."""
    out = {}
    for item in result:
        spans = item.spans if isinstance(item, FreeTime) else free_time(item).spans
        if spans:
            out[(item.practitioner_id, item.location_id)] = spans
    return out


@pytest.mark.parametrize(
    ("offset_h", "hours", "locations"),
    [
        (0, 24 * 14, ()),
        (7.5, 50.25, ()),
        (-3, 30, ("1",)),
        (36.1, 24 * 40, ("1", "3")),
        (15, 1, ()),
    ],
)
def test_cached_availability_equals_the_legacy_answer(
    demo: Path, tmp_path: Path, offset_h: float, hours: float, locations: tuple[str, ...]
) -> None:
    backend = _backend(demo)
    cache = AvailabilityCache(backend, _unchanged, ttl_seconds=60)
    base = dt.datetime.combine(dt.date.today() + dt.timedelta(days=1), dt.time(), tzinfo=UTC)
    window = Interval(base + dt.timedelta(hours=offset_h), base + dt.timedelta(hours=offset_h + hours))
    q = AvailabilityQuery(window, PRACS, locations)

    async def both():
        direct = await backend.availability(q)
        await cache.free_time(AvailabilityQuery(Interval(window.start - dt.timedelta(days=2), window.end), PRACS, ()))
        cached = await cache.free_time(q)  # assembled from days a wider call loaded
        return direct, cached

    direct, cached = asyncio.run(both())
    assert _bookable(cached) == _bookable(direct)
    assert _bookable(direct), "the window has free time"


def test_an_adapter_write_in_another_worker_is_seen_at_once(demo: Path, tmp_path: Path) -> None:
    state = ThreadedStateStore(SqliteStateStore(tmp_path / "state.sqlite"))
    worker_a = AvailabilityCache(_backend(demo), state.calendar_version, ttl_seconds=3600)
    base = dt.datetime.combine(dt.date.today() + dt.timedelta(days=1), dt.time(), tzinfo=UTC)
    q = AvailabilityQuery(Interval(base, base + dt.timedelta(days=7)), ("SPEARSB",), ())
    loads = []
    original = worker_a.backend.availability

    async def counting(query):
        loads.append(query)
        return await original(query)

    worker_a.backend.availability = counting  # type: ignore[method-assign]
    asyncio.run(worker_a.free_time(q))
    asyncio.run(worker_a.free_time(q))
    assert len(loads) == 1  # second call served from the cache
    state.gate.bump_calendar_version()  # what another worker does after booking
    asyncio.run(worker_a.free_time(q))
    assert len(loads) == 2


def test_a_change_made_directly_in_the_legacy_system_shows_after_the_ttl(tmp_path: Path) -> None:
    path = tmp_path / "demo.sqlite"
    ensure_demo_database(path, today=dt.date.today())
    clock = [1000.0]
    cache = AvailabilityCache(_backend(path), _unchanged, ttl_seconds=2, clock=lambda: clock[0])
    base = dt.datetime.combine(dt.date.today() + dt.timedelta(days=1), dt.time(), tzinfo=UTC)
    q = AvailabilityQuery(Interval(base, base + dt.timedelta(days=7)), ("SPEARSB",), ())
    before = _bookable(asyncio.run(cache.free_time(q)))
    (prac, loc), free = next(iter(before.items()))
    slot = free[0]
    local = dt.datetime.fromtimestamp(slot[0], UTC).astimezone(__import__("zoneinfo").ZoneInfo("America/New_York"))
    con = sqlite3.connect(path)
    con.execute(
        "INSERT INTO APPT (APPT_ID, PAT_ID, PROV_ID, FAC_ID, APPT_DT, APPT_TM, DUR_MIN, TYPE_CD, STATUS_CD) "
        "VALUES (999999, 1, 'SPEARSB ', ?, ?, ?, 10, 'FOLLOW', 'S')",
        (int(loc), int(local.strftime("%Y%m%d")), local.hour * 100 + local.minute),
    )
    con.commit()
    assert _bookable(asyncio.run(cache.free_time(q))) == before  # within the TTL: the cached view
    clock[0] += 2.5
    after = _bookable(asyncio.run(cache.free_time(q)))
    booked = (slot[0], slot[0] + 600)
    assert not any(s < booked[1] and booked[0] < e for s, e in after[(prac, loc)])


def test_cache_seconds_zero_reads_the_legacy_system_every_time(demo: Path) -> None:
    backend = _backend(demo)
    cache = AvailabilityCache(backend, _unchanged, ttl_seconds=0)
    calls = []
    original = backend.availability

    async def counting(query):
        calls.append(query)
        return await original(query)

    backend.availability = counting  # type: ignore[method-assign]
    base = dt.datetime.combine(dt.date.today() + dt.timedelta(days=1), dt.time(), tzinfo=UTC)
    q = AvailabilityQuery(Interval(base, base + dt.timedelta(days=3)), ("SPEARSB",), ())
    first = asyncio.run(cache.free_time(q))
    second = asyncio.run(cache.free_time(q))
    assert len(calls) == 2 and calls[0] == q  # the request's own window, no day widening
    assert _bookable(first) == _bookable(second) != {}


class CountingBackend(SqlBackend):
    """The real SQL backend, counting its availability queries (and able to hold them back)."""

    def __init__(self, path: Path) -> None:
        super().__init__(load_mapping(DEMO_MAPPING), Database(f"sqlite:///{path}"))
        self.calls: list[AvailabilityQuery] = []
        self.release: asyncio.Event | None = None

    async def availability(self, q: AvailabilityQuery) -> list[ResourceAvailability]:
        self.calls.append(q)
        if self.release is not None:
            await self.release.wait()
        return await super().availability(q)


def test_issue14_2_concurrent_cold_requests_cause_one_legacy_load_per_key(demo: Path) -> None:
    backend = CountingBackend(demo)
    cache = AvailabilityCache(backend, _unchanged, ttl_seconds=60)
    base = dt.datetime.combine(dt.date.today() + dt.timedelta(days=1), dt.time(), tzinfo=UTC)
    q = AvailabilityQuery(Interval(base, base + dt.timedelta(days=14)), PRACS, ())

    async def run() -> list[list[FreeTime]]:
        backend.release = asyncio.Event()
        requests = [asyncio.ensure_future(cache.free_time(q)) for _ in range(20)]
        while not backend.calls:  # the first load is waiting on the release: every request is queued by now
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        backend.release.set()
        return await asyncio.gather(*requests)

    answers = asyncio.run(run())
    assert len(backend.calls) == 1  # one query for all 3 practitioners x 14 days, shared by 20 requests
    assert set(backend.calls[0].practitioner_ids) == set(PRACS)
    direct = asyncio.run(SqlBackend(load_mapping(DEMO_MAPPING), Database(f"sqlite:///{demo}")).availability(q))
    assert all(_bookable(a) == _bookable(direct) != {} for a in answers)


def test_issue14_2_an_overlapping_request_loads_only_what_is_not_loading(demo: Path) -> None:
    backend = CountingBackend(demo)
    cache = AvailabilityCache(backend, _unchanged, ttl_seconds=60)
    base = dt.datetime.combine(dt.date.today() + dt.timedelta(days=1), dt.time(), tzinfo=UTC)
    first = AvailabilityQuery(Interval(base, base + dt.timedelta(days=7)), ("SPEARSB",), ())
    wider = AvailabilityQuery(Interval(base, base + dt.timedelta(days=7)), ("SPEARSB", "OKAFORC"), ())

    async def run() -> None:
        backend.release = asyncio.Event()
        a = asyncio.ensure_future(cache.free_time(first))
        while not backend.calls:
            await asyncio.sleep(0.01)
        b = asyncio.ensure_future(cache.free_time(wider))
        await asyncio.sleep(0.05)
        backend.release.set()
        await asyncio.gather(a, b)

    asyncio.run(run())
    assert [c.practitioner_ids for c in backend.calls] == [("SPEARSB",), ("OKAFORC",)]


def test_issue14_2_an_expiring_entry_is_served_while_one_refresh_runs(tmp_path: Path) -> None:
    path = tmp_path / "demo.sqlite"
    ensure_demo_database(path, today=dt.date.today())
    backend = CountingBackend(path)
    clock = [1000.0]
    cache = AvailabilityCache(backend, _unchanged, ttl_seconds=10, clock=lambda: clock[0])
    base = dt.datetime.combine(dt.date.today() + dt.timedelta(days=1), dt.time(), tzinfo=UTC)
    q = AvailabilityQuery(Interval(base, base + dt.timedelta(days=7)), ("SPEARSB",), ())

    async def run() -> None:
        before = _bookable(await cache.free_time(q))
        assert len(backend.calls) == 1
        (_, loc), free = next(iter(before.items()))
        local = dt.datetime.fromtimestamp(free[0][0], UTC).astimezone(
            __import__("zoneinfo").ZoneInfo("America/New_York")
        )
        con = sqlite3.connect(path)
        con.execute(
            "INSERT INTO APPT (APPT_ID, PAT_ID, PROV_ID, FAC_ID, APPT_DT, APPT_TM, DUR_MIN, TYPE_CD, STATUS_CD) "
            "VALUES (999999, 1, 'SPEARSB ', ?, ?, ?, 10, 'FOLLOW', 'S')",
            (int(loc), int(local.strftime("%Y%m%d")), local.hour * 100 + local.minute),
        )
        con.commit()
        clock[0] += 7  # past ttl/2, within ttl: due for a refresh, still servable
        backend.release = asyncio.Event()  # the legacy system is slow now: the refresh hangs
        served = await asyncio.gather(*(cache.free_time(q) for _ in range(10)))
        assert all(_bookable(s) == before for s in served)  # answered from the copy, nobody waited
        await asyncio.sleep(0.05)
        assert len(backend.calls) == 2  # exactly one refresh, started by the first request that saw the age
        backend.release.set()
        while cache._refreshing:
            await asyncio.sleep(0.01)
        after = _bookable(await cache.free_time(q))
        assert len(backend.calls) == 2  # the refreshed copy is fresh again
        assert after != before  # and it has the legacy change
        clock[0] += 10.5  # older than ttl: never served, the request loads
        await cache.free_time(q)
        assert len(backend.calls) == 3

    asyncio.run(run())
