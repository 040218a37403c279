"""Issue 14.1: ``find_candidates`` counts and pages without enumerating, and answers exactly what
enumerating every option answers.

The reference below is the plain way to do it, kept here (not in the product) as the oracle: build
every option of every plan (each grid start of each bookable span), sort them all by (rank, start,
practitioner, location, visit type), count them and slice the page. Hypothesis draws calendars in
America/New_York around both DST changes of 2026 (periods that cross 02:00 on those nights
included), busy times, holds, the patient's own bookings, grid steps, anchors, "now", the booking
horizon, ``_offset`` and ``_count``; the product's arithmetic count and k-way merge must give the same
total and the same page, option for option.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings, strategies as st

from adapter.intervals import merge, merge_spans, subtract, subtract_spans
from adapter.scheduling.candidates import (
    Interval,
    ResourceAvailability,
    ResourcePlan,
    VisitType,
    find_candidates,
    free_time,
)

NY = ZoneInfo("America/New_York")
UTC = dt.UTC
# Days around the spring-forward (2026-03-08) and fall-back (2026-11-01) nights, plus an ordinary one.
DAYS = [dt.date(2026, 3, 7), dt.date(2026, 3, 8), dt.date(2026, 3, 9), dt.date(2026, 10, 31), dt.date(2026, 11, 1)]
DAYS += [dt.date(2026, 11, 2), dt.date(2026, 6, 15)]
PRACS = ("A", "B", "C")
LOCS = ("1", "2")


def _vt(key: str, minutes: int) -> VisitType:
    return VisitType(key, key, minutes, ())


def _local(day: dt.date, minute: int) -> dt.datetime:
    """Wall-clock minutes after midnight on ``day`` in New York (a nonexistent time folds forward), as UTC."""
    naive = dt.datetime.combine(day, dt.time()) + dt.timedelta(minutes=minute)
    aware = naive.replace(tzinfo=NY)
    if aware.astimezone(UTC).astimezone(NY).replace(tzinfo=None) != naive:  # in the spring-forward gap
        aware = (naive + dt.timedelta(hours=1)).replace(tzinfo=NY)
    return aware.astimezone(UTC)


def _utc(seconds: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, UTC)


# -- the reference: enumerate every option ---------------------------------------------------------
def reference_find(
    plans: Sequence[ResourcePlan],
    held: dict[str, list[Interval]],
    now: dt.datetime,
    step_minutes: int | None,
    offset: int,
    limit: int,
    latest_start: dt.datetime | None,
) -> tuple[int, list[tuple[str, str, str, dt.datetime, dt.datetime, tuple[int, ...]]]]:
    now_s = int(now.timestamp())
    latest = int(latest_start.timestamp()) if latest_start is not None else None
    options = []
    for plan in plans:
        ft = plan.free
        duration = plan.visit_type.minutes * 60
        step = (step_minutes or plan.visit_type.minutes) * 60
        taken = sorted((int(h.start.timestamp()), int(h.end.timestamp())) for h in held.get(ft.practitioner_id, []))
        for span_start, span_end in ft.spans:
            # the span minus every hold, piece by piece
            pieces = [(span_start, span_end)]
            for h_start, h_end in taken:
                pieces = [
                    part for s, e in pieces for part in ((s, min(e, h_start)), (max(s, h_end), e)) if part[0] < part[1]
                ]
            for s, e in pieces:
                governing = [a for a in ft.anchors if a <= s]
                first = s
                if governing:  # the first point of the period's grid at or after s
                    anchor = governing[-1]
                    first = anchor + -(-(s - anchor) // step) * step
                t = first
                while t < now_s:
                    t += step
                while t + duration <= e and (latest is None or t <= latest):
                    key = (ft.practitioner_id, ft.location_id, plan.visit_type.key)
                    options.append((plan.rank, t, key, plan.visit_type.minutes))
                    t += step
    options.sort()
    page = [
        (key[0], key[1], key[2], _utc(t), _utc(t) + dt.timedelta(minutes=minutes), rank)
        for rank, t, key, minutes in options[offset : offset + limit]
    ]
    return len(options), page


# -- random calendars ------------------------------------------------------------------------------
minute_of_day = st.integers(min_value=0, max_value=23 * 60)


@st.composite
def scenarios(draw: st.DrawFn) -> dict:
    days = draw(st.lists(st.sampled_from(DAYS), min_size=1, max_size=3, unique=True))
    days.sort()
    window_start = _local(days[0], draw(st.integers(0, 12 * 60)))
    window_end = _local(days[-1], draw(st.integers(12 * 60, 24 * 60 - 1)))
    window = Interval(window_start, window_end)
    visit_types = [_vt("V10", 10), _vt("V15", 15), _vt("V30", 30), _vt("V45", 45)]
    chosen = draw(st.lists(st.sampled_from(visit_types), min_size=1, max_size=3, unique_by=lambda v: v.key))
    availability = []
    for prac in draw(st.lists(st.sampled_from(PRACS), min_size=1, max_size=3, unique=True)):
        for loc in draw(st.lists(st.sampled_from(LOCS), min_size=1, max_size=2, unique=True)):
            periods = []
            for day in days:
                for _ in range(draw(st.integers(0, 2))):
                    start = draw(minute_of_day)
                    length = draw(st.integers(5, 8 * 60))
                    # Periods can start off the hour and run across the DST change of the night.
                    periods.append((_local(day, start), _local(day, start) + dt.timedelta(minutes=length)))
            periods.sort()
            free, anchors = [], []
            for start, end in periods:
                if free and start < free[-1].end:  # periods of one resource do not overlap
                    continue
                clipped = Interval(max(start, window.start), min(end, window.end))
                if clipped.start < clipped.end:
                    free.append(clipped)
                    anchors.append(start)  # the unclipped start: the grid does not move with the window
            busy = []
            for _ in range(draw(st.integers(0, 4))):
                b_start = _local(draw(st.sampled_from(days)), draw(minute_of_day))
                busy.append(Interval(b_start, b_start + dt.timedelta(minutes=draw(st.integers(1, 120)))))
            with_anchors = draw(st.booleans())
            availability.append(ResourceAvailability(prac, loc, free, busy, anchors if with_anchors else []))
    held: dict[str, list[Interval]] = {}
    for prac in PRACS:
        for _ in range(draw(st.integers(0, 3))):
            h_start = _local(draw(st.sampled_from(days)), draw(minute_of_day))
            held.setdefault(prac, []).append(
                Interval(h_start, h_start + dt.timedelta(minutes=draw(st.integers(5, 90))))
            )
    own = []  # the patient's own bookings and holds: taken from every practitioner (REQ-115-14)
    for _ in range(draw(st.integers(0, 2))):
        o_start = _local(draw(st.sampled_from(days)), draw(minute_of_day))
        own.append(Interval(o_start, o_start + dt.timedelta(minutes=draw(st.integers(5, 60)))))
    if own:
        held = {p: held.get(p, []) + own for p in PRACS}
    now = window.start + dt.timedelta(minutes=draw(st.integers(-600, 36 * 60)))
    latest = draw(st.none() | st.integers(0, 3 * 24 * 60).map(lambda m: window.start + dt.timedelta(minutes=m)))
    return {
        "availability": availability,
        "visit_types": chosen,
        "held": held,
        "now": now,
        "step_minutes": draw(st.sampled_from([None, 5, 10, 15, 20, 30])),
        "offset": draw(st.integers(0, 40)),
        "limit": draw(st.integers(0, 25)),
        "latest": latest,
        "ranked": draw(st.booleans()),
        "in_seconds": draw(st.booleans()),  # the SQL backend answers in epoch seconds, others with Intervals
    }


@settings(
    max_examples=300,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenarios())
def test_issue14_1_count_and_page_equal_enumerating_every_option(sc: dict) -> None:
    plans = []
    for ra in sc["availability"]:
        seconds = [(int(i.start.timestamp()), int(i.end.timestamp())) for i in ra.free]
        if sc["in_seconds"]:
            busy = [(int(i.start.timestamp()), int(i.end.timestamp())) for i in ra.busy]
            anchors = [int(a.timestamp()) for a in ra.anchors]
            ft = free_time(ResourceAvailability.in_seconds(ra.practitioner_id, ra.location_id, seconds, busy, anchors))
        else:
            ft = free_time(ra)
        # Bookable time is the datetime arithmetic of adapter.intervals, whichever form the backend used.
        assert merge_spans(ft.spans) == [
            (int(i.start.timestamp()), int(i.end.timestamp())) for i in subtract(ra.free, ra.busy)
        ]
        for vt_rank, vt in enumerate(sc["visit_types"]):
            rank = (PRACS.index(ra.practitioner_id) if sc["ranked"] else 0, LOCS.index(ra.location_id), vt_rank, 0)
            plans.append(ResourcePlan(ft, vt, rank))
    total, page = find_candidates(
        plans,
        held=sc["held"],
        now=sc["now"],
        step_minutes=sc["step_minutes"],
        offset=sc["offset"],
        limit=sc["limit"],
        latest_start=sc["latest"],
    )
    want_total, want_page = reference_find(
        plans, sc["held"], sc["now"], sc["step_minutes"], sc["offset"], sc["limit"], sc["latest"]
    )
    assert total == want_total
    got = [(c.practitioner_id, c.location_id, c.visit_type.key, c.interval.start, c.interval.end, c.rank) for c in page]
    assert got == want_page


@settings(max_examples=300, derandomize=True, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 500), st.integers(1, 120)), max_size=12),
    st.lists(st.tuples(st.integers(0, 500), st.integers(1, 120)), max_size=12),
)
def test_issue14_span_merge_and_subtraction_equal_the_interval_functions(
    free_raw: list[tuple[int, int]], taken_raw: list[tuple[int, int]]
) -> None:
    """``merge_spans``/``subtract_spans`` (epoch seconds, the $find path) answer what ``merge``/``subtract`` do."""
    base = 1_790_000_000
    free = [(base + s * 60, base + (s + n) * 60) for s, n in free_raw]
    taken = [(base + s * 60, base + (s + n) * 60) for s, n in taken_raw]

    def intervals(spans: list[tuple[int, int]]) -> list[Interval]:
        return [Interval(_utc(s), _utc(e)) for s, e in spans]

    def seconds(ivs: list[Interval]) -> list[tuple[int, int]]:
        return [(int(i.start.timestamp()), int(i.end.timestamp())) for i in ivs]

    assert merge_spans(free) == seconds(merge(intervals(free)))
    assert subtract_spans(merge_spans(free), taken) == seconds(subtract(intervals(free), intervals(taken)))
