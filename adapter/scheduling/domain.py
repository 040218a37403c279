"""The scheduling domain's own vocabulary: intervals, actors, visit types, appointments, queries and errors.

These types belong to the domain, not to any backend: the FHIR layer renders them, the scheduling service
reasons with them, and every backend (``adapter.backends``) translates its legacy system into them. They were
first written next to the backend Protocol; they live here so that nothing in the domain imports from below it.

Booking outcomes (issue 8.1): a legacy write answers ``Confirmed`` (the appointment as the legacy system holds
it), ``Refused`` (the legacy system's own reason; ``conflict`` says the time is taken, 409, otherwise 422), or
``Pending`` (the request was sent but no answer came: the outcome is unknown and is being confirmed; never
assumed either way). A SQL backend only ever confirms (it refuses by raising, under its lock); a message-based
backend can answer all three.

``LegacyChange`` is what a backend that pushes changes (an SIU feed) publishes: the domain invalidates every
worker's availability cache and settles pending bookings from it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Literal

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
    resource: dict[str, Any]
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
    # What the slots are for: a backend that asks the legacy system (SQM^S25) states service and duration.
    visit_type_key: str | None = None
    minutes: int | None = None


Span = tuple[int, int]
"""[start, end) in whole seconds since the Unix epoch: the form the domain computes candidate slots in."""


class ResourceAvailability:
    """What one practitioner can offer at one location within the query window.

    ``free``: working time minus absences (or explicit free slots); sorted, non-overlapping. ``busy``: blocking
    appointments. ``anchors``: where the slot grid of each working-time period (or listed free slot) starts, its
    unclipped start, sorted; a candidate starts at anchor + k * step of the period it lies in (issue 7.3). Empty:
    the grid starts at each free interval's start (a backend without periods).

    Two equivalent forms, whichever the backend has: Intervals (``ResourceAvailability(p, l, free, busy,
    anchors)``) or whole epoch seconds (``ResourceAvailability.in_seconds(...)``); ``spans()`` gives the second,
    the attributes the first, each derived on first use. Why: the domain computes candidates on epoch seconds
    (``adapter.scheduling.candidates``), and a SQL backend reads thousands of busy rows per ``$find``: building
    two datetimes and an Interval per row only to turn them back into integers cost more than the query itself.
    Once the Interval form has been read it is the one that counts (callers may change those lists in place),
    and ``spans()`` is computed from it.
    """

    __slots__ = ("practitioner_id", "location_id", "_free", "_busy", "_anchors", "_spans")

    def __init__(
        self,
        practitioner_id: str,
        location_id: str,
        free: list[Interval],
        busy: list[Interval] | None = None,
        anchors: list[dt.datetime] | None = None,
    ) -> None:
        self.practitioner_id = practitioner_id
        self.location_id = location_id
        self._free: list[Interval] | None = free
        self._busy: list[Interval] | None = [] if busy is None else busy
        self._anchors: list[dt.datetime] | None = [] if anchors is None else anchors
        self._spans: tuple[list[Span], list[Span], list[int]] | None = None

    @classmethod
    def in_seconds(
        cls, practitioner_id: str, location_id: str, free: list[Span], busy: list[Span], anchors: list[int]
    ) -> ResourceAvailability:
        """The same answer as epoch-second spans (``free`` sorted and disjoint, ``anchors`` sorted)."""
        ra = cls.__new__(cls)
        ra.practitioner_id = practitioner_id
        ra.location_id = location_id
        ra._free = ra._busy = ra._anchors = None
        ra._spans = (free, busy, anchors)
        return ra

    def spans(self) -> tuple[list[Span], list[Span], list[int]]:
        """(free, busy, anchors) in whole epoch seconds (sub-second parts are dropped, as ``int()`` does).

        Read-only: a backend may share one busy list between a practitioner's locations."""
        if self._spans is not None:
            return self._spans
        return (
            [(int(iv.start.timestamp()), int(iv.end.timestamp())) for iv in self.free],
            [(int(iv.start.timestamp()), int(iv.end.timestamp())) for iv in self.busy],
            [int(a.timestamp()) for a in self.anchors],
        )

    def _as_intervals(self) -> None:
        if self._spans is None:
            return
        free, busy, anchors = self._spans
        at, utc = dt.datetime.fromtimestamp, dt.UTC
        self._free = [Interval(at(s, utc), at(e, utc)) for s, e in free]
        self._busy = [Interval(at(s, utc), at(e, utc)) for s, e in busy]
        self._anchors = [at(a, utc) for a in anchors]
        self._spans = None  # from now on the Interval lists are the answer

    @property
    def free(self) -> list[Interval]:
        self._as_intervals()
        assert self._free is not None
        return self._free

    @free.setter
    def free(self, value: list[Interval]) -> None:
        self._as_intervals()
        self._free = value

    @property
    def busy(self) -> list[Interval]:
        self._as_intervals()
        assert self._busy is not None
        return self._busy

    @busy.setter
    def busy(self, value: list[Interval]) -> None:
        self._as_intervals()
        self._busy = value

    @property
    def anchors(self) -> list[dt.datetime]:
        self._as_intervals()
        assert self._anchors is not None
        return self._anchors

    @anchors.setter
    def anchors(self, value: list[dt.datetime]) -> None:
        self._as_intervals()
        self._anchors = value

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ResourceAvailability):
            return NotImplemented
        return (self.practitioner_id, self.location_id, self.free, self.busy, self.anchors) == (
            other.practitioner_id,
            other.location_id,
            other.free,
            other.busy,
            other.anchors,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaced

    def __repr__(self) -> str:
        return (
            f"ResourceAvailability(practitioner_id={self.practitioner_id!r}, location_id={self.location_id!r}, "
            f"free={self.free!r}, busy={self.busy!r}, anchors={self.anchors!r})"
        )


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
    # Stable across retries of one booking (derived from the proposed id): the legacy system correlates its
    # answers (SRR, SIU) and de-duplicates retries by it (ARQ-1/SCH-1).
    placer_id: str = ""


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


class BookingPending(BackendError):
    """A legacy write was sent but its answer never came: the outcome is being confirmed (HTTP 504)."""


@dataclass(frozen=True, slots=True)
class Confirmed:
    appointment: Appointment


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str  # the legacy system's own words
    conflict: bool = False  # True: the time is taken (409); False: another rule (422)


@dataclass(frozen=True, slots=True)
class Pending:
    placer_id: str
    detail: str


BookingOutcome = Confirmed | Refused | Pending


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do, so the domain picks its conflict strategy honestly.

    ``can_lock``: the backend serialises conflicting writes itself (a database lock) and calls the gate inside
    that lock. Without it, the adapter's own in-flight bookings (journal intents) count as busy time for every
    other request until their outcome is known. ``answers_availability_queries``: availability comes from the
    legacy system per query (SQL or SQM) rather than from templates minus a mirror. ``pushes_changes``: the
    backend publishes ``LegacyChange``s (an SIU feed), so caches are invalidated without waiting for expiry.
    """

    can_lock: bool = True
    answers_availability_queries: bool = True
    pushes_changes: bool = False
    # The legacy system answers availability per visit type (SQM^S25 names service and duration): the domain
    # asks once per visit type and does not cache the answer by practitioner and day.
    availability_per_visit_type: bool = False


ChangeKind = Literal["created", "changed", "cancelled"]


@dataclass(frozen=True, slots=True)
class LegacyChange:
    kind: ChangeKind
    appointment_id: str
    placer_id: str = ""
