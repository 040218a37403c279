"""ITI-116 ``$hold`` and ITI-117 ``$book`` (new, modify/reschedule, cancel).

Answers (docs/conformance.md#d11, docs/conformance.md#d14, docs/conformance.md#d18): success is a searchset Bundle with ``total`` 1 and the Appointment
(``pending`` for a hold, ``booked`` or ``cancelled`` for $book) plus an information
OperationOutcome. Operation failures are a searchset Bundle with ``total`` 0 and only a fatal
OperationOutcome: 409 conflict, 404 not-found, 400 invalid, 422 business-rule. A failed $hold
also carries a ``not-found`` issue, as ITI-116 requires.

``Idempotency-Key`` (docs/conformance.md#d17): the first answer for (client, key) is stored with a hash of the
operation, the answer format and the body; a retry with the same request gets that answer byte for
byte (header ``Idempotent-Replayed: true``), a different request gets 422, a concurrent duplicate
409. Transient answers (503) are not stored, so the retry is carried out; a key whose request died
with its process is taken over (``state``). Without a key, booking the same proposed id again from
the same client returns that client's booking instead of a conflict with itself.

Integrity rules (issue 7; carried out by the domain, ``scheduling.service``): a time that overlaps
the patient's other appointments or holds, with any practitioner, is 409; a proposed id booked for
another patient than it was proposed for is 422; cancel and modify compare the ``appointment-resource``
Patient participant with the appointment's patient (409 when it is another patient, nothing
changed; no Patient participant is accepted, as there is no token-based authorization yet); an
``appointment-resource`` booking or a reschedule off the slot grid, beyond ``find.max_days_ahead``,
of another length than the visit type or with a practitioner who does not offer it is 422;
cancelling an appointment that is arrived, checked-in, fulfilled or noshow is 409 naming its state,
and cancelling a cancelled one returns it unchanged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from adapter.backends.protocol import (
    Actor,
    ActorKind,
    Appointment,
    BackendUnavailable,
    BookingPending,
    BusinessRuleViolation,
    Coding,
    Identifier,
    Interval,
    InvalidRequest,
    NotFound,
    SlotConflict,
)
from adapter.fhir.appointments import render_appointments, render_hold
from adapter.fhir.context import FhirContext, client_id, read_body
from adapter.fhir.formats import parse_body, render, response_format
from adapter.fhir.outcome import FhirError, error_body, issue, operation_outcome
from adapter.fhir.parameters import ParamList, parse_datetime, parse_reference, split_reference, validate_embedded
from adapter.fhir.render import STATUS_REASON_URL, local_instant, searchset
from adapter.scheduling.proposals import ProposalError
from adapter.scheduling.service import ActorRef, HeldCancellation
from adapter.scheduling.state import IdempotencyInProgress, IdempotencyMismatch, StateUnavailable, StoredResponse

_REF = "valueReference"
log = logging.getLogger("adapter.fhir")


def _operation_error(exc: Exception, *, hold: bool) -> FhirError:
    """Domain failure -> the Bundle-shaped failure answer of REQ-GEN-20."""
    extra = []
    if hold:
        extra = [issue("fatal", "not-found", "the appointment can no longer be held")]
    if isinstance(exc, SlotConflict):
        return FhirError(409, "conflict", str(exc), as_bundle=True, extra_issues=extra)
    if isinstance(exc, BookingPending):  # sent to the legacy system, answer lost: being confirmed (issue 8)
        return FhirError(504, "timeout", str(exc), as_bundle=True, headers={"Retry-After": "5"})
    if isinstance(exc, (ProposalError, NotFound)):
        return FhirError(404, "not-found", str(exc), expression="appointment-reference", as_bundle=True)
    if isinstance(exc, InvalidRequest):
        return FhirError(400, "invalid", str(exc), as_bundle=True, extra_issues=extra)
    if isinstance(exc, BusinessRuleViolation):
        return FhirError(422, "business-rule", str(exc), as_bundle=True, extra_issues=extra)
    raise exc


MAX_IDEMPOTENCY_KEY = 255


def _request_key(request: Request) -> tuple[str, str] | None:
    """(client scope, key) of the ``Idempotency-Key`` header, or None.

    A key is never shortened (two long keys sharing a prefix would collide): a longer one is 400.
    Callers without an identity (no ``X-Client-Id``, no token) share no scope: their key is scoped to
    the exact request (operation and body), so only a retry of that same request is ever answered
    from it, never another anonymous client's different request.
    """
    key = request.headers.get("idempotency-key", "").strip()
    if not key:
        return None
    if len(key) > MAX_IDEMPOTENCY_KEY:
        raise FhirError(
            400,
            "too-long",
            f"Idempotency-Key is {len(key)} characters long; the limit is {MAX_IDEMPOTENCY_KEY}",
            expression="Idempotency-Key",
        )
    who = client_id(request)
    if who is None:
        body = request.scope.get("sched.body", b"")
        who = "anonymous:" + hashlib.sha256(request.url.path.encode() + b"\n" + body).hexdigest()[:32]
    return who, key


async def _with_idempotency(
    request: Request, operation: str, body: bytes, produce: Callable[[], Awaitable[Response]]
) -> Response:
    """Run ``produce`` at most once per (client, Idempotency-Key) and replay its answer (docs/conformance.md#d17).

    The request is identified by the operation, the body and the answer format, so a retry that
    asks for XML instead of JSON is a different request (422) rather than a JSON replay. Answers
    that say "try again" (503, request-level errors) are not stored: the key is freed so that the
    retry is carried out.
    """
    scoped = _request_key(request)
    if scoped is None:
        return await _as_operation_failure(produce)
    ctx: FhirContext = request.app.state.fhir
    state = ctx.service.state
    who, key = scoped
    digest = hashlib.sha256(f"{operation}\n{response_format(request)}\n".encode() + body).hexdigest()
    try:
        stored = await state.idempotency_begin(who, key, operation, digest, ctx.now())
    except IdempotencyMismatch as exc:
        raise FhirError(422, "business-rule", str(exc), expression="Idempotency-Key", as_bundle=True) from None
    except IdempotencyInProgress as exc:
        raise FhirError(409, "conflict", str(exc), expression="Idempotency-Key", as_bundle=True) from None
    if stored is not None:
        return Response(
            stored.body,
            status_code=stored.status,
            media_type=stored.media_type,
            headers={"Idempotent-Replayed": "true"},
        )
    try:
        response = await _as_operation_failure(produce)
    except FhirError as err:
        if err.status >= 500 or not err.as_bundle:
            await state.idempotency_finish(who, key, None)  # transient: let the client retry
            raise
        response = render(error_body(err, ctx.base_url), response_format(request), err.status, err.headers)
    except BaseException:
        await state.idempotency_finish(who, key, None)
        raise
    try:
        await state.idempotency_finish(
            who, key, StoredResponse(response.status_code, response.media_type or "", bytes(response.body))
        )
    except StateUnavailable as exc:
        # The operation is done (a booking may be committed): answer it. A retry with this key is
        # told "in progress" until the record's lease ends, then settled from the booking journal.
        log.warning("Idempotency-Key %r: the answer could not be stored (%s)", key, exc)
    return response


async def _as_operation_failure(produce: Callable[[], Awaitable[Response]]) -> Response:
    """Input errors found while carrying out $hold/$book are operation failures: Bundle-shaped (docs/conformance.md#d18)."""
    try:
        return await produce()
    except FhirError as err:
        if 400 <= err.status < 500 and not err.as_bundle:
            err.as_bundle = True
        raise


def _appointment_id(ctx: FhirContext, value: Any, name: str) -> str:
    if not isinstance(value, dict) or not isinstance(value.get("reference"), str):
        raise FhirError(
            400,
            "invalid",
            f"{name} must be a Reference with 'reference' = Appointment/<id>",
            expression=name,
            as_bundle=True,
        )
    kind, appt_id = split_reference(value["reference"], ctx.base_url, name, as_bundle=True)
    if kind != "Appointment":
        raise FhirError(
            400,
            "invalid",
            f"{name} must reference an Appointment, got {value['reference']!r}",
            expression=name,
            as_bundle=True,
        )
    return appt_id


def _success(ctx: FhirContext, appt: dict[str, Any], message: str, fmt: str) -> Response:
    bundle = searchset(
        ctx.base_url,
        total=1,
        matches=[appt],
        outcome=operation_outcome([issue("information", "informational", message)]),
    )
    return render(bundle, fmt)


# --- $hold ------------------------------------------------------------------------------------


async def hold_endpoint(request: Request) -> Response:
    ctx: FhirContext = request.app.state.fhir
    fmt = response_format(request)
    body = await read_body(request)
    params = ParamList.from_resource(parse_body(request.headers.get("content-type"), body), as_bundle=True)

    async def produce() -> Response:
        refs = params.values("appointment-reference", _REF)
        if len(refs) != 1:
            raise FhirError(
                400,
                "invalid",
                f"$hold needs exactly one appointment-reference (got {len(refs)})",
                expression="appointment-reference",
                as_bundle=True,
            )
        token = _appointment_id(ctx, refs[0], "appointment-reference")
        try:
            result = await ctx.service.hold(token, client_id(request), ctx.now())
        except BackendUnavailable:
            raise
        except Exception as exc:  # domain failures become operation failures; others propagate
            raise _operation_error(exc, hold=True) from None
        appt = await render_hold(ctx, result.hold)
        expiry = local_instant(result.hold.expires_at, ctx.zone)
        note = "held" if result.created else "already held by this client (not extended)"
        return _success(ctx, appt, f"Appointment/{token} {note} until {expiry}", fmt)

    return await _with_idempotency(request, "hold", body, produce)


# --- $book ------------------------------------------------------------------------------------


async def book_endpoint(request: Request) -> Response:
    ctx: FhirContext = request.app.state.fhir
    fmt = response_format(request)
    body = await read_body(request)
    params = ParamList.from_resource(parse_body(request.headers.get("content-type"), body), as_bundle=True)

    async def produce() -> Response:
        try:
            appt, message = await _book(ctx, params, request)
        except (FhirError, BackendUnavailable):
            raise
        except HeldCancellation as held:
            await ctx.service.release_hold(held.hold)
            rendered = await render_hold(ctx, held.hold)
            rendered["status"] = "cancelled"
            rendered.pop("extension", None)
            for p in rendered["participant"]:
                p["status"] = "declined"
            return _success(ctx, rendered, f"hold on Appointment/{held.hold.id} released", fmt)
        except Exception as exc:
            raise _operation_error(exc, hold=False) from None
        booked, _ = await render_appointments(ctx, [appt])
        return _success(ctx, booked[0], message, fmt)

    return await _with_idempotency(request, "book", body, produce)


async def _book(ctx: FhirContext, params: ParamList, request: Request) -> tuple[Appointment, str]:
    now = ctx.now()
    client = client_id(request)
    ref_value = params.one("appointment-reference", _REF)
    resource = params.one("appointment-resource", "resource")
    patient_resources = params.values("patient-resource", "resource")
    comment = params.one("comment", "valueString")
    if ref_value is None and resource is None:
        raise FhirError(
            400,
            "invalid",
            "$book needs appointment-reference or appointment-resource",
            expression="appointment-reference",
            as_bundle=True,
        )
    if resource is not None:
        validate_embedded(resource, "Appointment", "appointment-resource", as_bundle=True)
        comment = comment if comment is not None else resource.get("comment")
    status = resource.get("status") if resource is not None else "pending"
    if status not in ("pending", "proposed", "booked", "cancelled"):
        raise FhirError(
            400,
            "invalid",
            f"appointment-resource.status {status!r} is not one of pending, proposed "
            "(book), booked (modify) or cancelled (cancel)",
            expression="appointment-resource.status",
            as_bundle=True,
        )

    if status in ("pending", "proposed"):
        patient = await _patient(ctx, patient_resources, resource)  # only a new booking needs one
        token = (
            _appointment_id(ctx, ref_value, "appointment-reference") if ref_value is not None else resource.get("id")
        )
        expect = None
        if resource is not None and ref_value is not None and (resource.get("start") or resource.get("end")):
            expect = Interval(
                parse_datetime(resource.get("start"), "appointment-resource.start", ctx.zone),
                parse_datetime(resource.get("end"), "appointment-resource.end", ctx.zone),
            )
        if token is None:
            token = await _proposal_from_resource(ctx, resource, now)
        result = await ctx.service.book(
            token,
            patient=patient,
            comment=comment,
            client=client,
            now=now,
            expect=expect,
            request_key=_scoped_key(request),
        )
        appt = result.appointment
        return appt, (
            f"Appointment/{appt.id} was already booked by this client from Appointment/{token}; "
            "nothing was booked again"
            if result.replayed
            else f"Appointment/{appt.id} booked"
        )

    appt_id = resource.get("id") or (_appointment_id(ctx, ref_value, "appointment-reference") if ref_value else None)
    if not appt_id:
        raise FhirError(
            400,
            "invalid",
            f"to {'modify' if status == 'booked' else 'cancel'} an appointment, "
            "appointment-resource needs the id of the existing appointment",
            expression="appointment-resource.id",
            as_bundle=True,
        )
    # Whose appointment it is (issue 7.2): a Patient participant, when given, must be its patient.
    named = await _patient(ctx, [], resource)
    patient_id = named.id if named is not None else None
    if status == "cancelled":
        reason, text = _cancel_reason(resource)
        appt = await ctx.service.cancel(
            appt_id, reason, text, now, client=client, patient_id=patient_id, request_key=_scoped_key(request)
        )
        return appt, f"Appointment/{appt.id} cancelled"
    start = parse_datetime(resource.get("start"), "appointment-resource.start", ctx.zone)
    end = parse_datetime(resource.get("end"), "appointment-resource.end", ctx.zone)
    if end <= start:
        raise FhirError(
            400,
            "invalid",
            "appointment-resource.end must be after start",
            expression="appointment-resource.end",
            as_bundle=True,
        )
    prac, loc = _participant_ids(ctx, resource)
    await _require_actors(ctx, prac, loc)
    appt = await ctx.service.reschedule(
        appt_id,
        practitioner_id=prac,
        location_id=loc,
        interval=Interval(start, end),
        comment=comment,
        now=now,
        client=client,
        patient_id=patient_id,
        request_key=_scoped_key(request),
    )
    return appt, f"Appointment/{appt.id} modified"


def _scoped_key(request: Request) -> str | None:
    """The request's (client, Idempotency-Key) as one journal key, so a retry of the same request finds its entry."""
    scoped = _request_key(request)
    return "\x1f".join(scoped) if scoped else None


async def _require_actors(ctx: FhirContext, practitioner_id: str | None, location_id: str | None) -> None:
    """Participants named in appointment-resource must exist here (400 naming the one that does not)."""
    named: tuple[tuple[ActorKind, str | None], ...] = (("Practitioner", practitioner_id), ("Location", location_id))
    for kind, actor_id in named:
        if actor_id and await ctx.service.actor(kind, actor_id) is None:
            raise FhirError(
                400,
                "invalid",
                f"appointment-resource names {kind}/{actor_id}, which is not known to this server",
                expression="appointment-resource.participant",
                as_bundle=True,
            )


def _participant_ids(ctx: FhirContext, resource: dict[str, Any]) -> tuple[str | None, str | None]:
    prac = loc = None
    for i, part in enumerate(resource.get("participant") or []):
        actor = part.get("actor") or {}
        ref = actor.get("reference")
        if not ref:
            continue
        kind, rid = split_reference(ref, ctx.base_url, f"appointment-resource.participant[{i}].actor", as_bundle=True)
        if kind == "Practitioner":
            prac = rid
        elif kind == "Location":
            loc = rid
    return prac, loc


async def _patient(ctx: FhirContext, patient_resources: list[Any], resource: dict[str, Any] | None) -> Actor | None:
    refs: list[ActorRef] = []
    for p in patient_resources:
        validate_embedded(p, "Patient", "patient-resource", as_bundle=True)
        for ident in p.get("identifier", []):
            if ident.get("value"):
                refs.append(
                    ActorRef(
                        "Patient",
                        identifier=_ident(ident),
                        text=f"Patient?identifier={ident.get('system', '')}|{ident['value']}",
                    )
                )
        if p.get("id"):
            refs.append(ActorRef("Patient", id=p["id"], text=f"Patient/{p['id']}"))
    for i, part in enumerate((resource or {}).get("participant") or []):
        actor = part.get("actor") or {}
        if actor.get("reference", "").split("/")[-2:-1] == ["Patient"] or actor.get("type") == "Patient":
            refs.append(
                parse_reference(
                    actor, f"appointment-resource.participant[{i}].actor", ["Patient"], ctx.base_url, as_bundle=True
                )
            )
    if not refs:
        return None
    for ref in refs:
        actor = await ctx.service.resolve(ref)
        if actor is not None:
            return actor
    raise FhirError(
        422,
        "business-rule",
        f"{refs[0].text} does not match a patient of the legacy system, and this "
        "mapping does not allow creating patients",
        expression="patient-resource",
        as_bundle=True,
    )


def _ident(ident: dict[str, Any]) -> Identifier:
    return Identifier(ident.get("system", ""), ident["value"])


def _cancel_reason(resource: dict[str, Any]) -> tuple[Coding | None, str | None]:
    concepts = [resource.get("cancelationReason")] + [
        e.get("valueCodeableConcept") for e in resource.get("extension", []) if e.get("url") == STATUS_REASON_URL
    ]
    for c in concepts:
        if c:
            codings = [x for x in c.get("coding", []) if x.get("code")]
            first = codings[0] if codings else None
            return (
                Coding(first.get("system", ""), first["code"], first.get("display")) if first else None,
                c.get("text") or (first.get("display") if first else None),
            )
    return None, None


async def _proposal_from_resource(ctx: FhirContext, resource: dict[str, Any], now: dt.datetime) -> str:
    """An appointment-resource without a proposed id: book the slot it describes (issued now)."""
    start = parse_datetime(resource.get("start"), "appointment-resource.start", ctx.zone)
    end = parse_datetime(resource.get("end"), "appointment-resource.end", ctx.zone)
    prac, loc = _participant_ids(ctx, resource)
    if not prac or not loc or end <= start:
        raise FhirError(
            400,
            "invalid",
            "appointment-resource without a proposed id needs start, end and Practitioner and Location participants",
            expression="appointment-resource",
            as_bundle=True,
        )
    await _require_actors(ctx, prac, loc)
    minutes = (end - start) / dt.timedelta(minutes=1)
    types = await ctx.service.visit_types()
    wanted = [c for c in ((resource.get("appointmentType") or {}).get("coding") or [])]
    vt = next(
        (
            t
            for t in types
            for c in wanted
            for tc in t.codings
            if tc.code == c.get("code") and tc.system == c.get("system")
        ),
        None,
    )
    vt = vt or next((t for t in types if t.minutes == minutes), None)
    if vt is None:
        raise FhirError(
            400,
            "invalid",
            "appointment-resource.appointmentType does not name a visit type of this server",
            expression="appointment-resource.appointmentType",
            as_bundle=True,
        )
    # Checked like a proposal of $find (duration, grid, horizon, practitioner offers it): 422 otherwise.
    return await ctx.service.proposal_for(prac, loc, Interval(start, end), vt, now)
