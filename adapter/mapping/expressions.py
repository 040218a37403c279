"""Value expressions: the one small language mappings use to turn legacy values into FHIR ones and back.

An expression is a string. ``"{COL}"`` yields the column's value unchanged (typed: an int stays an
int). ``"{COL|trim|upper}"`` pipes it through converters. ``"{A,B|local_datetime:yyyymmdd,hhmm}"``
feeds two inputs to one converter. Text around or between placeholders makes a string:
``"{TITLE|trim} {FIRST_NM|trim} {LAST_NM|trim}"`` concatenates (an empty/NULL part collapses its
surrounding spaces). A NULL input yields ``None`` unless a ``default:`` converter supplies one; the
template renderer omits elements whose value is ``None``.

Converters are a closed, documented set (``CONVERTERS``) so a mapping can be validated before any
query runs. What no converter covers goes through ``python:module.function`` (the escape hatch):
the function receives the value and the evaluation context and returns the new value.
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from adapter.mapping.codes import CodeTables
from adapter.text import fold

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


class ExpressionError(ValueError):
    """A mapping expression is malformed or a converter was misused (reported with file:line)."""


@dataclass(frozen=True, slots=True)
class EvalContext:
    zone: ZoneInfo
    codes: CodeTables


@dataclass(frozen=True, slots=True)
class _Step:
    name: str
    args: tuple[str, ...]
    func: Callable[..., Any]


@dataclass(frozen=True, slots=True)
class _Placeholder:
    inputs: tuple[str, ...]
    steps: tuple[_Step, ...]

    def evaluate(self, row: Mapping[str, Any], ctx: EvalContext) -> Any:
        if len(self.inputs) == 1:
            value: Any = _lookup(row, self.inputs[0])
        else:
            value = tuple(_lookup(row, name) for name in self.inputs)
            if all(v is None for v in value):
                value = None
        for step in self.steps:
            if value is None and step.name not in _NULL_AWARE:
                continue  # NULL passes through to a later default:
            value = step.func(value, step.args, ctx)
        return value


def _lookup(row: Mapping[str, Any], name: str) -> Any:
    if name.startswith("'") and name.endswith("'"):
        return name[1:-1]
    if name in row:
        return row[name]
    # Databases disagree on the case of unquoted column names (PostgreSQL folds to lower case).
    lowered = name.lower()
    for key, value in row.items():
        if key.lower() == lowered:
            return value
    raise ExpressionError(f"no column or value named {name!r} (available: {', '.join(sorted(row)) or 'none'})")


class Expression:
    """A compiled expression; compile once at mapping load, evaluate per row."""

    __slots__ = ("source", "_parts", "_whole")

    def __init__(self, source: str) -> None:
        self.source = source
        parts: list[str | _Placeholder] = []
        pos = 0
        for match in _PLACEHOLDER.finditer(source):
            if match.start() > pos:
                parts.append(source[pos : match.start()])
            parts.append(_compile_placeholder(match.group(1)))
            pos = match.end()
        if pos < len(source):
            parts.append(source[pos:])
        if "{" in "".join(p for p in parts if isinstance(p, str)) or "}" in "".join(
            p for p in parts if isinstance(p, str)
        ):
            raise ExpressionError(f"unbalanced braces in expression {source!r}")
        self._parts = tuple(parts)
        self._whole = parts[0] if len(parts) == 1 and isinstance(parts[0], _Placeholder) else None

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(
            name for p in self._parts if isinstance(p, _Placeholder) for name in p.inputs if not name.startswith("'")
        )

    def evaluate(self, row: Mapping[str, Any], ctx: EvalContext) -> Any:
        if self._whole is not None:
            return self._whole.evaluate(row, ctx)
        if not any(isinstance(p, _Placeholder) for p in self._parts):
            return self.source
        pieces: list[str] = []
        for part in self._parts:
            if isinstance(part, str):
                pieces.append(part)
            else:
                value = part.evaluate(row, ctx)
                pieces.append("" if value is None else str(value))
        # A NULL part must not leave doubled or dangling spaces ("Dr.  Smith").
        text = " ".join("".join(pieces).split())
        return text or None

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"


def _compile_placeholder(body: str) -> _Placeholder:
    segments = [s.strip() for s in body.split("|")]
    inputs = tuple(s.strip() for s in segments[0].split(",") if s.strip())
    if not inputs:
        raise ExpressionError(f"placeholder {{{body}}} names no input column")
    steps = []
    for seg in segments[1:]:
        name, _, arg = seg.partition(":")
        name = name.strip()
        if name not in CONVERTERS:
            raise ExpressionError(f"unknown converter {name!r}; expected one of: {', '.join(sorted(CONVERTERS))}")
        args = tuple(a.strip() for a in arg.split(",")) if arg else ()
        if name == "python":
            func = _resolve_python(arg.strip())
            steps.append(_Step(name, args, lambda v, a, ctx, _f=func: _f(v, ctx)))
        else:
            steps.append(_Step(name, args, CONVERTERS[name]))
    return _Placeholder(inputs, tuple(steps))


def _resolve_python(target: str) -> Callable[[Any, EvalContext], Any]:
    module_name, _, func_name = target.rpartition(".")
    if not module_name:
        raise ExpressionError(f"python converter needs 'module.function', got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ExpressionError(f"python converter: cannot import module {module_name!r}: {exc}") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ExpressionError(f"python converter: {module_name!r} has no function {func_name!r}")
    converter: Callable[[Any, EvalContext], Any] = func
    return converter


_NO_CODES = CodeTables()

# --- converters -------------------------------------------------------------------------------
# Each takes (value, args, ctx). They are deliberately small; compose them in the mapping.


def _need_args(name: str, args: tuple[str, ...], n: int) -> None:
    if len(args) != n:
        raise ExpressionError(f"converter {name!r} takes {n} argument(s), got {len(args)}")


def _c_trim(v: Any, a: tuple[str, ...], ctx: EvalContext) -> Any:
    text = str(v).strip()
    return text or None


def _c_pad_right(v: Any, a: tuple[str, ...], ctx: EvalContext) -> str:
    _need_args("pad_right", a, 1)
    return str(v).ljust(int(a[0]))


def _c_zfill(v: Any, a: tuple[str, ...], ctx: EvalContext) -> str:
    _need_args("zfill", a, 1)
    return str(v).zfill(int(a[0]))


def _c_default(v: Any, a: tuple[str, ...], ctx: EvalContext) -> Any:
    return v if v not in (None, "") else ",".join(a)


_ASCII_INT = re.compile(r"[+-]?[0-9]{1,19}")


def _c_int(v: Any, a: tuple[str, ...], ctx: EvalContext) -> int:
    """A whole number in ASCII digits that a SQL integer can hold: ``int`` 64-bit, ``int:32`` 32-bit
    (Python's int() also reads other scripts' digits and unbounded lengths, which then overflow the
    database driver or the column's type)."""
    bits = int(a[0]) if a else 64
    if bits not in (32, 64):
        raise ExpressionError(f"int: the width must be 32 or 64, got {a[0]!r}")
    if isinstance(v, int) and not isinstance(v, bool):
        value = v
    else:
        text = str(v).strip()
        if not _ASCII_INT.fullmatch(text):
            raise ExpressionError(f"int: {str(v)[:40]!r} is not a whole number")
        value = int(text)
    if not -(2 ** (bits - 1)) <= value < 2 ** (bits - 1):
        raise ExpressionError(f"int: {str(v)[:40]!r} is out of the {bits}-bit integer range")
    return value


def _ascii_digits(text: str, n: int) -> bool:
    return len(text) == n and text.isascii() and text.isdigit()


def _as_date(v: Any) -> dt.date:
    if isinstance(v, dt.datetime):
        return v.date()
    if isinstance(v, dt.date):
        return v
    text = str(v).strip()
    if _ascii_digits(text, 8):
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    return dt.date.fromisoformat(text[:10])


def _c_yyyymmdd(v: Any, a: tuple[str, ...], ctx: EvalContext) -> dt.date | None:
    text = str(v).strip()
    if text in ("", "0", "00000000"):
        return None
    if not _ascii_digits(text, 8):
        raise ExpressionError(f"yyyymmdd: {v!r} is not a YYYYMMDD date")
    return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))


