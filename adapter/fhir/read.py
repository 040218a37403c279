"""Reads: ``GET Appointment/{id}`` and read + simple search of Patient, Practitioner, Location.

Actor search supports ``_id``, ``identifier`` (``system|value``) and ``name`` (starts-with), enough
for a client to resolve every participant reference the server emits.
"""

from __future__ import annotations

import datetime as dt
import re
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response

from adapter.backends.protocol import ActorQuery, Identifier
from adapter.fhir.appointments import render_appointments, render_hold, render_proposal
from adapter.fhir.context import FhirContext
from adapter.fhir.formats import render, response_format
from adapter.fhir.outcome import FhirError, issue, operation_outcome
from adapter.fhir.parameters import parse_count
from adapter.fhir.render import searchset
from adapter.fhir.search import prefer_strict
from adapter.r4 import FHIR_ID
from adapter.scheduling.proposals import Proposal, ProposalError
from adapter.scheduling.state import Hold

ACTOR_KINDS = ("Patient", "Practitioner", "Location")
MAX_ACTOR_MATCHES = 10_000


def _check_id(resource_id: str, kind: str) -> None:
    if not FHIR_ID.match(resource_id):
        raise FhirError(404, "not-found", f"{kind}/{resource_id} is not a valid resource id")


async def read_appointment(request: Request) -> Response:
    ctx: FhirContext = request.app.state.fhir
    fmt = response_format(request)
    appt_id = request.path_params["id"]
    _check_id(appt_id, "Appointment")
    now = ctx.now()
    found = await ctx.service.get(appt_id, now)
    if found is not None and not isinstance(found, Hold) and found.id != appt_id:
        found = None  # only the canonical form of an id names the appointment
    if found is None:
        proposal = await _proposal(ctx, appt_id, now)
        booked = await _booked_from(ctx, appt_id) if proposal is not None else None
        if booked is not None:
            raise FhirError(404, "not-found", f"proposed Appointment/{appt_id} is no longer proposed: {booked}")
        if proposal is not None:
            # The fullUrl of a $find entry resolves while the proposal is valid (issue 7, item 8).
            return render(await render_proposal(ctx, appt_id, proposal), fmt)
        raise FhirError(
            404,
            "not-found",
            f"Appointment/{appt_id} is not known (proposed appointments from $find can be read until they expire)",
        )
    if isinstance(found, Hold):
        return render(await render_hold(ctx, found), fmt)
    rendered, _ = await render_appointments(ctx, [found])
    return render(rendered[0], fmt)


async def _proposal(ctx: FhirContext, token: str, now: dt.datetime) -> Proposal | None:
    if not token.startswith(("p", "r")):
        return None
    try:
        return await ctx.service.proposals.decode(token, now)
    except (ProposalError, ValueError):
        return None


async def _booked_from(ctx: FhirContext, token: str) -> str | None:
    """Why a proposed id is no longer a proposal (booked, or being booked), or None."""
    entry = await ctx.service.state.journal_get(token)
    if entry is None:
        return None
    if entry.appointment_id:
        return f"it was booked as Appointment/{entry.appointment_id}"
    return "it is being booked"


async def read_actor(request: Request) -> Response:
    ctx: FhirContext = request.app.state.fhir
    fmt = response_format(request)
    kind = request.path_params["kind"]
    actor_id = request.path_params["id"]
    _check_id(actor_id, kind)
    found = await ctx.service.find_actors(ActorQuery(kind, ids=(actor_id,), limit=1))
    found = [a for a in found if a.id == actor_id]  # e.g. a case-insensitive collation: canonical ids only
    if not found:
        raise FhirError(404, "not-found", f"{kind}/{actor_id} is not known")
    return render(found[0].resource, fmt)


async def search_actor(request: Request) -> Response:
    """Patient/Practitioner/Location search: ``_id``, ``identifier``, ``name``, ``_count``, ``_offset``,
    ``_summary=count``. Matches keep the legacy system's order and are paged with ``_offset`` links; ``total`` counts
    all of them (a search matching more than ``MAX_ACTOR_MATCHES`` must be narrowed: 400 too-costly)."""
    ctx: FhirContext = request.app.state.fhir
    fmt = response_format(request)
    kind = request.path_params["kind"]
    q = request.query_params
    ids = tuple(v for raw in q.getlist("_id") for v in raw.split(",") if v)
    identifiers = []
    for raw in q.getlist("identifier"):
        for v in raw.split(","):
            system, sep, value = v.rpartition("|")
            if not sep or not value:
                raise FhirError(400, "invalid", f"identifier {v!r} must be system|value", expression="identifier")
            identifiers.append(Identifier(system, value))
    name = q.get("name")
    count = min(parse_count(q.get("_count", "50")), ctx.find.max_count)
    summary = q.get("_summary")
    if summary is not None and summary != "count":
        raise FhirError(
            400, "not-supported", f"_summary={summary!r} is not supported (only count)", expression="_summary"
        )
    if summary == "count":
        count = 0
    offset_text = q.get("_offset", "0")
    if not re.fullmatch(r"[0-9]{1,9}", offset_text):
        raise FhirError(400, "invalid", "_offset must be a non-negative integer", expression="_offset")
    offset = int(offset_text)
    known = ("_id", "identifier", "name", "_count", "_format", "_offset", "_summary")
    ignored = sorted({k for k in q.keys() if k not in known})
    if ignored and prefer_strict(request):
        raise FhirError(
            400,
            "invalid",
            f"parameter {ignored[0]!r} is not supported by {kind} search (Prefer: handling=strict)",
            expression=ignored[0],
        )
    found = await ctx.service.find_actors(
        ActorQuery(
            kind,
            ids=ids,
            identifiers=tuple(identifiers),
            name=name,
            limit=MAX_ACTOR_MATCHES + 1,
        )
    )
    if ids:
        found = [a for a in found if a.id in ids]
    if len(found) > MAX_ACTOR_MATCHES:
        raise FhirError(
            400,
            "too-costly",
            f"more than {MAX_ACTOR_MATCHES} {kind} resources match; narrow the search (_id, identifier, name)",
        )
    issues = [
        issue("warning", "not-supported", f"parameter {k!r} is not supported and was ignored", expression=k)
        for k in ignored
    ]
    used = [(k, v) for k, v in q.multi_items() if k in known and k not in ("_offset", "_count")]
    used.append(("_count", str(count)))

    def link(relation: str, at: int) -> dict[str, str]:
        return {"relation": relation, "url": f"{ctx.base_url}/{kind}?{urlencode([*used, ('_offset', str(at))])}"}

    links = [link("self", offset)]
    if count > 0 and offset + count < len(found):
        links.append(link("next", offset + count))
    if count > 0 and offset > 0:
        links.append(link("previous", max(0, offset - count)))
    bundle = searchset(
        ctx.base_url,
        total=len(found),
        matches=[a.resource for a in found[offset : offset + count]],
        outcome=operation_outcome(issues) if issues else None,
        links=links,
        profile=False,
    )
    return render(bundle, fmt)
