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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from adapter.backends.protocol import AvailabilityQuery, Interval, SchedulingBackend
from adapter.scheduling.candidates import FreeTime, Span, anchor_of, free_time, subtract_spans, to_spans

_DAY = 86400
_MAX_ENTRIES = 200_000


@dataclass(slots=True)
class _DayEntry:
    loaded: float
    free: dict[str, list[Span]] = field(default_factory=dict)  # location id -> bookable spans in the day
    anchors: dict[str, set[int]] = field(default_factory=dict)  # location id -> grid anchors of those spans


class AvailabilityCache:
    def __init__(
        self,
        backend: SchedulingBackend,
        version: Callable[[], Awaitable[int]],
        ttl_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self._version = version
        self.ttl = ttl_seconds
        self._clock = clock
        self._seen_version: int | None = None
        self._days: dict[tuple[str, int], _DayEntry] = {}

    def clear(self) -> None:
        self._days.clear()

    async def free_time(self, q: AvailabilityQuery) -> list[FreeTime]:
        """Bookable time (working time minus absences minus bookings; holds are the caller's)."""
        if self.ttl <= 0 or not q.practitioner_ids:
            return [free_time(ra) for ra in await self.backend.availability(q)]
        version = await self._version()
        if version != self._seen_version or len(self._days) > _MAX_ENTRIES:
            self._days.clear()
            self._seen_version = version
        now = self._clock()
        w_start, w_end = int(q.window.start.timestamp()), int(q.window.end.timestamp())
        days = list(range(w_start - w_start % _DAY, w_end, _DAY))
        stale = [
            p
            for p in q.practitioner_ids
            if any((e := self._days.get((p, day))) is None or now - e.loaded > self.ttl for day in days)
        ]
        if stale:
            await self._load(tuple(stale), days, now)
        return self._assemble(q, days, w_start, w_end)

    async def _load(self, practitioners: tuple[str, ...], days: list[int], now: float) -> None:
        utc = dt.UTC
        span = Interval(dt.datetime.fromtimestamp(days[0], utc), dt.datetime.fromtimestamp(days[-1] + _DAY, utc))
        fetched = await self.backend.availability(AvailabilityQuery(span, practitioners, ()))
        for p in practitioners:
            for day in days:
                self._days[(p, day)] = _DayEntry(now)
        for ra in fetched:
            # Stored already minus the bookings: per request only holds remain to subtract.
            bookable = subtract_spans(to_spans(ra.free), to_spans(ra.busy))
            anchors = sorted(int(a.timestamp()) for a in ra.anchors)
            for start, end in bookable:
                # Each piece keeps the anchor of its period, which may lie on an earlier day.
                anchor = anchor_of(anchors, start)
                day = start - start % _DAY
                while day < end:
                    piece = (max(start, day), min(end, day + _DAY))
                    entry = self._days.get((ra.practitioner_id, day))
                    if entry is not None and piece[0] < piece[1]:
                        entry.free.setdefault(ra.location_id, []).append(piece)
                        if anchor is not None:
                            entry.anchors.setdefault(ra.location_id, set()).add(anchor)
                    day += _DAY

    def _assemble(self, q: AvailabilityQuery, days: list[int], w_start: int, w_end: int) -> list[FreeTime]:
        out = []
        wanted = set(q.location_ids)
        for p in q.practitioner_ids:
            entries = [self._days[(p, day)] for day in days]
            for loc in sorted({loc for e in entries for loc in e.free}):
                if wanted and loc not in wanted:
                    continue
                spans: list[Span] = []
                for e in entries:  # days in order, each day's spans sorted: no sort needed
                    for start, end in e.free.get(loc, ()):
                        if end <= w_start or start >= w_end:
                            continue
                        if start < w_start:
                            start = w_start
                        if end > w_end:
                            end = w_end
                        if spans and spans[-1][1] == start:  # re-join a period the day cut split
                            spans[-1] = (spans[-1][0], end)
                        else:
                            spans.append((start, end))
                if spans:
                    anchors = sorted({a for e in entries for a in e.anchors.get(loc, ())})
                    out.append(FreeTime(p, loc, spans, anchors))
        return out
