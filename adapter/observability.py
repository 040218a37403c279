"""Operations: Prometheus metrics, one JSON log line per request, ``X-Request-Id``, health and readiness.

Wired by the composition root (``adapter.server``) around the FHIR app, so no FHIR or domain
module knows about it:

* ``ObservabilityMiddleware`` (pure ASGI): times every request, labels it with its transaction
  (``find``, ``hold``, ``book``, ``search``, ``read``, ``metadata``, ``actor``, ``ops``, ``other``)
  and status, accepts a well-formed ``X-Request-Id`` (1-128 of ``A-Z a-z 0-9 . _ : -``; anything
  else is replaced by a fresh id) and echoes it, and writes one JSON line to the
  ``adapter.request`` logger: request id, transaction, method, status, duration. Never the path,
  query or body: they carry patient references. Only at ``server.log_level`` ``info`` or ``debug``;
  the line is written by a thread of its own (``request_log_writer``), so a stalled stderr never
  stalls the event loop: beyond 10,000 waiting lines new ones are dropped and counted.
* ``MeasuredStateStore`` / ``MeasuredBackend``: the state store and the legacy backend seen through
  a timing proxy (latency and errors per call; holds created / converted / swept; idempotent
  replays; availability cache lookups and loads).
* ``/healthz`` (the process answers), ``/readyz`` (the legacy database and the state store answer
  within ``probe_timeout_s`` and the mapping is loaded; else 503) and ``/metrics``, outside ``/fhir``.

Several workers: ``sched-adapter serve`` points ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's
own variable) at a fresh folder before the workers start; ``/metrics`` then adds up every worker.

Metric names (all prefixed ``sched_``): ``request_duration_seconds{transaction,status}``,
``conflicts_total{transaction}``, ``holds_total{event=created|converted|expired}`` (``expired``
counts what the sweep removed: run-out holds and stored proposals), ``idempotent_replays_total``,
``legacy_call_duration_seconds{call,outcome}``, ``legacy_errors_total{call}``,
``state_call_duration_seconds{call,outcome}``, ``availability_cache_lookups_total`` and
``availability_cache_loads_total`` (hit ratio = 1 - loads / lookups), ``request_log_dropped_total``.
"""

from __future__ import annotations

import asyncio
import atexit
import datetime as dt
import inspect
import json
import logging
import logging.handlers
import os
import queue
import re
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapter.backends.protocol import BackendError, BackendUnavailable, Interval
from adapter.scheduling.change_counters import ChangeCounters
from adapter.scheduling.state import (
    Hold,
    JournalEntry,
    StateGate,
    StateStore,
    StateUnavailable,
    StoredResponse,
)

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUESTS = Histogram(
    "sched_request_duration_seconds", "HTTP request latency", ["transaction", "status"], buckets=_BUCKETS
)
CONFLICTS = Counter("sched_conflicts_total", "answers 409 (slot taken, hold refused)", ["transaction"])
HOLDS = Counter("sched_holds_total", "holds created, converted to bookings, expired (swept)", ["event"])
REPLAYS = Counter("sched_idempotent_replays_total", "requests answered from a stored Idempotency-Key response")
LEGACY = Histogram(
    "sched_legacy_call_duration_seconds", "legacy backend round trips", ["call", "outcome"], buckets=_BUCKETS
)
LEGACY_ERRORS = Counter("sched_legacy_errors_total", "legacy backend calls that failed (unavailable)", ["call"])
STATE = Histogram("sched_state_call_duration_seconds", "state store calls", ["call", "outcome"], buckets=_BUCKETS)
CACHE_LOOKUPS = Counter("sched_availability_cache_lookups_total", "cached availability lookups ($find)")
CACHE_LOADS = Counter("sched_availability_cache_loads_total", "availability read from the legacy system")
REQUEST_LOG_DROPPED = Counter(
    "sched_request_log_dropped_total", "request log lines dropped because stderr was not being read"
)
_REQUEST_LOG_BACKLOG = 10_000  # lines waiting for the writer thread before new ones are dropped

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

request_log = logging.getLogger("adapter.request")


def valid_request_id(value: str | None) -> str:
    """The client's id when well-formed, else a fresh one (never echo arbitrary bytes into logs)."""
    if value and _REQUEST_ID.fullmatch(value):
        return value
    return uuid.uuid4().hex