def _c_hhmm(v: Any, a: tuple[str, ...], ctx: EvalContext) -> dt.timedelta:
    """HHMM integer or string -> offset from midnight (a timedelta, so 2400 = end of day)."""
    text = str(v).strip().zfill(4)
    if not _ascii_digits(text, 4) or int(text[2:]) > 59 or int(text[:2]) > 24:
        raise ExpressionError(f"hhmm: {v!r} is not an HHMM time")
    return dt.timedelta(hours=int(text[:2]), minutes=int(text[2:]))


def _c_time(v: Any, a: tuple[str, ...], ctx: EvalContext) -> dt.timedelta:
    """A SQL TIME (time, timedelta as some ODBC drivers return it, or 'HH:MM[:SS]')."""
    if isinstance(v, dt.timedelta):
        return v
    if isinstance(v, dt.time):
        return dt.timedelta(hours=v.hour, minutes=v.minute, seconds=v.second)
    parts = [int(p) for p in str(v).strip().split(":")]
    while len(parts) < 3:
        parts.append(0)
    return dt.timedelta(hours=parts[0], minutes=parts[1], seconds=parts[2])


def _c_date(v: Any, a: tuple[str, ...], ctx: EvalContext) -> dt.date:
    return _as_date(v)


def _c_minutes(v: Any, a: tuple[str, ...], ctx: EvalContext) -> dt.timedelta:
    return dt.timedelta(minutes=int(v))


