"""Rendering stored appointments and holds as ``ihe-sched-appt`` Appointments (shared by $hold,
$book, read and search), resolving participant displays in one batch per actor kind."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from adapter.backends.protocol import Actor, ActorKind, ActorQuery, Appointment
from adapter.fhir.context import FhirContext
from adapter.fhir.render import HOLD_EXPIRATION_URL, appointment, from_booked, local_instant
from adapter.scheduling.proposals import Proposal, proposal_from_dict
from adapter.scheduling.state import Hold


async def actors_for(ctx: FhirContext, refs: Iterable[tuple[ActorKind, str | None]]) -> dict[str, Actor]:
    wanted: dict[ActorKind, set[str]] = {}
    for kind, actor_id in refs:
        if actor_id:
            wanted.setdefault(kind, set()).add(actor_id)
    out: dict[str, Actor] = {}
    for kind, ids in wanted.items():
        for actor in await ctx.service.find_actors(ActorQuery(kind, ids=tuple(sorted(ids)), limit=len(ids))):
            out[f"{kind}/{actor.id}"] = actor
    return out


async def render_appointments(
    ctx: FhirContext, appts: list[Appointment]
) -> tuple[list[dict[str, Any]], dict[str, Actor]]:
    refs: list[tuple[ActorKind, str | None]] = []
    for a in appts:
        refs += [("Practitioner", a.practitioner_id), ("Location", a.location_id), ("Patient", a.patient_id)]
    actors = await actors_for(ctx, refs)
    types = {vt.key: vt for vt in await ctx.service.visit_types()}
    return [from_booked(a, zone=ctx.zone, visit_types=types, actors=actors) for a in appts], actors


async def render_hold(ctx: FhirContext, hold: Hold) -> dict[str, Any]:
    return await render_proposal(
        ctx,
        hold.id,
        proposal_from_dict(hold.payload),
        status="pending",
        participant_status="tentative",
        extensions=[{"url": HOLD_EXPIRATION_URL, "valueDateTime": local_instant(hold.expires_at, ctx.zone)}],
    )


async def render_proposal(
    ctx: FhirContext,
    appt_id: str,
    p: Proposal,
    *,
    status: str = "proposed",
    participant_status: str = "needs-action",
    extensions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A proposed (or, for a hold, pending) appointment as $find and $hold write it."""
    refs: list[tuple[ActorKind, str | None]] = [("Practitioner", p.practitioner_id), ("Location", p.location_id)]
    refs += [("Patient", pid) for pid in p.patient_ids]
    actors = await actors_for(ctx, refs)
    types = {vt.key: vt for vt in await ctx.service.visit_types()}
    prac = actors.get(f"Practitioner/{p.practitioner_id}")
    loc = actors.get(f"Location/{p.location_id}")
    patients: list[tuple[str | None, str | None]] = []
    for pid in p.patient_ids:
        patient = actors.get(f"Patient/{pid}")
        patients.append((pid, patient.display if patient else None))
    return appointment(
        appt_id=appt_id,
        status=status,
        start=p.start,
        end=p.end,
        zone=ctx.zone,
        practitioner=(p.practitioner_id, prac.display if prac else None),
        location=(p.location_id, loc.display if loc else None),
        patients=patients,
        visit_type=types.get(p.visit_type_key),
        specialties=prac.specialties if prac else (),
        requested=(p.window_start, p.window_end),
        participant_status=participant_status,
        extensions=extensions or [],
    )
