"""A short-lived, per-worker cache of the legacy calendar, by (practitioner, UTC day).

Why: ``$find`` must count every option in the window (``Bundle.total``), so it reads the whole
window's working time and bookings on every call; mapping a few hundred legacy rows through the
declarative mapping costs ~5 us each, which dominated ``$find`` (~15 ms of ~20 ms). Patient
portals ask for overlapping windows all day long, so a day-granular cache helps real traffic,
not only repeated identical requests.

Why it is safe:
* holds are never cached (the service reads them from the shared state store on every call), so
  a held slot is never offered (ITI-115 SHALL);
* every change made through the adapter (book, reschedule, cancel) bumps a calendar version in the
  shared state store; every worker compares it on each call and drops its cache when it moved, so
  the adapter's own bookings are visible immediately to all workers;
* changes made directly in the legacy system become visible within ``ttl`` seconds; until then a
  client may be offered a slot that ``$hold``/``$book`` then refuse with 409, because those always
  re-check the legacy calendar under the booking lock. Nothing is ever double-booked by staleness.

``ttl`` 0 turns the cache off (every ``$find`` reads the legacy system).
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Callable

from adapter.backends.protocol import AvailabilityQuery, Interval, ResourceAvailability, SchedulingBackend
from adapter.intervals import subtract

_DAY = dt.timedelta(days=1)
_MAX_ENTRIES = 200_000


@dataclass(slots=True)
class _DayEntry:
    loaded: float
    free: dict[str, list[Interval]] = field(default_factory=dict)  # location id -> free minus booked, in the day


def _day_start(t: dt.datetime) -> dt.datetime:
    u = t.astimezone(dt.timezone.utc)
    return dt.datetime(u.year, u.month, u.day, tzinfo=dt.timezone.utc)


class AvailabilityCache:
    def __init__(self, backend: SchedulingBackend, version: Callable[[], int], ttl_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backend = backend
        self._version = version
        self.ttl = ttl_seconds
        self._clock = clock
        self._seen_version: int | None = None
        self._days: dict[tuple[str, dt.datetime], _DayEntry] = {}

    def clear(self) -> None:
        self._days.clear()

    async def availability(self, q: AvailabilityQuery) -> list[ResourceAvailability]:
        if self.ttl <= 0 or not q.practitioner_ids:
            return await self.backend.availability(q)
        version = self._version()
        if version != self._seen_version or len(self._days) > _MAX_ENTRIES:
            self._days.clear()
            self._seen_version = version
        now = self._clock()
        first = _day_start(q.window.start)
        days = []
        d = first
        while d < q.window.end:
            days.append(d)
            d += _DAY
        stale = [p for p in q.practitioner_ids
                 if any((e := self._days.get((p, day))) is None or now - e.loaded > self.ttl for day in days)]
        if stale:
            await self._load(tuple(stale), Interval(days[0], days[-1] + _DAY), days, now)
        return self._assemble(q, days)

    async def _load(self, practitioners: tuple[str, ...], span: Interval, days: list[dt.datetime], now: float) -> None:
        fetched = await self.backend.availability(AvailabilityQuery(span, practitioners, ()))
        for p in practitioners:
            for day in days:
                self._days[(p, day)] = _DayEntry(now)
        for ra in fetched:
            for day in days:
                entry = self._days[(ra.practitioner_id, day)]
                day_iv = Interval(day, day + _DAY)
                clipped = [Interval(max(f.start, day), min(f.end, day + _DAY)) for f in ra.free if f.overlaps(day_iv)]
                if clipped:
                    # Stored already minus the bookings: per request only holds remain to subtract.
                    bookable = subtract(clipped, [b for b in ra.busy if b.overlaps(day_iv)])
                    if bookable:
                        entry.free.setdefault(ra.location_id, []).extend(bookable)

    def _assemble(self, q: AvailabilityQuery, days: list[dt.datetime]) -> list[ResourceAvailability]:
        out = []
        window = q.window
        wanted = set(q.location_ids)
        for p in q.practitioner_ids:
            entries = [self._days[(p, day)] for day in days]
            locations = sorted({loc for e in entries for loc in e.free})
            for loc in locations:
                if wanted and loc not in wanted:
                    continue
                free: list[Interval] = []
                for e in entries:  # days in order, each day's intervals sorted: no sort needed
                    for f in e.free.get(loc, ()):
                        if f.end <= window.start or f.start >= window.end:
                            continue
                        if f.start < window.start or f.end > window.end:
                            f = Interval(max(f.start, window.start), min(f.end, window.end))
                        if free and free[-1].end == f.start:  # re-join a period the day cut split
                            free[-1] = Interval(free[-1].start, f.end)
                        else:
                            free.append(f)
                if free:
                    out.append(ResourceAvailability(p, loc, free, []))
        return out
