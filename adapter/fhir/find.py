"""ITI-115 ``Appointment/$find``: POST with Parameters (the contract) or GET with a query string.

Decisions where the IG is open (docs/conformance.md#d4 to #d10):
* a missing ``start``/``end`` is filled (now, start + ``find.default_window_days``) with a warning;
* ``_count`` from the URL or a Parameters entry, default 50, capped at ``find.max_count``;
* ``total`` counts all options; a ``next`` link (GET, with ``_offset``) pages through them;
* no options: ``total`` 0 and exactly one information OperationOutcome entry;
* ``referral-identifier``, ``timing``, ``insurance-reference`` and ``reason`` are accepted and do
  not narrow the result with this backend; an information issue says so.

The response memo (issue 14): portals send the same ``$find`` many times a second. Within one whole
second of the request clock, the same request gets byte for byte the same answer as long as nothing it
depends on moved: proposed ids carry their issue second, and ``SchedulingService.find_fingerprint``
names the rest (calendar and holds change counters, read without I/O and bumped in every worker before a
``$hold``/``$book`` answer goes out; the availability cache's generation). So the finished body is kept
(``FhirContext.find_memo``, LRU of 1,024 answers or 64 MB, at most one second) under a key of: method, the exact body
bytes, the query string, Host, Content-Type, Accept, Prefer, the caller (token principal or
``X-Client-Id``), the fingerprint and the second. It runs after authentication, authorization, rate
limiting and audit (the security middleware), which see every request. Off when the fingerprint is None
(``find.cache_seconds`` below 1, a shared Redis/PostgreSQL state store, a backend that cannot lock).
Staleness is unchanged: a legacy change shows within ``find.cache_seconds`` (the memo holds an answer
for at most one second, and a reload of the availability cache moves the generation), an adapter change
at once. A slot starting within the very second of the memoised answer may be offered to the end of
that second; ``$hold`` refuses it as it would a second later.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import re
from collections.abc import Hashable, Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response

from adapter.backends.protocol import Actor, Coding, Identifier, Interval, VisitType
from adapter.fhir.context import FhirContext, client_id, read_body
from adapter.fhir.formats import parse_body, render, response_format
from adapter.fhir.outcome import issue, operation_outcome
from adapter.fhir.parameters import (
    ParamList,
    bad,
    capped_count,
    parse_datetime,
    parse_reference,
    parse_token,
    validate_embedded,
)
from adapter.fhir.render import appointment, local_instant, searchset
from adapter.scheduling.candidates import Candidate
from adapter.scheduling.service import FindRequest, FindResult

_REF = "valueReference"
_GET_PARAMS = {
    "start": "valueDateTime",
    "end": "valueDateTime",
    "specialty": "valueString",
    "visit-type": "valueString",
    "reason": "valueString",
    "location-string": "valueString",
    "practitioner": _REF,
    "organization": _REF,
    "location-reference": _REF,
    "patient-reference": _REF,
    "insurance-reference": _REF,
    "_count": "valueString",
}
_NOT_NARROWING = ("referral-identifier", "timing", "insurance-reference", "reason")


def _params_from_query(request: Request) -> ParamList:
    entries: dict[str, list[dict[str, Any]]] = {}
    for name, value in request.query_params.multi_items():
        kind = _GET_PARAMS.get(name)
        if kind is None:
            continue
        entries.setdefault(name, []).append({"name": name, kind: {"reference": value} if kind == _REF else value})
    return ParamList(entries)


async def find_endpoint(request: Request) -> Response:
    ctx: FhirContext = request.app.state.fhir
    fmt = response_format(request)
    now = ctx.now()
    body = await read_body(request) if request.method == "POST" else b""
    # The counters are read before the answer is computed (a change meanwhile leaves it under the old key only),
    # the cache's generation after it (see ``SchedulingService.find_fingerprint``).
    counters = ctx.service.find_fingerprint() if ctx.find.memo else None
    if counters is None:
        return await _find(ctx, request, body, fmt, now)
    memo = ctx.find_memo
    key = _memo_key(request, body, counters, now)
    if (hit := memo.get((key, ctx.service.availability.generation))) is not None:
        return Response(hit[0], media_type=hit[1])
    if (computing := memo.computing(key)) is not None:
        try:
            shared = await asyncio.shield(computing)
            return Response(shared[0], media_type=shared[1])
        except asyncio.CancelledError:
            if not computing.cancelled():
                raise  # this request itself was cancelled
            # the computation failed or was abandoned: compute this request's own answer
    future = memo.begin(key)
    answer: tuple[bytes, str] | None = None
    try:
        response = await _find(ctx, request, body, fmt, now)
        if response.media_type is not None:
            answer = (bytes(response.body), response.media_type)
            memo.put((key, ctx.service.availability.generation), *answer)
        return response
    finally:
        memo.end(key, future, answer)


async def _find(ctx: FhirContext, request: Request, body: bytes, fmt: str, now: dt.datetime) -> Response:
    if request.method == "POST":
        params = ParamList.from_resource(parse_body(request.headers.get("content-type"), body))
    else:
        params = _params_from_query(request)
    notices: list[dict[str, Any]] = []
    req = _find_request(ctx, params, request, now, notices)
    result = await ctx.service.find(req, now)
    link_criteria = await _link_criteria(ctx, req, result)
    bundle = _bundle(ctx, req, result, notices, request, link_criteria)
    return render(bundle, fmt)


def _memo_key(request: Request, body: bytes, counters: Hashable, now: dt.datetime) -> Hashable:
    """Everything a ``$find`` answer depends on (module docstring: the response memo)."""
    headers = request.headers
    principal = request.scope.get("sched.principal")
    caller = (
        (principal.subject, principal.client_id, principal.scopes, principal.patient, principal.issuer)
        if principal is not None
        else client_id(request)
    )
    return (
        request.method,
        body,
        request.scope.get("query_string", b""),
        headers.get("host"),
        headers.get("content-type"),
        headers.get("accept"),
        headers.get("prefer"),
        caller,
        counters,
        int(now.timestamp()),
    )


def _find_request(
    ctx: FhirContext, params: ParamList, request: Request, now: dt.datetime, notices: list[dict[str, Any]]
) -> FindRequest:
    zone = ctx.zone
    start_raw = params.one("start", "valueDateTime", "valueInstant")
    end_raw = params.one("end", "valueDateTime", "valueInstant")
    start = parse_datetime(start_raw, "start", zone) if start_raw is not None else None
    end = parse_datetime(end_raw, "end", zone, is_end=True) if end_raw is not None else None
    default_span = dt.timedelta(days=ctx.find.default_window_days)
    if start is None or end is None:
        if start is None:
            start = now.replace(microsecond=0) if end is None or end > now else end - default_span
        if end is None:
            end = start + default_span
        filled = " and ".join(n for n, v in (("start", start_raw), ("end", end_raw)) if v is None)
        notices.append(
            issue(
                "warning",
                "incomplete",
                f"{filled} not given; searched from {start.isoformat()} to {end.isoformat()}",
                expression=filled.split(" ")[0],
            )
        )
    if end <= start:
        raise bad(f"end ({end.isoformat()}) must be after start ({start.isoformat()})", "end")
    if end - start > dt.timedelta(days=ctx.find.max_window_days):
        raise bad(f"the search window is longer than the maximum of {ctx.find.max_window_days:g} days", "end")

    count_url = request.query_params.get("_count")
    count_param = params.one("_count", "valueInteger", "valuePositiveInt", "valueString", "valueUnsignedInt")
    count_value = count_param if count_param is not None else count_url
    count = capped_count(
        count_value if count_value is not None else ctx.find.default_count, ctx.find.max_count, notices
    )
    offset_text = request.query_params.get("_offset", "0")
    if not re.fullmatch(r"[0-9]{1,9}", offset_text):
        raise bad("_offset must be a non-negative integer (ASCII digits, at most 9)", "_offset")

    base = ctx.base_url
    req = FindRequest(window=Interval(start, end), offset=int(offset_text), count=count)
    req.practitioners = [
        parse_reference(v, "practitioner", ["Practitioner"], base) for v in params.values("practitioner", _REF)
    ]
    req.organizations = [
        parse_reference(v, "organization", ["Organization"], base) for v in params.values("organization", _REF)
    ]
    req.locations = [
        parse_reference(v, "location-reference", ["Location"], base) for v in params.values("location-reference", _REF)
    ]
    req.location_strings = [_string(v, "location-string") for v in params.values("location-string", "valueString")]
    req.patients = [
        parse_reference(v, "patient-reference", ["Patient"], base) for v in params.values("patient-reference", _REF)
    ]
    for resource in params.values("patient-resource", "resource"):
        patient = validate_embedded(resource, "Patient", "patient-resource")
        idents = [Identifier(i.get("system", ""), i["value"]) for i in patient.get("identifier", []) if i.get("value")]
        if patient.get("id") and not idents:
            req.patients.append(parse_reference(f"Patient/{patient['id']}", "patient-resource", ["Patient"], base))
        else:
            req.patient_identifiers.append(idents)
    for name, target in (("specialty", req.specialties), ("visit-type", req.visit_types)):
        for v in params.values(name, "valueString"):
            token = parse_token(v, name)
            if token.system is None:
                notices.append(
                    issue(
                        "warning",
                        "incomplete",
                        f"{name} {token.code!r} has no system; matched on the code alone",
                        expression=name,
                    )
                )
            target.append(token)
    for v in params.values("reason", "valueString"):
        parse_token(v, "reason")
    params.values("referral-identifier", "valueIdentifier")
    params.values("timing", "valueTiming")
    for v in params.values("insurance-reference", _REF):
        parse_reference(v, "insurance-reference", ["InsurancePlan", "Coverage"], base)
    for name in _NOT_NARROWING:
        if params.entries.get(name):
            notices.append(
                issue(
                    "information",
                    "informational",
                    f"{name} is accepted but does not narrow the search on this server",
                    expression=name,
                )
            )
    for name in params.unused():
        notices.append(issue("warning", "not-supported", f"unknown parameter {name!r} was ignored", expression=name))
    return req


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise bad(f"{name} must be a non-empty string", name)
    return value


def _bundle(
    ctx: FhirContext,
    req: FindRequest,
    result: FindResult,
    notices: list[dict[str, Any]],
    request: Request,
    criteria: list[tuple[str, str]],
) -> dict[str, Any]:
    entries = match_entries(
        ctx.base_url,
        ctx.zone,
        result.candidates,
        result.actors,
        tuple((p.id, p.display) for p in result.patients),
        (req.window.start, req.window.end),
    )
    issues = list(notices) + [issue(n.severity, n.code, n.text, expression=n.expression) for n in result.notices]
    if result.total == 0:
        issues.insert(
            0,
            issue(
                "information",
                "not-found",
                f"no potential appointments between {req.window.start.isoformat()} and "
                f"{req.window.end.isoformat()} match the criteria",
            ),
        )
    fmt = request.query_params.get("_format")
    extra = [("_format", fmt)] if fmt else []
    links = [{"relation": "self", "url": _page_url(ctx, req, criteria + extra, req.offset)}]
    if req.count > 0 and req.offset + len(entries) < result.total:
        links.append({"relation": "next", "url": _page_url(ctx, req, criteria + extra, req.offset + req.count)})
    if req.count == 0:
        issues.append(issue("information", "informational", "_count=0: only the total is returned"))
    return searchset(
        ctx.base_url,
        total=result.total,
        matches=[],
        match_entries=entries,
        outcome=operation_outcome(issues) if issues else None,
        links=links,
    )


_MATCH = {"mode": "match"}


@functools.lru_cache(maxsize=4096)
def _template(
    practitioner: tuple[str, str | None],
    specialties: tuple[Coding, ...],
    location: tuple[str, str | None],
    visit_type: VisitType,
    patients: tuple[tuple[str, str | None], ...],
    requested: tuple[dt.datetime, dt.datetime],
    zone: dt.tzinfo,
) -> dict[str, Any]:
    """A proposed Appointment for one (practitioner, location, visit type, patients, window): what
    is left per entry is its id and times. Kept across requests; the same dict (and its nested
    parts) serves every entry made from it, so nothing downstream may mutate a rendered Bundle."""
    start = requested[0]
    return appointment(
        appt_id="-",
        status="proposed",
        start=start,
        end=start,
        zone=zone,
        practitioner=practitioner,
        location=location,
        patients=patients,
        visit_type=visit_type,
        specialties=specialties,
        requested=requested,
        participant_status="needs-action",
    )


def match_entries(
    base: str,
    zone: dt.tzinfo,
    candidates: Sequence[tuple[str, Candidate]],
    actors: Mapping[str, Actor],
    patients: tuple[tuple[str, str | None], ...],
    requested: tuple[dt.datetime, dt.datetime],
) -> list[dict[str, Any]]:
    """The Bundle entries of a $find page: each one a template (``_template``) plus id and times,
    byte for byte what rendering each through ``render.appointment`` and ``render.entry`` gives."""
    out: list[dict[str, Any]] = []
    for token, c in candidates:
        prac = actors.get(f"Practitioner/{c.practitioner_id}")
        loc = actors.get(f"Location/{c.location_id}")
        template = _template(
            (c.practitioner_id, prac.display if prac else None),
            prac.specialties if prac else (),
            (c.location_id, loc.display if loc else None),
            c.visit_type,
            patients,
            requested,
            zone,
        )
        start, end = c.interval.start, c.interval.end
        resource = {
            **template,
            "id": token,
            "start": local_instant(start, zone),
            "end": local_instant(end, zone),
            "minutesDuration": int((end - start).total_seconds() // 60),
        }
        out.append({"fullUrl": f"{base}/Appointment/{token}", "resource": resource, "search": _MATCH})
    return out


async def _link_criteria(ctx: FhirContext, req: FindRequest, result: FindResult) -> list[tuple[str, str]]:
    """Every criterion of the request as GET ``$find`` parameters, so that the ``self`` and ``next``
    links answer the same question as this page. Actors given by identifier (and a
    ``patient-resource``) are written as references to what they resolved to: the GET form has no
    other way to carry them, and the resolution does not change between pages."""
    q: list[tuple[str, str]] = [("start", req.window.start.isoformat()), ("end", req.window.end.isoformat())]
    for name, kind, refs in (
        ("practitioner", "Practitioner", req.practitioners),
        ("location-reference", "Location", req.locations),
    ):
        for ref in refs:
            actor_id = ref.id
            if actor_id is None:
                actor = await ctx.service.resolve(ref)
                if actor is None:
                    continue  # matched nothing on this page either
                actor_id = actor.id
            q.append((name, f"{kind}/{actor_id}"))
    q += [("patient-reference", f"Patient/{p.id}") for p in result.patients]
    q += [("organization", f"Organization/{r.id}") for r in req.organizations if r.id]
    q += [("location-string", s) for s in req.location_strings]
    q += [("specialty", str(t)) for t in req.specialties]
    q += [("visit-type", str(t)) for t in req.visit_types]
    return q


def _page_url(ctx: FhirContext, req: FindRequest, criteria: list[tuple[str, str]], offset: int) -> str:
    q = criteria + [("_count", str(req.count)), ("_offset", str(offset))]
    return f"{ctx.base_url}/Appointment/$find?{urlencode(q)}"
