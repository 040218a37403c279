"""Reading operation inputs (a ``Parameters`` resource, or a query string for GET ``$find``).

Validation is hand-written rather than done with fhir.resources models: the error must name the
parameter (``expression``) and say what was expected, and this runs on every ``$find``. Embedded
resources (``patient-resource``, ``appointment-resource``) are additionally validated with the
R4B models, which catch structural mistakes inside them.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from adapter.backends.protocol import Identifier
from adapter.fhir.limits import MAX_NAME, check_resource_strings, check_text
from adapter.fhir.outcome import FhirError, issue
from adapter.r4 import FHIR_ID
from adapter.scheduling.service import ActorRef, Token

# ASCII digits only: ``\d`` would accept other scripts' digits, which int() then silently reads.
DATE_VALUE = re.compile(
    r"^(?P<y>[0-9]{4})(?:-(?P<m>[0-9]{2})(?:-(?P<d>[0-9]{2})(?:T(?P<H>[0-9]{2}):(?P<M>[0-9]{2})"
    r"(?::(?P<S>[0-9]{2})(?:\.(?P<f>[0-9]{1,9}))?)?(?P<tz>Z|[+-][0-9]{2}:[0-9]{2})?)?)?)?$"
)
# Instants outside these years are refused (400) rather than computed with: the calendar arithmetic,
# the zone rules and the legacy columns all overflow or lose meaning near year 1 and year 9999.
MIN_YEAR = 1900
MAX_YEAR = 2999
MAX_OFFSET = dt.timedelta(hours=14)


def bad(
    diagnostics: str, expression: str | None = None, *, code: str = "invalid", as_bundle: bool = False
) -> FhirError:
    return FhirError(400, code, diagnostics, expression=expression, as_bundle=as_bundle)


@dataclass(frozen=True, slots=True)
class DateValue:
    """A checked FHIR date/dateTime: its first instant (``naive`` + ``offset``; no offset = local)
    and the unit its precision implies."""

    naive: dt.datetime
    offset: dt.timedelta | None
    has_time: bool
    width: dt.timedelta | None  # None for year/month/day precision (calendar widths)
    unit: str  # year, month, day, minute, second, fraction


def parse_date_value(text: str, name: str, *, as_bundle: bool = False) -> DateValue:
    """Check a FHIR date/dateTime by hand so every refusal names the parameter and the rule, without
    Python's own messages, and no value outside ``MIN_YEAR..MAX_YEAR`` reaches any arithmetic."""

    def refuse(why: str) -> FhirError:
        return bad(f"{name} {text[:80]!r} {why}", name, as_bundle=as_bundle)

    m = DATE_VALUE.match(text)
    if not m:
        raise refuse(
            "is not a FHIR date or dateTime (YYYY, YYYY-MM, YYYY-MM-DD or "
            "YYYY-MM-DDThh:mm[:ss[.fff]][Z|+hh:mm|-hh:mm], ASCII digits)"
        )
    y = int(m["y"])
    if not MIN_YEAR <= y <= MAX_YEAR:
        raise refuse(f"is outside the supported years {MIN_YEAR}..{MAX_YEAR}")
    mo = int(m["m"] or 1)
    if not 1 <= mo <= 12:
        raise refuse("has no valid month (01..12)")
    d = int(m["d"] or 1)
    last_day = (dt.date(y + (mo == 12), mo % 12 + 1, 1) - dt.timedelta(days=1)).day
    if not 1 <= d <= last_day:
        raise refuse(f"has no valid day (01..{last_day:02d} in that month)")
    if m["H"] is None:
        unit = "day" if m["d"] else "month" if m["m"] else "year"
        return DateValue(dt.datetime(y, mo, d), None, False, None, unit)
    hh, mi, ss = int(m["H"]), int(m["M"]), int(m["S"] or 0)
    if hh > 23 or mi > 59 or ss > 59:
        raise refuse("has no valid time of day (00:00:00..23:59:59)")
    offset: dt.timedelta | None = None
    tz = m["tz"]
    if tz == "Z":
        offset = dt.timedelta(0)
    elif tz is not None:
        oh, om = int(tz[1:3]), int(tz[4:6])
        offset = dt.timedelta(hours=oh, minutes=om) * (1 if tz[0] == "+" else -1)
        if om > 59 or abs(offset) > MAX_OFFSET:
            raise refuse(f"has an invalid timezone offset {tz} (valid: -14:00 to +14:00)")
    frac = m["f"] or ""
    micro = int((frac + "000000")[:6])
    if m["S"] is None:
        width, unit = dt.timedelta(minutes=1), "minute"
    elif not frac:
        width, unit = dt.timedelta(seconds=1), "second"
    else:
        width, unit = dt.timedelta(microseconds=max(1, 10 ** (6 - min(len(frac), 6)))), "fraction"
    return DateValue(dt.datetime(y, mo, d, hh, mi, ss, micro), offset, True, width, unit)


