"""The HTTP endpoint of Appointment search and the searchset Bundle it renders (links, includes, _elements)."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.requests import Request
from starlette.responses import Response

from adapter.backends.protocol import InvalidRequest
from adapter.fhir.appointments import render_appointments
from adapter.fhir.context import FhirContext, read_body
from adapter.fhir.formats import FORM, format_named, render, response_format
from adapter.fhir.limits import check_params
from adapter.fhir.outcome import FhirError, issue, operation_outcome
from adapter.fhir.render import searchset
from adapter.fhir.search.cursor import CURSOR_PARAM, Cursor
from adapter.fhir.search.params import parse_search, prefer_strict
from adapter.fhir.search.query import build_query

SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}
# Appointment elements with cardinality 1..* in R4: kept whatever _elements asks for.
MANDATORY_ELEMENTS = ("resourceType", "id", "meta", "status", "participant")


def subset(resource: dict[str, Any], elements: set[str]) -> dict[str, Any]:
    """``_elements``: the asked-for elements plus the mandatory ones, tagged SUBSETTED (FHIR R4 search 3.1.1.5.9)."""
    out = {k: v for k, v in resource.items() if k in elements or k in MANDATORY_ELEMENTS}
    meta = {k: v for k, v in (out.get("meta") or {}).items() if k != "profile"}  # a subset conforms to no profile
    meta["tag"] = [*meta.get("tag", []), SUBSETTED]
    out["meta"] = meta
    return {"resourceType": out.pop("resourceType"), "id": out.pop("id"), **out}


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
