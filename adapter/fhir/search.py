"""ITI-118 Find Existing Appointments: ``GET [base]/Appointment?…`` and ``POST [base]/Appointment/_search``.

Decisions (20; repeated in the README's conformance notes):

* POST takes an ``application/x-www-form-urlencoded`` body; its parameters are added to those of the URL
  and the answer is the same as the equivalent GET. Page links are always GET URLs.
* Parameters: ``_id``, ``identifier``, ``patient`` / ``practitioner`` / ``location`` (``id``,
  ``Type/id``, ``[base]/Type/id``; the ``:Type`` modifier; chained ``.identifier=system|value``), ``date``,
  ``status``, ``specialty``, ``appointment-type``, ``service-type``, ``_count``, ``_sort``, ``_include``,
  ``_total``, ``_format`` and the paging cursor ``_cursor``. A comma inside one value is OR, a repeated
  parameter is AND (except ``date``: a comma there is a 400; repeat ``date`` for ranges).
* ``date`` is ``Appointment.start``, compared as an instant: a search value is the range its precision
  implies (a year, month, day, minute, second; dates and zone-less times in the legacy system's zone),
  ``[lo, hi)``. eq: lo <= start < hi; ne: not eq; lt: start < lo; le: start < hi; gt: start >= hi;
  ge: start >= lo; sa: start >= hi (starts after the range ends); eb: start < lo (the point "ends"
  before the range starts); ap: eq on the range widened on both sides by 10 % of the distance between
  the value and now, at least one day. With starts at whole seconds (minutes in the demo) and values at
  second precision or coarser this is exactly FHIR's range semantics for a one-second target range.
* ``status`` takes AppointmentStatus codes (system optional); ``cancelled`` matches every legacy code that
  maps to it. A code outside AppointmentStatus is a 400. ``pending`` etc. that no legacy code maps to
  simply match nothing. Holds (``$hold``) live outside the legacy system and are not searched.
* ``_count`` default ``find.default_count`` (50), capped at ``find.max_count`` (500) with an information
  issue; ``_count=0`` returns only ``total``. ``_sort=date`` (default) or ``-date``. ``_total=none`` skips
  the count query (``total`` is then only given when the first page is also the last).
* Paging is a keyset on (start, id): ``next``/``previous`` links carry an opaque, HMAC-signed ``_cursor``
  (the start and id of the row a page ended at, the direction and the sort). Links stay correct while
  appointments are added or cancelled; a tampered or foreign cursor is a 400.
* Unknown or unsupported parameters (including modifiers such as ``:missing`` and chains other than
  ``.identifier``) and empty values are ignored and named in a warning issue of the outcome entry; with
  ``Prefer: handling=strict`` they are a 400 ``invalid`` naming the parameter.
* An identifier system the server cannot process (``patient.identifier=urn:x|1``), or a reference to
  another server, gives 200 with ``total`` 0, no Appointment and an information issue saying why
  (REQ-118-04). Every answer without an Appointment has an information OperationOutcome entry.
* A search without any criterion (only ``_count``, ``_sort``, ...) is not run: 200, ``total`` 0 and an
  information issue asking for at least one criterion, preferably ``patient`` and ``date`` (REQ-118-18).
"""

from __future__ import annotations

import datetime as dt
import hmac
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.requests import Request
from starlette.responses import Response

from adapter.backends.protocol import ActorKind, ActorQuery, AppointmentQuery, Identifier, Interval, InvalidRequest
from adapter.fhir.appointments import render_appointments
from adapter.fhir.context import FhirContext, read_body
from adapter.fhir.formats import FORM, format_named, render, response_format
from adapter.fhir.limits import check_params
from adapter.fhir.outcome import FhirError, issue, operation_outcome
from adapter.fhir.parameters import FHIR_ID, parse_count, parse_date_value, period_end
from adapter.fhir.render import searchset
from adapter.mapping.expressions import attach_zone

APPOINTMENT_STATUS_SYSTEM = "http://hl7.org/fhir/appointmentstatus"
APPOINTMENT_STATUSES = frozenset(
    {
        "proposed",
        "pending",
        "booked",
        "arrived",
        "fulfilled",
        "cancelled",
        "noshow",
        "entered-in-error",
        "checked-in",
        "waitlist",
    }
)
PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
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
CONTROL_ONCE = ("_count", "_sort", "_total", "_format", "_cursor", "_summary", "_elements")
SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}
# Appointment elements with cardinality 1..* in R4: kept whatever _elements asks for.
MANDATORY_ELEMENTS = ("resourceType", "id", "meta", "status", "participant")
CURSOR_PARAM = "_cursor"

