"""Candidate slots: free time minus busy time minus holds, cut into visits, ranked (pure functions).

Ranking (docs/conformance.md#d8): by the preference rank of the client's repeated parameters (practitioner,
location, visit type, specialty: lower is better, compared in that order), then by start time,
then by practitioner and location id so the order is stable across calls and replicas (paging
relies on it). ``total`` counts every option without building them: each free span yields
``floor((length - duration) / step) + 1`` candidates, so only the returned page is materialised.

The slot grid (issue 7.3): candidate starts lie on ``anchor + k * step`` where the anchor is the
start of the working-time period (or listed free slot) the time comes from, whatever the request
window, the clock or a busy appointment ending off the grid: a free span is first rounded up to
its period's grid, then candidates step from there. "Now" rounds up to the next grid point too.
Grid steps are elapsed seconds from the anchor, which is a wall-clock time in the mapping's zone
(periods are single days, so no DST change falls inside one in practice).

Time is integer seconds since the epoch here, not datetimes: a $find page walks a few hundred
free spans per request, and datetime arithmetic and comparisons cost several times more than
integers. Datetimes are made only for the page that is returned.
"""

from __future__ import annotations

import datetime as dt
import heapq
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from adapter.backends.protocol import Interval, ResourceAvailability, VisitType

# Re-exported: both were defined here before the SQL backend needed them too.
from adapter.intervals import subtract_spans as subtract_spans
from adapter.scheduling.domain import Span as Span


@dataclass(frozen=True, slots=True)
class FreeTime:
    """Bookable time of one practitioner at one location: sorted, non-overlapping spans."""

    practitioner_id: str
    location_id: str
    spans: list[Span]
    # Sorted grid anchors (period starts): a span's grid starts at the last anchor at or before it.
    # Empty: each span's own start (backends that report no periods).
    anchors: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Candidate:
    practitioner_id: str
    location_id: str
    visit_type: VisitType
    interval: Interval
    rank: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ResourcePlan:
    """One (practitioner, location, visit type) combination the client may be offered."""

    free: FreeTime
    visit_type: VisitType
    rank: tuple[int, ...]


def to_spans(intervals: Iterable[Interval]) -> list[Span]:
    return [(int(iv.start.timestamp()), int(iv.end.timestamp())) for iv in intervals]


def free_time(ra: ResourceAvailability) -> FreeTime:
    """A backend's answer (free and busy time) as bookable spans."""
    free, busy, anchors = ra.spans()
    return FreeTime(ra.practitioner_id, ra.location_id, subtract_spans(free, busy), sorted(set(anchors)))


def anchor_of(anchors: Sequence[int], t: int) -> int | None:
    """The grid anchor that governs time ``t``: the last one at or before it (None: there is none)."""
    i = bisect_right(anchors, t) - 1
    return anchors[i] if i >= 0 else None


