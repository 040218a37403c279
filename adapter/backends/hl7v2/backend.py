"""The HL7v2 backend: a legacy scheduler behind MLLP (placer role), on the seam of ``adapter.backends.protocol``.

* ``$find``: ``mode = "query"`` asks the filler (SQM^S25 for the visit type's service and duration, answered by
  SQR^S25 free slots); ``mode = "templates"`` computes availability from the mapping's session templates minus the
  appointments mirrored from the SIU feed. The domain subtracts holds and bookings in flight either way.
* ``$book``: SRM^S01 (new), S02 (reschedule), S04 (cancel) answered by SRR. AA is ``Confirmed`` (the SRR's
  appointment, its filler id SCH-2 becomes the Appointment id and identifier); AE is ``Refused`` as a conflict
  (409), AR as a rule (422), with the filler's reason; no answer after the retry budget is ``Pending``: the domain
  keeps the booking intent and settles it through ``find_booked`` (mirror by placer id, then SQM).
* Reads, ITI-118 search and conflict checks serve from the SIU-fed mirror (``adapter.hl7v2.store.SiuStore``: a
  SQLite file on one host, or the shared state database, where every replica's listener stores and any replica's
  applier applies); a confirmed
  SRR is written to the mirror at once (versioned by receipt time, so any later SIU still wins) so that a read
  right after ``$book`` finds the appointment.
* No lock: ``capabilities.can_lock`` is False, so the domain records each booking intent atomically against the
  other bookings in flight (``StateGate.journal_intent_exclusive``) before the SRM leaves.
* Actors and visit types come from the mapping's ``directory`` (an HL7v2 scheduler cannot be asked for them);
  patients also from the mirror (a front-desk booking may name a patient the directory does not list).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from adapter.backends.protocol import (
    Actor,
    ActorKind,
    ActorQuery,
    Appointment,
    AppointmentPage,
    AppointmentQuery,
    AvailabilityQuery,
    BackendUnavailable,
    BookingOutcome,
    Capabilities,
    ChangeKind,
    ChangePublisher,
    Coding,
    Confirmed,
    ConflictGate,
    Identifier,
    Interval,
    LegacyChange,
    NewBooking,
    NotFound,
    Pending,
    Refused,
    ResourceAvailability,
    SlotConflict,
    SlotRequest,
    VisitType,
)
from adapter.hl7v2.feed import SiuFeed
from adapter.hl7v2.inbound import AppointmentData, SiuEvent
from adapter.hl7v2.mapping import DirectoryActor, DirectoryPatient, Hl7v2Mapping
from adapter.hl7v2.mirror import mirror_write
from adapter.hl7v2.outbound import AvailabilityRequest, BookingRequest, PatientRef, SrmTrigger
from adapter.hl7v2.placer import Confirmed as SrrConfirmed, NotDelivered, Placer, Refused as SrrRefused, Unknown
from adapter.hl7v2.store import (
    RECORD_INBOX_ID,
    WAITING,
    ActorKind as MirrorActorKind,
    MirroredAppointment,
    SiuStore,
    SiuStoreUnavailable,
)
from adapter.mllp import MLLPError

log = logging.getLogger("adapter.backends.hl7v2")
T = TypeVar("T")

_BLOCKING = frozenset({"booked", "arrived", "checked-in", "pending"})
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_CANCELLING: dict[str, ChangeKind] = {"S15": "cancelled", "S16": "cancelled", "S17": "cancelled"}


def fhir_id(filler_id: str) -> str:
    """The Appointment id of a filler id: the id itself when FHIR allows it, else a reversible hex form."""
    if _FHIR_ID.fullmatch(filler_id) and not filler_id.startswith("h."):
        return filler_id
    return "h." + filler_id.encode("utf-8").hex()[:62]


def filler_id(appointment_id: str) -> str:
    if appointment_id.startswith("h."):
        try:
            return bytes.fromhex(appointment_id[2:]).decode("utf-8")
        except ValueError:
            return appointment_id
    return appointment_id


class Hl7v2Backend:
    name = "hl7v2"

    def __init__(
        self,
        mapping: Hl7v2Mapping,
        *,
        peer_host: str,
        peer_port: int,
        store: SiuStore,
        listen_host: str = "127.0.0.1",
        listen_port: int = 2575,
        mode: str = "query",
        timeout_seconds: float | None = None,
        retries: int | None = None,
        inbox_retention_days: float = 30,
    ) -> None:
        update: dict[str, Any] = {}
        if timeout_seconds is not None:
            update["timeout_seconds"] = timeout_seconds
        if retries is not None:
            update["retries"] = retries
        if update:
            mapping = dataclasses.replace(mapping, interface=mapping.interface.model_copy(update=update))
        self.mapping = mapping
        self.directory = mapping.directory
        self.zone: dt.tzinfo = mapping.zone
        self.mode = mode
        self.capabilities = Capabilities(
            can_lock=False,
            answers_availability_queries=mode == "query",
            pushes_changes=True,
            availability_per_visit_type=mode == "query",
        )
        self.placer = Placer(mapping, peer_host, peer_port)
        self._peer = (peer_host, peer_port)
        # The backend owns the store: the feed writes it, the backend's reads and confirmed SRRs use it.
        self.store = store
        # The applier also purges applied inbox messages older than ``inbox_retention_days`` (0: never).
        self.feed = SiuFeed(
            store,
            mapping,
            host=listen_host,
            port=listen_port,
            poll_seconds=0.5,
            retention_days=inbox_retention_days,
        )
        self._publish: ChangePublisher | None = None
        self._queries = 0

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self, publish: ChangePublisher) -> None:
        self._publish = publish
        self.feed.applier.on_applied = self._on_applied
        await self.feed.start()
        log.info(
            "HL7v2 backend: SIU listener on port %d, filler at %s:%d", self.feed.port, self._peer[0], self._peer[1]
        )

    async def stop(self) -> None:
        await self.placer.close()
        await self.feed.stop()
        await asyncio.to_thread(self.store.close)

    async def ping(self) -> None:
        """The filler's MLLP port accepts a connection (nothing is sent), the SIU listener runs and its store
        answers (without it no SIU can be acknowledged)."""
        if not self.feed.port:
            raise BackendUnavailable("the SIU listener is not running")
        await self._db(lambda m: m.count_messages(WAITING))
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(*self._peer), timeout=3.0)
        except (OSError, TimeoutError) as exc:
            raise BackendUnavailable(f"the legacy scheduler at {self._peer[0]}:{self._peer[1]} is unreachable") from exc
        writer.close()
        await writer.wait_closed()

    async def close(self) -> None:
        await self.stop()

    async def _on_applied(self, events: list[SiuEvent]) -> None:
        if self._publish is None:
            return
        changes = [
            LegacyChange(
                "created" if e.trigger == "S12" else _CANCELLING.get(e.trigger, "changed"),
                fhir_id(e.filler_id),
                e.appointment.placer_id,
            )
            for e in events
            if e.filler_id
        ]
        await self._publish(changes)

    # -- the mirror (the SiuStore; used from worker threads) ----------------------------------------
    async def _db(self, fn: Callable[[SiuStore], T]) -> T:
        try:
            return await asyncio.to_thread(fn, self.store)
        except SiuStoreUnavailable as exc:
            raise BackendUnavailable(f"the appointment mirror cannot be read: {exc}") from None

    def _record(self, data: AppointmentData, trigger: str) -> None:
        """Write a confirmed SRR's appointment into the mirror, versioned by now: a later SIU still wins."""
        event = SiuEvent(trigger, "SRR", "srr", self.mapping.interface.version, dt.datetime.now(dt.UTC), data, (), "")
        write = mirror_write(event, RECORD_INBOX_ID)
        if write is not None:
            try:
                self.store.record(write)
            except SiuStoreUnavailable as exc:
                # The booking is made; the SIU the filler sends for it will bring it into the mirror.
                log.warning("a confirmed SRR (filler id %s) was not written to the mirror: %s", data.filler_id, exc)

    def _appointment(self, m: MirroredAppointment) -> Appointment:
        d = self.directory
        start = m.start or dt.datetime.fromtimestamp(0, dt.UTC)
        return Appointment(
            id=fhir_id(m.filler_id),
            status=m.status or "booked",
            interval=Interval(start, m.end or start),
            practitioner_id=m.practitioner_ids[0] if m.practitioner_ids else None,
            location_id=m.location_ids[0] if m.location_ids else None,
            patient_id=m.patient_ids[0] if m.patient_ids else None,
            visit_type_key=m.service or None,
            identifiers=(
                Identifier(d.appointment_identifier_system, m.filler_id),
                *((Identifier(d.placer_identifier_system, m.placer_id),) if m.placer_id else ()),
            ),
            comment=m.reason or None,
        )

    def _from_data(self, a: AppointmentData) -> Appointment:
        return self._appointment(
            MirroredAppointment(
                a.filler_id,
                a.placer_id,
                a.status,
                a.legacy_status,
                a.status_reason,
                a.start,
                a.end,
                a.service,
                a.reason,
                a.patient_family,
                a.patient_given,
                "",
                "",
                "",
                "",
                a.practitioner_ids,
                a.location_ids,
                a.patient_ids,
            )
        )

    # -- actors and visit types -------------------------------------------------------------------
    def identifier_systems(self, kind: ActorKind) -> set[str]:
        d = self.directory
        entries: Sequence[DirectoryActor | DirectoryPatient]
        if kind == "Patient":
            entries = d.patients
        else:
            entries = d.practitioners if kind == "Practitioner" else d.locations
        return {system for e in entries for system in e.identifiers}

    def _actor(self, kind: ActorKind, e: DirectoryActor | DirectoryPatient, names: dict[str, tuple[str, str]]) -> Actor:
        idents = tuple(Identifier(s, v) for s, v in e.identifiers.items())
        resource: dict[str, Any] = {"resourceType": kind, "id": e.id, "active": True}
        if idents:
            resource["identifier"] = [{"system": i.system, "value": i.value} for i in idents]
        if isinstance(e, DirectoryPatient):
            family, given = names.get(e.id, (e.family, e.given))
            display = " ".join(x for x in (given, family) if x)
            resource["name"] = [{"family": family, **({"given": [given]} if given else {}), "text": display}]
            return Actor("Patient", e.id, e.id, display, resource, idents)
        if kind == "Location":
            resource.pop("active")
            resource.update({"status": "active", "name": e.name})
            return Actor("Location", e.id, e.id, e.name, resource, idents)
        resource["name"] = [{"text": e.name}]
        types = {vt.key: vt for vt in self.directory.visit_types}
        specialties = tuple(
            Coding(
                types[s].system if s in types else "urn:sched-adapter:hl7v2:service",
                s,
                types[s].display if s in types else None,
            )
            for s in e.specialties
        )
        return Actor(
            "Practitioner",
            e.id,
            e.id,
            e.name,
            resource,
            idents,
            specialties=specialties,
            specialty_keys=tuple(e.specialties),
            location_ids=tuple(e.locations),
        )

    async def find_actors(self, query: ActorQuery) -> list[Actor]:
        d = self.directory
        names: dict[str, tuple[str, str]] = {}
        entries: list[DirectoryActor | DirectoryPatient]
        if query.kind == "Patient":
            names = await self._db(lambda m: m.patient_names())
            entries = list(d.patients)
            known = {p.id for p in d.patients}
            entries += [
                DirectoryPatient(id=pid, family=f, given=g) for pid, (f, g) in names.items() if pid not in known
            ]
        else:
            entries = list(d.practitioners if query.kind == "Practitioner" else d.locations)
        out = []
        for e in entries:
            if query.ids and e.id not in query.ids:
                continue
            if query.identifiers and not any(
                e.identifiers.get(i.system) == i.value or (not i.system and i.value in e.identifiers.values())
                for i in query.identifiers
            ):
                continue
            actor = self._actor(query.kind, e, names)
            if query.name and query.name.casefold() not in actor.display.casefold():
                continue
            out.append(actor)
            if len(out) >= query.limit:
                break
        return out

    async def visit_types(self) -> list[VisitType]:
        return [
            VisitType(
                v.key,
                v.display,
                v.minutes,
                (Coding(v.system, v.key, v.display),),
                specialty_codes=(v.key,),
            )
            for v in self.directory.visit_types
        ]

    # -- availability ---------------------------------------------------------------------------
    async def availability(self, query: AvailabilityQuery) -> list[ResourceAvailability]:
        if self.mode == "templates":
            return await self._from_templates(query)
        types = {v.key: v for v in self.directory.visit_types}
        key = query.visit_type_key or self.directory.default_visit_type or next(iter(types), "")
        vt = types.get(key)
        minutes = query.minutes or (vt.minutes if vt else 0)
        self._queries += 1
        request = AvailabilityRequest(
            query_id=f"Q{self._queries}",
            window_start=query.window.start,
            window_end=query.window.end,
            duration_minutes=minutes,
            service=key,
            service_text=vt.display if vt else "",
            practitioner_ids=query.practitioner_ids,
            location_ids=query.location_ids,
            max_results=1000,
        )
        try:
            sqr = await self.placer.query(request)
        except (NotDelivered, MLLPError) as exc:
            raise BackendUnavailable(f"the HL7v2 scheduler did not answer the schedule query: {exc}") from None
        if sqr.ack_code not in ("AA", "CA", "OK"):
            raise BackendUnavailable(f"the HL7v2 scheduler refused the schedule query: {sqr.text or sqr.ack_code}")
        grouped: dict[tuple[str, str], ResourceAvailability] = {}
        for slot in sqr.slots:
            prac = slot.practitioner_ids[0] if slot.practitioner_ids else ""
            loc = slot.location_ids[0] if slot.location_ids else ""
            if not prac or (query.practitioner_ids and prac not in query.practitioner_ids):
                continue
            if query.location_ids and loc not in query.location_ids:
                continue
            ra = grouped.setdefault((prac, loc), ResourceAvailability(prac, loc, []))
            ra.free.append(Interval(slot.start, slot.end))
            ra.anchors.append(slot.start)
        for ra in grouped.values():
            ra.free.sort(key=lambda i: i.start)
            ra.anchors.sort()
        return list(grouped.values())

    async def _from_templates(self, query: AvailabilityQuery) -> list[ResourceAvailability]:
        zone = self.mapping.zone
        out: dict[tuple[str, str], ResourceAvailability] = {}
        day = query.window.start.astimezone(zone).date() - dt.timedelta(days=1)
        last = query.window.end.astimezone(zone).date()
        while day <= last:
            for s in self.directory.sessions:
                if day.weekday() not in s.weekdays:
                    continue
                if query.practitioner_ids and s.practitioner not in query.practitioner_ids:
                    continue
                if query.location_ids and s.location not in query.location_ids:
                    continue
                start = dt.datetime.combine(day, dt.time.fromisoformat(s.start), zone)
                end = dt.datetime.combine(day, dt.time.fromisoformat(s.end), zone)
                if end <= query.window.start or start >= query.window.end:
                    continue
                ra = out.setdefault((s.practitioner, s.location), ResourceAvailability(s.practitioner, s.location, []))
                ra.free.append(Interval(start, end))
                ra.anchors.append(start)
            day += dt.timedelta(days=1)

        def busy(m: SiuStore) -> dict[str, list[Interval]]:
            found: dict[str, list[Interval]] = {}
            for prac in {p for p, _ in out}:
                for a in m.for_actor("practitioner", prac, query.window.start, query.window.end, statuses=_BLOCKING):
                    if a.start and a.end:
                        found.setdefault(prac, []).append(Interval(a.start, a.end))
            return found

        taken = await self._db(busy)
        for (prac, _), ra in out.items():
            ra.free.sort(key=lambda i: i.start)
            ra.anchors.sort()
            ra.busy = sorted(taken.get(prac, []), key=lambda i: i.start)
        return list(out.values())

    # -- conflict checks from the mirror ----------------------------------------------------------
    async def _check_mirror(self, slots: Sequence[SlotRequest], ignore: str = "") -> None:
        def clash(m: SiuStore) -> str | None:
            for s in slots:
                checks: list[tuple[MirrorActorKind, str]] = [("practitioner", s.practitioner_id)]
                checks += [("patient", p) for p in s.patient_ids]
                for kind, who in checks:
                    for a in m.for_actor(kind, who, s.interval.start, s.interval.end, statuses=_BLOCKING):
                        if a.filler_id != ignore:
                            what = "Practitioner" if kind == "practitioner" else "Patient"
                            return (
                                f"{what}/{who} is booked from {a.start} to {a.end} (legacy appointment {a.filler_id})"
                            )
            return None

        found = await self._db(clash)
        if found is not None:
            raise SlotConflict(found)

    async def secure(self, slots: Sequence[SlotRequest], gate: ConflictGate) -> None:
        await self._check_mirror(slots)
        await asyncio.to_thread(gate, slots)

    # -- writes ---------------------------------------------------------------------------------
    def _patient(self, patient_id: str) -> PatientRef:
        for p in self.directory.patients:
            if p.id == patient_id:
                return PatientRef(p.id, p.family, p.given)
        return PatientRef(patient_id)

    async def _send(self, trigger: SrmTrigger, request: BookingRequest) -> BookingOutcome:
        try:
            outcome = await self.placer.request(trigger, request)
        except NotDelivered as exc:
            raise BackendUnavailable(f"the HL7v2 scheduler cannot be reached: {exc}") from None
        if isinstance(outcome, Unknown):
            return Pending(outcome.placer_id, outcome.detail)
        if isinstance(outcome, SrrRefused):
            return Refused(outcome.reason or outcome.code, conflict=outcome.code == "AE")
        assert isinstance(outcome, SrrConfirmed)
        data = outcome.appointment
        if data is None or not data.filler_id:
            raise BackendUnavailable("the HL7v2 scheduler accepted the request but named no appointment (no SCH-2)")
        await asyncio.to_thread(self._record, data, {"S01": "S12", "S02": "S13", "S04": "S15"}.get(trigger, "S14"))
        appt = await self.get_appointment(fhir_id(data.filler_id))
        return Confirmed(appt if appt is not None else self._from_data(data))

    async def book(self, booking: NewBooking, gate: ConflictGate) -> BookingOutcome:
        slot = booking.slot
        await self._check_mirror([slot])
        await asyncio.to_thread(gate, [slot])
        minutes = int((slot.interval.end - slot.interval.start).total_seconds() // 60)
        request = BookingRequest(
            placer_id=booking.placer_id,
            start=slot.interval.start,
            duration_minutes=minutes,
            service=slot.visit_type_key,
            practitioner_ids=(slot.practitioner_id,),
            location_ids=(slot.location_id,) if slot.location_id else (),
            patient=self._patient(booking.patient_id),
            reason=booking.comment or "",
        )
        return await self._send("S01", request)

    async def _current(self, appointment_id: str) -> MirroredAppointment:
        fid = filler_id(appointment_id)
        found = await self._db(lambda m: m.by_filler_id(fid))
        if found is None:
            raise NotFound(f"Appointment/{appointment_id} is not known")
        return found

    async def reschedule(
        self,
        appointment_id: str,
        new_slot: SlotRequest,
        gate: ConflictGate,
        comment: str | None = None,
        booked_by: str | None = None,  # SRM carries no "changed by" field in the interface agreement
    ) -> BookingOutcome:
        current = await self._current(appointment_id)
        await self._check_mirror([new_slot], ignore=current.filler_id)
        await asyncio.to_thread(gate, [new_slot])
        minutes = int((new_slot.interval.end - new_slot.interval.start).total_seconds() // 60)
        request = BookingRequest(
            placer_id=current.placer_id,
            filler_id=current.filler_id,
            start=new_slot.interval.start,
            duration_minutes=minutes,
            service=new_slot.visit_type_key or current.service,
            practitioner_ids=(new_slot.practitioner_id,),
            location_ids=(new_slot.location_id,) if new_slot.location_id else (),
            patient=self._patient(current.patient_ids[0]) if current.patient_ids else None,
            reason=comment or current.reason,
        )
        return await self._send("S02", request)

    async def cancel(
        self, appointment_id: str, reason: Coding | None, reason_text: str | None, booked_by: str | None = None
    ) -> BookingOutcome:
        current = await self._current(appointment_id)
        start = current.start or dt.datetime.now(dt.UTC)
        minutes = int(((current.end or start) - start).total_seconds() // 60)
        request = BookingRequest(
            placer_id=current.placer_id,
            filler_id=current.filler_id,
            start=start,
            duration_minutes=minutes,
            service=current.service,
            practitioner_ids=current.practitioner_ids,
            location_ids=current.location_ids,
            patient=self._patient(current.patient_ids[0]) if current.patient_ids else None,
            reason=reason_text or (reason.display or reason.code if reason else ""),
        )
        return await self._send("S04", request)

    # -- reads ----------------------------------------------------------------------------------
    async def get_appointment(self, appointment_id: str) -> Appointment | None:
        fid = filler_id(appointment_id)
        found = await self._db(lambda m: m.by_filler_id(fid))
        return self._appointment(found) if found is not None else None

    async def find_booked(self, slot: SlotRequest, patient_id: str | None, placer_id: str = "") -> Appointment | None:
        """Settle a booking whose SRR never came: the mirror (SIU feed) by placer id says "booked"; a schedule
        query that still offers the slot says "not booked"; anything else cannot be told yet."""
        if placer_id:
            found = await self._db(lambda m: m.by_placer_id(placer_id))
            live = [f for f in found if f.status in _BLOCKING]
            if live:
                return self._appointment(live[0])
            if found:
                return None  # booked and since cancelled or ended: nothing is held for this booking any more
        if self.mode == "query":
            minutes = int((slot.interval.end - slot.interval.start).total_seconds() // 60)
            free = await self.availability(
                AvailabilityQuery(
                    slot.interval,
                    (slot.practitioner_id,),
                    (slot.location_id,) if slot.location_id else (),
                    visit_type_key=slot.visit_type_key,
                    minutes=minutes,
                )
            )
            if any(i.start == slot.interval.start for ra in free for i in ra.free):
                return None
        raise BackendUnavailable(
            f"the outcome of booking {placer_id or slot} is not known yet: no SIU names it and the slot is not free"
        )

    async def search_appointments(self, query: AppointmentQuery) -> AppointmentPage:
        rows = await self._db(lambda m: m.all_appointments())
        appts = [self._appointment(r) for r in rows]
        statuses = set(query.statuses)

        def keep(a: Appointment) -> bool:
            if query.ids and a.id not in query.ids:
                return False
            if query.identifiers and not any(
                i.value in {x.value for x in a.identifiers if not i.system or x.system == i.system}
                for i in query.identifiers
            ):
                return False
            if query.patient_ids and a.patient_id not in query.patient_ids:
                return False
            if query.practitioner_ids and a.practitioner_id not in query.practitioner_ids:
                return False
            if query.location_ids and a.location_id not in query.location_ids:
                return False
            if statuses and a.status not in statuses:
                return False
            if query.visit_type_keys and a.visit_type_key not in query.visit_type_keys:
                return False
            if query.specialty_keys and a.visit_type_key not in query.specialty_keys:
                return False
            for tokens in query.specialty_codes:
                if not any(t.split("|")[-1] in ("", a.visit_type_key) for t in tokens):
                    return False
            if not all(_compare(a.interval.start, op, t) for op, t in query.start_bounds):
                return False
            if not all(_compare(a.interval.end, op, t) for op, t in query.end_bounds):
                return False
            return not any(r.start <= a.interval.start < r.end for r in query.exclude_start_ranges)

        matched = sorted(
            (a for a in appts if keep(a)), key=lambda a: (a.interval.start, a.id), reverse=query.descending
        )
        total = len(matched) if query.want_total else None
        if query.after is not None:
            after = query.after
            matched = [
                a
                for a in matched
                if ((a.interval.start, a.id) < after if query.descending else (a.interval.start, a.id) > after)
            ]
        page = matched[: query.limit]
        return AppointmentPage(page, total, len(matched) > query.limit)


def _compare(value: dt.datetime, op: str, t: dt.datetime) -> bool:
    return {"lt": value < t, "le": value <= t, "gt": value > t, "ge": value >= t}.get(op, value == t)
