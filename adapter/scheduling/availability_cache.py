"""A short-lived, per-worker cache of the legacy calendar, by (practitioner, UTC day).

Why: ``$find`` must count every option in the window (``Bundle.total``), so it reads the whole
window's working time and bookings on every call; mapping a few hundred legacy rows through the
declarative mapping costs ~5 us each, which dominated ``$find`` (~15 ms of ~20 ms). Patient
portals ask for overlapping windows all day long, so a day-granular cache helps real traffic,
not only repeated identical requests.

Why it is safe:
* holds are never cached here (the service reads them from the state store on every call; on one
  host ``ThreadedStateStore`` keeps what it read only until the holds counter moves), so a held slot
  is never offered (ITI-115 SHALL);
* every change made through the adapter (book, reschedule, cancel) bumps a calendar version in the
  shared state store; every worker compares it on each call and drops its cache when it moved, so
  the adapter's own bookings are visible immediately to all workers;
* changes made directly in the legacy system become visible within ``ttl`` seconds; until then a
  client may be offered a slot that ``$hold``/``$book`` then refuse with 409, because those always
  re-check the legacy calendar under the booking lock. Nothing is ever double-booked by staleness.

Loading (issue 14.2):
* single flight: per worker, one load per (practitioner, day) runs at a time; a request that needs a
  day another request is loading awaits that load instead of asking the legacy system again, so N
  concurrent ``$find`` on a cold cache cost one legacy query, not N;
* one legacy query per request covers every missing (practitioner, day) of its window (all the
  practitioners, the whole day range), never one query per day;
* the staleness rule (stale-while-revalidate): an entry is *fresh* for ``ttl / 2`` seconds; from then
  until ``ttl`` it is still served, and the first request that sees it so starts one background
  refresh (requests never wait for it); older than ``ttl`` it is never served: the request waits for
  a load (shared with any other request for that day). So the bound above is unchanged: what the
  legacy system changed is offered for at most ``ttl`` seconds, and no request waits behind a legacy
  round trip while a copy younger than ``ttl`` exists;
* a load that was running when the calendar version moved answers its own request but is not stored,
  so an adapter write is never hidden by a load that read the calendar before it.

The version is read without I/O (issue 14): ``version`` is the state store's change counter
(``scheduling.change_counters``), a memory read; an awaitable version function is still accepted.
``generation`` moves whenever what this cache would answer may have changed (its days dropped, or a
load stored): whoever memoises answers derived from it (the ``$find`` response memo of the FHIR layer)
keys them by it, so a memoised answer is never older than what this cache would serve.

"""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from adapter.backends.protocol import AvailabilityQuery, Interval, SchedulingBackend
from adapter.scheduling.candidates import FreeTime, Span, anchor_of, free_time, subtract_spans

log = logging.getLogger(__name__)

_DAY = 86400
_MAX_ENTRIES = 200_000

Key = tuple[str, int]  # (practitioner id, UTC day start in epoch seconds)


@dataclass(slots=True)
class _DayEntry:
    loaded: float
    free: dict[str, list[Span]] = field(default_factory=dict)  # location id -> bookable spans in the day
    anchors: dict[str, set[int]] = field(default_factory=dict)  # location id -> grid anchors of those spans


