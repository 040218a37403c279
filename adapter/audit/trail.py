"""The audit trail: a queue the request path drops records into, one worker thread that builds the
AuditEvents and delivers them, and a durable spool (SQLite) for whatever a sink could not take.

Nothing here runs on the event loop except ``submit`` (a non-blocking queue put). An event a sink
refuses is stored in the spool, and while a sink has spooled events new ones queue up behind them,
so each sink receives events in order. The worker retries the spool every ``retry_seconds``; it is
shared by the workers of one installation (claims keep two workers from sending the same row).
The spool is bounded (``max_events``): when it is full the oldest rows of that sink are dropped with
an error in the log, the only case in which an event is lost; its size is logged as it grows.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from adapter.audit.events import AuditRecord, ServerIdentity, build_events
from adapter.audit.sinks import Sink
from adapter.sqlite_wal import enable_wal

log = logging.getLogger("adapter.audit")

_STOP = object()
_CLAIM_SECONDS = 120.0
_BATCH = 100


class Spool:
    def __init__(self, path: Path, max_events: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_events = max_events
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        enable_wal(self.db)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS spool (id INTEGER PRIMARY KEY AUTOINCREMENT, sink TEXT NOT NULL, "
            "event BLOB NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, claimed_by TEXT, claimed_at REAL)"
        )
        self.db.execute("CREATE INDEX IF NOT EXISTS spool_sink ON spool (sink, id)")
        self._warned_at = 0

    def count(self, sink: str | None = None) -> int:
        if sink is None:
            return int(self.db.execute("SELECT count(*) FROM spool").fetchone()[0])
        return int(self.db.execute("SELECT count(*) FROM spool WHERE sink = ?", (sink,)).fetchone()[0])

    def add(self, sink: str, event: bytes) -> None:
        self.db.execute("INSERT INTO spool (sink, event) VALUES (?, ?)", (sink, event))
        size = self.count()
        if size > self.max_events:
            excess = size - self.max_events
            self.db.execute(
                "DELETE FROM spool WHERE id IN (SELECT id FROM spool WHERE sink = ? ORDER BY id LIMIT ?)",
                (sink, excess),
            )
            log.error(
                "audit spool is full (%d events): dropped the %d oldest for sink %s", self.max_events, excess, sink
            )
        elif size >= max(10, self._warned_at * 10):
            self._warned_at = size
            log.warning("audit spool holds %d undelivered events (%s)", size, self.path)

    def claim(self, sink: str, owner: str) -> list[tuple[int, bytes]]:
        now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            rows = self.db.execute(
                "SELECT id, event FROM spool WHERE sink = ? AND (claimed_by IS NULL OR claimed_at < ?) "
                "ORDER BY id LIMIT ?",
                (sink, now - _CLAIM_SECONDS, _BATCH),
            ).fetchall()
            if rows:
                self.db.executemany(
                    "UPDATE spool SET claimed_by = ?, claimed_at = ?, attempts = attempts + 1 WHERE id = ?",
                    [(owner, now, r[0]) for r in rows],
                )
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return [(int(r[0]), bytes(r[1])) for r in rows]

    def done(self, row_id: int) -> None:
        self.db.execute("DELETE FROM spool WHERE id = ?", (row_id,))

    def release(self, ids: Sequence[int]) -> None:
        self.db.executemany("UPDATE spool SET claimed_by = NULL, claimed_at = NULL WHERE id = ?", [(i,) for i in ids])

    def close(self) -> None:
        self.db.close()


class AuditTrail:
    def __init__(
        self,
        sinks: Sequence[Sink],
        server: ServerIdentity,
        spool_path: Path,
        *,
        max_spool_events: int = 100_000,
        retry_seconds: float = 30.0,
    ) -> None:
        self.sinks = list(sinks)
        self.server = server
        self.spool_path = spool_path
        self.max_spool_events = max_spool_events
        self.retry_seconds = retry_seconds
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._owner = f"{os.getpid()}-{id(self):x}"
        self._spool: Spool | None = None
        self.delivered = 0

    # -- request path ---------------------------------------------------------------------------
    def submit(self, record: AuditRecord) -> None:
        """Non-blocking: the record is built and delivered by the audit thread."""
        self._queue.put(record)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="audit-trail", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Deliver (or spool) everything queued, then stop the thread."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("audit thread did not finish within %.0f s; queued events are lost", timeout)
        self._thread = None

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything submitted so far has been handled (tests, shutdown)."""
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    # -- audit thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while self._spool is None:  # the thread must not die: nothing else would deliver this worker's events
            try:
                self._spool = Spool(self.spool_path, self.max_spool_events)
            except sqlite3.Error:
                log.exception("audit: cannot open the spool %s; retrying in 1 s", self.spool_path)
                time.sleep(1.0)
        backlog = {s.name: self._spool.count(s.name) > 0 for s in self.sinks}
        last_retry = 0.0
        try:
            while True:
                try:
                    item = self._queue.get(timeout=self.retry_seconds)
                except queue.Empty:
                    item = "retry"
                if item is _STOP:
                    break
                if isinstance(item, threading.Event):
                    item.set()
                    continue
                if isinstance(item, AuditRecord):
                    self._handle(item, backlog)
                if item == "retry" or time.monotonic() - last_retry >= self.retry_seconds:
                    last_retry = time.monotonic()
                    self._retry(backlog)
            while True:  # shutdown: whatever is still queued goes out or into the spool
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, AuditRecord):
                    self._handle(item, backlog)
                elif isinstance(item, threading.Event):
                    item.set()
        finally:
            for s in self.sinks:
                s.close()
            self._spool.close()

    def _handle(self, record: AuditRecord, backlog: dict[str, bool]) -> None:
        try:
            events = build_events(record, self.server)
        except Exception:
            log.exception("audit: cannot build the AuditEvent for %s %s", record.method, record.path)
            return
        assert self._spool is not None
        for event in events:
            blob = orjson.dumps(event)
            for sink in self.sinks:
                if backlog.get(sink.name):
                    self._spool.add(sink.name, blob)
                    continue
                try:
                    sink.send(event)
                    self.delivered += 1
                except Exception as exc:
                    log.warning("audit sink %s failed (%s); the event is spooled", sink.name, exc)
                    self._spool.add(sink.name, blob)
                    backlog[sink.name] = True

    def _retry(self, backlog: dict[str, bool]) -> None:
        assert self._spool is not None
        for sink in self.sinks:
            while True:
                rows = self._spool.claim(sink.name, self._owner)
                if not rows:
                    backlog[sink.name] = self._spool.count(sink.name) > 0
                    break
                failed_at = None
                for i, (row_id, blob) in enumerate(rows):
                    try:
                        sink.send(orjson.loads(blob))
                    except Exception as exc:
                        log.warning("audit sink %s still failing (%s); %d events wait", sink.name, exc, len(rows) - i)
                        failed_at = i
                        break
                    self._spool.done(row_id)
                    self.delivered += 1
                if failed_at is not None:
                    self._spool.release([r[0] for r in rows[failed_at:]])
                    backlog[sink.name] = True
                    break
