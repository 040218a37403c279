"""Mapping functions for recurring legacy events (used through ``repeat:`` with the ``python:`` converter).

A legacy calendar often stores a repeating event once, with a rule. ``repeat:`` in an availability
section names an expression that returns the local dates a row occurs on; the engine then evaluates
the section's fields once per date (input ``occurrence``). The engine knows nothing about any
particular rule format: the functions here do.

``openemr_occurrences``: OpenEMR's ``openemr_postcalendar_events`` rule. Inputs, in this order::

    {pc_eventDate, END_DATE, pc_recurrtype, pc_recurrspec, window_start, window_end
     |python:adapter.mapping.recurrence.openemr_occurrences}

``END_DATE`` is ``pc_endDate`` with OpenEMR's "no end" value ``0000-00-00`` turned into NULL in SQL
(``CASE WHEN pc_endDate > '1000-01-01' THEN pc_endDate END``). ``pc_recurrspec`` is the PHP-serialized
array OpenEMR writes. Supported (``pc_recurrtype``):

* ``0`` no repeat: ``pc_eventDate`` only;
* ``1`` "repeat every N units": ``event_repeat_freq`` = N, ``event_repeat_freq_type`` = 0 day,
  1 week, 2 month (same day of month; months without that day are skipped), 3 year, 4 work day
  (every N-th Monday..Friday);
* ``2`` "repeat on": the ``event_repeat_on_num``-th (1..4, 5 = last) ``event_repeat_on_day``
  (0 = Sunday .. 6 = Saturday) of every ``event_repeat_on_freq``-th month;
* ``3`` "repeat on days": ``event_repeat_freq`` is a comma-separated list of weekdays as OpenEMR's
  day check boxes number them (1 = Sunday .. 7 = Saturday), every week.

``exdate`` ("YYYYMMDD,YYYYMMDD"), the occurrences deleted one by one in OpenEMR, are left out. The
result covers the local dates from the day before ``window_start`` (appointments crossing midnight)
to the day of ``window_end``, within ``pc_eventDate`` .. ``END_DATE``. An unknown type or
an unreadable rule raises ``ExpressionError``: a wrong calendar must not pass silently.
"""

from __future__ import annotations

import calendar
import datetime as dt
from typing import Any

from adapter.mapping.expressions import EvalContext, ExpressionError


def php_unserialize(text: str) -> Any:
    """PHP ``serialize()`` output -> Python (arrays become dicts; strings, ints, floats, booleans, null)."""
    data = text.encode("utf-8")
    value, pos = _php_value(data, 0)
    if data[pos:].strip():
        raise ExpressionError(f"php_unserialize: trailing data after position {pos}")
    return value


def _php_value(data: bytes, pos: int) -> tuple[Any, int]:
    try:
        kind = chr(data[pos])
        if kind == "N":
            return None, pos + 2
        if kind == "s":
            colon = data.index(b":", pos + 2)
            length = int(data[pos + 2 : colon])
            start = colon + 2
            return data[start : start + length].decode("utf-8"), start + length + 2
        if kind in "idb":
            end = data.index(b";", pos)
            raw = data[pos + 2 : end].decode()
            return (int(raw) if kind == "i" else float(raw) if kind == "d" else raw == "1"), end + 1
        if kind == "a":
            colon = data.index(b":", pos + 2)
            count = int(data[pos + 2 : colon])
            pos = colon + 2
            out: dict[Any, Any] = {}
            for _ in range(count):
                key, pos = _php_value(data, pos)
                out[key], pos = _php_value(data, pos)
            return out, pos + 1
    except (IndexError, ValueError) as exc:
        raise ExpressionError(f"php_unserialize: malformed value at position {pos}: {exc}") from exc
    raise ExpressionError(f"php_unserialize: unsupported type {kind!r} at position {pos}")


def _as_date(value: Any) -> dt.date | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    text = str(value).strip()
    if not text or text.startswith("0000"):
        return None
    return dt.date.fromisoformat(text[:10])


def _int(spec: dict[Any, Any], key: str, default: int) -> int:
    raw = spec.get(key)
    try:
        return int(str(raw).strip()) if raw not in (None, "") else default
    except ValueError as exc:
        raise ExpressionError(f"openemr recurrence: {key} = {raw!r} is not a number") from exc


