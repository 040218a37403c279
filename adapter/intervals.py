"""Pure interval arithmetic on timezone-aware datetimes (no I/O; used by every layer).

All maths runs on absolute instants: a 20-minute visit is 20 real minutes even across a DST
change. Wall-clock concerns (09:00 local) are handled where legacy times are read, and every
datetime that reaches these functions is in UTC or a fixed offset, never a ZoneInfo (Python adds
timedeltas to ZoneInfo datetimes in wall-clock time).
"""

from __future__ import annotations

from collections.abc import Iterable

from adapter.backends.protocol import Interval


def merge(intervals: Iterable[Interval]) -> list[Interval]:
    """Sort and coalesce overlapping or touching intervals."""
    out: list[Interval] = []
    for iv in sorted(intervals, key=lambda i: (i.start, i.end)):
        if out and iv.start <= out[-1].end:
            if iv.end > out[-1].end:
                out[-1] = Interval(out[-1].start, iv.end)
        else:
            out.append(iv)
    return out


def subtract(free: Iterable[Interval], taken: Iterable[Interval]) -> list[Interval]:
    """``free`` minus ``taken``: the parts of free time no taken interval touches.

    Both inputs may be unsorted and overlapping. ``adapter.scheduling.candidates.subtract_spans`` is the
    same operation on epoch-second spans for the candidate search, where datetimes would be too slow.
    """
    taken_sorted = merge(taken)
    result: list[Interval] = []
    for iv in merge(free):
        start = iv.start
        for t in taken_sorted:
            if t.end <= start:
                continue
            if t.start >= iv.end:
                break
            if t.start > start:
                result.append(Interval(start, t.start))
            start = max(start, t.end)
            if start >= iv.end:
                break
        if start < iv.end:
            result.append(Interval(start, iv.end))
    return result