def period_end(value: DateValue) -> dt.datetime:
    """The first naive instant after the period the value stands for."""
    n = value.naive
    if value.unit == "day":
        return n + dt.timedelta(days=1)
    if value.unit == "month":
        return dt.datetime(n.year + (n.month == 12), n.month % 12 + 1, 1)
    if value.unit == "year":
        return dt.datetime(n.year + 1, 1, 1)
    assert value.width is not None
    return n + value.width


def parse_datetime(
    text: Any, name: str, zone: dt.tzinfo, *, is_end: bool = False, as_bundle: bool = False
) -> dt.datetime:
    """A FHIR dateTime -> aware datetime. Partial dates mean the start (or, for ``end``, the end)
    of that period in the server's zone; a time without an offset is invalid FHIR."""
    if not isinstance(text, str):
        raise bad(f"{name} must be a dateTime string, got {type(text).__name__}", name, as_bundle=as_bundle)
    value = parse_date_value(text.strip(), name, as_bundle=as_bundle)
    if value.has_time:
        if value.offset is None:
            raise bad(f"{name} {text[:80]!r} has a time but no timezone offset", name, as_bundle=as_bundle)
        # UTC from here on: comparing datetimes that share one tzinfo object is several times
        # cheaper than comparing across offsets, and the slot maths compares a lot.
        return value.naive.replace(tzinfo=dt.timezone(value.offset)).astimezone(dt.UTC)
    local = period_end(value) if is_end else value.naive
    # Local midnight as an instant: computing on ZoneInfo datetimes would be wall-clock maths.
    return local.replace(tzinfo=zone).astimezone(dt.UTC)


def parse_token(value: Any, name: str) -> Token:
    if not isinstance(value, str) or not value.strip():
        raise bad(f"{name} must be a non-empty string 'system|code'", name)
    system, sep, code = value.strip().rpartition("|")
    if not sep:
        return Token(None, value.strip())
    if not code:
        raise bad(f"{name} {value!r} has no code after '|'", name)
    return Token(system or None, code)


@dataclass(slots=True)
class ParamList:
    """The entries of a Parameters resource, grouped by name, checked as they are taken."""

    entries: dict[str, list[dict[str, Any]]]
    as_bundle: bool = False
    used: set[str] = field(default_factory=set)

    @classmethod
    def from_resource(cls, resource: dict[str, Any], *, as_bundle: bool = False) -> ParamList:
        if resource.get("resourceType") != "Parameters":
            raise FhirError(
                400,
                "invalid",
                f"expected a Parameters resource, got resourceType {resource.get('resourceType')!r}",
                as_bundle=as_bundle,
            )
        params = resource.get("parameter", [])
        if not isinstance(params, list):
            raise FhirError(
                400,
                "structure",
                "Parameters.parameter must be a list",
                expression="Parameters.parameter",
                as_bundle=as_bundle,
            )
        entries: dict[str, list[dict[str, Any]]] = {}
        for i, p in enumerate(params):
            if not isinstance(p, dict) or not isinstance(p.get("name"), str):
                raise FhirError(
                    400,
                    "structure",
                    f"Parameters.parameter[{i}] has no name",
                    expression=f"Parameters.parameter[{i}]",
                    as_bundle=as_bundle,
                )
            check_text(p["name"], f"Parameters.parameter[{i}].name", limit=MAX_NAME, as_bundle=as_bundle)
            check_resource_strings({k: v for k, v in p.items() if k != "name"}, p["name"], as_bundle=as_bundle)
            entries.setdefault(p["name"], []).append(p)
        return cls(entries, as_bundle)

    def _err(self, msg: str, name: str) -> FhirError:
        return FhirError(400, "invalid", msg, expression=name, as_bundle=self.as_bundle)

    def values(self, name: str, *types: str) -> list[Any]:
        self.used.add(name)
        out = []
        for p in self.entries.get(name, []):
            keys = [k for k in p if k.startswith("value") or k == "resource"]
            if len(keys) != 1:
                raise self._err(f"parameter {name!r} must carry exactly one value", name)
            key = keys[0]
            if key not in types:
                raise self._err(f"parameter {name!r} must be {' or '.join(types)}, got {key}", name)
            out.append(p[key])
        return out

    def one(self, name: str, *types: str, required: bool = False) -> Any:
        vals = self.values(name, *types)
        if len(vals) > 1:
            raise self._err(f"parameter {name!r} may appear only once", name)
        if required and not vals:
            raise self._err(f"parameter {name!r} is required", name)
        return vals[0] if vals else None

    def unused(self) -> list[str]:
        return sorted(set(self.entries) - self.used)


