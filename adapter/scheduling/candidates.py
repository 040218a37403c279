"""Candidate slots: free time minus busy time minus holds, cut into visits, ranked (pure functions).

Ranking (DESIGN 8): by the preference rank of the client's repeated parameters (practitioner,
location, visit type, specialty: lower is better, compared in that order), then by start time,
then by practitioner and location id so the order is stable across calls and replicas (paging
relies on it). ``total`` counts every option without building them: each free interval yields
``floor((length - duration) / step) + 1`` candidates, so only the returned page is materialised.
"""

from __future__ import annotations

import datetime as dt
import heapq
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from adapter.backends.protocol import Interval, ResourceAvailability, VisitType
from adapter.intervals import subtract


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

    availability: ResourceAvailability
    visit_type: VisitType
    rank: tuple[int, ...]


def bookable(free: Sequence[Interval], busy: Iterable[Interval], held: Iterable[Interval]) -> list[Interval]:
    """Free time that is neither booked nor held (``free`` is sorted and non-overlapping)."""
    taken = list(busy) + list(held)
    return subtract(free, taken) if taken else list(free)


def _first_start(iv: Interval, step: dt.timedelta, not_before: dt.datetime) -> dt.datetime:
    """First grid point (anchored at the interval start, so 09:00 stays 09:00) not in the past."""
    if iv.start >= not_before:
        return iv.start
    steps = -((iv.start - not_before) // step)  # ceiling division on timedeltas
    return iv.start + steps * step


def _starts(free: Sequence[Interval], duration: dt.timedelta, step: dt.timedelta,
            not_before: dt.datetime) -> Iterator[Interval]:
    for iv in free:
        start = _first_start(iv, step, not_before)
        while start + duration <= iv.end:
            yield Interval(start, start + duration)
            start += step


def _count(free: Sequence[Interval], duration: dt.timedelta, step: dt.timedelta, not_before: dt.datetime) -> int:
    total = 0
    for iv in free:
        span = iv.end - _first_start(iv, step, not_before)
        if span >= duration:
            total += (span - duration) // step + 1
    return total


def _tagged(plan: ResourcePlan, tie: tuple, intervals: Iterator[Interval]) -> Iterator[tuple]:
    for iv in intervals:
        yield (plan.rank, iv.start, tie, iv, plan)


def find_candidates(plans: Sequence[ResourcePlan], *, held: dict[str, list[Interval]], now: dt.datetime,
                    step_minutes: int | None, offset: int, limit: int) -> tuple[int, list[Candidate]]:
    """Return (total options, the ``limit`` best from ``offset``) over every plan."""
    streams = []
    total = 0
    for plan in plans:
        ra = plan.availability
        duration = dt.timedelta(minutes=plan.visit_type.minutes)
        step = dt.timedelta(minutes=step_minutes or plan.visit_type.minutes)
        free = bookable(ra.free, ra.busy, held.get(ra.practitioner_id, ()))
        if not free:
            continue
        total += _count(free, duration, step, now)
        tie = (ra.practitioner_id, ra.location_id, plan.visit_type.key)
        streams.append(_tagged(plan, tie, _starts(free, duration, step, now)))
    page: list[Candidate] = []
    if limit <= 0:
        return total, page
    for index, (rank, _, _, iv, plan) in enumerate(heapq.merge(*streams, key=lambda t: t[:3])):
        if index < offset:
            continue
        page.append(Candidate(plan.availability.practitioner_id, plan.availability.location_id,
                              plan.visit_type, iv, rank))
        if len(page) >= limit:
            break
    return total, page
