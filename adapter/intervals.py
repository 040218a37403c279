"""Pure interval arithmetic on timezone-aware datetimes (no I/O; used by every layer).

All maths runs on absolute instants: a 20-minute visit is 20 real minutes even across a DST
change. Wall-clock concerns (09:00 local) are handled where legacy times are read, and every
datetime that reaches these functions is in UTC or a fixed offset, never a ZoneInfo (Python adds
timedeltas to ZoneInfo datetimes in wall-clock time).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from adapter.backends.protocol import Interval
from adapter.scheduling.domain import Span


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

    Both inputs may be unsorted and overlapping. ``subtract_spans`` (after ``merge_spans`` of ``free``) is the
    same operation on epoch-second spans, for the hot paths where datetimes would be too slow.
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


# -- the same on whole epoch seconds ---------------------------------------------------------------
# $find reads thousands of busy rows per request and counts every option in the window: comparing ints
# is several times cheaper than comparing aware datetimes, so the legacy read and the candidate search
# work on ``Span``s (``ResourceAvailability.spans()``). A test checks these give what the datetime
# functions above give.


def merge_spans(spans: Iterable[Span]) -> list[Span]:
    """Sort and coalesce overlapping or touching spans (``merge`` on epoch seconds)."""
    out: list[Span] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def subtract_spans(free: Sequence[Span], taken: Iterable[Span]) -> list[Span]:
    """``free`` (sorted, disjoint) minus ``taken`` (any order, may overlap).

    ``subtract`` on epoch seconds, except that ``free`` must already be sorted and disjoint (it is, on the
    candidate path), so the merge ``subtract`` does is skipped: ``subtract_spans(merge_spans(f), t)`` is
    ``subtract(f, t)``.
    """
    cuts = sorted(taken)
    if not cuts:
        return list(free)
    out: list[Span] = []
    i = 0
    n = len(cuts)
    for start, end in free:
        while i < n and cuts[i][1] <= start:
            i += 1
        j = i
        while start < end and j < n and cuts[j][0] < end:
            c_start, c_end = cuts[j]
            if c_start > start:
                out.append((start, c_start))
            if c_end > start:
                start = c_end
            j += 1
        if start < end:
            out.append((start, end))
    return out