def _c_seconds(v: Any, a: tuple[str, ...], ctx: EvalContext) -> dt.timedelta:
    return dt.timedelta(seconds=int(v))


def attach_zone(naive: dt.datetime, zone: dt.tzinfo) -> dt.datetime:
    """Interpret a legacy wall-clock time in ``zone``, DST-correctly.

    Ambiguous times (the repeated hour) take the first occurrence (fold=0). Times in the
    skipped hour do not exist; they are moved forward by the gap, as a wall clock would be.
    """
    aware = naive.replace(tzinfo=zone, fold=0)
    round_trip = aware.astimezone(dt.UTC).astimezone(zone)
    if round_trip.replace(tzinfo=None) != naive:  # nonexistent local time
        return round_trip
    return aware


def _c_local_datetime(v: Any, a: tuple[str, ...], ctx: EvalContext) -> dt.datetime | None:
    """Legacy local date (+ optional time-of-day) in the mapping zone -> an instant (UTC datetime).

    Arguments name the shape of each input: date shapes ``yyyymmdd``, ``date``, ``datetime``;
    time shapes ``hhmm``, ``time``. With one input of shape ``datetime`` a naive timestamp is
    interpreted as is.

    Memoized: the conversion is a pure function of (values, shapes, zone) and legacy calendars
    repeat the same few thousand date/time pairs, while each conversion costs ~15 us (zone rules).
    """
    values = v if isinstance(v, tuple) else (v,)
    try:
        return _local_instant(values, a, ctx.zone)
    except TypeError:  # an unhashable driver value: convert without the cache
        unwrapped: dt.datetime | None = _local_instant.__wrapped__(values, a, ctx.zone)
        return unwrapped


@functools.lru_cache(maxsize=65536)
def _local_instant(values: tuple[Any, ...], a: tuple[str, ...], zone: ZoneInfo) -> dt.datetime | None:
    ctx = EvalContext(zone, _NO_CODES)
    if len(a) != len(values):
        raise ExpressionError(f"local_datetime: {len(values)} input(s) but {len(a)} shape(s) {a}")
    if any(x is None for x in values):
        return None
    if a[0] == "datetime":
        naive = values[0] if isinstance(values[0], dt.datetime) else dt.datetime.fromisoformat(str(values[0]))
        base, offset = naive.replace(tzinfo=None), dt.timedelta(0)
    else:
        day = _c_yyyymmdd(values[0], (), ctx) if a[0] == "yyyymmdd" else _as_date(values[0])
        if day is None:
            return None
        base = dt.datetime.combine(day, dt.time())
        offset = dt.timedelta(0)
    if len(values) > 1:
        shape = a[1]
        if shape == "hhmm":
            offset = _c_hhmm(values[1], (), ctx)
        elif shape == "time":
            offset = _c_time(values[1], (), ctx)
        else:
            raise ExpressionError(f"local_datetime: unknown time shape {shape!r}; expected hhmm or time")
    # Wall-clock arithmetic first, then the zone: 09:00 stays 09:00 local on both sides of DST.
    # The result is an instant in UTC: Python does wall-clock arithmetic on ZoneInfo datetimes
    # (01:50 EST + 10 min = a nonexistent 02:00), so nothing downstream may compute in local time.
    return attach_zone(base + offset, ctx.zone).astimezone(dt.UTC)


def _c_local(v: Any, a: tuple[str, ...], ctx: EvalContext) -> dt.datetime:
    """Aware datetime -> naive wall-clock time in the mapping zone (what legacy columns hold)."""
    local: dt.datetime = v.astimezone(ctx.zone).replace(tzinfo=None)
    return local


def _c_local_date(v: Any, a: tuple[str, ...], ctx: EvalContext) -> dt.date:
    return v.astimezone(ctx.zone).date() if isinstance(v, dt.datetime) else _as_date(v)


def _c_to_yyyymmdd(v: Any, a: tuple[str, ...], ctx: EvalContext) -> int:
    d = _c_local_date(v, a, ctx)
    return d.year * 10000 + d.month * 100 + d.day


def _c_to_hhmm(v: Any, a: tuple[str, ...], ctx: EvalContext) -> int:
    t = v.astimezone(ctx.zone) if isinstance(v, dt.datetime) and v.tzinfo else v
    return t.hour * 100 + t.minute


def _c_format(v: Any, a: tuple[str, ...], ctx: EvalContext) -> str:
    if not a:
        raise ExpressionError("format needs a strftime pattern, e.g. format:%Y%m%d")
    fmt = ",".join(a)
    if isinstance(v, dt.datetime) and v.tzinfo is not None:
        v = v.astimezone(ctx.zone)
    text: str = v.strftime(fmt)
    return text