def transaction_of(method: str, path: str) -> str:
    if not path.startswith("/fhir"):
        return "ops" if path in ("/healthz", "/readyz", "/metrics") else "other"
    rest = path[len("/fhir") :].strip("/")
    if rest == "metadata":
        return "metadata"
    if rest.startswith("Appointment"):
        tail = rest[len("Appointment") :].strip("/")
        if tail in ("$find", "$hold", "$book"):
            return tail[1:]
        if tail in ("", "_search"):
            return "search"
        return "read"
    return "actor" if rest else "other"


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            fields.update(extra)
        else:
            fields["message"] = record.getMessage()
        return json.dumps(fields, separators=(",", ":"))


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writer thread; when ``_REQUEST_LOG_BACKLOG`` lines are waiting (stderr not read:
    a stalled log collector, a full pipe) it drops the line and counts it rather than stall the event loop."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record  # formatted by the writer thread; the record's fields are a fresh dict per request

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            REQUEST_LOG_DROPPED.inc()


class _RequestLogListener(logging.handlers.QueueListener):
    def stop(self, timeout: float = 5.0) -> None:
        """Write what is waiting and end the thread, giving up after ``timeout`` seconds (a stalled stderr at
        exit must not keep the worker alive: the thread is a daemon, and the lines still queued are lost)."""
        thread = self._thread
        if thread is None:
            return
        try:
            self.queue.put(self._sentinel, timeout=timeout)  # type: ignore[attr-defined]  # put() is queue.Queue's
        except queue.Full:
            return
        thread.join(timeout)
        self._thread = None


def request_log_writer(
    stream: Any, *, backlog: int = _REQUEST_LOG_BACKLOG
) -> tuple[logging.Handler, _RequestLogListener]:
    """A handler to put on a logger, and the started thread that writes its records to ``stream`` as JSON lines.

    The event loop only enqueues: formatting and the write (which blocks when nobody reads stderr) happen on the
    listener's thread. Call ``listener.stop()`` to write what is waiting and end the thread.
    """
    lines: queue.Queue[logging.LogRecord] = queue.Queue(maxsize=backlog)
    out = logging.StreamHandler(stream)
    out.setFormatter(_JsonLines())
    listener = _RequestLogListener(lines, out)
    listener.start()
    return _DroppingQueueHandler(lines), listener


def configure_request_log(level: str = "info", stream: Any = None) -> None:
    """Send ``adapter.request`` lines as bare JSON (one object per line) to ``stream`` (stderr), off the event loop.

    ``level`` is ``server.log_level``: a request line is an INFO record, so ``warning`` and ``error`` turn the
    request log off (metrics still count every request). The logger is per process; the last call sets it.
    """
    request_log.setLevel(logging.INFO if level.lower() in ("debug", "info") else logging.WARNING)
    request_log.propagate = False
    if any(getattr(h, "_sched_json", False) for h in request_log.handlers):
        return
    handler, listener = request_log_writer(stream or sys.stderr)
    handler._sched_json = True  # type: ignore[attr-defined]  # marks our handler so it is added once
    request_log.addHandler(handler)
    atexit.register(listener.stop)  # what is still queued is written when the worker exits


class ObservabilityMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = None
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                given = value.decode("latin-1")
                break
        request_id = valid_request_id(given)
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            duration = time.perf_counter() - started
            transaction = transaction_of(scope.get("method", ""), scope.get("path", ""))
            REQUESTS.labels(transaction, str(status)).observe(duration)
            if status == 409:
                CONFLICTS.labels(transaction).inc()
            if transaction != "ops":
                request_log.info(
                    "request",
                    extra={
                        "fields": {
                            "event": "request",
                            "request_id": request_id,
                            "transaction": transaction,
                            "method": scope.get("method"),
                            "status": status,
                            "duration_ms": round(duration * 1000, 3),
                        }
                    },
                )