def on_grid(anchor: int, step: int, t: int) -> int:
    """The first grid point ``anchor + k * step`` at or after ``t`` (``t`` >= ``anchor``)."""
    return anchor - ((anchor - t) // step) * step  # ceiling division


def snap_spans(spans: Sequence[Span], anchors: Sequence[int], step: int) -> list[Span]:
    """Round every span's start up to the grid of the period it lies in."""
    if not anchors:
        return list(spans)
    out: list[Span] = []
    # Spans and anchors are both sorted: one forward walk finds each span's anchor (what
    # anchor_of and on_grid compute, inlined: this runs for every free span of every request).
    i, n = 0, len(anchors)
    for start, end in spans:
        while i < n and anchors[i] <= start:
            i += 1
        if i:
            anchor = anchors[i - 1]
            start = anchor - ((anchor - start) // step) * step
        if start < end:
            out.append((start, end))
    return out


def _first_start(start: int, step: int, not_before: int) -> int:
    """First grid point (anchored at the span start, so 09:00 stays 09:00) not in the past."""
    if start >= not_before:
        return start
    return start - ((start - not_before) // step) * step  # ceiling division


def _offered(
    spans: Sequence[Span], anchors: Sequence[int], step: int, duration: int, not_before: int, latest: int | None
) -> tuple[list[Span], int]:
    """The spans candidates are cut from, and how many candidates they hold, in one pass.

    What ``snap_spans``, the booking horizon (no start after ``latest``) and counting (no start before
    ``not_before``) do one after the other, fused: this runs for every free span of every request (a
    20-practitioner, 90-day window has ~5,000), and three passes that each built a new list cost three
    times as much. Spans that can hold no candidate any more (all in the past) are left out.
    """
    out: list[Span] = []
    total = 0
    i, n = 0, len(anchors)
    last_end = latest + duration if latest is not None else 0
    earliest_end = not_before + duration
    for span in spans:
        start, end = span
        if n:
            while i < n and anchors[i] <= start:
                i += 1
            if i:
                anchor = anchors[i - 1]
                start = anchor - ((anchor - start) // step) * step  # up to the period's grid
        if start >= end or end < earliest_end:
            continue
        if latest is not None:
            if start > latest:
                continue
            if end > last_end:
                end = last_end
        out.append(span if start == span[0] and end == span[1] else (start, end))
        if start < not_before:  # _first_start, inlined
            start -= ((start - not_before) // step) * step
        room = end - start - duration
        if room >= 0:
            total += room // step + 1
    return out, total


def _starts(spans: Sequence[Span], duration: int, step: int, not_before: int) -> Iterator[int]:
    for start, end in spans:
        t = _first_start(start, step, not_before)
        while t + duration <= end:
            yield t
            t += step


def _tagged(
    rank: tuple[int, ...], tie: tuple[str, str, str], plan: ResourcePlan, starts: Iterator[int]
) -> Iterator[tuple[tuple[int, ...], int, tuple[str, str, str], ResourcePlan]]:
    for t in starts:
        yield (rank, t, tie, plan)


def find_candidates(
    plans: Sequence[ResourcePlan],
    *,
    held: dict[str, list[Interval]],
    now: dt.datetime,
    step_minutes: int | None,
    offset: int,
    limit: int,
    latest_start: dt.datetime | None = None,
) -> tuple[int, list[Candidate]]:
    """Return (total options, the ``limit`` best from ``offset``) over every plan.

    ``latest_start``: no candidate starts after it (the booking horizon)."""
    now_s = int(now.timestamp())
    latest_s = int(latest_start.timestamp()) if latest_start is not None else None
    held_spans = {prac: to_spans(ivs) for prac, ivs in held.items() if ivs}
    streams = []
    total = 0
    for plan in plans:
        ft = plan.free
        duration = plan.visit_type.minutes * 60
        step = (step_minutes or plan.visit_type.minutes) * 60
        spans = ft.spans
        if ft.practitioner_id in held_spans:
            spans = subtract_spans(spans, held_spans[ft.practitioner_id])
        spans, count = _offered(spans, ft.anchors, step, duration, now_s, latest_s)
        if not spans:
            continue
        total += count
        tie = (ft.practitioner_id, ft.location_id, plan.visit_type.key)
        streams.append(_tagged(plan.rank, tie, plan, _starts(spans, duration, step, now_s)))
    page: list[Candidate] = []
    if limit <= 0:
        return total, page
    utc = dt.UTC
    for index, (rank, t, _, plan) in enumerate(heapq.merge(*streams)):
        if index < offset:
            continue
        start = dt.datetime.fromtimestamp(t, utc)
        page.append(
            Candidate(
                plan.free.practitioner_id,
                plan.free.location_id,
                plan.visit_type,
                Interval(start, start + dt.timedelta(minutes=plan.visit_type.minutes)),
                rank,
            )
        )
        if len(page) >= limit:
            break
    return total, page