def _c_fhir_date(v: Any, a: tuple[str, ...], ctx: EvalContext) -> str:
    return _as_date(v).isoformat()


def _c_str(v: Any, a: tuple[str, ...], ctx: EvalContext) -> str:
    return str(v)


def _c_upper(v: Any, a: tuple[str, ...], ctx: EvalContext) -> str:
    return str(v).upper()


def _c_lower(v: Any, a: tuple[str, ...], ctx: EvalContext) -> str:
    return str(v).lower()


def _c_title(v: Any, a: tuple[str, ...], ctx: EvalContext) -> str:
    return str(v).title()


def _c_code(v: Any, a: tuple[str, ...], ctx: EvalContext) -> Any:
    _need_args("code", a, 1)
    return ctx.codes.to_fhir(a[0], str(v).strip())


def _c_code_or_none(v: Any, a: tuple[str, ...], ctx: EvalContext) -> Any:
    _need_args("code?", a, 1)
    return ctx.codes.to_fhir(a[0], str(v).strip(), missing_ok=True)


def _c_legacy_code(v: Any, a: tuple[str, ...], ctx: EvalContext) -> Any:
    _need_args("legacy_code", a, 1)
    return ctx.codes.to_legacy(a[0], v)


def _c_legacy_code_or_none(v: Any, a: tuple[str, ...], ctx: EvalContext) -> Any:
    _need_args("legacy_code?", a, 1)
    try:
        return ctx.codes.to_legacy(a[0], v)
    except LookupError:
        return None


def _c_add_days(v: Any, a: tuple[str, ...], ctx: EvalContext) -> Any:
    _need_args("add_days", a, 1)
    return v + dt.timedelta(days=int(a[0]))


def _c_join(v: Any, a: tuple[str, ...], ctx: EvalContext) -> str | None:
    sep = ",".join(a) if a else " "
    values = v if isinstance(v, tuple) else (v,)
    return sep.join(str(x).strip() for x in values if x not in (None, "")) or None


def _c_fold(v: Any, a: tuple[str, ...], ctx: EvalContext) -> str:
    """Case- and accent-insensitive form for FHIR string matching."""
    return fold(str(v))


def _c_truncate(v: Any, a: tuple[str, ...], ctx: EvalContext) -> str:
    """Cut a text to the legacy column's width (``truncate:40``), so a long note never fails a write."""
    _need_args("truncate", a, 1)
    return str(v)[: int(a[0])]


CONVERTERS: dict[str, Callable[..., Any]] = {
    "trim": _c_trim,
    "pad_right": _c_pad_right,
    "zfill": _c_zfill,
    "default": _c_default,
    "int": _c_int,
    "str": _c_str,
    "upper": _c_upper,
    "lower": _c_lower,
    "title": _c_title,
    "fold": _c_fold,
    "yyyymmdd": _c_yyyymmdd,
    "hhmm": _c_hhmm,
    "time": _c_time,
    "date": _c_date,
    "minutes": _c_minutes,
    "seconds": _c_seconds,
    "local_datetime": _c_local_datetime,
    "local": _c_local,
    "local_date": _c_local_date,
    "to_yyyymmdd": _c_to_yyyymmdd,
    "to_hhmm": _c_to_hhmm,
    "format": _c_format,
    "fhir_date": _c_fhir_date,
    "code": _c_code,
    "code?": _c_code_or_none,
    "legacy_code": _c_legacy_code,
    "legacy_code?": _c_legacy_code_or_none,
    "add_days": _c_add_days,
    "join": _c_join,
    "truncate": _c_truncate,
    "python": lambda v, a, ctx: v,  # replaced per use by the resolved function
}

_NULL_AWARE = {"default", "join", "local_datetime", "python", "legacy_code?"}


def compile_template(value: Any) -> Any:
    """Compile every string in a nested dict/list template into an Expression."""
    if isinstance(value, str):
        return Expression(value) if "{" in value else value
    if isinstance(value, list):
        return [compile_template(v) for v in value]
    if isinstance(value, dict):
        return {k: compile_template(v) for k, v in value.items()}
    return value


def render_template(template: Any, row: Mapping[str, Any], ctx: EvalContext) -> Any:
    """Render a compiled template; ``None`` values and empty containers are dropped."""
    if isinstance(template, Expression):
        return template.evaluate(row, ctx)
    if isinstance(template, list):
        items = [r for r in (render_template(v, row, ctx) for v in template) if r not in (None, {}, [])]
        return items or None
    if isinstance(template, dict):
        rendered = {k: render_template(v, row, ctx) for k, v in template.items()}
        out = {k: v for k, v in rendered.items() if v not in (None, {}, [])}
        return out or None
    return template
