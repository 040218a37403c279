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
from zoneinfo import ZoneInfo

from adapter.backends.protocol import Identifier
from adapter.fhir.outcome import FhirError
from adapter.scheduling.service import ActorRef, Token

_DATETIME = re.compile(
    r"^(?P<y>\d{4})(-(?P<m>\d{2})(-(?P<d>\d{2})(T(?P<H>\d{2}):(?P<M>\d{2})(:(?P<S>\d{2})(\.\d+)?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2}))?)?)?$"
)
FHIR_ID = re.compile(r"^[A-Za-z0-9\-\.]{1,64}$")


def bad(
    diagnostics: str, expression: str | None = None, *, code: str = "invalid", as_bundle: bool = False
) -> FhirError:
    return FhirError(400, code, diagnostics, expression=expression, as_bundle=as_bundle)


def parse_datetime(text: Any, name: str, zone: ZoneInfo, *, is_end: bool = False) -> dt.datetime:
    """A FHIR dateTime -> aware datetime. Partial dates mean the start (or, for ``end``, the end)
    of that period in the server's zone; a time without an offset is invalid FHIR."""
    if not isinstance(text, str):
        raise bad(f"{name} must be a dateTime string, got {type(text).__name__}", name)
    m = _DATETIME.match(text.strip())
    if not m:
        raise bad(
            f"{name} {text!r} is not a valid FHIR dateTime (e.g. 2026-12-01T09:00:00-05:00); "
            "a time needs a timezone offset",
            name,
        )
    try:
        if m.group("H") is not None:
            if m.group("tz") is None:
                raise bad(f"{name} {text!r} has a time but no timezone offset", name)
            # UTC from here on: comparing datetimes that share one tzinfo object is several times
            # cheaper than comparing across offsets, and the slot maths compares a lot.
            return dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00")).astimezone(dt.UTC)
        y, mo, d = int(m.group("y")), int(m.group("m") or 1), int(m.group("d") or 1)
        start = dt.date(y, mo, d)
        if is_end:
            if m.group("d"):
                start = start + dt.timedelta(days=1)
            elif m.group("m"):
                start = dt.date(y + (mo == 12), mo % 12 + 1, 1)
            else:
                start = dt.date(y + 1, 1, 1)
        # Local midnight as an instant: computing on ZoneInfo datetimes would be wall-clock maths.
        return dt.datetime.combine(start, dt.time(), tzinfo=zone).astimezone(dt.UTC)
    except ValueError as exc:
        raise bad(f"{name} {text!r} is not a valid date: {exc}", name) from None


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
    elif isinstance(value, str) and value.strip().isdigit():
        n = int(value.strip())
    else:
        raise bad(f"{name} must be a positive integer, got {value!r}", name)
    if n < 0:
        raise bad(f"{name} must not be negative", name)
    return n


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
