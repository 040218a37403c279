"""The parameters Appointment search declares (the CapabilityStatement is built from the same table) and
the parsing of a request into a :class:`SearchRequest`."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from adapter.backends.protocol import ActorKind, Interval
from adapter.fhir.context import FhirContext
from adapter.fhir.outcome import FhirError
from adapter.fhir.parameters import capped_count
from adapter.fhir.search.cursor import CURSOR_PARAM, Cursor
from adapter.fhir.search.dates import date_constraints
from adapter.r4 import APPOINTMENT_STATUS_SYSTEM, APPOINTMENT_STATUSES, FHIR_ID

_SP = "http://hl7.org/fhir/SearchParameter/"


@dataclass(frozen=True, slots=True)
class SearchParam:
    """One parameter Appointment search takes, as the CapabilityStatement states it."""

    name: str
    type: str  # the FHIR search parameter type
    definition: str | None = None  # the SearchParameter it implements
    documentation: str | None = None
    once: bool = False  # a result parameter: at most once per request


# The one declaration of Appointment search: parse_search ignores (or, with handling=strict, refuses) any
# other parameter, and capability.py states exactly these.
APPOINTMENT_SEARCH_PARAMS: tuple[SearchParam, ...] = (
    SearchParam("_id", "token", _SP + "Resource-id"),
    SearchParam("identifier", "token", _SP + "clinical-identifier"),
    SearchParam("patient", "reference", _SP + "Appointment-patient"),
    SearchParam("date", "date", _SP + "clinical-date"),
    SearchParam("specialty", "token", _SP + "Appointment-specialty"),
    SearchParam("appointment-type", "token", _SP + "Appointment-appointment-type"),
    SearchParam("practitioner", "reference", _SP + "Appointment-practitioner"),
    SearchParam("location", "reference", _SP + "Appointment-location"),
    SearchParam("status", "token", _SP + "Appointment-status"),
    SearchParam("service-type", "token", _SP + "Appointment-service-type"),
    SearchParam("actor", "reference", _SP + "Appointment-actor"),
    SearchParam("_count", "number", documentation="page size, default 50, maximum 500", once=True),
    SearchParam("_sort", "string", documentation="date or -date", once=True),
    SearchParam("_summary", "token", documentation="count only (the total, no entries)", once=True),
    SearchParam(
        "_elements",
        "string",
        documentation="Appointment elements to return; status and participant are always kept "
        "and the result is tagged SUBSETTED",
        once=True,
    ),
    SearchParam(
        "_total",
        "token",
        documentation="estimate (default): exact up to 200 matches, else omitted; accurate: always counted; "
        "none: no count",
        once=True,
    ),
)
SEARCH_INCLUDES = ("Appointment:actor", "Appointment:patient", "Appointment:practitioner", "Appointment:location")
# Request controls that are not search parameters: the response format, the paging cursor, _include
# (stated as searchInclude).
_CONTROLS = ("_format", CURSOR_PARAM, "_include")
_DECLARED = frozenset(p.name for p in APPOINTMENT_SEARCH_PARAMS) | frozenset(_CONTROLS)
# The default ``_total`` (estimate): an exact total up to this many matches (a bounded index scan),
# none beyond; ``_total=accurate`` counts everything.
TOTAL_ESTIMATE_CAP = 200
CONTROL_ONCE = frozenset(p.name for p in APPOINTMENT_SEARCH_PARAMS if p.once) | {"_format", CURSOR_PARAM}

REFERENCE_PARAMS: dict[str, ActorKind] = {"patient": "Patient", "practitioner": "Practitioner", "location": "Location"}
ACTOR_TYPES = (
    "Patient",
    "Practitioner",
    "PractitionerRole",
    "RelatedPerson",
    "Device",
    "HealthcareService",
    "Location",
)
OUR_ACTOR_KINDS = ("Patient", "Practitioner", "Location")


# --- parameter values -----------------------------------------------------------------------------


def split_escaped(value: str, sep: str, *, keep_escaped: str = "") -> list[str]:
    """Split on ``sep`` unless escaped with a backslash (FHIR search escaping) and unescape the parts;
    escapes of the characters in ``keep_escaped`` stay, for a later split on them."""
    parts, current, i = [], [], 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            current.append(value[i : i + 2] if value[i + 1] in keep_escaped else value[i + 1])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def _split_token(text: str) -> tuple[str | None, str]:
    """``system|code`` -> (system, code); no ``|`` -> (None, code). Escapes are honoured."""
    i = 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == "|":
            return _unescape(text[:i]), _unescape(text[i + 1 :])
        i += 1
    return None, _unescape(text)


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _split_or(value: str) -> list[str]:
    """The comma-separated alternatives of one parameter value, still escaped for ``|``."""
    return split_escaped(value, ",", keep_escaped="|")


# --- request parsing ------------------------------------------------------------------------------


def _identifier_systems(backend: Any, kind: str) -> set[str] | None:
    """Identifier systems the backend can search actors by."""
    return set(backend.identifier_systems(kind))


@dataclass(slots=True)
class _RefCriterion:
    kind: ActorKind
    ids: set[str] | None = None  # intersection of all direct-id parameters; None = none given
    identifier_groups: list[list[tuple[str | None, str]]] = field(default_factory=list)


@dataclass(slots=True)
class SearchRequest:
    ids: set[str] | None = None
    identifiers: set[tuple[str, str]] | None = None
    refs: dict[str, _RefCriterion] = field(default_factory=dict)
    bounds: list[tuple[str, dt.datetime]] = field(default_factory=list)
    excluded: list[Interval] = field(default_factory=list)
    statuses: set[str] | None = None
    specialty_groups: list[tuple[str, ...]] = field(default_factory=list)
    type_groups: list[tuple[str, list[tuple[str | None, str | None]]]] = field(default_factory=list)
    count: int = 50
    descending: bool = False
    includes: set[str] = field(default_factory=set)
    want_total: bool = True
    total_cap: int | None = field(default_factory=lambda: TOTAL_ESTIMATE_CAP)  # read per request; accurate: None
    cursor: Cursor | None = None
    criteria: int = 0
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (parameter, why)
    notes: list[dict[str, Any]] = field(default_factory=list)
    nothing: list[str] = field(default_factory=list)  # reasons why nothing can match
    used: list[tuple[str, str]] = field(default_factory=list)  # for the page links
    elements: set[str] | None = None  # _elements


def prefer_strict(request: Request) -> bool:
    for header in request.headers.getlist("prefer"):
        for part in re.split(r"[,;]", header):
            key, _, value = part.strip().partition("=")
            if key.strip().lower() == "handling" and value.strip().strip('"').lower() == "strict":
                return True
    return False


def _token(text: str, name: str) -> tuple[str | None, str | None]:
    system, code = _split_token(text)
    if system is not None and code == "":
        if not system:
            raise FhirError(400, "invalid", f"{name} {text!r} has neither a system nor a code", expression=name)
        return system, None  # "system|": any code of that system
    if code == "":
        raise FhirError(400, "invalid", f"{name} has an empty value", expression=name)
    return system, code


def _reference_id(value: str, kind: str, name: str, base: str) -> str | None:
    """``id``, ``Type/id`` or ``[base]/Type/id`` -> id; None for a reference to another server."""
    text = value.strip()
    if "://" in text:
        prefix = base.rstrip("/") + "/"
        if not text.startswith(prefix):
            return None
        text = text[len(prefix) :]
    parts = text.split("/")
    if len(parts) == 4 and parts[2] == "_history":
        parts = parts[:2]
    if len(parts) == 2:
        if parts[0] != kind:
            raise FhirError(400, "invalid", f"{name} {value!r} must reference a {kind}", expression=name)
        rid = parts[1]
    elif len(parts) == 1:
        rid = parts[0]
    else:
        raise FhirError(
            400, "invalid", f"{name} {value!r} is not a reference of the form id or {kind}/id", expression=name
        )
    if not FHIR_ID.match(rid):
        raise FhirError(400, "invalid", f"{name} {value!r}: {rid!r} is not a valid FHIR id", expression=name)
    return rid


def _actor_kind(name: str, modifier: str, chain: str | None, value: str, ctx: FhirContext) -> str | None:
    """The one actor type an ``actor`` parameter is about (its ``:Type`` modifier, the ``Type/`` of its
    references, or the identifier system); None for a type no appointment here has as an actor."""
    if modifier:
        if modifier not in ACTOR_TYPES:
            raise FhirError(400, "invalid", f"{name}: {modifier!r} is not an Appointment actor type", expression=name)
        return modifier if modifier in OUR_ACTOR_KINDS else None
    kinds: set[str] = set()
    for v in _split_or(value):
        if chain == "identifier":
            system, _ = _split_token(v)
            backend = ctx.service  # the scheduling layer answers for the backend
            known = {k for k in OUR_ACTOR_KINDS if system and system in (_identifier_systems(backend, k) or ())}
            if len(known) != 1:
                raise FhirError(
                    400,
                    "invalid",
                    f"{name} {v!r}: say which actor type the identifier is of (e.g. actor:Patient.identifier=...)",
                    expression=name,
                )
            kinds |= known
            continue
        text = _unescape(v).strip()
        prefix = ctx.base_url.rstrip("/") + "/"
        if text.startswith(prefix):
            text = text[len(prefix) :]
        elif "://" in text:
            kinds.add("Patient")  # another server's reference: the Patient criterion reports it as such
            continue
        kind = text.split("/", 1)[0] if "/" in text else None
        if kind is None:
            raise FhirError(
                400,
                "invalid",
                f"{name} {v!r} needs a type: {name}=Patient/<id> or {name}:Patient=<id>",
                expression=name,
            )
        if kind not in ACTOR_TYPES:
            raise FhirError(400, "invalid", f"{name} {v!r}: {kind!r} is not an Appointment actor type", expression=name)
        kinds.add(kind)
    if len(kinds) > 1:
        raise FhirError(
            400,
            "not-supported",
            f"{name} {value!r} mixes actor types; repeat the parameter per type instead",
            expression=name,
        )
    kind = kinds.pop() if kinds else None
    return kind if kind in OUR_ACTOR_KINDS else None


def _include_kinds(value: str) -> set[str] | None:
    parts = value.split(":")
    if value in ("*", "Appointment:*"):
        return set(OUR_ACTOR_KINDS)
    if len(parts) not in (2, 3) or parts[0] != "Appointment":
        return None
    target = parts[2] if len(parts) == 3 else None
    if parts[1] == "actor":
        if target is None:
            return set(OUR_ACTOR_KINDS)
        return {target} & set(OUR_ACTOR_KINDS) if target in ACTOR_TYPES else None
    kind = REFERENCE_PARAMS.get(parts[1])
    if kind is None or target not in (None, kind):
        return None
    return {kind}


def parse_search(ctx: FhirContext, params: list[tuple[str, str]], now: dt.datetime) -> SearchRequest:
    req = SearchRequest(count=ctx.find.default_count)
    seen_once: set[str] = set()
    for name, raw in params:
        value = raw.strip()
        if name in CONTROL_ONCE:
            if name in seen_once:
                raise FhirError(400, "invalid", f"parameter {name!r} may appear only once", expression=name)
            seen_once.add(name)
        if value == "" and name != "_format":
            req.ignored.append((name, "has no value"))
            continue
        base_name, _, modifier = name.partition(":")
        chain = None
        if "." in name:
            head, _, chain = name.partition(".")
            base_name, _, modifier = head.partition(":")
        if base_name not in _DECLARED:
            req.ignored.append((name, "is not a supported parameter of Appointment search"))
            continue
        if base_name == "actor":
            kind = _actor_kind(name, modifier, chain, value, ctx)
            if kind is None:
                req.criteria += 1
                req.nothing.append(
                    f"{name} {value!r}: appointments here have only Patient, Practitioner and Location actors"
                )
                req.used.append((name, raw))
                continue
            base_name, modifier = kind.lower(), ""
        used = True
        if name == "_id":
            req.criteria += 1
            ids = {v.strip() for v in _split_or(value) if v.strip()}
            req.ids = ids if req.ids is None else req.ids & ids
        elif name == "identifier":
            req.criteria += 1
            idents = set()
            for v in _split_or(value):
                system, code = _token(v, name)
                if code is None:
                    raise FhirError(400, "invalid", f"identifier {v!r} needs a value after '|'", expression=name)
                idents.add((system or "", code))
            req.identifiers = idents if req.identifiers is None else req.identifiers & idents
        elif base_name in REFERENCE_PARAMS and modifier in ("", REFERENCE_PARAMS[base_name]) and chain is None:
            req.criteria += 1
            kind = REFERENCE_PARAMS[base_name]
            crit = req.refs.setdefault(kind, _RefCriterion(kind))
            ids = set()
            for v in _split_or(value):
                rid = _reference_id(_unescape(v), kind, name, ctx.base_url)
                if rid is None:
                    req.nothing.append(
                        f"{name} {v!r} refers to another server; this server only knows "
                        f"references relative to {ctx.base_url}"
                    )
                else:
                    ids.add(rid)
            crit.ids = ids if crit.ids is None else crit.ids & ids
        elif base_name in REFERENCE_PARAMS and modifier in ("", REFERENCE_PARAMS[base_name]) and chain == "identifier":
            req.criteria += 1
            kind = REFERENCE_PARAMS[base_name]
            ident_group: list[tuple[str | None, str]] = []
            for v in _split_or(value):
                system, code = _token(v, name)
                if code is None:
                    raise FhirError(400, "invalid", f"{name} {v!r} needs a value after '|'", expression=name)
                ident_group.append((system, code))
            req.refs.setdefault(kind, _RefCriterion(kind)).identifier_groups.append(ident_group)
        elif name == "date":
            req.criteria += 1
            bounds, excluded = date_constraints(value, ctx.zone, now, name)
            req.bounds += bounds
            req.excluded += excluded
        elif name == "status":
            req.criteria += 1
            codes = set()
            for v in _split_or(value):
                system, code = _token(v, name)
                if system not in (None, "", APPOINTMENT_STATUS_SYSTEM) or code not in APPOINTMENT_STATUSES:
                    raise FhirError(
                        400,
                        "invalid",
                        f"status {v!r} is not an AppointmentStatus code (one of "
                        f"{', '.join(sorted(APPOINTMENT_STATUSES))})",
                        expression=name,
                    )
                codes.add(code)
            req.statuses = codes if req.statuses is None else req.statuses & codes
        elif name == "specialty":
            req.criteria += 1
            group: list[str] = []
            for v in _split_or(value):
                system, code = _token(v, name)
                group.append(f"{system}|{code or ''}" if system is not None else code or "")
            req.specialty_groups.append(tuple(group))
        elif name in ("appointment-type", "service-type"):
            req.criteria += 1
            req.type_groups.append((name, [_token(v, name) for v in _split_or(value)]))
        elif name == "_count":
            req.count = capped_count(value, ctx.find.max_count, req.notes)
        elif name == "_summary":
            if value == "count":
                req.count = 0
            else:
                req.ignored.append((name, f"value {value!r} is not supported (only count)"))
                used = False
        elif name == "_elements":
            req.elements = {e.strip() for e in value.split(",") if e.strip()}
        elif name == "_sort":
            if value in ("date", "-date"):
                req.descending = value == "-date"
            else:
                req.ignored.append((name, f"value {value!r} is not supported (only date and -date)"))
                used = False
        elif name == "_include":
            kinds = _include_kinds(value)
            if kinds is None:
                req.ignored.append(
                    (
                        name,
                        f"value {value!r} is not supported (Appointment:actor[:Type], "
                        "Appointment:patient, Appointment:practitioner, Appointment:location)",
                    )
                )
                used = False
            else:
                req.includes |= kinds
        elif name == "_total":
            if value in ("none", "accurate", "estimate"):
                req.want_total = value != "none"
                req.total_cap = None if value == "accurate" else TOTAL_ESTIMATE_CAP
            else:
                req.ignored.append((name, f"value {value!r} is not supported (none, estimate, accurate)"))
                used = False
        elif name == "_format":
            pass  # not a filter: it picks the response format (_response_format) and stays in the paging links
        elif name == CURSOR_PARAM:
            req.cursor = Cursor.decode(ctx, value)
            used = False  # links carry their own cursor
        else:
            why = "is not a supported parameter of Appointment search"
            if base_name in REFERENCE_PARAMS and chain not in (None, "identifier"):
                why = f"chain .{chain} is not supported (only .identifier)"
            elif modifier:
                why = f"modifier :{modifier} is not supported"
            req.ignored.append((name, why))
            used = False
        if used:
            req.used.append((name, raw))
    if req.cursor is not None and req.cursor.descending != req.descending:
        raise FhirError(
            400,
            "invalid",
            f"{CURSOR_PARAM} was issued for _sort={'-date' if req.cursor.descending else 'date'}"
            "; follow the Bundle's links without changing _sort",
            expression=CURSOR_PARAM,
        )
    return req
