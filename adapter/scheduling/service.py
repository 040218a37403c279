"""The scheduling domain: find candidates, hold them, book them, change bookings.

Backend-agnostic: talks to a ``SchedulingBackend`` and the adapter's ``StateStore``; knows
nothing of HTTP or FHIR JSON. Results carry ``Notice``s (information/warnings) that the FHIR layer
turns into OperationOutcome entries.

Conflict rules (docs/conformance.md#d9, docs/conformance.md#d13): a practitioner is an exclusive resource: no two active holds or
bookings of one practitioner overlap. A hold blocks the slot for everybody except a booking that
names the hold's own id. Holds are checked inside the backend's booking lock (the ConflictGate),
so "check legacy calendar, check holds, write" is one atomic step.

A patient is exclusive too (issue 7.1): ``$hold``, ``$book`` and reschedule refuse (409) a time
that overlaps the patient's active appointments with any practitioner, or another active hold for
that patient. The backend locks the patient after the practitioner(s) and checks the legacy
calendar; the gate checks the patient's holds; both under the same lock as the practitioner's
calendar. A proposed id signs the patients it was issued for: booking it for another patient is
422 ``business-rule``.

Whose appointment it is (issue 7.2): cancel and reschedule compare the Patient participant of the
request with the appointment's patient; a different patient is 409 ``conflict`` and nothing is
changed. A request that names no patient is accepted: there is no token-based authorization yet,
so any client can act for any patient (README, Limitations).

Times (issue 7.3): offered starts lie on the slot grid of their working-time period
(``candidates``); a booking from an ``appointment-resource`` and a reschedule must start on that
grid, last exactly the visit type's duration, lie within ``max_days_ahead`` days and name a
practitioner who offers the visit type; otherwise 422 with the reason. Reschedule keeps the visit
type. Messages state times in the mapping's zone, as the resources do.

Cancelling (issue 7.8): an appointment that is already ``cancelled`` is returned unchanged
(idempotent: a retried cancel must not fail); one that is ``arrived``, ``checked-in``,
``fulfilled``, ``noshow`` or ``entered-in-error`` is 409 naming its state.

Backends without a lock (issue 8.1, e.g. an HL7v2 scheduler behind MLLP): the gate records the booking intent
with ``journal_intent_exclusive``, which refuses it while another booking of overlapping time (same practitioner
or patient) is in flight, so the adapter's own unanswered requests are busy time for everybody else, and
``$find`` leaves them out too. The legacy answer is an outcome: ``Refused`` becomes 409 (time taken) or 422 with
the legacy reason; ``Pending`` (no answer within the retry budget) keeps the intent, answers 504 ("being
confirmed") and is settled by ``reconcile`` from the legacy system's next change notice or query; a retry of the
same booking (same client or Idempotency-Key) then gets the settled answer. A reschedule or cancel is journaled
the same way (key ``chg:<appointment id>:<request digest>``) before its message leaves (a reschedule exclusively,
like a booking), so a crash between sending and answering leaves an entry the housekeeping job settles; an entry
left ``Pending`` is settled when the mirror shows the change (or rules it out), and a retry with the same
Idempotency-Key gets the changed appointment. (A backend with a lock commits a change in one legacy transaction and
journals only an unknown outcome.)

The FHIR layer reaches the backend only through this service (``find_actors``, ``visit_types``,
``identifier_systems``, ``get``, ``search``), so a backend whose appointments live in a mirror fits unchanged.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

from adapter.backends.protocol import SchedulingBackend
from adapter.scheduling.availability_cache import AvailabilityCache
from adapter.scheduling.candidates import (
    Candidate,
    FreeTime,
    ResourcePlan,
    anchor_of,
    find_candidates,
    free_time,
    on_grid,
)
from adapter.scheduling.domain import (
    Actor,
    ActorKind,
    ActorQuery,
    Appointment,
    AppointmentPage,
    AppointmentQuery,
    AvailabilityQuery,
    BackendError,
    BackendUnavailable,
    BookingOutcome,
    BookingPending,
    BusinessRuleViolation,
    Capabilities,
    Coding,
    Confirmed,
    Identifier,
    Interval,
    InvalidRequest,
    LegacyChange,
    NewBooking,
    NotFound,
    Pending,
    SlotConflict,
    SlotRequest,
    VisitType,
)
from adapter.scheduling.proposals import Proposal, ProposalCodec, ProposalError, proposal_from_dict, proposal_to_dict
from adapter.scheduling.state import Hold, HoldConflict, JournalEntry, StateStore, StateUnavailable
from adapter.text import fold

log = logging.getLogger("adapter.scheduling")


@dataclass(frozen=True, slots=True)
class Notice:
    severity: str  # information | warning
    code: str  # FHIR IssueType
    text: str
    expression: str | None = None


@dataclass(frozen=True, slots=True)
class Token:
    system: str | None
    code: str

    def matches(self, coding: Coding) -> bool:
        return coding.code == self.code and (self.system is None or coding.system == self.system)

    def __str__(self) -> str:
        return f"{self.system}|{self.code}" if self.system else self.code


@dataclass(frozen=True, slots=True)
class ActorRef:
    """A reference as the client gave it: literal (``id``) or logical (``identifier``)."""

    kind: str  # an actor kind, or e.g. Organization/Coverage for references that are only checked
    id: str | None = None
    identifier: Identifier | None = None
    text: str = ""  # as received, for messages


@dataclass(slots=True)
class FindRequest:
    window: Interval
    practitioners: list[ActorRef] = field(default_factory=list)
    locations: list[ActorRef] = field(default_factory=list)
    location_strings: list[str] = field(default_factory=list)
    organizations: list[ActorRef] = field(default_factory=list)
    specialties: list[Token] = field(default_factory=list)
    visit_types: list[Token] = field(default_factory=list)
    patients: list[ActorRef] = field(default_factory=list)
    patient_identifiers: list[list[Identifier]] = field(default_factory=list)  # from patient-resource
    offset: int = 0
    count: int = 50


@dataclass(slots=True)
class FindResult:
    total: int
    candidates: list[tuple[str, Candidate]]  # (proposed id, candidate)
    patients: list[Actor]
    notices: list[Notice]
    window: Interval
    actors: dict[str, Actor]  # "Practitioner/x" -> Actor, for displays


@dataclass(slots=True)
class HoldResult:
    hold: Hold
    proposal: Proposal
    created: bool


@dataclass(slots=True)
class BookResult:
    appointment: Appointment
    replayed: bool  # True: this client's earlier booking of the same id, returned again


class SchedulingService:
    def __init__(
        self,
        backend: SchedulingBackend,
        state: StateStore,
        proposals: ProposalCodec,
        *,
        hold_ttl: dt.timedelta,
        default_visit_type: str | None = None,
        slot_step_minutes: int | None = None,
        organization_id: str | None = None,
        availability_cache_seconds: float = 0.0,
        max_days_ahead: float = 365,
    ) -> None:
        self.backend = backend
        self.availability = AvailabilityCache(backend, state.counters.calendar, availability_cache_seconds)
        self.state = state
        self.proposals = proposals
        self.hold_ttl = hold_ttl
        self.default_visit_type = default_visit_type
        self.slot_step_minutes = slot_step_minutes
        self.organization_id = organization_id
        self.max_days_ahead = max_days_ahead
        self.zone: dt.tzinfo = getattr(backend, "zone", dt.UTC)
        self.capabilities: Capabilities = getattr(backend, "capabilities", Capabilities())

    # -- lifecycle and legacy-side changes ---------------------------------------------------------
    async def start(self) -> None:
        """Start the backend (listeners, connections); its change notices come back to ``legacy_changed``."""
        await self.backend.start(self.legacy_changed)

    async def stop(self) -> None:
        await self.backend.stop()

    async def legacy_changed(self, changes: Sequence[LegacyChange]) -> None:
        """A backend told of changes made in the legacy system (or confirmations of ours): every worker drops its
        availability cache, and bookings whose outcome was unknown are settled now instead of at the next sweep."""
        if not changes:
            return
        await self._calendar_changed()
        try:
            settled = await self.reconcile(dt.datetime.now(dt.UTC))
        except (BackendError, StateUnavailable) as exc:
            log.warning("booking journal: cannot settle after a legacy change yet (%s)", exc)
            return
        if settled:
            log.info("booking journal: %d booking(s) of unknown outcome settled from the legacy feed", settled)

    # -- what the FHIR layer may ask of the legacy system ------------------------------------------
    async def find_actors(self, query: ActorQuery) -> list[Actor]:
        return await self.backend.find_actors(query)

    async def visit_types(self) -> list[VisitType]:
        return await self.backend.visit_types()

    def identifier_systems(self, kind: ActorKind) -> set[str]:
        return self.backend.identifier_systems(kind)

    async def _free_time(self, q: AvailabilityQuery) -> list[FreeTime]:
        if self.capabilities.availability_per_visit_type:
            # The answer depends on the visit type (SQM^S25 asks for one service and duration): not cacheable
            # by practitioner and day, and each call is one legacy query anyway.
            return [free_time(ra) for ra in await self.backend.availability(q)]
        return await self.availability.free_time(q)

    def _local(self, instant: dt.datetime) -> str:
        return instant.astimezone(self.zone).isoformat()

    def horizon(self, now: dt.datetime) -> dt.datetime:
        """The latest start that may be offered or booked (``find.max_days_ahead``)."""
        return now + dt.timedelta(days=self.max_days_ahead)

    # -- actors ------------------------------------------------------------------------------
    async def resolve(self, ref: ActorRef) -> Actor | None:
        if ref.id is not None:
            found = await self.backend.find_actors(ActorQuery(ref.kind, ids=(ref.id,)))  # type: ignore[arg-type]  # only actor refs are resolved
        elif ref.identifier is not None:
            found = await self.backend.find_actors(ActorQuery(ref.kind, identifiers=(ref.identifier,)))  # type: ignore[arg-type]  # only actor refs are resolved
        else:
            return None
        return found[0] if found else None

    async def actor(self, kind: ActorKind, actor_id: str) -> Actor | None:
        return await self.resolve(ActorRef(kind, id=actor_id))

    # -- ITI-115 -------------------------------------------------------------------------------
    def find_fingerprint(self) -> tuple[int, int] | None:
        """What, besides the request, the whole second of ``now`` and the availability cache's ``generation``, a
        ``$find`` answer depends on: the calendar and holds change counters; None when that is not all of it.

        Within one second the same request then gets the same answer (proposed ids carry their issue second), as
        long as these do not move: a hold placed or released, a booking or a legacy notice moves a counter (in
        every worker at once: ``change_counters.exact``), and a load of the availability cache moves its
        generation. Read the counters BEFORE computing an answer (a change meanwhile must leave it under the old
        key) and the generation AFTER (the load the answer itself caused must not make the next request miss).
        None when a memoised answer could hide something: counters only eventually consistent
        (Redis, PostgreSQL: another host's hold must be read from the store), bookings in flight read from the
        journal (a backend that cannot lock), availability per visit type (not cached), or a cache younger than
        a second (a memo would stretch its staleness bound).
        """
        counters = self.state.counters
        if (
            not counters.exact
            or self.availability.ttl < 1
            or not self.capabilities.can_lock
            or self.capabilities.availability_per_visit_type
        ):
            return None
        return (counters.calendar(), counters.holds())

    async def find(self, req: FindRequest, now: dt.datetime) -> FindResult:
        notices: list[Notice] = []
        empty = FindResult(0, [], [], notices, req.window, {})

        practitioners = await self.backend.find_actors(ActorQuery("Practitioner", limit=100000))
        prac_rank: dict[str, int] = {}
        if req.practitioners:
            for rank, ref in enumerate(req.practitioners):
                actor = await self.resolve(ref)
                if actor is None:
                    notices.append(
                        Notice("information", "not-found", f"{ref.text} is not known to this server", "practitioner")
                    )
                    continue
                prac_rank.setdefault(actor.id, rank)
            if not prac_rank:
                return empty
        candidates_prac = [p for p in practitioners if not prac_rank or p.id in prac_rank]

        spec_rank: dict[str, int] = {}
        if req.specialties:
            for p in candidates_prac:
                for rank, tok in enumerate(req.specialties):
                    if any(tok.matches(c) for c in p.specialties):
                        spec_rank[p.id] = min(spec_rank.get(p.id, rank), rank)
            for tok in req.specialties:
                if not any(tok.matches(c) for p in practitioners for c in p.specialties):
                    notices.append(
                        Notice("information", "not-found", f"specialty {tok} is not offered here", "specialty")
                    )
            candidates_prac = [p for p in candidates_prac if p.id in spec_rank]

        if req.organizations:
            ours = [o for o in req.organizations if o.id == self.organization_id]
            if not ours:
                for o in req.organizations:
                    notices.append(
                        Notice(
                            "information",
                            "not-found",
                            f"{o.text} is not an organization of this server",
                            "organization",
                        )
                    )
                return empty

        locations = {a.id: a for a in await self.backend.find_actors(ActorQuery("Location", limit=100000))}
        loc_rank: dict[str, int] = {}
        if req.locations:
            for rank, ref in enumerate(req.locations):
                actor = await self.resolve(ref)
                if actor is None:
                    notices.append(
                        Notice(
                            "information", "not-found", f"{ref.text} is not known to this server", "location-reference"
                        )
                    )
                    continue
                loc_rank.setdefault(actor.id, rank)
            if not loc_rank:
                return empty
        if req.location_strings:
            matching = {
                lid
                for lid, loc in locations.items()
                if any(_address_matches(loc.resource, s) for s in req.location_strings)
            }
            if not matching:
                notices.append(
                    Notice(
                        "information",
                        "not-found",
                        f"no location matches location-string {', '.join(req.location_strings)!r}",
                        "location-string",
                    )
                )
                return empty
            loc_rank = (
                {lid: r for lid, r in loc_rank.items() if lid in matching} if loc_rank else {lid: 0 for lid in matching}
            )
            if not loc_rank:
                return empty

        all_types = await self.backend.visit_types()
        chosen: list[tuple[int, VisitType]] = []
        if req.visit_types:
            for rank, tok in enumerate(req.visit_types):
                matched = [vt for vt in all_types if any(tok.matches(c) for c in vt.codings)]
                if not matched:
                    notices.append(
                        Notice("information", "not-found", f"visit-type {tok} is not offered here", "visit-type")
                    )
                chosen.extend((rank, vt) for vt in matched)
            if not chosen:
                return FindResult(0, [], [], notices, req.window, {})
        else:
            default = next((vt for vt in all_types if vt.key == self.default_visit_type), None)
            if default is None:
                raise BusinessRuleViolation(
                    f"the mapping's default visit type {self.default_visit_type!r} does not exist"
                )
            chosen = [(0, default)]

        patients: list[Actor] = []
        for ref in req.patients:
            actor = await self.resolve(ref)
            if actor is None:
                notices.append(
                    Notice("information", "not-found", f"{ref.text} is not known to this server", "patient-reference")
                )
                return empty
            patients.append(actor)
        for identifiers in req.patient_identifiers:
            actor = None
            for ident in identifiers:
                actor = await self.resolve(ActorRef("Patient", identifier=ident))
                if actor:
                    break
            if actor is None:
                notices.append(
                    Notice(
                        "warning",
                        "not-found",
                        "patient-resource does not match a patient of the legacy system by identifier; "
                        "the patient must be known before booking",
                        "patient-resource",
                    )
                )
            else:
                patients.append(actor)

        prac_ids = tuple(p.id for p in candidates_prac)
        if not prac_ids:
            return FindResult(0, [], patients, notices, req.window, {})
        # Nothing beyond the booking horizon is offered: it could not be booked (issue 7.3). The
        # window is cut so that the last candidate still starts within the horizon.
        horizon = self.horizon(now)
        longest = max(vt.minutes for _, vt in chosen)
        window = Interval(req.window.start, min(req.window.end, horizon + dt.timedelta(minutes=longest)))
        if window.start >= horizon:
            notices.append(
                Notice(
                    "information",
                    "informational",
                    f"appointments are offered up to {self.max_days_ahead:g} days ahead "
                    f"(until {self._local(horizon)}); the requested period starts later",
                    "start",
                )
            )
            return FindResult(0, [], patients, notices, req.window, {})
        locs = tuple(loc_rank) if loc_rank else ()
        per_type: list[tuple[list[FreeTime], list[tuple[int, VisitType]]]] = []
        if self.capabilities.availability_per_visit_type:
            for vt_rank, vt in chosen:
                q = AvailabilityQuery(window, prac_ids, locs, visit_type_key=vt.key, minutes=vt.minutes)
                per_type.append((await self._free_time(q), [(vt_rank, vt)]))
        else:
            per_type.append((await self._free_time(AvailabilityQuery(window, prac_ids, locs)), chosen))
        held = await self.state.holds_by_practitioner(prac_ids, window, now)
        if not self.capabilities.can_lock:
            # Bookings still waiting for the legacy answer are busy time (issue 8.1).
            for prac_id, span, pats in await self.state.intents_overlapping(window):
                held.setdefault(prac_id, []).append(span)
                if patients and set(pats) & {p.id for p in patients}:
                    held = {pid: held.get(pid, []) + [span] for pid in prac_ids}
        if patients:
            # REQ-115-14: a time the patient is already booked (or held) for is no option for them,
            # whoever the practitioner; treat it like a hold on every practitioner for this request.
            own_ids = tuple(p.id for p in patients)
            own = await self._patient_busy(own_ids, window)
            own += await self.state.holds_by_patient(own_ids, window, now)
            if own:
                held = {pid: held.get(pid, []) + own for pid in prac_ids}
        prac_by_id = {p.id: p for p in candidates_prac}
        plans = []
        for ra, types in ((ra, types) for found, types in per_type for ra in found):
            prac = prac_by_id.get(ra.practitioner_id)
            if prac is None:
                continue
            for vt_rank, vt in types:
                if vt.specialty_codes and not _offers(prac, vt):
                    continue
                plan_rank = (
                    prac_rank.get(ra.practitioner_id, 0),
                    loc_rank.get(ra.location_id, 0),
                    vt_rank,
                    spec_rank.get(ra.practitioner_id, 0),
                )
                plans.append(ResourcePlan(ra, vt, plan_rank))
        total, page = find_candidates(
            plans,
            held=held,
            now=now,
            step_minutes=self.slot_step_minutes,
            offset=req.offset,
            limit=req.count,
            latest_start=horizon,
        )
        patient_ids = tuple(p.id for p in patients)
        issue = self.proposals.issuer(patient_ids, now, req.window.start, req.window.end)
        proposed = [
            (issue(c.practitioner_id, c.location_id, c.interval.start, c.visit_type.minutes, c.visit_type.key), c)
            for c in page
        ]
        await issue.save()
        actors = {f"Practitioner/{p.id}": p for p in candidates_prac}
        actors.update({f"Location/{lid}": loc for lid, loc in locations.items()})
        return FindResult(total, proposed, patients, notices, req.window, actors)

    async def _patient_busy(self, patient_ids: tuple[str, ...], window: Interval) -> list[Interval]:
        page = await self.backend.search_appointments(
            AppointmentQuery(
                patient_ids=patient_ids,
                statuses=("booked", "arrived", "checked-in", "pending"),
                start_bounds=(("ge", window.start - dt.timedelta(days=1)), ("lt", window.end)),
                limit=1000,
                want_total=False,
            )
        )
        return [a.interval for a in page.appointments if a.interval.overlaps(window)]

    # -- ITI-116 -------------------------------------------------------------------------------
    def _slot(self, p: Proposal) -> SlotRequest:
        return SlotRequest(p.practitioner_id, p.location_id, Interval(p.start, p.end), p.visit_type_key, p.patient_ids)

    async def hold(self, token: str, client: str | None, now: dt.datetime) -> HoldResult:
        """Reserve a proposed appointment for ``hold_ttl`` (docs/conformance.md#d11 to #d13).

        The legacy calendar is re-checked and the hold recorded under the backend's booking lock,
        so a hold and a booking of overlapping time can never both succeed. Holding again from
        the same (known) client returns the existing hold unchanged; anonymous callers are all
        distinct, so for them an existing hold is a conflict.
        """
        proposal = await self.proposals.decode(token, now)
        existing = await self.state.get_hold(token, now)
        if existing is not None:
            if client is not None and existing.client == client:
                return HoldResult(existing, proposal, created=False)
            raise SlotConflict(
                f"Appointment/{token} is already held by another client until {self._local(existing.expires_at)}"
            )
        if proposal.start <= now:
            raise ProposalError(f"proposed appointment {token!r} starts in the past")
        slot = self._slot(proposal)
        expires = now + self.hold_ttl
        if expires.microsecond:  # whole seconds, as the hold-expiration extension states it
            expires = expires.replace(microsecond=0) + dt.timedelta(seconds=1)
        new_hold = Hold(
            token,
            proposal.practitioner_id,
            proposal.location_id,
            slot.interval,
            expires,
            client,
            proposal_to_dict(proposal),
        )
        placed: list[Hold] = []

        def gate(slots: Sequence[SlotRequest]) -> None:
            if not self.capabilities.can_lock:
                # A booking still waiting for its legacy answer is busy time for holds too (issue 8.1).
                for prac_id, span, _ in self.state.gate.intents_overlapping(slot.interval):
                    if prac_id == slot.practitioner_id:
                        raise SlotConflict(
                            f"Practitioner/{prac_id} is being booked from {self._local(span.start)} to "
                            f"{self._local(span.end)}; the legacy system has not confirmed it yet"
                        )
            try:
                placed.append(self.state.gate.place_hold(new_hold, now))
            except HoldConflict as exc:
                raise SlotConflict(exc.describe(self.zone)) from None

        await self.backend.secure([slot], gate)
        hold = placed[0]
        if hold.client != client or hold.expires_at != new_hold.expires_at:
            if hold.client != client or client is None:
                raise SlotConflict(f"Appointment/{token} was held by another client meanwhile")
            return HoldResult(hold, proposal, created=False)
        return HoldResult(hold, proposal, created=True)

    # -- ITI-117 -------------------------------------------------------------------------------
    async def book(
        self,
        token: str,
        *,
        patient: Actor | None,
        comment: str | None,
        client: str | None,
        now: dt.datetime,
        expect: Interval | None = None,
        request_key: str | None = None,
    ) -> BookResult:
        """Book a proposed (or held) appointment, exactly once.

        Conflict rules: the legacy calendar and every foreign hold are checked inside the backend's
        booking lock (the gate), then the legacy row is written in the same transaction. Crash
        safety: the gate also records a journal intent; after the legacy commit the journal gets the
        appointment id and the hold is released in one step (see ``state``). A booking of this id
        whose answer was lost (crash, broken connection) is first settled from the legacy system;
        when the same client (or the same Idempotency-Key) asks again it gets that appointment back
        instead of a conflict with its own booking.
        """
        proposal = await self.proposals.decode(token, now)
        if expect is not None and (expect.start != proposal.start or expect.end != proposal.end):
            raise InvalidRequest(
                "appointment-resource start/end differ from the referenced proposed appointment "
                f"({self._local(proposal.start)} to {self._local(proposal.end)})"
            )
        entry = await self._settle(token, now)
        if entry is not None and entry.state == "intent" and _same_requester(entry, client, request_key):
            raise BookingPending(_pending_text(token))
        if (
            entry is not None
            and entry.state == "done"
            and entry.appointment_id
            and _same_requester(entry, client, request_key)
        ):
            previous = await self.backend.get_appointment(entry.appointment_id)
            if previous is not None and previous.status not in _FREEING_STATUSES:
                return BookResult(previous, replayed=True)
        own = await self.state.get_hold(token, now)
        if own is not None and own.client is not None and own.client != client:
            raise SlotConflict(f"Appointment/{token} is held by another client")
        if patient is not None and proposal.patient_ids and patient.id not in proposal.patient_ids:
            raise BusinessRuleViolation(
                f"Appointment/{token} was proposed for "
                + ", ".join(f"Patient/{p}" for p in proposal.patient_ids)
                + f" and cannot be booked for Patient/{patient.id}; run $find for that patient"
            )
        patient_id = patient.id if patient else (proposal.patient_ids[0] if proposal.patient_ids else None)
        if patient_id is None:
            raise InvalidRequest(
                "no patient: give patient-reference/patient-resource to $find, "
                "or patient-resource or a Patient participant to $book"
            )
        if len(proposal.patient_ids) > 1 and patient is None:
            raise BusinessRuleViolation(
                "the legacy system books one patient per appointment; book each patient of a group separately"
            )
        if proposal.start <= now:
            raise InvalidRequest(f"the proposed appointment starts in the past ({self._local(proposal.start)})")
        p = proposal
        slot = SlotRequest(p.practitioner_id, p.location_id, Interval(p.start, p.end), p.visit_type_key, (patient_id,))
        payload = proposal_to_dict(proposal) | {"patient_id": patient_id}
        recorded: list[bool] = []

        def gate(slots: Sequence[SlotRequest]) -> None:
            # Inside the legacy lock (practitioner and patient), after the legacy calendar said "free".
            if not self.capabilities.can_lock:
                # No legacy lock: the check of holds and in-flight bookings and the intent are one state
                # transaction, so the intent itself is the lock (issue 8.1).
                self._intent_exclusive(token, slots, client, request_key, payload, now)
                recorded.append(True)
                return
            self._check_holds(slots, now, own_hold=token, client=client)
            self.state.gate.journal_intent(token, client=client, request_key=request_key, payload=payload, now=now)
            recorded.append(True)

        booking = NewBooking(slot, patient_id, comment, client or "sched-adapter", placer_id=placer_id_for(token))
        try:
            outcome = await self.backend.book(booking, gate)
            if isinstance(outcome, Pending):
                # Sent, unanswered: the intent stays (busy time for others) and is settled from the legacy
                # system; given up here so that the settlement may claim it at once. The legacy system may
                # already have told us (an SIU that overtook the lost SRR): then this is the answer.
                await self.state.journal_abandon(token, now)
                log.warning("booking of %s: outcome unknown (%s); being confirmed", token, outcome.detail)
                try:
                    settled = await self._settle(token, now)
                except (BackendError, StateUnavailable) as exc:
                    log.warning("booking of %s: cannot settle yet (%s)", token, exc)
                    settled = None
                if settled is not None and settled.state == "done" and settled.appointment_id:
                    found = await self.backend.get_appointment(settled.appointment_id)
                    if found is not None:
                        return BookResult(found, replayed=False)
                raise BookingPending(_pending_text(token))
            appt = _confirmed(outcome)
            await self._calendar_changed()
        except BookingPending:
            raise
        except BackendError as exc:
            if recorded:
                if isinstance(exc, BackendUnavailable):
                    # The connection broke after the intent: the legacy write may have been
                    # committed. Give the intent up so that the next attempt (a retry, or the
                    # housekeeping job) settles it from the legacy system first.
                    await self.state.journal_abandon(token, now)
                else:
                    await self.state.journal_drop(token)  # refused before commit: nothing was written
            raise
        except Exception:
            if recorded:
                await self.state.journal_abandon(token, now)
            raise
        # The booking replaces the hold (REQ-117-06), in the same step that records the outcome.
        try:
            await self.state.journal_done(token, appt.id, now, release_hold=True)
        except Exception:  # the booking stands; the intent is settled later from the legacy system
            log.exception("booking journal: cannot record Appointment/%s for %s; it will be reconciled", appt.id, token)
        return BookResult(appt, replayed=False)

    def _intent_exclusive(
        self,
        token: str,
        slots: Sequence[SlotRequest],
        client: str | None,
        request_key: str | None,
        payload: dict[str, Any],
        now: dt.datetime,
    ) -> None:
        """In a gate of a backend without a lock: record the intent of ``token`` unless a foreign hold or another
        booking in flight overlaps one of ``slots`` (then 409)."""
        try:
            for s in slots:
                self.state.gate.journal_intent_exclusive(
                    token,
                    client=client,
                    request_key=request_key,
                    payload=payload,
                    now=now,
                    practitioner_id=s.practitioner_id,
                    patient_ids=s.patient_ids,
                    interval=s.interval,
                )
        except HoldConflict as exc:
            raise SlotConflict(exc.describe(self.zone)) from None

    def _check_holds(
        self, slots: Sequence[SlotRequest], now: dt.datetime, *, own_hold: str | None, client: str | None
    ) -> None:
        """In a gate: no foreign hold on the practitioner, no other hold for the patient."""
        try:
            for s in slots:
                self.state.gate.check_free(s.practitioner_id, s.interval, now, own_hold=own_hold, client=client)
                self.state.gate.check_patient_free(s.patient_ids, s.interval, now, own_hold)
        except HoldConflict as exc:
            raise SlotConflict(exc.describe(self.zone)) from None

    async def _check_time(
        self, practitioner_id: str, location_id: str, interval: Interval, minutes: int, now: dt.datetime
    ) -> None:
        """A start chosen by the client (not proposed by $find) must be one $find could offer: within
        the booking horizon and on the slot grid of the working-time period it lies in (issue 7.3).
        Whether it lies in working time at all is checked by the backend under its lock (400)."""
        horizon = self.horizon(now)
        if interval.start > horizon:
            raise BusinessRuleViolation(
                f"{self._local(interval.start)} is beyond the booking horizon: appointments can be booked "
                f"up to {self.max_days_ahead:g} days ahead (until {self._local(horizon)})"
            )
        found = await self.backend.availability(AvailabilityQuery(interval, (practitioner_id,), (location_id,)))
        anchors = sorted({int(a.timestamp()) for ra in found for a in ra.anchors})
        anchor_s = anchor_of(anchors, int(interval.start.timestamp()))
        if anchor_s is None:
            return
        anchor = dt.datetime.fromtimestamp(anchor_s, dt.UTC)
        step = dt.timedelta(minutes=self.slot_step_minutes or minutes)
        if (interval.start - anchor) % step:
            after = dt.datetime.fromtimestamp(
                on_grid(anchor_s, int(step.total_seconds()), int(interval.start.timestamp()) + 1), dt.UTC
            )
            raise BusinessRuleViolation(
                f"{self._local(interval.start)} is not on the slot grid of Practitioner/{practitioner_id} at "
                f"Location/{location_id} (every {int(step.total_seconds()) // 60} minutes from "
                f"{self._local(anchor)}); the nearest starts on it are {self._local(after - step)} and "
                f"{self._local(after)}"
            )

    async def proposal_for(
        self,
        practitioner_id: str,
        location_id: str,
        interval: Interval,
        visit_type: VisitType,
        now: dt.datetime,
    ) -> str:
        """A proposed id for a slot the client describes itself (``appointment-resource`` without an
        id): refused (422) unless $find could have offered it: the visit type's duration, a
        practitioner who offers the visit type, on the grid, within the horizon."""
        minutes = (interval.end - interval.start) / dt.timedelta(minutes=1)
        if minutes != visit_type.minutes:
            raise BusinessRuleViolation(
                f"a {visit_type.display} visit lasts {visit_type.minutes} minutes; appointment-resource "
                f"start and end are {minutes:g} minutes apart"
            )
        prac = await self.actor("Practitioner", practitioner_id)
        if prac is not None and visit_type.specialty_codes and not _offers(prac, visit_type):
            raise BusinessRuleViolation(
                f"Practitioner/{practitioner_id} does not offer the visit type {visit_type.display!r}"
            )
        await self._check_time(practitioner_id, location_id, interval, visit_type.minutes, now)
        return await self.proposals.encode(
            Proposal(
                practitioner_id,
                location_id,
                interval.start,
                visit_type.minutes,
                visit_type.key,
                (),
                now,
                interval.start,
                interval.end,
            )
        )

    async def _settle(self, token: str, now: dt.datetime) -> JournalEntry | None:
        """Settle a stale booking intent of ``token`` (if any); return the journal entry as it now is."""
        entry = await self.state.journal_get(token)  # a plain read: the common case writes nothing
        if entry is None or entry.state != "intent":
            return entry
        claimed = await self.state.journal_claim(token, now)  # None: its request is still running
        if claimed is not None:
            await self._reconcile_entry(claimed, now)
        return await self.state.journal_get(token)

    async def _reconcile_entry(self, entry: JournalEntry, now: dt.datetime) -> str:
        """Look a booking of unknown outcome up in the legacy system and record what happened."""
        if entry.token.startswith(_CHANGE_PREFIX):
            return await self._reconcile_change(entry, now)
        p = proposal_from_dict({k: v for k, v in entry.payload.items() if k != "patient_id"})
        slot = self._slot(p)
        patient_id = entry.payload.get("patient_id")
        try:
            appt = await self.backend.find_booked(slot, patient_id, placer_id_for(entry.token))
        except BackendError as exc:
            log.warning("booking journal: cannot settle Appointment/%s yet (%s); will retry", entry.token, exc)
            await self.state.journal_abandon(entry.token, now)
            return "unknown"
        if appt is not None:
            await self.state.journal_done(entry.token, appt.id, now, release_hold=True)
            log.warning(
                "booking journal: the booking of %s by %s was committed in the legacy system as "
                "Appointment/%s but not recorded here (crash or lost connection); recorded now",
                entry.token,
                entry.client or "an anonymous client",
                appt.id,
            )
            return "booked"
        await self.state.journal_drop(entry.token)
        log.warning(
            "booking journal: the booking of %s by %s never reached the legacy system; intent dropped",
            entry.token,
            entry.client or "an anonymous client",
        )
        return "not-booked"

    async def _reconcile_change(self, entry: JournalEntry, now: dt.datetime) -> str:
        """Settle a reschedule/cancel of unknown outcome from the mirror: done when it shows the change (the filler's
        SIU S13/S14, S15/S17); dropped when it shows the change cannot have happened, or when no notice showed it
        within ``_CHANGE_UNSEEN_AFTER`` (the filler announces every change it makes)."""
        p = entry.payload
        appointment_id = str(p.get("appointment_id") or "")
        try:
            appt = await self.backend.get_appointment(appointment_id)
        except BackendError as exc:
            log.warning("change journal: cannot settle Appointment/%s yet (%s); will retry", appointment_id, exc)
            await self.state.journal_abandon(entry.token, now)
            return "unknown"
        if appt is not None and _shows_change(appt, p):
            await self.state.journal_done(entry.token, appt.id, now, release_hold=False)
            log.warning("change journal: the %s of Appointment/%s was made in the legacy system", p["change"], appt.id)
            return "changed"
        refuted = appt is None or (p.get("change") == "reschedule" and appt.status in _FREEING_STATUSES)
        if refuted or now - entry.created_at > _CHANGE_UNSEEN_AFTER:
            await self.state.journal_drop(entry.token)
            log.warning(
                "change journal: the legacy system shows no %s of Appointment/%s; considered not made",
                p.get("change"),
                appointment_id,
            )
            return "not-changed"
        await self.state.journal_abandon(entry.token, now)
        return "unknown"

    async def reconcile(self, now: dt.datetime) -> int:
        """Settle every stale booking intent (startup and the housekeeping job); returns how many."""
        entries = await self.state.journal_claim_stale(now)
        for entry in entries:
            await self._reconcile_entry(entry, now)
        return len(entries)

    async def reschedule(
        self,
        appointment_id: str,
        *,
        practitioner_id: str | None,
        location_id: str | None,
        interval: Interval,
        comment: str | None,
        now: dt.datetime,
        client: str | None = None,
        patient_id: str | None = None,
        request_key: str | None = None,
    ) -> Appointment:
        """Move a booking (REQ-117-07/08): the new time is secured and the old one released in one
        legacy transaction, so a conflict (409) or any failure leaves the original untouched.

        The visit type stays, and so does its duration (a new start/end of another length is 422);
        the new practitioner must offer the visit type (422); the new start must be on the grid and
        within the horizon (422); ``patient_id``, when the request names one, must be the
        appointment's patient (409). A change whose legacy answer never came is journaled and settled from
        the legacy feed (``_reconcile_change``)."""
        asked = f"{practitioner_id or ''}|{location_id or ''}|{interval.start.isoformat()}|{interval.end.isoformat()}"
        token = change_token(appointment_id, asked, client, request_key)
        replay = await self._settled_change(token, client, request_key, now)
        if replay is not None:
            return replay
        current = await self.backend.get_appointment(appointment_id)
        if current is None:
            raise NotFound(f"Appointment/{appointment_id} is not known")
        self._require_patient(appointment_id, current.patient_id, patient_id)
        if current.status in _FREEING_STATUSES + ("fulfilled",):
            raise BusinessRuleViolation(f"Appointment/{appointment_id} is {current.status} and cannot be modified")
        if interval.start <= now:
            raise InvalidRequest("the new time is in the past")
        vt = next((v for v in await self.backend.visit_types() if v.key == current.visit_type_key), None)
        old_minutes = (current.interval.end - current.interval.start) / dt.timedelta(minutes=1)
        minutes = vt.minutes if vt is not None else old_minutes
        new_minutes = (interval.end - interval.start) / dt.timedelta(minutes=1)
        if new_minutes != minutes:
            what = f"a {vt.display} visit" if vt is not None else "this appointment"
            raise BusinessRuleViolation(
                f"Appointment/{appointment_id} is {what} of {minutes:g} minutes; the new start and end are "
                f"{new_minutes:g} minutes apart (a reschedule keeps the visit type and its duration)"
            )
        new_prac = practitioner_id or current.practitioner_id or ""
        new_loc = location_id or current.location_id or ""
        if vt is not None and vt.specialty_codes and new_prac != current.practitioner_id:
            prac = await self.actor("Practitioner", new_prac)
            if prac is not None and not _offers(prac, vt):
                raise BusinessRuleViolation(
                    f"Practitioner/{new_prac} does not offer the visit type {vt.display!r} of "
                    f"Appointment/{appointment_id}"
                )
        await self._check_time(new_prac, new_loc, interval, int(minutes), now)
        slot = SlotRequest(
            new_prac,
            new_loc,
            interval,
            current.visit_type_key or "",
            (current.patient_id,) if current.patient_id else (),
        )

        ask = {"change": "reschedule", "practitioner_id": new_prac, "location_id": new_loc}
        payload = _change_payload(ask, appointment_id, interval, slot.patient_ids)
        recorded: list[bool] = []

        def gate(slots: Sequence[SlotRequest]) -> None:
            if not self.capabilities.can_lock:
                # As for a new booking: the intent is the lock, recorded before the message leaves, so a crash or a
                # lost answer leaves a journal entry that the legacy feed settles, and the new time is busy meanwhile.
                self._intent_exclusive(token, slots, client, request_key, payload, now)
                recorded.append(True)
                return
            self._check_holds(slots, now, own_hold=None, client=client)

        outcome = await self._journaled_change(
            token,
            recorded,
            now,
            self.backend.reschedule(appointment_id, slot, gate, comment, booked_by=client or "sched-adapter"),
        )
        if isinstance(outcome, Pending) and not recorded:
            await self._change_pending(token, appointment_id, payload, client, request_key, now)
        appt = _confirmed(outcome, appointment_id)
        await self._change_done(token, recorded, appt, now)
        await self._calendar_changed()
        return appt

    async def cancel(
        self,
        appointment_id: str,
        reason: Coding | None,
        reason_text: str | None,
        now: dt.datetime,
        client: str | None = None,
        patient_id: str | None = None,
        request_key: str | None = None,
    ) -> Appointment:
        """Cancel a booking (legacy status update; the slot is offered again) or release a hold.

        A hold placed by a known client can only be released by that client. ``patient_id``, when
        the request names one, must be the appointment's (or the hold's) patient (409).
        """
        held = await self.state.get_hold(appointment_id, now)
        if held is not None:
            if held.client is not None and held.client != client:
                raise SlotConflict(f"Appointment/{appointment_id} is held by another client")
            held_for = [str(p) for p in held.payload.get("patient_ids") or ()]
            if held_for and patient_id is not None and patient_id not in held_for:
                raise SlotConflict(
                    f"Appointment/{appointment_id} is not held for Patient/{patient_id}; nothing was changed"
                )
            raise _HeldCancellation(held)
        token = change_token(appointment_id, "cancel", client, request_key)
        replay = await self._settled_change(token, client, request_key, now)
        if replay is not None:
            return replay
        current = await self.backend.get_appointment(appointment_id)
        if current is None:
            raise NotFound(f"Appointment/{appointment_id} is not known")
        self._require_patient(appointment_id, current.patient_id, patient_id)
        if current.status == "cancelled":
            return current  # cancelling twice changes nothing: a retried cancel must not fail
        if current.status in _SETTLED_STATUSES:
            raise SlotConflict(
                f"Appointment/{appointment_id} is {current.status} and can no longer be cancelled; nothing was changed"
            )
        patients = (current.patient_id,) if current.patient_id else ()
        ask = {"change": "cancel", "practitioner_id": current.practitioner_id or "", "location_id": ""}
        payload = _change_payload(ask, appointment_id, current.interval, patients)
        recorded: list[bool] = []
        if not self.capabilities.can_lock:
            # Recorded before the message leaves (see reschedule); the time stays busy until the cancel is settled.
            await asyncio.to_thread(
                self.state.gate.journal_intent, token, client=client, request_key=request_key, payload=payload, now=now
            )
            recorded.append(True)
        outcome = await self._journaled_change(
            token,
            recorded,
            now,
            self.backend.cancel(appointment_id, reason, reason_text, booked_by=client or "sched-adapter"),
        )
        if isinstance(outcome, Pending) and not recorded:
            await self._change_pending(token, appointment_id, payload, client, request_key, now)
        appt = _confirmed(outcome, appointment_id)
        await self._change_done(token, recorded, appt, now)
        await self._calendar_changed()
        return appt

    async def _journaled_change(
        self, token: str, recorded: list[bool], now: dt.datetime, send: Awaitable[BookingOutcome]
    ) -> BookingOutcome:
        """Run a reschedule/cancel whose intent may have been journaled (``recorded``) and settle the journal entry
        by what is known: refused before any legacy write -> dropped; unknown (no answer, broken connection, crash
        of this request) -> given up at once, so the legacy feed or the housekeeping job settles it."""
        try:
            outcome = await send
        except BackendError as exc:
            if recorded:
                if isinstance(exc, BackendUnavailable):
                    await self.state.journal_abandon(token, now)
                else:
                    await self.state.journal_drop(token)
            raise
        except Exception:
            if recorded:
                await self.state.journal_abandon(token, now)
            raise
        if recorded:
            if isinstance(outcome, Pending):
                await self.state.journal_abandon(token, now)
                log.warning("change %s: outcome unknown (%s); being confirmed", token, outcome.detail)
            elif not isinstance(outcome, Confirmed):
                await self.state.journal_drop(token)
        return outcome

    async def _change_done(self, token: str, recorded: list[bool], appt: Appointment, now: dt.datetime) -> None:
        if not recorded:
            return
        try:
            await self.state.journal_done(token, appt.id, now, release_hold=False)
        except Exception:  # the change stands; the intent is settled later from the legacy feed
            log.exception("change journal: cannot record Appointment/%s for %s; it will be reconciled", appt.id, token)

    async def _change_pending(
        self,
        token: str,
        appointment_id: str,
        payload: dict[str, Any],
        client: str | None,
        request_key: str | None,
        now: dt.datetime,
    ) -> None:
        """A reschedule or cancel of a backend with a lock was sent but not answered (a backend without one journals
        before sending): journal what was asked so that the legacy feed settles it and a retry of the same request
        gets the settled answer."""
        try:
            # The gate's synchronous write, in a thread: the state store has no async "intent" of its own because a
            # booking records it inside the backend's lock; a change records it only once its outcome is unknown.
            await asyncio.to_thread(
                self.state.gate.journal_intent, token, client=client, request_key=request_key, payload=payload, now=now
            )
            await self.state.journal_abandon(token, now)  # stale at once: the next legacy notice may settle it
        except StateUnavailable as exc:
            log.warning("change journal: cannot record the change of Appointment/%s (%s)", appointment_id, exc)

    async def _settled_change(
        self, token: str, client: str | None, request_key: str | None, now: dt.datetime
    ) -> Appointment | None:
        """The settled answer to a retried reschedule/cancel whose first attempt's outcome was unknown; raises
        ``BookingPending`` while it is still unknown; None when there is nothing to replay. Only a request with an
        Idempotency-Key is replayed: without one, the same change asked again is a new request."""
        if request_key is None:
            return None
        entry = await self._settle(token, now)
        if entry is None or not _same_requester(entry, client, request_key):
            return None
        what = f"the change of Appointment/{entry.payload.get('appointment_id')}"
        if entry.state == "intent":
            raise BookingPending(
                f"{what} was sent to the legacy scheduling system but its answer did not arrive in time; it is "
                "still being confirmed: retry with the same Idempotency-Key shortly"
            )
        if entry.appointment_id:
            return await self.backend.get_appointment(entry.appointment_id)
        return None

    @staticmethod
    def _require_patient(appointment_id: str, actual: str | None, claimed: str | None) -> None:
        if claimed is not None and actual != claimed:
            raise SlotConflict(
                f"Appointment/{appointment_id} is not an appointment of Patient/{claimed}; nothing was changed"
            )

    async def release_hold(self, hold: Hold) -> None:
        await self.state.release(hold.id)

    async def appointment(self, appointment_id: str) -> Appointment | None:
        return await self.backend.get_appointment(appointment_id)

    async def get(self, appointment_id: str, now: dt.datetime) -> Appointment | Hold | None:
        hold = await self.state.get_hold(appointment_id, now)
        if hold is not None:
            return hold
        return await self.backend.get_appointment(appointment_id)

    async def search(self, query: AppointmentQuery) -> AppointmentPage:
        return await self.backend.search_appointments(query)

    async def _calendar_changed(self) -> None:
        """Tell every worker's availability cache that the adapter changed the legacy calendar.

        Called after the legacy commit: a state store that cannot be reached now must not turn a
        committed change into an error. The caches then catch up within ``find.cache_seconds``, as
        for a change made directly in the legacy system ($hold/$book re-check under the lock anyway).
        """
        try:
            await self.state.bump_calendar_version()
        except StateUnavailable as exc:
            log.warning("availability caches: cannot announce a calendar change (%s)", exc)

    async def sweep(self, now: dt.datetime) -> int:
        n = await self.state.sweep(now)
        if n:
            log.info("released %d expired holds/proposals", n)
        return n

    async def housekeeping(self, now: dt.datetime) -> None:
        """The timed job (and the first thing after startup): expire holds, settle stale bookings."""
        try:
            await self.sweep(now)
        except StateUnavailable as exc:  # a locked state file: the next run tries again
            log.warning("hold expiry: %s", exc)
            return
        try:
            settled = await self.reconcile(now)
        except Exception:  # never let the job die; the next run tries again
            log.exception("booking journal: reconciliation failed")
            return
        if settled:
            log.info("booking journal: settled %d booking(s) of unknown outcome", settled)


_FREEING_STATUSES = ("cancelled", "noshow", "entered-in-error")
# The visit took place (or was recorded as missed): cancelling it would rewrite history.
_SETTLED_STATUSES = ("arrived", "checked-in", "fulfilled", "noshow", "entered-in-error")


# Change intents share the booking journal; proposed ids never contain ":" so the keys cannot collide.
_CHANGE_PREFIX = "chg:"
# The filler announces every change it makes by SIU: a change no notice showed in this time did not happen.
_CHANGE_UNSEEN_AFTER = dt.timedelta(minutes=5)


def _change_payload(
    ask: dict[str, str], appointment_id: str, interval: Interval, patient_ids: tuple[str, ...]
) -> dict[str, Any]:
    """What a change's journal entry keeps: what was asked, and the time it occupies (the new slot, or the appointment
    being cancelled) in the fields every state store reads as busy time."""
    return ask | {
        "appointment_id": appointment_id,
        "start": interval.start.isoformat(),
        "end": interval.end.isoformat(),
        "minutes": int((interval.end - interval.start) / dt.timedelta(minutes=1)),
        "patient_ids": list(patient_ids),
    }


def change_token(appointment_id: str, asked: str, client: str | None, request_key: str | None) -> str:
    """The journal key of one reschedule/cancel request (what was ``asked`` of ``appointment_id``, by whom, under
    which Idempotency-Key), so that a retry of the same request finds it and another request does not."""
    who = hashlib.sha256(f"{asked}\x1f{request_key or ''}\x1f{client or ''}".encode()).hexdigest()[:20]
    return f"{_CHANGE_PREFIX}{appointment_id}:{who}"


def _shows_change(appt: Appointment, payload: dict[str, Any]) -> bool:
    if payload.get("change") == "cancel":
        return appt.status == "cancelled"
    return (
        appt.status not in _FREEING_STATUSES
        and appt.interval.start == dt.datetime.fromisoformat(str(payload["start"]))
        and appt.interval.end == dt.datetime.fromisoformat(str(payload["end"]))
        and (not payload.get("practitioner_id") or appt.practitioner_id == payload["practitioner_id"])
    )


def placer_id_for(token: str) -> str:
    """The placer id of every attempt to book the proposed id ``token``: stable across retries (the same token,
    the same id), short enough for ARQ-1/SCH-1 (EI, 20 characters in v2.3) and free of HL7 delimiters."""
    return "SA" + hashlib.sha256(token.encode("utf-8")).hexdigest()[:18].upper()


def _pending_text(token: str) -> str:
    return (
        f"the booking of Appointment/{token} was sent to the legacy scheduling system but its answer did not "
        "arrive in time; the booking is being confirmed. Retry with the same Idempotency-Key (or the same "
        "client) to get the settled answer; do not book another slot meanwhile"
    )


def _confirmed(outcome: BookingOutcome, appointment_id: str | None = None) -> Appointment:
    """The appointment of a confirmed outcome; a refusal or an unknown outcome as the error the FHIR layer maps."""
    if isinstance(outcome, Confirmed):
        return outcome.appointment
    if isinstance(outcome, Pending):
        what = f"the change of Appointment/{appointment_id}" if appointment_id else "the request"
        raise BookingPending(
            f"{what} was sent to the legacy scheduling system but its answer did not arrive in time; it is being "
            "confirmed: read the appointment again shortly, or retry with the same Idempotency-Key to get the settled answer"
        )
    if outcome.conflict:
        raise SlotConflict(f"the legacy scheduling system refused: {outcome.reason}")
    raise BusinessRuleViolation(f"the legacy scheduling system refused: {outcome.reason}")


def _same_requester(entry: JournalEntry, client: str | None, request_key: str | None) -> bool:
    return (client is not None and entry.client == client) or (
        request_key is not None and entry.request_key == request_key
    )


class _HeldCancellation(Exception):
    """Cancelling an appointment that is only held: the caller releases the hold."""

    def __init__(self, hold: Hold) -> None:
        self.hold = hold


HeldCancellation = _HeldCancellation


def _offers(prac: Actor, vt: VisitType) -> bool:
    return bool(set(vt.specialty_codes) & set(prac.specialty_keys))


def _address_matches(location: dict[str, Any], query: str) -> bool:
    """FHIR string search semantics: case- and accent-insensitive starts-with on address parts."""
    q = fold(query.strip())
    address = location.get("address") or {}
    parts: list[str] = list(address.get("line", []))
    parts += [address[k] for k in ("city", "district", "state", "postalCode", "country", "text") if address.get(k)]
    return any(fold(p).startswith(q) for p in parts)
