"""Reads: ``GET Appointment/{id}`` and read + simple search of Patient, Practitioner, Location.

Actor search supports ``_id``, ``identifier`` (``system|value``) and ``name`` (starts-with), enough
for a client to resolve every participant reference the server emits.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from adapter.backends.protocol import ActorQuery, Identifier
from adapter.fhir.appointments import render_appointments, render_hold
from adapter.fhir.context import FhirContext
from adapter.fhir.formats import render, response_format
from adapter.fhir.outcome import FhirError, issue, operation_outcome
from adapter.fhir.parameters import FHIR_ID, parse_count
from adapter.fhir.render import searchset
from adapter.scheduling.state import Hold

ACTOR_KINDS = ("Patient", "Practitioner", "Location")


def _check_id(resource_id: str, kind: str) -> None:
    if not FHIR_ID.match(resource_id):
        raise FhirError(404, "not-found", f"{kind}/{resource_id} is not a valid resource id")


async def read_appointment(request: Request) -> Response:
    ctx: FhirContext = request.app.state.fhir
    fmt = response_format(request)
    appt_id = request.path_params["id"]
    _check_id(appt_id, "Appointment")
    found = await ctx.service.get(appt_id, ctx.now())
    if found is None:
        raise FhirError(
            404,
            "not-found",
            f"Appointment/{appt_id} is not known (proposed appointments from $find exist only once held or booked)",
        )
    if isinstance(found, Hold):
        return render(await render_hold(ctx, found), fmt)
    rendered, _ = await render_appointments(ctx, [found])
    return render(rendered[0], fmt)


async def read_actor(request: Request) -> Response:
    ctx: FhirContext = request.app.state.fhir
    fmt = response_format(request)
    kind = request.path_params["kind"]
    actor_id = request.path_params["id"]
    _check_id(actor_id, kind)
    found = await ctx.service.backend.find_actors(ActorQuery(kind, ids=(actor_id,), limit=1))  # type: ignore[arg-type]
    if not found:
        raise FhirError(404, "not-found", f"{kind}/{actor_id} is not known")
    return render(found[0].resource, fmt)


async def search_actor(request: Request) -> Response:
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
    count = parse_count(q.get("_count", "50"))
    ignored = sorted({k for k in q.keys() if k not in ("_id", "identifier", "name", "_count", "_format")})
    if not (ids or identifiers or name):
        found = await ctx.service.backend.find_actors(ActorQuery(kind, limit=count))  # type: ignore[arg-type]
    else:
        found = await ctx.service.backend.find_actors(
            ActorQuery(
                kind,
                ids=ids,
                identifiers=tuple(identifiers),  # type: ignore[arg-type]
                name=name,
                limit=count,
            )
        )
    issues = [
        issue("warning", "not-supported", f"parameter {k!r} is not supported and was ignored", expression=k)
        for k in ignored
    ]
    bundle = searchset(
        ctx.base_url,
        total=len(found),
        matches=[a.resource for a in found[:count]],
        outcome=operation_outcome(issues) if issues else None,
        profile=False,
    )
    return render(bundle, fmt)
