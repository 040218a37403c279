"""``SiuStore``: where the SIU feed keeps its state (the durable inbox and the appointment mirror).

The listener stores each raw message here before it acknowledges it; the applier claims waiting messages, applies
them to the mirror and marks them done; the backend reads the mirror and writes a confirmed SRR's appointment into
it. Nothing here parses HL7: the applier hands over ``MirrorWrite`` values built from parsed events
(``adapter.hl7v2.mirror.mirror_write``), and the rule that decides which event wins (``supersedes``) is one pure
function every implementation calls.

Implementations, chosen by ``open_siu_store`` from ``state.url`` (no other module knows which one is in use):

* ``sqlite:///...``: ``SqliteSiuStore``, one host-local file (``hl7v2.inbox``, default beside ``state.path``);
* ``postgresql://...``: ``PostgresSiuStore``, tables ``sched_hl7_*`` in the state database, shared by replicas;
* ``redis://...``, ``rediss://...``, ``redis+sentinel://...``: ``RedisSiuStore`` (``store_redis.py``), keys
  ``<key_prefix>siu:*`` beside the scheduling state, shared by replicas.

Every method is synchronous and may block: call it from a worker thread, never the event loop. One store object
is safe to use from several threads at once; several store objects (several replicas) may share one database.

Retention (``purge_applied``, run periodically by ``InboxApplier`` with ``hl7v2.inbox_retention_days``): applied
messages older than the retention period are deleted with their de-duplication keys and stale records; waiting and
failed messages and the mirror are kept. A message resent after its first copy was purged is therefore not a
duplicate any more: it is stored and applied again, with a new inbox id, and the version rule decides. Its version
is ``event_version(MSH-7, new inbox id)``: the same MSH-7 as before, a higher arrival number. So:

* if the appointment changed since, through an event with a later MSH-7 (or a confirmed SRR, versioned by the
  adapter's clock when it was received, later than the MSH-7 of a message received long before it unless the
  sender's clock is that far ahead), the resend is older and recorded stale: no roll-back;
* if the resent message is still the newest event of its appointment, it is applied again with the same content:
  the mirror does not change (the applier reports it as applied);
* the one roll-back: the event that superseded the purged message carries the *same* MSH-7 (to the precision the
  sender writes it, or both lack MSH-7), so that arrival order decided between them, and the resend now arrives
  last. This is the case the rule already orders by arrival (senders should write MSH-7 with sub-second precision),
  and it needs a sender to resend a message older than the retention period (30 days by default), far beyond any
  resend after a lost ACK.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

WAITING, APPLIED, FAILED = 0, 1, 2
"""Inbox message states: waiting to be applied, applied (or recorded stale), failed (cannot be parsed)."""

ActorKind = Literal["practitioner", "location", "patient"]
ApplyResult = Literal["applied", "stale", "ignored"]

RECORD_INBOX_ID = 0
"""The inbox id of a mirror write that comes from a confirmed SRR rather than from an inbox message."""


class SiuStoreUnavailable(Exception):
    """The store cannot answer now (unreachable, timed out); the caller may try again later."""


@dataclass(frozen=True, slots=True)
class MirroredAppointment:
    filler_id: str
    placer_id: str
    status: str | None
    legacy_status: str
    status_reason: str | None
    start: datetime | None  # with the offset the sender wrote
    end: datetime | None
    service: str
    reason: str
    patient_family: str
    patient_given: str
    version: str
    last_trigger: str
    last_control_id: str
    sender: str
    practitioner_ids: tuple[str, ...]
    location_ids: tuple[str, ...]
    patient_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class MirrorWrite:
    """One event's effect on the mirror: the appointment as the event tells it (``appointment.version`` is the
    event's version, see ``event_version``), the raw message, and the inbox message it came from."""

    appointment: MirroredAppointment
    raw: str
    inbox_id: int


def mirror_row(write: MirrorWrite) -> tuple[str | None, ...]:
    """The values of one mirror row in the column order every SQL store uses (``filler_id`` .. ``sender``, ``raw``):
    times both in UTC text (for ordering and windows) and as the sender wrote them (for reading back)."""
    a = write.appointment
    return (
        a.filler_id,
        a.placer_id,
        a.status,
        a.legacy_status,
        a.status_reason,
        utc_text(a.start),
        utc_text(a.end),
        a.start.isoformat() if a.start else None,
        a.end.isoformat() if a.end else None,
        a.service,
        a.reason,
        a.patient_family,
        a.patient_given,
        a.version,
        a.last_trigger,
        a.last_control_id,
        a.sender,
        write.raw,
    )