def parse_reference(value: Any, name: str, kinds: Iterable[str], base: str, *, as_bundle: bool = False) -> ActorRef:
    """A Reference (literal or logical) to one of ``kinds`` on this server."""
    kinds = tuple(kinds)

    def err(msg: str, status: int = 400, code: str = "invalid") -> FhirError:
        return FhirError(status, code, msg, expression=name, as_bundle=as_bundle)

    if isinstance(value, str):
        value = {"reference": value}
    if not isinstance(value, dict):
        raise err(f"{name} must be a Reference")
    ref = value.get("reference")
    if isinstance(ref, str) and ref:
        kind, rid = split_reference(ref, base, name, as_bundle=as_bundle)
        if kind not in kinds:
            raise err(f"{name} must reference {' or '.join(kinds)}, got {ref!r}")
        return ActorRef(kind, id=rid, text=f"{kind}/{rid}")
    ident = value.get("identifier")
    if isinstance(ident, dict) and isinstance(ident.get("value"), str):
        kind = value.get("type") or kinds[0]
        if kind not in kinds:
            raise err(f"{name}.type must be {' or '.join(kinds)}")
        system = ident.get("system") or ""
        return ActorRef(
            kind, identifier=Identifier(system, ident["value"]), text=f"{kind}?identifier={system}|{ident['value']}"
        )
    raise err(f"{name} needs a 'reference' or an 'identifier' with a value")


def split_reference(ref: str, base: str, name: str, *, as_bundle: bool = False) -> tuple[str, str]:
    """``Type/id`` or ``[our base]/Type/id`` -> (Type, id). Another server's URL is 404."""
    text = ref.strip()
    if "://" in text:
        parsed, ours = urlsplit(text), urlsplit(base)
        prefix = base.rstrip("/") + "/"
        if not text.startswith(prefix) or parsed.netloc != ours.netloc:
            raise FhirError(
                404,
                "not-found",
                f"{name} {ref!r} points to another server; this server acts only on references relative to {base}",
                expression=name,
                as_bundle=as_bundle,
            )
        text = text[len(prefix) :]
    parts = text.split("/")
    if len(parts) == 4 and parts[2] == "_history":
        parts = parts[:2]
    if len(parts) != 2 or not parts[0] or not FHIR_ID.match(parts[1]):
        raise FhirError(
            400,
            "invalid",
            f"{name} {ref!r} is not a reference of the form Type/id",
            expression=name,
            as_bundle=as_bundle,
        )
    return parts[0], parts[1]


def parse_count(value: Any, name: str = "_count") -> int:
    if isinstance(value, bool):
        raise bad(f"{name} must be a positive integer", name)
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and re.fullmatch(r"[0-9]{1,18}", value.strip()):
        n = int(value.strip())
    else:
        raise bad(f"{name} must be a positive integer, got {value!r}", name)
    if n < 0:
        raise bad(f"{name} must not be negative", name)
    return n


def capped_count(value: Any, maximum: int, notices: list[dict[str, Any]], name: str = "_count") -> int:
    """``_count`` parsed and capped at ``maximum`` (``find.max_count``); capping adds an information issue."""
    count = parse_count(value, name)
    if count <= maximum:
        return count
    notices.append(
        issue("information", "informational", f"{name} {count} is above the maximum; {maximum} used", expression=name)
    )
    return maximum


def validate_embedded(resource: Any, expected: str, name: str, *, as_bundle: bool = False) -> dict[str, Any]:
    """Check an embedded resource's type and R4 structure (fhir.resources R4B models)."""
    if not isinstance(resource, dict) or resource.get("resourceType") != expected:
        got = resource.get("resourceType") if isinstance(resource, dict) else type(resource).__name__
        raise FhirError(
            400, "invalid", f"{name} must be a {expected} resource, got {got!r}", expression=name, as_bundle=as_bundle
        )
    from fhir.resources.R4B import get_fhir_model_class
    from pydantic import ValidationError

    try:
        get_fhir_model_class(expected).model_validate(resource)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise FhirError(
            400,
            "structure",
            f"{name} is not a valid {expected}: {where}: {first['msg']}",
            expression=name,
            as_bundle=as_bundle,
        ) from None
    return resource
