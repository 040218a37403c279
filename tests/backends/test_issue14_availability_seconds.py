"""Issue 14: the SQL backend's availability read works in epoch seconds (the lean path behind an uncached
``$find``), and answers exactly what the datetime arithmetic it replaced answered.

The oracle below is that former implementation, kept here (not in the product): every working-time period
turned into an instant with the zone rules (``attach_zone``) one by one, Intervals of aware datetimes,
``adapter.intervals.subtract`` for absences, and the busy rows through the general row mapping
(``SqlBackend._busy``: a dict per row, every field evaluated). Hypothesis draws windows (any second, from a
minute to 95 days, across both DST changes), practitioner subsets and location filters over the real demo
database (SQLite), in several zones and both grid alignments.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from apputil import DEMO_MAPPING
from hypothesis import HealthCheck, given, settings, strategies as st

from adapter.backends.protocol import Interval, ResourceAvailability
from adapter.backends.sql import backend as backend_module
from adapter.backends.sql.backend import SqlBackend, _local_day, _wall_clock, _whole_days
from adapter.backends.sql.db import Database
from adapter.demo.seed import ensure_demo_database
from adapter.intervals import subtract
from adapter.mapping.expressions import EvalContext, attach_zone
from adapter.mapping.loader import load_mapping

UTC = dt.UTC
TODAY = dt.date(2026, 10, 15)  # the seed's "today": its bookings cover the fall-back night of 2026-11-01
ZONES = ("America/New_York", "Europe/Dublin", "Australia/Lord_Howe", "America/Santiago", "America/Havana")


# Offsets change on weekend nights (mostly at 00:00-03:00) and the demo clinics close at weekends: these
# rows put working time, bookings and absences on those days and hours, for every zone the tests use.
WEEKEND_TEMPLATES = [  # (practitioner, location, weekday, start HHMM, end HHMM)
    ("SPEARSB ", 1, 6, 0, 2400),
    ("SPEARSB ", 1, 7, 0, 130),
    ("SPEARSB ", 2, 7, 130, 400),
    ("SPEARSB ", 1, 7, 600, 2400),
    ("OKAFORC ", 3, 5, 2200, 2400),
    ("OKAFORC ", 3, 6, 30, 330),
]
NIGHTS = [dt.date(2026, 10, 24), dt.date(2026, 10, 25), dt.date(2026, 10, 31), dt.date(2026, 11, 1)]
NIGHTS += [dt.date(2027, 3, 13), dt.date(2027, 3, 14), dt.date(2027, 3, 27), dt.date(2027, 3, 28)]
NIGHTS += [dt.date(2027, 4, 3), dt.date(2027, 4, 4), dt.date(2026, 9, 5), dt.date(2026, 9, 6)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("seconds") / "demo.sqlite"
    ensure_demo_database(path, today=TODAY)
    con = sqlite3.connect(path)
    with con:
        for n, (prac, loc, weekday, start, end) in enumerate(WEEKEND_TEMPLATES):
            con.execute(
                "INSERT INTO PROV_TEMPLATE VALUES (?, ?, ?, ?, ?, ?, 20260101, NULL)",
                (900_000 + n, prac, loc, weekday, start, end),
            )
        n = 0
        for night in NIGHTS:
            ymd = int(night.strftime("%Y%m%d"))
            for hhmm, minutes in ((0, 20), (110, 40), (130, 20), (159, 2), (200, 30), (230, 20), (300, 60), (2350, 20)):
                for prac in ("SPEARSB ", "OKAFORC "):
                    n += 1
                    con.execute(
                        "INSERT INTO APPT (APPT_ID, PAT_ID, PROV_ID, FAC_ID, APPT_DT, APPT_TM, DUR_MIN, STATUS_CD) "
                        "VALUES (?, 1, ?, 1, ?, ?, ?, 'S')",
                        (900_000 + n, prac, ymd, hhmm, minutes),
                    )
            con.execute("INSERT INTO PROV_BLOCK VALUES (?, 'SPEARSB ', ?, 145, 215, 'night test')", (900_000 + n, ymd))
    con.close()
    return path


def _backend(path: Path, zone: str = "America/New_York", alignment: str = "period") -> SqlBackend:
    mapping = load_mapping(DEMO_MAPPING)
    backend = SqlBackend(mapping, Database(f"sqlite:///{path}"))
    visit_types = backend.doc.visit_types.model_copy(update={"slot_alignment": alignment})
    backend.doc = backend.doc.model_copy(update={"visit_types": visit_types})
    backend._ctx = EvalContext(ZoneInfo(zone), mapping.ctx.codes)
    return backend


# -- the oracle: the datetime implementation this replaced -------------------------------------------------
def reference_availability(
    backend: SqlBackend, conn: Any, window: Interval, prac_keys: list[Any], location_ids: set[str]
) -> list[tuple[str, str, list[Interval], list[Interval], list[dt.datetime]]]:
    zone = backend._ctx.zone
    free: dict[tuple[str, str], list[Interval]] = {}
    anchors: dict[tuple[str, str], list[dt.datetime]] = {}
    for r in backend._run_section(conn, "working_time", window, prac_keys):
        loc = str(r["location"])
        if location_ids and loc not in location_ids:
            continue
        day = window.start.astimezone(zone).date()
        while day <= window.end.astimezone(zone).date():
            if (
                day.isoweekday() == r["weekday"]
                and (r.get("valid_from") is None or r["valid_from"] <= day)
                and (r.get("valid_to") is None or day <= r["valid_to"])
            ):
                midnight = dt.datetime.combine(day, dt.time())
                period = attach_zone(midnight + r["start_time"], zone).astimezone(UTC)
                end = attach_zone(midnight + r["end_time"], zone).astimezone(UTC)
                start, end = max(period, window.start), min(end, window.end)
                if start < end:
                    free.setdefault((str(r["practitioner"]), loc), []).append(Interval(start, end))
                    anchors.setdefault((str(r["practitioner"]), loc), []).append(backend._grid_anchor(period))
            day += dt.timedelta(days=1)
    absences: dict[str, list[Interval]] = {}
    for r in backend._run_section(conn, "absences", window, prac_keys):
        if r.get("start") is None and r.get("date") is not None:
            absences.setdefault(str(r["practitioner"]), []).append(_whole_days(r, zone))
        elif r.get("start") is not None:
            end = r.get("end") or r["start"] + dt.timedelta(minutes=int(r["minutes"]))
            absences.setdefault(str(r["practitioner"]), []).append(Interval(r["start"], end))
    busy = backend._busy(conn, window, prac_keys)
    out = []
    for (prac, loc), intervals in sorted(free.items()):
        intervals = subtract(sorted(intervals, key=lambda i: i.start), absences.get(prac, []))
        if intervals:
            taken = sorted((b for _, b in busy.get(prac, [])), key=lambda i: (i.start, i.end))
            out.append((prac, loc, intervals, taken, sorted(anchors.get((prac, loc), []))))
    return out


def _seconds(intervals: list[Interval]) -> list[tuple[int, int]]:
    return [(int(i.start.timestamp()), int(i.end.timestamp())) for i in intervals]


def _compare(backend: SqlBackend, window: Interval, pracs: list[str], locations: set[str]) -> int:
    conn = backend.db.connection()
    keys = [backend.legacy_key("Practitioner", p) for p in pracs]
    got = backend._availability(conn, window, keys, locations)
    # The oracle maps rows with a backend of its own: nothing the product remembered across calls is reused.
    oracle = SqlBackend(backend.mapping, backend.db)
    oracle.doc, oracle._ctx = backend.doc, backend._ctx
    want = reference_availability(oracle, conn, window, keys, locations)
    assert [(ra.practitioner_id, ra.location_id) for ra in got] == [(w[0], w[1]) for w in want]
    for ra, (_p, _l, free, busy, anchors) in zip(got, want, strict=True):
        got_free, got_busy, got_anchors = ra.spans()
        assert got_free == _seconds(free)
        assert sorted(got_busy) == _seconds(busy)
        assert got_anchors == [int(a.timestamp()) for a in anchors]
        # ... and as Intervals, for the callers that read those (the legacy times are whole seconds)
        assert ra.free == free and sorted(ra.busy, key=lambda i: (i.start, i.end)) == busy and ra.anchors == anchors
    return len(got)


PRACTITIONERS = (
    "SPEARSB",
    "OKAFORC",
    "GOLDBERM",
    "LINDQVIA",
    "NGUYENT",
    "PATELR",
)
windows = st.builds(
    lambda offset_s, length_s: Interval(
        dt.datetime.combine(TODAY, dt.time(), tzinfo=UTC) + dt.timedelta(seconds=offset_s),
        dt.datetime.combine(TODAY, dt.time(), tzinfo=UTC) + dt.timedelta(seconds=offset_s + length_s),
    ),
    st.integers(-40 * 86400, 150 * 86400),  # both DST changes (2026-11-01, 2027-03-14) and the bookings around them
    st.one_of(st.integers(60, 2 * 86400), st.integers(2 * 86400, 95 * 86400)),
)


@settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    window=windows,
    pracs=st.lists(st.sampled_from(PRACTITIONERS), min_size=1, max_size=6, unique=True),
    locations=st.sets(st.sampled_from(["1", "2", "3", "9"]), max_size=2),
)
def test_issue14_the_seconds_read_equals_the_datetime_arithmetic(
    demo: Path, window: Interval, pracs: list[str], locations: set[str]
) -> None:
    # One backend for every example: what it remembers from earlier windows must never change a later answer.
    backend = _SHARED.get(demo) or _SHARED.setdefault(demo, _backend(demo))
    _compare(backend, window, pracs, locations)


_SHARED: dict[Path, SqlBackend] = {}


@pytest.mark.parametrize("zone", ZONES)
@pytest.mark.parametrize("alignment", ["period", "clock"])
def test_issue14_the_seconds_read_equals_the_datetime_arithmetic_in_other_zones(
    demo: Path, zone: str, alignment: str
) -> None:
    backend = _backend(demo, zone, alignment)
    base = dt.datetime.combine(TODAY, dt.time(), tzinfo=UTC)
    # A whole year: every zone's offset changes (and Havana's midnight transitions) lie in it.
    found = _compare(
        backend, Interval(base - dt.timedelta(days=200), base + dt.timedelta(days=200)), ["SPEARSB"], set()
    )
    found += _compare(
        backend, Interval(base - dt.timedelta(days=30), base + dt.timedelta(days=60)), list(PRACTITIONERS), set()
    )
    assert found > 0


def test_issue14_the_busy_rows_the_lean_converter_cannot_take_go_the_general_way_with_the_same_answer(
    demo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = dt.datetime.combine(TODAY, dt.time(), tzinfo=UTC)
    window = Interval(base, base + dt.timedelta(days=30))
    monkeypatch.setattr(backend_module._BusyRows, "build", classmethod(lambda cls, mapping, names: None))
    assert _compare(_backend(demo), window, list(PRACTITIONERS), set()) > 0


def test_issue14_busy_rows_are_converted_once_per_distinct_value_and_remembered_across_reads(demo: Path) -> None:
    backend = _backend(demo)
    conn = backend.db.connection()
    base = dt.datetime.combine(TODAY, dt.time(), tzinfo=UTC)
    keys = [backend.legacy_key("Practitioner", p) for p in PRACTITIONERS]
    first = backend._busy_spans(conn, Interval(base, base + dt.timedelta(days=20)), keys)
    (converter,) = backend._busy_rows.values()
    assert converter is not None
    remembered = len(converter.memo)
    assert 0 < remembered <= sum(len(v) for v in first.values()) + 200  # the window plus the day before it
    again = backend._busy_spans(conn, Interval(base + dt.timedelta(days=5), base + dt.timedelta(days=10)), keys)
    assert len(converter.memo) == remembered  # a narrower window: every row was converted before
    assert all(spans == sorted(spans) for spans in again.values())


@pytest.mark.parametrize("zone", ZONES + ("UTC", "Asia/Kolkata", "Pacific/Apia", "Africa/Casablanca"))
def test_issue14_a_local_day_is_its_midnight_plus_the_time_of_day_whenever_it_has_24_hours(zone: str) -> None:
    tz = ZoneInfo(zone)
    day = dt.date(2026, 1, 1)
    shortcuts = 0
    while day < dt.date(2028, 1, 1):
        midnight, uniform = _local_day(day, tz)
        assert midnight == int(attach_zone(dt.datetime.combine(day, dt.time()), tz).timestamp())
        if uniform:
            shortcuts += 1
            for minutes in range(0, 24 * 60 + 1, 30):
                offset = dt.timedelta(minutes=minutes)
                assert midnight + minutes * 60 == _wall_clock(day, offset, tz), (day, offset)
        day += dt.timedelta(days=1)
    assert shortcuts > 700


def test_issue14_resource_availability_in_seconds_reads_as_intervals_and_back() -> None:
    t0 = 1_790_000_000
    ra = ResourceAvailability.in_seconds("P", "L", [(t0, t0 + 3600)], [(t0 + 600, t0 + 1200)], [t0])
    as_intervals = ResourceAvailability(
        "P",
        "L",
        [Interval(dt.datetime.fromtimestamp(t0, UTC), dt.datetime.fromtimestamp(t0 + 3600, UTC))],
        [Interval(dt.datetime.fromtimestamp(t0 + 600, UTC), dt.datetime.fromtimestamp(t0 + 1200, UTC))],
        [dt.datetime.fromtimestamp(t0, UTC)],
    )
    assert ra.spans() == as_intervals.spans() == ([(t0, t0 + 3600)], [(t0 + 600, t0 + 1200)], [t0])
    assert ra == as_intervals
    assert "practitioner_id='P'" in repr(ra)
    # Once read as Intervals, those lists are the answer: a change to them shows in spans() too.
    ra.busy.append(Interval(dt.datetime.fromtimestamp(t0 + 1800, UTC), dt.datetime.fromtimestamp(t0 + 1900, UTC)))
    assert ra.spans()[1] == [(t0 + 600, t0 + 1200), (t0 + 1800, t0 + 1900)]
    ra.free = []
    assert ra.spans()[0] == [] and ra != as_intervals


def test_issue14_postgresql_prepares_each_availability_query_once_per_connection(pg_demo_dsn: str) -> None:
    """Each ``$find`` runs the same three availability statements: they are kept prepared on the connection
    (one server-side statement each, executed again and again) instead of parsed and planned per call."""
    import asyncio

    from adapter.backends.protocol import AvailabilityQuery
    from adapter.backends.sql.db import query

    backend = SqlBackend(load_mapping(DEMO_MAPPING), Database("odbc:" + pg_demo_dsn, pool_size=1))
    start = dt.datetime.combine(dt.date.today() + dt.timedelta(days=1), dt.time(), tzinfo=UTC)
    q = AvailabilityQuery(Interval(start, start + dt.timedelta(days=14)), ("SPEARSB", "OKAFORC"), ())

    async def run() -> list[dict[str, Any]]:
        first = [(ra.practitioner_id, ra.location_id, ra.spans()) for ra in await backend.availability(q)]
        assert first
        for _ in range(7):
            assert [(ra.practitioner_id, ra.location_id, ra.spans()) for ra in await backend.availability(q)] == first
        sql = "SELECT statement, generic_plans + custom_plans AS runs FROM pg_prepared_statements"
        try:
            return await backend.db.run(lambda conn: query(conn, sql, {}))
        finally:
            await backend.close()

    prepared = asyncio.run(run())
    for table in ("PROV_TEMPLATE", "PROV_BLOCK", "FROM APPT"):
        runs = [r["runs"] for r in prepared if table in r["statement"]]
        assert runs == [8], prepared


def test_issue14_kept_statements_survive_a_refusal_and_are_dropped_after_a_driver_error(pg_demo_dsn: str) -> None:
    import asyncio

    from adapter.backends.protocol import SlotConflict

    db = Database("odbc:" + pg_demo_dsn, pool_size=1)

    def kept(conn: Any) -> int:
        return len(db._local.statements)

    def refuse(conn: Any) -> None:
        db.select(conn, "SELECT 1 AS one WHERE 1 = :x", {"x": 1}).fetchall()
        raise SlotConflict("taken")

    def broken(conn: Any) -> None:
        db.select(conn, "SELECT no_such_column FROM PROVIDER", {}).fetchall()

    async def run() -> list[int]:
        counts = []
        try:
            with pytest.raises(SlotConflict):
                await db.run(refuse)
            counts.append(await db.run(kept))  # a refusal of the domain's: the cursor stays prepared
            with pytest.raises(Exception, match="no_such_column"):
                await db.run(broken)
            counts.append(await db.run(kept))  # the driver failed: every kept cursor is let go
            rows = await db.run(lambda conn: db.select(conn, "SELECT 1 AS one WHERE 1 = :x", {"x": 1}).fetchall())
            counts.append(len(rows))
        finally:
            await db.close()
        return counts

    assert asyncio.run(run()) == [1, 0, 1]
