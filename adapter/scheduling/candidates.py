"""Candidate slots: free time minus busy time minus holds, cut into visits, ranked (pure functions).

Ranking (DESIGN 8): by the preference rank of the client's repeated parameters (practitioner,
location, visit type, specialty: lower is better, compared in that order), then by start time,
then by practitioner and location id so the order is stable across calls and replicas (paging
relies on it). ``total`` counts every option without building them: each free span yields
``floor((length - duration) / step) + 1`` candidates, so only the returned page is materialised.

Time is integer seconds since the epoch here, not datetimes: a $find page walks a few hundred
free spans per request, and datetime arithmetic and comparisons cost several times more than
integers. Datetimes are made only for the page that is returned.
"""

from __future__ import annotations

import datetime as dt
import heapq
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from adapter.backends.protocol import Interval, ResourceAvailability, VisitType

Span = tuple[int, int]  # [start, end) in seconds since the Unix epoch


@dataclass(frozen=True, slots=True)
class FreeTime:
    """Bookable time of one practitioner at one location: sorted, non-overlapping spans."""

    practitioner_id: str
    location_id: str
    spans: list[Span]


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


def subtract_spans(free: Sequence[Span], taken: Iterable[Span]) -> list[Span]:
    """``free`` (sorted, disjoint) minus ``taken`` (any order, may overlap)."""
    cuts = sorted(taken)
    if not cuts:
        return list(free)
    out: list[Span] = []
    i = 0
    for start, end in free:
        while i < len(cuts) and cuts[i][1] <= start:
            i += 1
        j = i
        while start < end and j < len(cuts) and cuts[j][0] < end:
            c_start, c_end = cuts[j]
            if c_start > start:
                out.append((start, c_start))
            start = max(start, c_end)
            j += 1
        if start < end:
            out.append((start, end))
    return out


def free_time(ra: ResourceAvailability) -> FreeTime:
    """A backend's answer (free and busy intervals) as bookable spans."""
    return FreeTime(ra.practitioner_id, ra.location_id, subtract_spans(to_spans(ra.free), to_spans(ra.busy)))


def _first_start(start: int, step: int, not_before: int) -> int:
    """First grid point (anchored at the span start, so 09:00 stays 09:00) not in the past."""
    if start >= not_before:
        return start
    return start - ((start - not_before) // step) * step  # ceiling division


def _count(spans: Sequence[Span], duration: int, step: int, not_before: int) -> int:
    total = 0
    for start, end in spans:
        if start < not_before:  # _first_start, inlined: this loop runs for every free span
            start -= ((start - not_before) // step) * step
        room = end - start - duration
        if room >= 0:
            total += room // step + 1
    return total


def _starts(spans: Sequence[Span], duration: int, step: int, not_before: int) -> Iterator[int]:
    for start, end in spans:
        t = _first_start(start, step, not_before)
        while t + duration <= end:
            yield t
            t += step


def _tagged(
    rank: tuple[int, ...], tie: tuple[str, str, str], plan: ResourcePlan, starts: Iterator[int]
) -> Iterator[tuple]:
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
) -> tuple[int, list[Candidate]]:
    """Return (total options, the ``limit`` best from ``offset``) over every plan."""
    now_s = int(now.timestamp())
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
        if not spans:
            continue
        total += _count(spans, duration, step, now_s)
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