def appointment_from_row(row: Sequence[object], actors: Mapping[str, Sequence[str]]) -> MirroredAppointment:
    """The inverse of ``mirror_row`` for a row of the SQL stores' columns (``raw`` not included), with the actor ids
    by kind (``practitioner``, ``location``, ``patient``) in the order the event named them."""
    r = row
    return MirroredAppointment(
        filler_id=str(r[0]),
        placer_id=str(r[1]),
        status=None if r[2] is None else str(r[2]),
        legacy_status=str(r[3]),
        status_reason=None if r[4] is None else str(r[4]),
        start=datetime.fromisoformat(str(r[7])) if r[7] else None,
        end=datetime.fromisoformat(str(r[8])) if r[8] else None,
        service=str(r[9]),
        reason=str(r[10]),
        patient_family=str(r[11]),
        patient_given=str(r[12]),
        version=str(r[13]),
        last_trigger=str(r[14]),
        last_control_id=str(r[15]),
        sender=str(r[16]),
        practitioner_ids=tuple(actors.get("practitioner", ())),
        location_ids=tuple(actors.get("location", ())),
        patient_ids=tuple(actors.get("patient", ())),
    )


@dataclass(frozen=True, slots=True)
class InboxMessage:
    inbox_id: int
    raw: bytes