# --- small parsers --------------------------------------------------------------------------------


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


# --- the cursor -----------------------------------------------------------------------------------


def _mac(ctx: FhirContext, body: str) -> str:
    """Truncated HMAC with the server secret that signs proposed ids, so every replica agrees; the
    purpose prefix keeps a cursor MAC from ever being valid for a proposed id."""
    return ctx.service.proposals.mac("cursor", body)


@dataclass(frozen=True, slots=True)
class Cursor:
    forward: bool  # True: rows after the key; False: rows before it (a `previous` link)
    descending: bool  # the _sort the cursor was made for
    start: dt.datetime
    appt_id: str

    def encode(self, ctx: FhirContext) -> str:
        micros = (self.start - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)
        body = f"1.{'n' if self.forward else 'p'}{'d' if self.descending else 'a'}.{micros}.{self.appt_id}"
        return f"{body}.{_mac(ctx, body)}"

    @classmethod
    def decode(cls, ctx: FhirContext, token: str) -> Cursor:
        def bad() -> FhirError:
            return FhirError(
                400,
                "invalid",
                f"{CURSOR_PARAM} {token[:80]!r} is not a paging cursor issued by this "
                "server (tampered, truncated or from another server); follow the Bundle's links",
                expression=CURSOR_PARAM,
            )

        body, _, mac = token.rpartition(".")
        if not body or not hmac.compare_digest(_mac(ctx, body), mac):
            raise bad()
        parts = body.split(".", 3)
        if (
            len(parts) != 4
            or parts[0] != "1"
            or len(parts[1]) != 2
            or parts[1][0] not in "np"
            or parts[1][1] not in "ad"
            or not re.fullmatch(r"-?\d+", parts[2])
            or not FHIR_ID.match(parts[3])
        ):
            raise bad()
        start = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=int(parts[2]))
        return cls(parts[1][0] == "n", parts[1][1] == "d", start, parts[3])


# --- request parsing ------------------------------------------------------------------------------


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
            backend = ctx.service.backend
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


def subset(resource: dict[str, Any], elements: set[str]) -> dict[str, Any]:
    """``_elements``: the asked-for elements plus the mandatory ones, tagged SUBSETTED (FHIR R4 search 3.1.1.5.9)."""
    out = {k: v for k, v in resource.items() if k in elements or k in MANDATORY_ELEMENTS}
    meta = {k: v for k, v in (out.get("meta") or {}).items() if k != "profile"}  # a subset conforms to no profile
    meta["tag"] = [*meta.get("tag", []), SUBSETTED]
    out["meta"] = meta
    return {"resourceType": out.pop("resourceType"), "id": out.pop("id"), **out}


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
            count = parse_count(value)
            if count > ctx.find.max_count:
                req.notes.append(
                    issue(
                        "information",
                        "informational",
                        f"_count {count} is above the maximum; {ctx.find.max_count} used",
                        expression="_count",
                    )
                )
                count = ctx.find.max_count
            req.count = count
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


# --- resolving references and tokens --------------------------------------------------------------


def _identifier_systems(backend: Any, kind: str) -> set[str] | None:
    """Identifier systems the backend can search actors by."""
    return set(backend.identifier_systems(kind))


async def _resolve_ref(ctx: FhirContext, crit: _RefCriterion, req: SearchRequest) -> set[str] | None:
    ids = crit.ids
    param = crit.kind.lower()
    backend = ctx.service.backend
    for group in crit.identifier_groups:
        known = _identifier_systems(backend, crit.kind)
        idents: list[Identifier] = []
        for system, value in group:
            if system:
                if known is not None and system not in known:
                    req.nothing.append(
                        f"{param}.identifier system {system!r} cannot be processed by this server"
                        + (f"; it knows {', '.join(sorted(known))}" if known else "")
                    )
                    continue
                idents.append(Identifier(system, value))
            elif known:
                idents += [Identifier(s, value) for s in sorted(known)]  # no system: try every known one
            else:
                req.nothing.append(
                    f"{param}.identifier {value!r} has no system and this server has no "
                    f"{crit.kind} identifier system to interpret it with"
                )
        found: set[str] = set()
        if idents:
            actors = await backend.find_actors(ActorQuery(crit.kind, identifiers=tuple(idents), limit=1000))
            found = {a.id for a in actors}
            if not found:
                req.nothing.append(
                    f"no {crit.kind} with identifier "
                    + " or ".join(f"{i.system}|{i.value}" for i in idents)
                    + " is known"
                )
        ids = found if ids is None else ids & found
    return ids