class AvailabilityCache:
    def __init__(
        self,
        backend: SchedulingBackend,
        version: Callable[[], int | Awaitable[int]],
        ttl_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self._version = version
        self.ttl = ttl_seconds
        self._clock = clock
        self._seen_version: int | None = None
        self._days: dict[Key, _DayEntry] = {}
        # Loads in flight, by the keys they fill; a key maps to the one load that will fill it.
        self._inflight: dict[Key, asyncio.Task[dict[Key, _DayEntry]]] = {}
        self._refreshing: set[asyncio.Task[dict[Key, _DayEntry]]] = set()
        # Bumped whenever the stored days are dropped: a load started before keeps its answer to itself.
        self._generation = 0
        self._stored_loads = 0  # loads stored since the cache began (see ``generation``)

    @property
    def generation(self) -> tuple[int, int]:
        """Changes whenever an answer of this cache may differ from an earlier one (days dropped or loaded)."""
        return (self._generation, self._stored_loads)

    def clear(self) -> None:
        self._days.clear()
        self._inflight.clear()
        self._generation += 1

    async def free_time(self, q: AvailabilityQuery) -> list[FreeTime]:
        """Bookable time (working time minus absences minus bookings; holds are the caller's)."""
        if self.ttl <= 0 or not q.practitioner_ids:
            return [free_time(ra) for ra in await self.backend.availability(q)]
        version = self._version()
        if inspect.isawaitable(version):
            version = await version
        if version != self._seen_version or len(self._days) > _MAX_ENTRIES:
            self.clear()
            self._seen_version = version
        now = self._clock()
        w_start, w_end = int(q.window.start.timestamp()), int(q.window.end.timestamp())
        days = list(range(w_start - w_start % _DAY, w_end, _DAY))
        fresh_for = self.ttl / 2
        stored = self._days
        keys = [(p, day) for p in q.practitioner_ids for day in days]
        not_fresh = [k for k in keys if (e := stored.get(k)) is None or now - e.loaded > fresh_for]
        if not not_fresh:  # the common case: everything fresh, nothing to load or refresh
            return self._assemble(q, days, w_start, w_end, stored)
        pending = set(not_fresh)
        # Taken before any await: a version change meanwhile may drop the stored days.
        view: dict[Key, _DayEntry] = {k: stored[k] for k in keys if k not in pending}
        waits: set[asyncio.Task[dict[Key, _DayEntry]]] = set()
        missing: list[Key] = []
        due: list[Key] = []
        for key in not_fresh:
            entry = stored.get(key)
            if entry is not None and now - entry.loaded <= self.ttl:
                view[key] = entry
                if key not in self._inflight:
                    due.append(key)
            elif (task := self._inflight.get(key)) is not None:
                waits.add(task)
            else:
                missing.append(key)
        if due:  # stale but servable: refresh in the background, answer from the copy
            task = self._start_load(due, now)
            self._refreshing.add(task)
            task.add_done_callback(self._refresh_done)
        if missing:
            waits.add(self._start_load(missing, now))
        for task in waits:
            loaded = await asyncio.shield(task)  # a cancelled request must not cancel a shared load
            for key in loaded.keys() & pending:
                view.setdefault(key, loaded[key])
        return self._assemble(q, days, w_start, w_end, view)

    def _start_load(self, keys: list[Key], now: float) -> asyncio.Task[dict[Key, _DayEntry]]:
        practitioners = tuple(dict.fromkeys(p for p, _ in keys))
        first, last = min(d for _, d in keys), max(d for _, d in keys)
        task = asyncio.ensure_future(self._load(practitioners, first, last, now, self._generation))
        for key in keys:
            self._inflight[key] = task
        return task

    def _refresh_done(self, task: asyncio.Task[dict[Key, _DayEntry]]) -> None:
        self._refreshing.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # The stale copy stays until ``ttl``; the next request past it loads (and reports) itself.
            log.warning("availability cache: background refresh failed (%s)", exc)

    async def _load(
        self, practitioners: tuple[str, ...], first: int, last: int, now: float, generation: int
    ) -> dict[Key, _DayEntry]:
        """One legacy query for every day ``first``..``last`` of every practitioner; stored if still current."""
        days = range(first, last + _DAY, _DAY)
        loaded: dict[Key, _DayEntry] = {(p, day): _DayEntry(now) for p in practitioners for day in days}
        try:
            utc = dt.UTC
            span = Interval(dt.datetime.fromtimestamp(first, utc), dt.datetime.fromtimestamp(last + _DAY, utc))
            fetched = await self.backend.availability(AvailabilityQuery(span, practitioners, ()))
            for ra in fetched:
                # Stored already minus the bookings: per request only holds remain to subtract.
                free, busy, anchor_seconds = ra.spans()  # epoch seconds as the SQL backend has them
                bookable = subtract_spans(free, busy)
                anchors = sorted(anchor_seconds)
                for start, end in bookable:
                    # Each piece keeps the anchor of its period, which may lie on an earlier day.
                    anchor = anchor_of(anchors, start)
                    day = start - start % _DAY
                    while day < end:
                        piece = (max(start, day), min(end, day + _DAY))
                        entry = loaded.get((ra.practitioner_id, day))
                        if entry is not None and piece[0] < piece[1]:
                            entry.free.setdefault(ra.location_id, []).append(piece)
                            if anchor is not None:
                                entry.anchors.setdefault(ra.location_id, set()).add(anchor)
                        day += _DAY
            if generation == self._generation:
                self._days.update(loaded)
                self._stored_loads += 1
            return loaded
        finally:
            if generation == self._generation:
                me = asyncio.current_task()
                for key in loaded:
                    if self._inflight.get(key) is me:
                        del self._inflight[key]

    def _assemble(
        self, q: AvailabilityQuery, days: list[int], w_start: int, w_end: int, view: dict[Key, _DayEntry]
    ) -> list[FreeTime]:
        out = []
        wanted = set(q.location_ids)
        for p in q.practitioner_ids:
            entries = [view[(p, day)] for day in days]
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
