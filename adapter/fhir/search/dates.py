"""FHIR search ``date`` values: prefixes (eq, ne, gt, lt, ge, le, sa, eb, ap) and the range a precision implies."""

from __future__ import annotations

import datetime as dt

from adapter.backends.protocol import Interval
from adapter.fhir.outcome import FhirError
from adapter.fhir.parameters import parse_date_value, period_end
from adapter.mapping.expressions import attach_zone

PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")


def parse_date_range(text: str, zone: dt.tzinfo, name: str = "date") -> tuple[dt.datetime, dt.datetime]:
    """A FHIR search date/dateTime -> the range ``[lo, hi)`` its precision implies."""
    value = parse_date_value(text, name)
    end = period_end(value)
    if value.offset is None:
        return attach_zone(value.naive, zone), attach_zone(end, zone)
    tz = dt.timezone(value.offset)
    return value.naive.replace(tzinfo=tz), end.replace(tzinfo=tz)


def date_constraints(
    value: str, zone: dt.tzinfo, now: dt.datetime, name: str = "date"
) -> tuple[list[tuple[str, dt.datetime]], list[Interval]]:
    """One ``date`` value -> (start bounds as ('ge'|'lt', instant), excluded start ranges)."""
    text = value.strip()
    if "," in text:
        raise FhirError(
            400,
            "not-supported",
            f"{name} {value!r}: a comma (OR) inside one date value is not "
            "supported; repeat the parameter for a range (AND)",
            expression=name,
        )
    prefix = "eq"
    if len(text) >= 2 and text[:2].isalpha():
        prefix = text[:2]
        if prefix not in PREFIXES:
            raise FhirError(
                400,
                "invalid",
                f"{name} {value!r} has an unknown prefix {prefix!r}; expected one of {', '.join(PREFIXES)}",
                expression=name,
            )
        text = text[2:]
    lo, hi = parse_date_range(text, zone, name)
    if prefix == "eq":
        return [("ge", lo), ("lt", hi)], []
    if prefix == "ne":
        return [], [Interval(lo, hi)]
    if prefix in ("gt", "sa"):
        return [("ge", hi)], []
    if prefix in ("lt", "eb"):
        return [("lt", lo)], []
    if prefix == "ge":
        return [("ge", lo)], []
    if prefix == "le":
        return [("lt", hi)], []
    margin = max(abs(lo - now) / 10, dt.timedelta(days=1))  # ap
    return [("ge", lo - margin), ("lt", hi + margin)], []
