"""The appointment mirror: the legacy scheduler's appointments as told by its SIU feed.

``InboxApplier`` takes waiting messages from the inbox in arrival order, parses them (``parse_siu``) and applies
them to ``hl7_mirror_appointment`` in the same SQLite file, marking each inbox row applied in the same transaction
(so a crash re-applies a batch, never loses one; applying is idempotent).

Out-of-order events: every appointment row carries the version of the event that wrote it, ``(MSH-7 in UTC,
inbox id)``. An event older than the stored version is recorded as stale and changes nothing, so an S14 that
arrives before its S12 is not overwritten by the late S12, and a late S12 never resurrects an appointment an S15 or
S17 ended (S17 keeps a tombstone with status entered-in-error).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from adapter.hl7v2.inbound import SiuEvent, parse_siu
from adapter.hl7v2.inbox import APPLIED, FAILED, SCHEMA as INBOX_SCHEMA, WAITING, connect
from adapter.hl7v2.mapping import Hl7v2Mapping

log = logging.getLogger("adapter.hl7v2.mirror")

SCHEMA = """
CREATE TABLE IF NOT EXISTS hl7_mirror_appointment (
    filler_id TEXT PRIMARY KEY,
    placer_id TEXT NOT NULL,
    status TEXT,
    legacy_status TEXT NOT NULL,
    status_reason TEXT,
    start_utc TEXT,
    end_utc TEXT,
    start_local TEXT,
    end_local TEXT,
    service TEXT NOT NULL,
    reason TEXT NOT NULL,
    patient_family TEXT NOT NULL,
    patient_given TEXT NOT NULL,
    version TEXT NOT NULL,
    last_trigger TEXT NOT NULL,
    last_control_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    raw TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS hl7_mirror_placer ON hl7_mirror_appointment (placer_id);
CREATE TABLE IF NOT EXISTS hl7_mirror_actor (
    filler_id TEXT NOT NULL,
    kind TEXT NOT NULL,  -- practitioner | location | patient
    actor_id TEXT NOT NULL,
    UNIQUE (kind, actor_id, filler_id)
);
CREATE INDEX IF NOT EXISTS hl7_mirror_actor_by_appt ON hl7_mirror_actor (filler_id);
CREATE TABLE IF NOT EXISTS hl7_mirror_stale (
    inbox_id INTEGER PRIMARY KEY,
    filler_id TEXT NOT NULL,
    trigger TEXT NOT NULL,
    version TEXT NOT NULL
);
"""

ActorKind = Literal["practitioner", "location", "patient"]
ApplyResult = Literal["applied", "stale", "ignored"]

_COLUMNS = (
    "filler_id, placer_id, status, legacy_status, status_reason, start_utc, end_utc, start_local, end_local, "
    "service, reason, patient_family, patient_given, version, last_trigger, last_control_id, sender"
)


def _utc(dt: datetime | None) -> str | None:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ") if dt is not None else None


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


class AppointmentMirror:
    """Synchronous mirror over one SQLite connection; call it from a worker thread, not the event loop."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.conn = connect(self.path)
        self.conn.executescript(SCHEMA)

    def close(self) -> None:
        self.conn.close()

    # --- writes ---------------------------------------------------------------------------------------------------

    def apply(self, event: SiuEvent, inbox_id: int) -> ApplyResult:
        """Apply one event inside the caller's transaction."""
        a = event.appointment
        if not a.filler_id:
            log.warning("SIU %s from %s has no filler appointment id; ignored", event.control_id, event.sender)
            return "ignored"
        stamp = _utc(event.message_time) or "0000"
        version = f"{stamp}#{inbox_id:012d}"
        row = self.conn.execute(
            "SELECT version FROM hl7_mirror_appointment WHERE filler_id = ?", (a.filler_id,)
        ).fetchone()
        if row is not None and row[0] >= version:
            self.conn.execute(
                "INSERT OR IGNORE INTO hl7_mirror_stale (inbox_id, filler_id, trigger, version) VALUES (?, ?, ?, ?)",
                (inbox_id, a.filler_id, event.trigger, version),
            )
            return "stale"
        values = (
            a.filler_id,
            a.placer_id,
            a.status,
            a.legacy_status,
            a.status_reason,
            _utc(a.start),
            _utc(a.end),
            a.start.isoformat() if a.start else None,
            a.end.isoformat() if a.end else None,
            a.service,
            a.reason,
            a.patient_family,
            a.patient_given,
            version,
            event.trigger,
            event.control_id,
            event.sender,
            event.raw,
        )
        self.conn.execute(
            f"INSERT OR REPLACE INTO hl7_mirror_appointment ({_COLUMNS}, raw) VALUES ({', '.join('?' * 18)})",
            values,
        )
        self.conn.execute("DELETE FROM hl7_mirror_actor WHERE filler_id = ?", (a.filler_id,))
        actors = [("practitioner", x) for x in a.practitioner_ids]
        actors += [("location", x) for x in a.location_ids]
        actors += [("patient", x) for x in a.patient_ids]
        self.conn.executemany(
            "INSERT OR IGNORE INTO hl7_mirror_actor (filler_id, kind, actor_id) VALUES (?, ?, ?)",
            [(a.filler_id, kind, actor) for kind, actor in actors],
        )
        return "applied"

    # --- reads ----------------------------------------------------------------------------------------------------

    def _load(self, rows: list[tuple[object, ...]]) -> list[MirroredAppointment]:
        out = []
        for r in rows:
            fid = str(r[0])
            actors = self.conn.execute(
                "SELECT kind, actor_id FROM hl7_mirror_actor WHERE filler_id = ? ORDER BY rowid", (fid,)
            ).fetchall()
            by_kind: dict[str, list[str]] = {"practitioner": [], "location": [], "patient": []}
            for kind, actor in actors:
                by_kind[kind].append(actor)
            out.append(
                MirroredAppointment(
                    filler_id=fid,
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
                    practitioner_ids=tuple(by_kind["practitioner"]),
                    location_ids=tuple(by_kind["location"]),
                    patient_ids=tuple(by_kind["patient"]),
                )
            )
        return out

    def by_filler_id(self, filler_id: str) -> MirroredAppointment | None:
        rows = self.conn.execute(
            f"SELECT {_COLUMNS} FROM hl7_mirror_appointment WHERE filler_id = ?", (filler_id,)
        ).fetchall()
        found = self._load(rows)
        return found[0] if found else None

    def by_placer_id(self, placer_id: str) -> list[MirroredAppointment]:
        rows = self.conn.execute(
            f"SELECT {_COLUMNS} FROM hl7_mirror_appointment WHERE placer_id = ?", (placer_id,)
        ).fetchall()
        return self._load(rows)

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
        rows = self.conn.execute(
            f"SELECT {', '.join('a.' + c.strip() for c in _COLUMNS.split(','))} "
            "FROM hl7_mirror_actor x JOIN hl7_mirror_appointment a ON a.filler_id = x.filler_id "
            "WHERE x.kind = ? AND x.actor_id = ? AND a.start_utc < ? AND a.end_utc > ? ORDER BY a.start_utc",
            (kind, actor_id, _utc(end), _utc(start)),
        ).fetchall()
        found = self._load(rows)
        if statuses is not None:
            found = [f for f in found if f.status in statuses]
        return found

    def count(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM hl7_mirror_appointment").fetchone()[0])

    def stale_count(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM hl7_mirror_stale").fetchone()[0])


@dataclass(slots=True)
class ApplyStats:
    applied: int = 0
    stale: int = 0
    ignored: int = 0
    failed: int = 0


class InboxApplier:
    """Parse-and-apply from the durable inbox into the mirror, in inbox order, in batches."""

    def __init__(
        self, path: str | Path, mapping: Hl7v2Mapping, *, batch_size: int = 500, coalesce_seconds: float = 0.02
    ) -> None:
        self.path = Path(path)
        self.coalesce_seconds = coalesce_seconds
        self.mapping = mapping
        self.batch_size = batch_size
        self.stats = ApplyStats()
        self._mirror: AppointmentMirror | None = None
        # Events applied (not stale) since the last hand-over to ``on_applied``: a backend publishes them as
        # legacy-side changes (cache invalidation, settling bookings whose answer was lost).
        self.on_applied: Callable[[list[SiuEvent]], Awaitable[None]] | None = None
        self._applied: list[SiuEvent] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # One SQLite connection, used from worker threads: a cancelled ``to_thread`` keeps running, so closing
        # must wait for the batch in flight.
        self._lock = threading.Lock()

    @property
    def mirror(self) -> AppointmentMirror:
        if self._mirror is None:
            self._mirror = AppointmentMirror(self.path)
            self._mirror.conn.executescript(INBOX_SCHEMA)
            # The mirror is derived from the inbox, and each batch marks its inbox rows applied in the same
            # transaction: if a power cut loses the last batches, the rows revert to waiting together with the
            # mirror and are applied again. So these commits need not wait for fsync (the ACK path's do).
            self._mirror.conn.execute("PRAGMA synchronous=NORMAL")
        return self._mirror

    def apply_batch(self) -> int:
        """Apply up to ``batch_size`` waiting messages in one transaction; returns how many were taken."""
        conn = self.mirror.conn
        rows = conn.execute(
            "SELECT id, raw FROM hl7_inbox WHERE state = ? ORDER BY id LIMIT ?", (WAITING, self.batch_size)
        ).fetchall()
        if not rows:
            return 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            done: list[tuple[int, int, str | None]] = []
            for inbox_id, raw in rows:
                try:
                    event = parse_siu(bytes(raw), self.mapping)
                except ValueError as exc:
                    self.stats.failed += 1
                    log.warning("inbox message %s cannot be applied: %s", inbox_id, exc)
                    done.append((FAILED, inbox_id, str(exc)))
                    continue
                result = self.mirror.apply(event, inbox_id)
                setattr(self.stats, result, getattr(self.stats, result) + 1)
                if result == "applied" and self.on_applied is not None:
                    self._applied.append(event)
                done.append((APPLIED, inbox_id, None))
            conn.executemany("UPDATE hl7_inbox SET state = ?, error = ? WHERE id = ?", [(s, e, i) for s, i, e in done])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return len(rows)

    def drain(self) -> int:
        total = 0
        with self._lock:
            while n := self.apply_batch():
                total += n
        return total

    async def _hand_over(self) -> None:
        if self.on_applied is None or not self._applied:
            return
        with self._lock:
            events, self._applied = self._applied, []
        try:
            await self.on_applied(events)
        except Exception:  # a failing subscriber must not stop the feed; the mirror is already up to date
            log.exception("SIU feed: handing %d applied event(s) over failed", len(events))

    def wake(self) -> None:
        """Nudge the applier; call it on the event loop thread (``SiuListener(on_stored=applier.wake)``)."""
        self._wake.set()

    async def run(self, poll_seconds: float = 1.0) -> None:
        while True:
            # Clear before draining: a message stored during the drain sets it again and is not left waiting.
            self._wake.clear()
            await asyncio.to_thread(self.drain)
            await self._hand_over()
            # Let a burst accumulate so one transaction applies many messages instead of one each.
            await asyncio.sleep(self.coalesce_seconds)
            try:
                await asyncio.wait_for(self._wake.wait(), poll_seconds)
            except TimeoutError:
                continue

    def start(self, poll_seconds: float = 1.0) -> None:
        self._task = asyncio.create_task(self.run(poll_seconds), name="hl7-inbox-applier")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        with self._lock:
            if self._mirror is not None:
                mirror, self._mirror = self._mirror, None
                mirror.close()
