"""The one seam between the scheduling domain and a legacy system.

A backend answers in terms of *resources* (practitioners, locations, patients), *intervals*
(timezone-aware datetimes) and *appointments*; it never exposes SQL, HL7v2 segments or FHIR.
Two very different legacy systems must fit behind it:

* a practice-management database (``backends.sql``): availability is computed from working
  hours minus busy time, bookings are rows written under a lock;
* a message-based scheduler (HL7v2, a later backend): availability arrives as free slots in an
  SQR^S25 answer to an SQM^S25 query (``free`` intervals with no ``busy``), bookings are SRM^S01
  requests answered by SRR, and changes arrive unsolicited as SIU^S12..S26.

The domain types (``Interval``, ``Appointment``, ``Actor``, ``VisitType``, the queries, the errors and the
booking outcomes) live in ``adapter.scheduling.domain``; they are re-exported here so a backend needs one import.

Hence the shapes: availability is "free minus busy" per resource so both fit; writes receive a
``ConflictGate`` callback that the backend calls *inside* its own critical section (after it
has locked what the legacy system lets it lock and checked the legacy calendar) so the domain's
hold rules are evaluated atomically with the legacy write, whatever the locking mechanism is.

Issue 8 made the seam fit a message-based scheduler without faking it: writes answer a ``BookingOutcome``
(confirmed / refused with the legacy reason / pending, i.e. sent but unanswered); ``NewBooking.placer_id`` is
stable across retries; ``AvailabilityQuery`` carries visit type and duration; ``capabilities`` say whether the
backend locks (if not, the gate records the booking intent atomically against other intents, see
``StateGate.journal_intent_exclusive``), answers availability queries, and pushes changes; ``start(publish)``
hands the backend a callback for legacy-side changes, ``stop()`` ends it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

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
    ChangeKind,
    Coding,
    Confirmed,
    Identifier,
    Interval,
    InvalidRequest,
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

__all__ = [
    "Actor",
    "ActorKind",
    "ActorQuery",
    "Appointment",
    "AppointmentPage",
    "AppointmentQuery",
    "AvailabilityQuery",
    "BackendError",
    "BackendUnavailable",
    "BookingOutcome",
    "BookingPending",
    "BusinessRuleViolation",
    "Capabilities",
    "ChangeKind",
    "Coding",
    "Confirmed",
    "Identifier",
    "Interval",
    "InvalidRequest",
    "LegacyChange",
    "NewBooking",
    "NotFound",
    "Pending",
    "Refused",
    "ResourceAvailability",
    "SlotConflict",
    "SlotRequest",
    "VisitType",
    "ChangePublisher",
    "ConflictGate",
    "SchedulingBackend",
]

ConflictGate = Callable[[Sequence[SlotRequest]], None]
"""Called by a backend inside its critical section; raises SlotConflict to abort."""

ChangePublisher = Callable[[Sequence[LegacyChange]], Awaitable[None]]
"""Handed to ``start``: the backend awaits it with the legacy-side changes it learnt of."""


class SchedulingBackend(Protocol):
    """What the domain needs from a legacy scheduler. All methods may raise BackendError."""

    name: str
    zone: dt.tzinfo  # the zone of the legacy wall-clock times: messages state times in it
    capabilities: Capabilities

    async def start(self, publish: ChangePublisher) -> None:
        """Start listeners/connections; ``publish`` is called for every legacy-side change (when pushed)."""
        ...

    async def stop(self) -> None: ...

    async def ping(self) -> None:
        """Raise if the legacy system cannot be reached now (readiness: ``/readyz``)."""
        ...

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

    async def book(self, booking: NewBooking, gate: ConflictGate) -> BookingOutcome: ...

    async def reschedule(
        self,
        appointment_id: str,
        new_slot: SlotRequest,
        gate: ConflictGate,
        comment: str | None = None,
        booked_by: str | None = None,
    ) -> BookingOutcome:
        """``booked_by``: who asks for the change (the client), for legacy "changed by" columns."""
        ...

    async def cancel(
        self, appointment_id: str, reason: Coding | None, reason_text: str | None, booked_by: str | None = None
    ) -> BookingOutcome: ...

    async def get_appointment(self, appointment_id: str) -> Appointment | None: ...

    async def find_booked(self, slot: SlotRequest, patient_id: str | None, placer_id: str = "") -> Appointment | None:
        """The blocking appointment a booking of ``slot`` (sent with ``placer_id``) wrote, if any: settles bookings
        whose outcome is unknown after a crash, a connection lost during COMMIT or an SRM left unanswered.
        Raises ``BackendUnavailable`` when the legacy system cannot tell yet."""
        ...

    async def search_appointments(self, query: AppointmentQuery) -> AppointmentPage: ...

    async def close(self) -> None: ...