# --------------------------------------------------------------------------------------------------
# Measured state store and backend
# --------------------------------------------------------------------------------------------------
def _outcome(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    if isinstance(exc, StateUnavailable | BackendUnavailable):
        return "unavailable"
    return "refused"  # a conflict, a mismatch, not found: answered, not failed


class _Converted:
    """Tokens whose hold this worker read lately: a booking of one of them converts a hold."""

    def __init__(self, size: int = 10_000) -> None:
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._size = size

    def add(self, token: str) -> None:
        self._seen[token] = None
        self._seen.move_to_end(token)
        while len(self._seen) > self._size:
            self._seen.popitem(last=False)

    def pop(self, token: str) -> bool:
        return self._seen.pop(token, False) is None  # stored values are None; False: never seen


class MeasuredGate:
    def __init__(self, gate: StateGate) -> None:
        self._gate = gate

    def _timed(self, call: str, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        exc: BaseException | None = None
        try:
            return fn()
        except BaseException as e:
            exc = e
            raise
        finally:
            STATE.labels(call, _outcome(exc)).observe(time.perf_counter() - started)

    def place_hold(self, hold: Hold, now: dt.datetime) -> Hold:
        placed: Hold = self._timed("place_hold", lambda: self._gate.place_hold(hold, now))
        if placed is hold:  # a new hold (an existing one comes back as its stored copy)
            HOLDS.labels("created").inc()
        return placed

    def check_free(
        self,
        practitioner_id: str,
        interval: Interval,
        now: dt.datetime,
        own_hold: str | None,
        client: str | None = None,
    ) -> None:
        self._timed("check_free", lambda: self._gate.check_free(practitioner_id, interval, now, own_hold, client))

    def check_patient_free(
        self, patient_ids: Iterable[str], interval: Interval, now: dt.datetime, own_hold: str | None
    ) -> None:
        ids = tuple(patient_ids)
        self._timed("check_patient_free", lambda: self._gate.check_patient_free(ids, interval, now, own_hold))

    def journal_intent(
        self, token: str, *, client: str | None, request_key: str | None, payload: dict[str, Any], now: dt.datetime
    ) -> None:
        self._timed(
            "journal_intent",
            lambda: self._gate.journal_intent(token, client=client, request_key=request_key, payload=payload, now=now),
        )

    def journal_intent_exclusive(
        self,
        token: str,
        *,
        client: str | None,
        request_key: str | None,
        payload: dict[str, Any],
        now: dt.datetime,
        practitioner_id: str,
        patient_ids: Iterable[str],
        interval: Interval,
    ) -> None:
        self._timed(
            "journal_intent_exclusive",
            lambda: self._gate.journal_intent_exclusive(
                token,
                client=client,
                request_key=request_key,
                payload=payload,
                now=now,
                practitioner_id=practitioner_id,
                patient_ids=patient_ids,
                interval=interval,
            ),
        )

    def intents_overlapping(self, window: Interval) -> list[tuple[str, Interval, tuple[str, ...]]]:
        found: list[tuple[str, Interval, tuple[str, ...]]] = self._timed(
            "intents_overlapping", lambda: self._gate.intents_overlapping(window)
        )
        return found

    def __getattr__(self, name: str) -> Any:
        return getattr(self._gate, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # Settings of the store (e.g. lease_seconds) are the wrapped store's, not this view's.
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._gate, name, value)


class _MeasuredCounters:
    """The store's change counters; each calendar read is one cached ``$find`` lookup (the availability cache
    and the ``$find`` response memo read it once per lookup). Reads are memory reads: nothing to time."""

    def __init__(self, counters: ChangeCounters) -> None:
        self._counters = counters

    @property
    def exact(self) -> bool:
        return self._counters.exact

    def calendar(self) -> int:
        CACHE_LOOKUPS.inc()
        return self._counters.calendar()

    def holds(self) -> int:
        return self._counters.holds()


class MeasuredStateStore:
    """A ``StateStore`` that times every call of the one it wraps and counts domain events."""

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._gate = MeasuredGate(store.gate)
        self._held = _Converted()
        self._counters = _MeasuredCounters(store.counters)

    @property
    def gate(self) -> MeasuredGate:
        return self._gate

    @property
    def counters(self) -> _MeasuredCounters:
        return self._counters

    async def _timed(self, call: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        started = time.perf_counter()
        exc: BaseException | None = None
        try:
            return await fn()
        except BaseException as e:
            exc = e
            raise
        finally:
            STATE.labels(call, _outcome(exc)).observe(time.perf_counter() - started)

    async def holds_by_practitioner(
        self, practitioner_ids: Iterable[str], window: Interval, now: dt.datetime
    ) -> dict[str, list[Interval]]:
        ids = tuple(practitioner_ids)
        result: dict[str, list[Interval]] = await self._timed(
            "holds_by_practitioner", lambda: self._store.holds_by_practitioner(ids, window, now)
        )
        return result

    async def get_hold(self, hold_id: str, now: dt.datetime) -> Hold | None:
        found: Hold | None = await self._timed("get_hold", lambda: self._store.get_hold(hold_id, now))
        if found is not None:
            self._held.add(hold_id)
        return found

    async def holds_by_patient(self, patient_ids: Iterable[str], window: Interval, now: dt.datetime) -> list[Interval]:
        ids = tuple(patient_ids)
        found: list[Interval] = await self._timed(
            "holds_by_patient", lambda: self._store.holds_by_patient(ids, window, now)
        )
        return found

    async def release(self, hold_id: str) -> None:
        await self._timed("release", lambda: self._store.release(hold_id))

    async def sweep(self, now: dt.datetime) -> int:
        n: int = await self._timed("sweep", lambda: self._store.sweep(now))
        if n:
            HOLDS.labels("expired").inc(n)
        return n

    async def put_proposal(self, proposal_id: str, payload: str, expires_at: dt.datetime) -> None:
        await self._timed("put_proposal", lambda: self._store.put_proposal(proposal_id, payload, expires_at))

    async def get_proposal(self, proposal_id: str, now: dt.datetime) -> str | None:
        found: str | None = await self._timed("get_proposal", lambda: self._store.get_proposal(proposal_id, now))
        return found

    async def idempotency_begin(
        self, client: str, key: str, operation: str, body_hash: str, now: dt.datetime
    ) -> StoredResponse | None:
        stored: StoredResponse | None = await self._timed(
            "idempotency_begin", lambda: self._store.idempotency_begin(client, key, operation, body_hash, now)
        )
        if stored is not None:
            REPLAYS.inc()
        return stored

    async def idempotency_finish(self, client: str, key: str, response: StoredResponse | None) -> None:
        await self._timed("idempotency_finish", lambda: self._store.idempotency_finish(client, key, response))

    async def intents_overlapping(self, window: Interval) -> list[tuple[str, Interval, tuple[str, ...]]]:
        found: list[tuple[str, Interval, tuple[str, ...]]] = await self._timed(
            "intents_overlapping", lambda: self._store.intents_overlapping(window)
        )
        return found

    async def journal_get(self, token: str) -> JournalEntry | None:
        found: JournalEntry | None = await self._timed("journal_get", lambda: self._store.journal_get(token))
        return found

    async def calendar_version(self) -> int:
        version: int = await self._timed("calendar_version", self._store.calendar_version)
        return version

    async def bump_calendar_version(self) -> None:
        await self._timed("bump_calendar_version", self._store.bump_calendar_version)

    async def journal_done(self, token: str, appointment_id: str, now: dt.datetime, *, release_hold: bool) -> None:
        await self._timed(
            "journal_done", lambda: self._store.journal_done(token, appointment_id, now, release_hold=release_hold)
        )
        if release_hold and self._held.pop(token):
            HOLDS.labels("converted").inc()

    async def journal_abandon(self, token: str, now: dt.datetime) -> None:
        await self._timed("journal_abandon", lambda: self._store.journal_abandon(token, now))

    async def journal_drop(self, token: str) -> None:
        await self._timed("journal_drop", lambda: self._store.journal_drop(token))

    async def journal_claim(self, token: str, now: dt.datetime) -> JournalEntry | None:
        found: JournalEntry | None = await self._timed("journal_claim", lambda: self._store.journal_claim(token, now))
        return found

    async def journal_claim_stale(self, now: dt.datetime, limit: int = 100) -> list[JournalEntry]:
        found: list[JournalEntry] = await self._timed(
            "journal_claim_stale", lambda: self._store.journal_claim_stale(now, limit)
        )
        return found

    async def close(self) -> None:
        await self._store.close()


class MeasuredBackend:
    """The legacy backend behind a timing proxy: every coroutine method is timed, its failures counted."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._backend, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        async def timed(*args: Any, **kwargs: Any) -> Any:
            if name == "availability":
                CACHE_LOADS.inc()
            started = time.perf_counter()
            exc: BaseException | None = None
            try:
                return await attr(*args, **kwargs)
            except BaseException as e:
                exc = e
                raise
            finally:
                failed = exc is not None and (not isinstance(exc, BackendError) or isinstance(exc, BackendUnavailable))
                outcome = "ok" if exc is None else "unavailable" if failed else "refused"
                if outcome == "unavailable":
                    LEGACY_ERRORS.labels(name).inc()
                LEGACY.labels(name, outcome).observe(time.perf_counter() - started)

        return timed


# --------------------------------------------------------------------------------------------------
# Health, readiness, metrics
# --------------------------------------------------------------------------------------------------
Probe = Callable[[], Awaitable[Any]]


def metrics_text() -> bytes:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # prometheus_client's own switch, set by `serve`
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # unannotated in prometheus_client
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def install(app: Starlette, probes: dict[str, Probe], *, probe_timeout_s: float = 3.0, log_level: str = "info") -> None:
    """Add the middleware and the ``/healthz``, ``/readyz``, ``/metrics`` routes to ``app``."""

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        async def check(probe: Probe) -> str:
            try:
                await asyncio.wait_for(probe(), probe_timeout_s)
            except TimeoutError:
                return f"no answer within {probe_timeout_s:g} s"
            except Exception as exc:  # any failure means "not ready"; the reason goes to the operator
                return f"{type(exc).__name__}: {exc}"[:300]
            return "ok"

        names = list(probes)
        results = await asyncio.gather(*(check(probes[n]) for n in names))
        checks = dict(zip(names, results, strict=True))
        ready = all(r == "ok" for r in results)
        return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks}, 200 if ready else 503)

    async def metrics(request: Request) -> Response:
        body = await asyncio.get_running_loop().run_in_executor(None, metrics_text)  # reads files in multiproc mode
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    for route in reversed(
        [
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ]
    ):
        app.router.routes.insert(0, route)
    app.add_middleware(ObservabilityMiddleware)
    configure_request_log(log_level)