def _token_matches(token: tuple[str | None, str | None], system: str, code: str) -> bool:
    t_system, t_code = token
    if t_system is not None and t_system != system:
        return False
    return t_code is None or t_code == code


async def build_query(ctx: FhirContext, req: SearchRequest) -> AppointmentQuery | None:
    """The backend query for a parsed request; None when the criteria already show nothing can match."""
    refs: dict[str, tuple[str, ...]] = {}
    for kind, crit in req.refs.items():
        ids = await _resolve_ref(ctx, crit, req)
        if ids is not None:
            if not ids:
                if not req.nothing:
                    req.nothing.append(f"the {kind.lower()} criteria exclude each other")
                return None
            refs[kind] = tuple(sorted(ids))
    if req.nothing:
        return None
    visit_keys: set[str] | None = None
    if req.type_groups:
        types = await ctx.service.backend.visit_types()
        for name, tokens in req.type_groups:
            keys = {
                vt.key
                for vt in types
                for c in (vt.codings if name == "appointment-type" else vt.service_types)
                if any(_token_matches(t, c.system, c.code) for t in tokens)
            }
            visit_keys = keys if visit_keys is None else visit_keys & keys
            if not visit_keys:
                req.nothing.append(
                    f"no visit type of this server matches {name} "
                    + ",".join(f"{s}|{c}" if s is not None else str(c) for s, c in tokens)
                )
                return None
    for what, value in (("_id", req.ids), ("identifier", req.identifiers), ("status", req.statuses)):
        if value is not None and not value:
            req.nothing.append(f"the repeated {what} parameters exclude each other")
            return None
    cursor = req.cursor
    descending = req.descending if cursor is None or cursor.forward else not req.descending
    return AppointmentQuery(
        ids=tuple(sorted(req.ids or ())),
        identifiers=tuple(Identifier(s, v) for s, v in sorted(req.identifiers or ())),
        patient_ids=refs.get("Patient", ()),
        practitioner_ids=refs.get("Practitioner", ()),
        location_ids=refs.get("Location", ()),
        statuses=tuple(sorted(req.statuses or ())),
        visit_type_keys=tuple(sorted(visit_keys or ())),
        specialty_codes=tuple(req.specialty_groups),
        start_bounds=tuple(req.bounds),
        exclude_start_ranges=tuple(req.excluded),
        descending=descending,
        after=(cursor.start, cursor.appt_id) if cursor else None,
        limit=req.count,
        want_total=req.want_total,
    )


# --- the endpoint ---------------------------------------------------------------------------------