def utc_text(moment: datetime | None) -> str | None:
    """The sortable UTC text every store keeps times in (so that text order is time order)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ") if moment is not None else None


def event_version(message_time: datetime | None, inbox_id: int) -> str:
    """The version of an event: MSH-7 in UTC, then the inbox id (arrival order) for events of the same second."""
    return f"{utc_text(message_time) or '0000'}#{inbox_id:012d}"


def supersedes(version: str, stored: str | None) -> bool:
    """The version rule: an event changes the mirror only if it is newer than what the mirror holds.

    So an S14 that arrives before its S12 is not overwritten by the late S12, and a late S12 never resurrects an
    appointment an S15 or S17 ended (S17 leaves a tombstone). Equal versions (the same event again) are stale.
    """
    return stored is None or version > stored


class SiuBatch(Protocol):
    """Waiting inbox messages claimed by one applier, and the mirror writes made for them, as one unit.

    Leaving the ``with`` block normally makes the writes and the marks durable together; an exception discards
    them and the messages are waiting again (applying is idempotent, so a crash re-applies, never loses).
    """

    messages: Sequence[InboxMessage]
    """The claimed messages in inbox (arrival) order; no other batch holds any of them while this one is open."""

    def apply(self, write: MirrorWrite) -> ApplyResult:
        """Apply one event: if ``supersedes(write version, stored version)`` replace the appointment and its
        actors and answer "applied"; else record (inbox id, filler id, trigger, version) as stale and answer
        "stale"."""
        ...

    def mark_applied(self, inbox_id: int) -> None:
        """The message is done (applied, stale or ignored); it is not claimed again."""
        ...

    def mark_failed(self, inbox_id: int, error: str) -> None:
        """The message cannot be applied (``error`` says why); it is kept, not claimed again."""
        ...


class SiuStore(Protocol):
    # --- the inbox (the ACK path) ----------------------------------------------------------------------------------

    def store_message(self, sender: str, control_id: str, message_type: str, raw: bytes) -> bool:
        """Store a raw message durably (committed on return, on every replica's view) as waiting; True if new,
        False if (sender, control_id) is already stored (by this or any other store object): then nothing
        changes. Raises if it cannot store: the caller must then not acknowledge the message."""
        ...

    def count_messages(self, state: int | None = None) -> int:
        """How many inbox messages there are in ``state`` (``WAITING``, ``APPLIED``, ``FAILED``), or in all
        (messages deleted by ``purge_applied`` are not counted)."""
        ...

    def purge_applied(self, before: datetime, limit: int) -> int:
        """Delete up to ``limit`` inbox messages in state ``APPLIED`` received before ``before``, oldest first,
        together with their de-duplication keys (the same (sender, control_id) can then be stored again, as a new
        message) and their stale records; return how many messages were deleted.

        Waiting, claimed and failed messages are never deleted, nor is anything in the mirror (appointments,
        actors, tombstones). Safe while listeners store and appliers claim, on this and other store objects
        sharing the store: each call is one short unit of at most ``limit`` messages, so call it again until it
        returns less than ``limit``. ``before`` (timezone-aware) is compared with the time the store recorded on
        receipt (PostgreSQL: the database server's clock; SQLite and Redis: the storing host's clock). Inbox ids
        of messages stored later stay above every purged id (the version rule orders by them)."""
        ...

    # --- the applier ----------------------------------------------------------------------------------------------

    def claim(self, limit: int) -> AbstractContextManager[SiuBatch]:
        """Claim up to ``limit`` waiting messages, oldest first, for applying. Two claims open at the same time
        (threads, processes, hosts) never hold the same message; a message marked in a batch that completed is
        never claimed again. The batch may be empty."""
        ...

    def record(self, write: MirrorWrite) -> ApplyResult:
        """Apply one mirror write outside any batch, durably (a confirmed SRR's appointment, with
        ``inbox_id = RECORD_INBOX_ID``); the same version rule as ``SiuBatch.apply``."""
        ...

    # --- the mirror's reads ---------------------------------------------------------------------------------------

    def by_filler_id(self, filler_id: str) -> MirroredAppointment | None:
        """The mirrored appointment with this filler id (SCH-2), whatever its status."""
        ...

    def by_placer_id(self, placer_id: str) -> list[MirroredAppointment]:
        """The mirrored appointments with this placer id (SCH-1), whatever their status."""
        ...

    def for_actor(
        self,
        kind: ActorKind,
        actor_id: str,
        start: datetime,
        end: datetime,
        *,
        statuses: frozenset[str] | None = None,
    ) -> list[MirroredAppointment]:
        """Appointments of one actor overlapping [start, end), by start time; optionally only some statuses."""
        ...

    def all_appointments(self) -> list[MirroredAppointment]:
        """Every mirrored appointment (tombstones included), in no particular order."""
        ...

    def patient_names(self) -> dict[str, tuple[str, str]]:
        """patient id -> (family, given) as the newest appointment (by version) naming the patient spells it."""
        ...

    def count(self) -> int:
        """How many appointments the mirror holds."""
        ...

    def stale_count(self) -> int:
        """How many stale events are recorded (at most one per inbox message; ``purge_applied`` deletes a purged
        message's)."""
        ...

    def close(self) -> None:
        """Release connections. The store stays usable: a later call connects again."""
        ...


SIU_STORE_SCHEMES = (
    "sqlite:///",
    "postgresql://",
    "postgres://",
    "redis://",
    "rediss://",
    "redis+sentinel://",
    "unix://",
)
"""The ``state.url`` schemes the SIU feed has a store for (``open_siu_store``)."""


def open_siu_store(url: str, *, sqlite_path: str | Path | None = None, timeout_s: float = 30.0) -> SiuStore:
    """The ``SiuStore`` for ``state.url``: PostgreSQL keeps the feed in the state database (tables
    ``sched_hl7_*``), Redis under ``<key_prefix>siu:``; SQLite keeps it in ``sqlite_path`` (``hl7v2.inbox``), a file of its own beside the state
    file, or in the state file itself when no path is given."""
    if url.startswith("sqlite:///"):
        from adapter.hl7v2.store_sqlite import SqliteSiuStore

        return SqliteSiuStore(sqlite_path if sqlite_path is not None else url[len("sqlite:///") :])
    if url.startswith(("postgresql://", "postgres://")):
        from adapter.hl7v2.store_postgres import PostgresSiuStore

        return PostgresSiuStore(url, timeout_s=timeout_s)
    if url.startswith(("redis://", "rediss://", "redis+sentinel://", "unix://")):
        from adapter.hl7v2.store_redis import RedisSiuStore

        return RedisSiuStore(url, timeout_s=timeout_s)
    raise ValueError(f"state.url {url!r}: the HL7v2 feed needs sqlite:///path, redis://... or postgresql://...")
