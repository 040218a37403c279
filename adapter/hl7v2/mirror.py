"""The appointment mirror: the legacy scheduler's appointments as told by its SIU feed.

``InboxApplier`` claims waiting messages from the ``SiuStore`` inbox in arrival order, parses them (``parse_siu``)
and applies them to the store's mirror, marking each inbox message in the same batch (so a crash re-applies a
batch, never loses one; applying is idempotent). Appliers of several replicas sharing one store never claim the
same message at once.

Out-of-order events: every appointment carries the version of the event that wrote it, ``(MSH-7 in UTC, inbox
id)`` (``adapter.hl7v2.store.event_version``). An event older than the stored version is recorded as stale and
changes nothing (``supersedes``), so an S14 that arrives before its S12 is not overwritten by the late S12, and a
late S12 never resurrects an appointment an S15 or S17 ended (S17 keeps a tombstone with status entered-in-error).

Retention: with ``retention_days`` > 0 the applier also deletes applied inbox messages older than that
(``SiuStore.purge_applied``, in batches of ``purge_limit`` until a batch comes back short), once when it starts and
then every ``purge_every_seconds``, on a worker thread. A purge that fails is logged and tried again next time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from adapter.hl7v2.inbound import SiuEvent, parse_siu
from adapter.hl7v2.mapping import Hl7v2Mapping
from adapter.hl7v2.store import (
    ActorKind,
    ApplyResult,
    MirroredAppointment,
    MirrorWrite,
    SiuStore,
    event_version,
)
from adapter.hl7v2.store_sqlite import MIRROR_SCHEMA as SCHEMA, SqliteSiuStore

__all__ = ["SCHEMA", "ActorKind", "ApplyResult", "ApplyStats", "InboxApplier", "MirroredAppointment", "mirror_write"]

log = logging.getLogger("adapter.hl7v2.mirror")


def mirror_write(event: SiuEvent, inbox_id: int) -> MirrorWrite | None:
    """What applying ``event`` (inbox message ``inbox_id``) writes to the mirror; None without a filler id."""
    a = event.appointment
    if not a.filler_id:
        return None
    appointment = MirroredAppointment(
        filler_id=a.filler_id,
        placer_id=a.placer_id,
        status=a.status,
        legacy_status=a.legacy_status,
        status_reason=a.status_reason,
        start=a.start,
        end=a.end,
        service=a.service,
        reason=a.reason,
        patient_family=a.patient_family,
        patient_given=a.patient_given,
        version=event_version(event.message_time, inbox_id),
        last_trigger=event.trigger,
        last_control_id=event.control_id,
        sender=event.sender,
        practitioner_ids=a.practitioner_ids,
        location_ids=a.location_ids,
        patient_ids=a.patient_ids,
    )
    return MirrorWrite(appointment, event.raw, inbox_id)


@dataclass(slots=True)
class ApplyStats:
    applied: int = 0
    stale: int = 0
    ignored: int = 0
    failed: int = 0


class InboxApplier:
    """Parse-and-apply from the durable inbox into the mirror, in inbox order, in batches.

    ``store`` is the feed's ``SiuStore``, or the path of a SQLite file (then the applier opens, owns and closes
    its own ``SqliteSiuStore``)."""

    def __init__(
        self,
        store: SiuStore | str | Path,
        mapping: Hl7v2Mapping,
        *,
        batch_size: int = 500,
        coalesce_seconds: float = 0.02,
        retention_days: float = 0,
        purge_every_seconds: float = 3600,
        purge_limit: int = 1000,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._owned = isinstance(store, str | Path)
        self.store: SiuStore = SqliteSiuStore(store) if isinstance(store, str | Path) else store
        self.coalesce_seconds = coalesce_seconds
        self.mapping = mapping
        self.batch_size = batch_size
        self.stats = ApplyStats()
        # Events applied (not stale) since the last hand-over to ``on_applied``: a backend publishes them as
        # legacy-side changes (cache invalidation, settling bookings whose answer was lost).
        self.on_applied: Callable[[list[SiuEvent]], Awaitable[None]] | None = None
        self._applied: list[SiuEvent] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Batches run on worker threads: a cancelled ``to_thread`` keeps running, so closing must wait for the
        # batch in flight.
        self._lock = threading.Lock()
        # Retention: 0 keeps every message.
        self.retention = timedelta(days=retention_days) if retention_days > 0 else None
        self.purge_every_seconds = purge_every_seconds
        self.purge_limit = purge_limit
        self.clock = clock
        self.purged = 0
        self._purge_task: asyncio.Task[None] | None = None
        self._stopping = threading.Event()
        # Not ``_lock``: the event loop takes that one (``_hand_over``) and must not wait for a purge batch.
        self._purge_lock = threading.Lock()

    @property
    def mirror(self) -> SiuStore:
        """The store the applier writes to (its mirror reads: ``by_filler_id``, ``stale_count``, ...)."""
        return self.store

    def apply_batch(self) -> int:
        """Apply up to ``batch_size`` waiting messages as one batch; returns how many were taken."""
        applied: list[SiuEvent] = []
        with self.store.claim(self.batch_size) as batch:
            for message in batch.messages:
                try:
                    event = parse_siu(message.raw, self.mapping)
                except ValueError as exc:
                    self.stats.failed += 1
                    log.warning("inbox message %s cannot be applied: %s", message.inbox_id, exc)
                    batch.mark_failed(message.inbox_id, str(exc))
                    continue
                write = mirror_write(event, message.inbox_id)
                result: ApplyResult
                if write is None:
                    log.warning("SIU %s from %s has no filler appointment id; ignored", event.control_id, event.sender)
                    result = "ignored"
                else:
                    result = batch.apply(write)
                setattr(self.stats, result, getattr(self.stats, result) + 1)
                if result == "applied" and self.on_applied is not None:
                    applied.append(event)
                batch.mark_applied(message.inbox_id)
            taken = len(batch.messages)
        # Only events of a batch that completed are handed over.
        self._applied.extend(applied)
        return taken

    def drain(self) -> int:
        total = 0
        with self._lock:
            while n := self.apply_batch():
                total += n
        return total

    def purge(self, now: datetime | None = None) -> int:
        """Delete the applied messages received before ``now`` (default: ``clock()``) minus the retention, in
        batches of ``purge_limit`` until one comes back short; returns how many. Nothing without a retention.
        Blocking: call it from a worker thread."""
        if self.retention is None:
            return 0
        before = (now or self.clock()) - self.retention
        total = 0
        try:
            while not self._stopping.is_set():
                with self._purge_lock:  # closing waits for the batch in flight (as for ``drain``)
                    if self._stopping.is_set():
                        break
                    n = self.store.purge_applied(before, self.purge_limit)
                total += n
                if n < self.purge_limit:
                    break
        finally:
            self.purged += total
            if total:
                log.info("SIU inbox: purged %d applied message(s) received before %s", total, before.isoformat())
        return total

    async def run_purges(self) -> None:
        """``purge`` now and then every ``purge_every_seconds``; a failure is logged and retried next time."""
        while True:
            try:
                await asyncio.to_thread(self.purge)
            except Exception:
                log.exception(
                    "SIU inbox: purging applied messages failed; retrying in %.0f s", self.purge_every_seconds
                )
            await asyncio.sleep(self.purge_every_seconds)

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
            try:
                await asyncio.to_thread(self.drain)
            except Exception:  # the store is unreachable for now: what is waiting stays waiting, try again later
                log.exception("SIU applier: a batch failed; retrying in %.1f s", poll_seconds)
            await self._hand_over()
            # Let a burst accumulate so one transaction applies many messages instead of one each.
            await asyncio.sleep(self.coalesce_seconds)
            try:
                await asyncio.wait_for(self._wake.wait(), poll_seconds)
            except TimeoutError:
                continue

    def start(self, poll_seconds: float = 1.0) -> None:
        self._stopping.clear()
        self._task = asyncio.create_task(self.run(poll_seconds), name="hl7-inbox-applier")
        if self.retention is not None:
            self._purge_task = asyncio.create_task(self.run_purges(), name="hl7-inbox-purge")

    async def stop(self) -> None:
        self._stopping.set()  # a purge running on a worker thread stops after its current batch
        for task in (self._task, self._purge_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._purge_task = None
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        with self._lock, self._purge_lock:
            if self._owned:
                self.store.close()