def _nth_weekday(year: int, month: int, weekday_sun0: int, nth: int) -> dt.date | None:
    """The nth (1..4, 5 = last) weekday (0 = Sunday) of a month."""
    py_weekday = (weekday_sun0 - 1) % 7  # Python: 0 = Monday
    days = [
        d for d in range(1, calendar.monthrange(year, month)[1] + 1) if dt.date(year, month, d).weekday() == py_weekday
    ]
    if nth >= 5:
        return dt.date(year, month, days[-1])
    return dt.date(year, month, days[nth - 1]) if nth <= len(days) else None


def openemr_dates(
    event_date: dt.date, end_date: dt.date | None, recurrtype: int, spec_text: str | None, first: dt.date, last: dt.date
) -> list[dt.date]:
    """The dates in ``first`` .. ``last`` on which an OpenEMR event occurs (see the module docstring)."""
    if recurrtype == 0:
        return [event_date] if first <= event_date <= last else []
    spec = php_unserialize(spec_text) if spec_text else {}
    if not isinstance(spec, dict):
        raise ExpressionError("openemr recurrence: pc_recurrspec is not a serialized array")
    excluded = {str(x).strip() for x in str(spec.get("exdate") or "").split(",") if str(x).strip()}
    stop = min(last, end_date) if end_date else last
    lo = max(first, event_date)
    out: list[dt.date] = []

    def keep(day: dt.date) -> None:
        if lo <= day <= stop and day.strftime("%Y%m%d") not in excluded:
            out.append(day)

    if recurrtype == 1:
        freq = max(1, _int(spec, "event_repeat_freq", 1))
        unit = _int(spec, "event_repeat_freq_type", 0)
        if unit in (0, 1):
            step = freq * (7 if unit == 1 else 1)
            offset = (lo - event_date).days
            day = event_date + dt.timedelta(days=-(-offset // step) * step) if offset > 0 else event_date
            while day <= stop:
                keep(day)
                day += dt.timedelta(days=step)
        elif unit in (2, 3):
            months = freq * (12 if unit == 3 else 1)
            index = 0
            while True:
                total = event_date.month - 1 + index * months
                year, month = event_date.year + total // 12, total % 12 + 1
                if dt.date(year, month, 1) > stop:
                    break
                if event_date.day <= calendar.monthrange(year, month)[1]:
                    keep(dt.date(year, month, event_date.day))
                index += 1
        elif unit == 4:
            count, day = 0, event_date
            while day <= stop:
                if day.weekday() < 5:
                    if count % freq == 0:
                        keep(day)
                    count += 1
                day += dt.timedelta(days=1)
        else:
            raise ExpressionError(f"openemr recurrence: event_repeat_freq_type {unit} is not supported")
    elif recurrtype == 2:
        nth = _int(spec, "event_repeat_on_num", 1)
        weekday = _int(spec, "event_repeat_on_day", 0)
        months = max(1, _int(spec, "event_repeat_on_freq", 1))
        index = 0
        while True:
            total = event_date.month - 1 + index * months
            year, month = event_date.year + total // 12, total % 12 + 1
            if dt.date(year, month, 1) > stop:
                break
            nth_day = _nth_weekday(year, month, weekday, nth)
            if nth_day is not None:
                keep(nth_day)
            index += 1
    elif recurrtype == 3:
        raw = str(spec.get("event_repeat_freq") or "")
        try:
            wanted = {(int(d) - 2) % 7 for d in raw.split(",") if d.strip()}  # 1 = Sunday -> Python 6
        except ValueError as exc:
            raise ExpressionError(f"openemr recurrence: event_repeat_freq {raw!r} is not a list of days") from exc
        day = lo
        while day <= stop:
            if day.weekday() in wanted:
                keep(day)
            day += dt.timedelta(days=1)
    else:
        raise ExpressionError(f"openemr recurrence: pc_recurrtype {recurrtype} is not supported")
    return out


def openemr_occurrences(value: Any, ctx: EvalContext) -> list[dt.date]:
    """``repeat:`` function for OpenEMR events: (pc_eventDate, END_DATE, pc_recurrtype, pc_recurrspec,
    window_start, window_end) -> local dates of the occurrences in the window."""
    if not isinstance(value, tuple) or len(value) != 6:
        raise ExpressionError(
            "openemr_occurrences takes 6 inputs: pc_eventDate, END_DATE, pc_recurrtype, pc_recurrspec, "
            "window_start, window_end"
        )
    event, end, rtype, spec, w_start, w_end = value
    event_date = _as_date(event)
    if event_date is None:
        return []
    first = w_start.astimezone(ctx.zone).date() - dt.timedelta(days=1)
    last = w_end.astimezone(ctx.zone).date()
    return openemr_dates(event_date, _as_date(end), int(rtype or 0), spec, first, last)