async def _request_params(request: Request) -> list[tuple[str, str]]:
    params = list(request.query_params.multi_items())
    if request.method == "POST":
        body = await read_body(request)
        media = (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
        if body.strip():
            if media != FORM:
                raise FhirError(
                    415,
                    "not-supported",
                    f"POST Appointment/_search takes a {FORM} body, not {media or 'an untyped body'}",
                )
            try:
                form = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
            except UnicodeDecodeError:
                raise FhirError(400, "structure", "the form body is not valid UTF-8") from None
            check_params(form)
            params += form
    return params


def _response_format(request: Request, params: list[tuple[str, str]]) -> str:
    fmt = next((v for k, v in params if k == "_format"), None)
    if fmt is None or request.query_params.get("_format") is not None:
        return response_format(request)
    return format_named(fmt)


def _link(ctx: FhirContext, used: list[tuple[str, str]], cursor: Cursor | None) -> str:
    items = list(used) + ([(CURSOR_PARAM, cursor.encode(ctx))] if cursor else [])
    return f"{ctx.base_url}/Appointment" + (f"?{urlencode(items)}" if items else "")


async def search_endpoint(request: Request) -> Response:
    ctx: FhirContext = request.app.state.fhir
    params = await _request_params(request)
    fmt = _response_format(request, params)
    now = ctx.now()
    req = parse_search(ctx, params, now)
    if req.ignored and prefer_strict(request):
        name, why = req.ignored[0]
        raise FhirError(
            400,
            "invalid",
            f"parameter {name!r} {why} (Prefer: handling=strict); "
            + "; ".join(f"{n!r} {w}" for n, w in req.ignored[1:]),
            expression=name,
        )
    issues = [
        issue("warning", "not-supported", f"parameter {n!r} {why}; it was ignored", expression=n)
        for n, why in req.ignored
    ]
    issues += req.notes

    links = [{"relation": "self", "url": _link(ctx, req.used, req.cursor)}]
    if req.criteria == 0:
        issues.insert(
            0,
            issue(
                "information",
                "required",
                "a search needs at least one criterion: ITI-118 asks "
                "for patient (patient=id or patient.identifier=system|value), usually with date "
                "(e.g. date=ge2026-01-01); other criteria: _id, identifier, practitioner, location, "
                "status, specialty, appointment-type, service-type",
            ),
        )
        return render(searchset(ctx.base_url, total=0, matches=[], outcome=operation_outcome(issues), links=links), fmt)

    query = await build_query(ctx, req)
    if query is None:
        issues[:0] = [issue("information", "not-found", f"no appointment can match: {why}") for why in req.nothing]
        return render(searchset(ctx.base_url, total=0, matches=[], outcome=operation_outcome(issues), links=links), fmt)
    try:
        page = await ctx.service.search(query)
    except InvalidRequest as exc:
        raise FhirError(400, "not-supported", str(exc)) from None

    appts = list(page.appointments)
    cursor = req.cursor
    backwards = cursor is not None and not cursor.forward
    if backwards:
        appts.reverse()
    rendered, actors = await render_appointments(ctx, appts)

    desc = req.descending
    has_more_after = page.has_more if not backwards else True
    has_more_before = (cursor is not None) if not backwards else page.has_more
    if appts:
        links.insert(0, {"relation": "first", "url": _link(ctx, req.used, None)})
        if has_more_before and cursor is not None:
            links.append(
                {
                    "relation": "previous",
                    "url": _link(ctx, req.used, Cursor(False, desc, appts[0].interval.start, appts[0].id)),
                }
            )
        if has_more_after and req.count > 0:
            links.append(
                {
                    "relation": "next",
                    "url": _link(ctx, req.used, Cursor(True, desc, appts[-1].interval.start, appts[-1].id)),
                }
            )
    elif cursor is not None:
        links.insert(0, {"relation": "first", "url": _link(ctx, req.used, None)})

    total = page.total
    if total is None and cursor is None and not page.has_more and req.count > 0:
        total = len(appts)  # the first page is the last: the count is known without counting
    if not appts and req.count > 0:
        if cursor is None or total == 0:
            issues.insert(0, issue("information", "not-found", "no appointments match the search criteria"))
        else:
            issues.insert(
                0,
                issue(
                    "information",
                    "not-found",
                    "no more appointments in this direction "
                    "(they may have changed since the link was made); see the first link",
                ),
            )
    elif req.count == 0:
        issues.insert(0, issue("information", "informational", "_count=0: only the total is returned"))
    issues.extend(
        issue("warning", "informational", text) for text in page.warnings
    )  # rows the mapping could not render as stored

    includes: list[dict[str, Any]] = []
    if req.includes:
        seen: set[str] = set()
        for a in appts:
            for kind, actor_id in (
                ("Patient", a.patient_id),
                ("Practitioner", a.practitioner_id),
                ("Location", a.location_id),
            ):
                key = f"{kind}/{actor_id}"
                if kind in req.includes and actor_id and key not in seen and key in actors:
                    seen.add(key)
                    includes.append(actors[key].resource)

    if req.elements is not None:
        rendered = [subset(r, req.elements) for r in rendered]
    bundle = searchset(
        ctx.base_url,
        total=total if total is not None else 0,
        matches=rendered,
        outcome=operation_outcome(issues) if issues else None,
        includes=includes,
        links=links,
        profile=total is not None and req.elements is None,
    )
    if total is None:
        del bundle["total"]
    return render(bundle, fmt)
