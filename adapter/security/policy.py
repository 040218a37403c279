"""What each endpoint needs, and the patient-context rule for tokens that only hold ``patient/`` scopes.

A patient-context token may only act for the patient in its ``patient`` claim. The check runs
before the handler, on the request itself (parameters, body, the stored appointment), so a refused
request changes nothing. Every refusal gives the same answer whether the other patient or
appointment exists or not, so a token cannot be used to probe for them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from typing import Any
from urllib.parse import parse_qsl

from adapter.backends.protocol import Identifier
from adapter.fhir.context import FhirContext
from adapter.fhir.formats import parse_body
from adapter.fhir.outcome import FhirError
from adapter.scheduling.proposals import ProposalError, proposal_from_dict
from adapter.scheduling.service import ActorRef
from adapter.scheduling.state import Hold
from adapter.security.scopes import Need

PUBLIC_PATHS = frozenset({"/metadata", "/.well-known/smart-configuration"})
ACTOR_KINDS = ("Patient", "Practitioner", "Location")
_READ = (("Appointment", "r"), ("Appointment", "s"))
_WRITE = (("Appointment", "c"), ("Appointment", "u"))
_FIND = (*_READ, ("Slot", "r"), ("Slot", "s"), ("Schedule", "r"), ("Schedule", "s"))
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")

NOT_YOURS = (
    "this access token is limited to one patient, and the request concerns another patient or an "
    "appointment that is not that patient's (or does not exist)"
)


@dataclasses.dataclass(frozen=True, slots=True)
class Transaction:
    """One kind of request: its audit name, what it needs, and the id in its path."""

    name: str  # find | hold | book | search | read | read-actor | search-actor | other
    need: Need | None  # None: any valid token
    kind: str = "Appointment"
    resource_id: str | None = None


def classify(method: str, path: str) -> Transaction | None:
    """``path`` is relative to the FHIR base (``/Appointment/$find``); None for public endpoints."""
    if path in PUBLIC_PATHS:
        return None
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["Appointment"]:
        if len(parts) == 1 and method == "GET":
            return Transaction("search", Need((("Appointment", "s"),)))
        if len(parts) == 2:
            op = parts[1]
            if op == "$find":
                return Transaction("find", Need(_FIND))
            if op == "$hold":
                return Transaction("hold", Need(_WRITE))
            if op == "$book":
                return Transaction("book", Need(_WRITE))
            if op == "_search" and method == "POST":
                return Transaction("search", Need((("Appointment", "s"),)))
            if method == "GET":
                return Transaction("read", Need((("Appointment", "r"),)), resource_id=op)
    if parts and parts[0] in ACTOR_KINDS:
        kind = parts[0]
        if len(parts) == 1:
            return Transaction("search-actor", Need(((kind, "s"),)), kind=kind)
        if len(parts) == 2:
            return Transaction("read-actor", Need(((kind, "r"),)), kind=kind, resource_id=parts[1])
    return Transaction("other", None)


# -- patient context ------------------------------------------------------------------------------


class _Deny(Exception):
    pass


def denied() -> FhirError:
    return FhirError(403, "forbidden", NOT_YOURS)


async def check_patient_context(
    ctx: FhirContext,
    tx: Transaction,
    *,
    patient: str,
    party: str,
    query: list[tuple[str, str]],
    body: bytes,
    content_type: str | None,
    now: dt.datetime,
) -> None:
    """Raise 403 unless the request only concerns ``patient``; bodies that do not parse are left
    to the handler, which refuses them the same way (400) before acting."""
    try:
        if tx.name == "find":
            params = _parameters(body, content_type) if body.strip() else _query_parameters(query)
            if params is not None:
                await _find(ctx, params, patient)
        elif tx.name == "hold":
            params = _parameters(body, content_type)
            if params is not None:
                for value in _values(params, "appointment-reference"):
                    await _proposal_is_for(ctx, _appointment_ref_id(value), patient, now)
        elif tx.name == "book":
            params = _parameters(body, content_type)
            if params is not None:
                await _book(ctx, params, patient, party, now)
        elif tx.name == "search":
            await _search(ctx, query + _form(body), patient)
        elif tx.name == "read":
            await _existing_is_for(ctx, tx.resource_id or "", patient, party, now, writing=False)
        elif tx.kind == "Patient" and tx.name == "read-actor":
            if tx.resource_id != patient:
                raise _Deny
        elif tx.kind == "Patient" and tx.name == "search-actor":
            ids = [v for k, raw in query if k == "_id" for v in raw.split(",")]
            if not ids or any(i != patient for i in ids):
                raise _Deny
    except _Deny:
        raise denied() from None


def _parameters(body: bytes, content_type: str | None) -> dict[str, Any] | None:
    try:
        resource = parse_body(content_type, body)
    except FhirError:
        return None
    return resource if resource.get("resourceType") == "Parameters" else None


def _query_parameters(query: list[tuple[str, str]]) -> dict[str, Any]:
    return {
        "resourceType": "Parameters",
        "parameter": [{"name": k, "valueReference": {"reference": v}} for k, v in query if k == "patient-reference"],
    }


def _form(body: bytes) -> list[tuple[str, str]]:
    try:
        return parse_qsl(body.decode("utf-8"), keep_blank_values=True) if body.strip() else []
    except UnicodeDecodeError:
        return []


def _values(params: dict[str, Any], name: str) -> list[Any]:
    out: list[Any] = []
    for p in params.get("parameter") or []:
        if isinstance(p, dict) and p.get("name") == name:
            out += [v for k, v in p.items() if k.startswith("value") or k == "resource"]
    return out


def _ref_id(reference: str, kind: str) -> str | None:
    parts = reference.strip().split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) >= 2 and parts[-2] == kind:
        return parts[-1]
    return None


def _appointment_ref_id(value: Any) -> str:
    ref = value.get("reference") if isinstance(value, dict) else None
    rid = _ref_id(ref, "Appointment") if isinstance(ref, str) else None
    if rid is None:
        raise _Deny
    return rid


async def _patient_id(ctx: FhirContext, value: Any) -> str | None:
    """The legacy patient id a Reference or Patient resource names; None when it matches nobody."""
    if not isinstance(value, dict):
        return None
    ref = value.get("reference")
    if isinstance(ref, str) and ref:
        return _ref_id(ref, "Patient")
    idents = [value["identifier"]] if isinstance(value.get("identifier"), dict) else []
    if value.get("resourceType") == "Patient":
        idents = [i for i in value.get("identifier") or [] if isinstance(i, dict)]
        if value.get("id") and not idents:
            return str(value["id"])
    for ident in idents:
        if isinstance(ident.get("value"), str):
            actor = await ctx.service.resolve(
                ActorRef("Patient", identifier=Identifier(str(ident.get("system") or ""), ident["value"]))
            )
            if actor is not None:
                return actor.id
    return None


async def _find(ctx: FhirContext, params: dict[str, Any], patient: str) -> None:
    for name in ("patient-reference", "patient-resource"):
        for value in _values(params, name):
            if await _patient_id(ctx, value) != patient:
                raise _Deny


async def _proposal_is_for(ctx: FhirContext, token: str, patient: str, now: dt.datetime) -> None:
    try:
        proposal = await ctx.service.proposals.decode(token, now)
    except (ProposalError, ValueError):
        raise _Deny from None
    if any(p != patient for p in proposal.patient_ids):
        raise _Deny


async def _existing_is_for(
    ctx: FhirContext, appt_id: str, patient: str, party: str, now: dt.datetime, *, writing: bool
) -> None:
    if not _ID.match(appt_id):
        raise _Deny
    found = await ctx.service.get(appt_id, now)
    if isinstance(found, Hold):
        ids = proposal_from_dict(found.payload).patient_ids
        if ids == (patient,) or (writing and not ids and found.client == party):
            return
        raise _Deny
    if found is None or found.patient_id != patient:
        raise _Deny


async def _book(ctx: FhirContext, params: dict[str, Any], patient: str, party: str, now: dt.datetime) -> None:
    refs = _values(params, "appointment-reference")
    resources = [r for r in _values(params, "appointment-resource") if isinstance(r, dict)]
    resource = resources[0] if resources else None
    status = resource.get("status") if resource is not None else "pending"
    named = [*_values(params, "patient-resource")]
    for part in (resource or {}).get("participant") or []:
        actor = part.get("actor") if isinstance(part, dict) else None
        if isinstance(actor, dict) and (
            actor.get("type") == "Patient" or _ref_id(str(actor.get("reference") or ""), "Patient") is not None
        ):
            named.append(actor)
    for value in named:
        if await _patient_id(ctx, value) != patient:
            raise _Deny
    appt_id = (resource or {}).get("id") or (_appointment_ref_id(refs[0]) if refs else None)
    if status in ("booked", "cancelled"):
        if not appt_id:
            return  # the handler refuses it (400): nothing to protect
        await _existing_is_for(ctx, str(appt_id), patient, party, now, writing=True)
    elif appt_id:
        await _proposal_is_for(ctx, str(appt_id), patient, now)


async def _search(ctx: FhirContext, params: list[tuple[str, str]], patient: str) -> None:
    seen = False
    for key, raw in params:
        base = key.split(":", 1)[0]
        if base.split(".", 1)[0] != "patient":
            continue
        seen = True
        for value in raw.split(","):
            if base == "patient.identifier":
                system, _, ident = value.rpartition("|")
                actor = await ctx.service.resolve(ActorRef("Patient", identifier=Identifier(system, ident)))
                if actor is None or actor.id != patient:
                    raise _Deny
            elif base == "patient":
                rid = _ref_id(value, "Patient") if "/" in value else value.strip()
                if rid != patient:
                    raise _Deny
            else:
                raise _Deny
    if not seen:
        raise _Deny
