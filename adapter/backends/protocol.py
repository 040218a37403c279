"""The one seam between the scheduling domain and a legacy system.

A backend answers in terms of *resources* (practitioners, locations, patients), *intervals*
(timezone-aware datetimes) and *appointments*; it never exposes SQL, HL7v2 segments or FHIR.
Two very different legacy systems must fit behind it:

* a practice-management database (``backends.sql``): availability is computed from working
  hours minus busy time, bookings are rows written under a lock;
* a message-based scheduler (HL7v2, a later backend): availability arrives as free slots in an
  SQR^S25 answer to an SQM^S25 query (``free`` intervals with no ``busy``), bookings are SRM^S01
  requests answered by SRR, and changes arrive unsolicited as SIU^S12..S26.

Hence the shapes: availability is "free minus busy" per resource so both fit; writes receive a
``ConflictGate`` callback that the backend calls *inside* its own critical section (after it
has locked what the legacy system lets it lock and checked the legacy calendar) so the domain's
hold rules are evaluated atomically with the legacy write, whatever the locking mechanism is.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

ActorKind = Literal["Practitioner", "Location", "Patient"]


class BackendError(Exception):
    """Base for failures a backend reports; the FHIR layer maps each subclass to a status."""


class BackendUnavailable(BackendError):
    """The legacy system cannot be reached or timed out (HTTP 503, Retry-After)."""


class SlotConflict(BackendError):
    """The requested time is no longer free (booked, blocked or held by someone else)."""


class NotFound(BackendError):
    """The referenced appointment or actor does not exist in the legacy system."""


class BusinessRuleViolation(BackendError):
    """The legacy system (or the mapping's rules) refused the request (HTTP 422)."""


class InvalidRequest(BackendError):
    """The request cannot be carried out as stated (HTTP 400), e.g. outside working hours."""


@dataclass(frozen=True, slots=True)
class Interval:
    start: dt.datetime  # timezone-aware
    end: dt.datetime

    def overlaps(self, other: Interval) -> bool:
        return self.start < other.end and other.start < self.end


@dataclass(frozen=True, slots=True)
class Coding:
    system: str
    code: str
    display: str | None = None


@dataclass(frozen=True, slots=True)
class Identifier:
    system: str
    value: str


@dataclass(slots=True)
class Actor:
    """A legacy practitioner, location or patient, already translated to FHIR terms.

    ``id`` is the FHIR id (valid, reversible); ``key`` is the exact legacy key.
    ``resource`` is the FHIR resource as a plain dict, produced by the mapping.
    """

    kind: ActorKind
    id: str
    key: str
    display: str
    resource: dict
    identifiers: tuple[Identifier, ...] = ()
    specialties: tuple[Coding, ...] = ()
    specialty_keys: tuple[str, ...] = ()  # the same specialties as legacy codes (visit types name these)
    location_ids: tuple[str, ...] = ()  # for practitioners: where they can work
    zone: str | None = None  # for locations: IANA zone of its local times


@dataclass(frozen=True, slots=True)
class VisitType:
    """A kind of visit: how long it takes and how it is coded on the FHIR side."""

    key: str
    display: str
    minutes: int
    codings: tuple[Coding, ...]  # appointmentType / visit-type codings
    service_types: tuple[Coding, ...] = ()
    specialty_codes: tuple[str, ...] = ()  # legacy specialty keys; empty = any specialty


@dataclass(frozen=True, slots=True)
class ActorQuery:
    kind: ActorKind
    ids: tuple[str, ...] = ()
    identifiers: tuple[Identifier, ...] = ()
    name: str | None = None
    limit: int = 100


@dataclass(frozen=True, slots=True)
class AvailabilityQuery:
    window: Interval
    practitioner_ids: tuple[str, ...]  # already resolved FHIR ids; empty = all
    location_ids: tuple[str, ...] = ()  # empty = any


@dataclass(slots=True)
class ResourceAvailability:
    """What one practitioner can offer at one location within the query window."""

    practitioner_id: str
    location_id: str
    free: list[Interval]  # working time minus absences (or explicit free slots); sorted, non-overlapping
    busy: list[Interval] = field(default_factory=list)  # blocking appointments
    # Where the slot grid of each working-time period (or listed free slot) starts: its unclipped
    # start, sorted. A candidate starts at anchor + k * step of the period it lies in (issue 7.3).
    # Empty: the grid starts at each free interval's start (a backend without periods).
    anchors: list[dt.datetime] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SlotRequest:
    """One concrete appointment time for concrete resources."""

    practitioner_id: str
    location_id: str
    interval: Interval
    visit_type_key: str
    patient_ids: tuple[str, ...] = ()


@dataclass(slots=True)
class Appointment:
    """A legacy appointment in neutral terms; the FHIR layer renders it."""

    id: str
    status: str  # FHIR AppointmentStatus
    interval: Interval
    practitioner_id: str | None
    location_id: str | None
    patient_id: str | None
    visit_type_key: str | None = None
    identifiers: tuple[Identifier, ...] = ()
    comment: str | None = None
    status_reason: Coding | None = None
    cancel_text: str | None = None
    created: dt.datetime | None = None
    warnings: tuple[str, ...] = ()  # e.g. a legacy code rendered with its code table's fallback


@dataclass(frozen=True, slots=True)
class NewBooking:
    slot: SlotRequest
    patient_id: str
    comment: str | None = None
    booked_by: str | None = None


@dataclass(frozen=True, slots=True)
class AppointmentQuery:
    """A search over existing appointments; every field narrows (AND), tuples are OR."""

    ids: tuple[str, ...] = ()
    identifiers: tuple[Identifier, ...] = ()  # Appointment.identifier; system "" = any system the backend knows
    patient_ids: tuple[str, ...] = ()
    practitioner_ids: tuple[str, ...] = ()
    location_ids: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ()  # FHIR AppointmentStatus codes; the backend finds every legacy code for each
    visit_type_keys: tuple[str, ...] = ()
    specialty_keys: tuple[str, ...] = ()
    # FHIR specialty tokens ("system|code", "code", "system|"), translated by the backend's code tables:
    # OR within one inner tuple, AND between the inner tuples (one per repeated search parameter).
    specialty_codes: tuple[tuple[str, ...], ...] = ()
    # Each bound is (operator, instant) with operator one of lt, le, gt, ge on Appointment.start,
    # plus optional end-based bounds for the `sa`/`eb` prefixes.
    start_bounds: tuple[tuple[str, dt.datetime], ...] = ()
    end_bounds: tuple[tuple[str, dt.datetime], ...] = ()
    exclude_start_ranges: tuple[Interval, ...] = ()  # `ne` prefixes
    descending: bool = False
    after: tuple[dt.datetime, str] | None = None  # keyset cursor: (start, id) of the last row seen
    limit: int = 50
    want_total: bool = True
    # Count at most this many matches; more: ``total`` is None (ITI-118 ``_total=estimate``). None: count all.
    total_cap: int | None = None


@dataclass(slots=True)
class AppointmentPage:
    appointments: list[Appointment]
    total: int | None
    has_more: bool
    warnings: list[str] = field(default_factory=list)  # rows skipped or rendered with a fallback code


ConflictGate = Callable[[Sequence[SlotRequest]], None]
"""Called by a backend inside its critical section; raises SlotConflict to abort."""


class SchedulingBackend(Protocol):
    """What the domain needs from a legacy scheduler. All methods may raise BackendError."""

    name: str
    zone: dt.tzinfo  # the zone of the legacy wall-clock times: messages state times in it

    async def find_actors(self, query: ActorQuery) -> list[Actor]: ...

    def identifier_systems(self, kind: ActorKind) -> set[str]:
        """Identifier systems actors of ``kind`` can be found by (others match nothing)."""
        ...

    async def visit_types(self) -> list[VisitType]: ...

    async def availability(self, query: AvailabilityQuery) -> list[ResourceAvailability]: ...

    async def secure(self, slots: Sequence[SlotRequest], gate: ConflictGate) -> None:
        """Check the slots are free in the legacy calendar and run ``gate`` atomically with it.

        Used by ``$hold``: nothing is written to the legacy system, but the check and the
        gate (which records the hold) run under the same lock a booking would take.
        """
        ...

    async def book(self, booking: NewBooking, gate: ConflictGate) -> Appointment: ...

    async def reschedule(
        self, appointment_id: str, new_slot: SlotRequest, gate: ConflictGate, comment: str | None = None
    ) -> Appointment: ...

    async def cancel(self, appointment_id: str, reason: Coding | None, reason_text: str | None) -> Appointment: ...

    async def get_appointment(self, appointment_id: str) -> Appointment | None: ...

    async def find_booked(self, slot: SlotRequest, patient_id: str | None) -> Appointment | None:
        """The blocking appointment a booking of ``slot`` wrote, if any: settles bookings whose outcome is
        unknown after a crash or a connection lost during COMMIT."""
        ...

    async def search_appointments(self, query: AppointmentQuery) -> AppointmentPage: ...

    async def close(self) -> None: ...
