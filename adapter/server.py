"""The composition root: settings in, a running ASGI app out. The only place that wires layers."""

from __future__ import annotations

import datetime as dt
import gc
import logging
import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from zoneinfo import ZoneInfo

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from starlette.applications import Starlette

from adapter import observability
from adapter.backends.protocol import SchedulingBackend
from adapter.backends.sql.backend import SqlBackend
from adapter.backends.sql.db import Database
from adapter.fhir.app import create_app
from adapter.fhir.context import FhirContext, utc_now
from adapter.fhir.search import search_endpoint
from adapter.mapping.loader import Mapping, MappingError, load_mapping
from adapter.scheduling.proposals import ProposalCodec
from adapter.scheduling.service import SchedulingService
from adapter.scheduling.stores import is_shared, open_state_store, secret_from_store, state_url
from adapter.security.setup import build_security
from adapter.settings import Settings
from adapter.tools.check import live_check

log = logging.getLogger("adapter")


def signing_secret(settings: Settings) -> bytes:
    sec = settings.security
    if sec.signing_secret:
        return sec.signing_secret.encode("utf-8")
    if sec.signing_secret_file is None:  # SecuritySettings requires one of the two; this keeps the types honest
        raise ValueError("security: set signing_secret or signing_secret_file")
    path = Path(sec.signing_secret_file)
    if not path.exists():
        # First start: create the secret once, atomically, readable by the owner only. Every worker
        # and replica that shares this file (or the same value in SCHED_SECURITY__SIGNING_SECRET)
        # verifies the others' proposed ids.
        # Several workers start at once: each writes its own temp file and link() publishes one of
        # them without ever overwriting (rename would let two workers end up with two secrets).
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".secret-", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(secrets.token_urlsafe(32))
            os.chmod(tmp_name, 0o600)
            try:
                os.link(tmp_name, path)
            except FileExistsError:
                pass  # another worker published first: use theirs
        finally:
            os.unlink(tmp_name)
    return path.read_text(encoding="utf-8").strip().encode("utf-8")


def ensure_demo_data(settings: Settings) -> None:
    url = settings.backend.database_url
    if settings.demo and url.startswith("sqlite:///"):
        from adapter.demo.seed import ensure_demo_database

        if ensure_demo_database(Path(url[len("sqlite:///") :]), today=dt.date.today()):
            log.info("created the demo practice database at %s", url)


def check_live_mapping(mapping: Mapping, settings: Settings) -> None:
    """Refuse to start with a mapping that does not fit the database (adapter.tools.check): a column typo
    must stop the server here, not answer 500 to the first request. Data warnings are logged only; a
    database that cannot be reached yet is not a mapping error (requests answer 503 until it is back)."""
    result = live_check(mapping, settings.backend.database_url, timeout_s=settings.backend.timeout_seconds)
    if result.unreachable:
        log.warning("mapping not checked against the legacy database: %s", "; ".join(result.errors))
        return
    for line in result.warnings:
        log.warning("%s", line)
    if result.errors:
        for line in result.errors:
            log.error("%s", line)
        raise MappingError(result.errors)


def _backend(settings: Settings) -> tuple[SchedulingBackend, str | None, int | None, str | None, str]:
    """The configured backend with what the domain needs from its mapping: (backend, default visit type, slot
    step, organization id, IANA zone)."""
    if settings.backend.kind == "hl7v2":
        from adapter.backends.hl7v2.backend import Hl7v2Backend
        from adapter.hl7v2.mapping import load_hl7v2_mapping
        from adapter.hl7v2.store import open_siu_store

        h = settings.hl7v2
        hmap = load_hl7v2_mapping(settings.backend.mapping)
        inbox = h.inbox or settings.state.path.with_name("hl7v2-inbox.sqlite")
        url = state_url(settings.state.url, settings.state.path)
        if not is_shared(url):
            inbox.parent.mkdir(parents=True, exist_ok=True)
        store = open_siu_store(
            url, sqlite_path=inbox, timeout_s=settings.state.timeout_seconds or settings.backend.timeout_seconds
        )
        hl7 = Hl7v2Backend(
            hmap,
            peer_host=h.peer_host,
            peer_port=h.peer_port,
            store=store,
            listen_host=h.listen_host,
            listen_port=h.listen_port,
            mode=h.mode,
            timeout_seconds=h.timeout_seconds,
            retries=h.retries,
            inbox_retention_days=h.inbox_retention_days,
        )
        d = hmap.directory
        return hl7, d.default_visit_type, d.slot_step_minutes, None, hmap.interface.timezone
    ensure_demo_data(settings)
    mapping = load_mapping(settings.backend.mapping)
    check_live_mapping(mapping, settings)
    database = Database(
        settings.backend.database_url, pool_size=settings.backend.pool_size, timeout_s=settings.backend.timeout_seconds
    )
    vt = mapping.doc.visit_types
    org = mapping.doc.system.organization.id if mapping.doc.system.organization else None
    return SqlBackend(mapping, database), vt.default, vt.slot_step_minutes, org, mapping.doc.system.timezone


def build_app(settings: Settings, *, clock: Callable[[], dt.datetime] = utc_now) -> Starlette:
    """The whole server for ``settings``. ``clock`` is what every transaction and the housekeeping job take
    as "now" (holds, proposals, idempotency, expiry); tests pass a clock they can move forward."""
    backend, default_visit_type, slot_step, organization_id, zone_name = _backend(settings)
    state_timeout = settings.state.timeout_seconds or settings.backend.timeout_seconds
    raw_state = open_state_store(state_url(settings.state.url, settings.state.path), timeout_s=state_timeout)
    secret = secret_from_store(raw_state) if settings.security.signing_secret_from_state else signing_secret(settings)
    state = observability.MeasuredStateStore(raw_state)
    measured_backend = observability.MeasuredBackend(backend)
    codec = ProposalCodec(secret, state, dt.timedelta(seconds=settings.find.proposal_ttl_seconds))
    service = SchedulingService(
        measured_backend,
        state,
        codec,
        hold_ttl=dt.timedelta(seconds=settings.hold.ttl_seconds),
        default_visit_type=default_visit_type,
        slot_step_minutes=slot_step,
        organization_id=organization_id,
        availability_cache_seconds=settings.find.cache_seconds,
        max_days_ahead=settings.find.max_days_ahead,
    )
    ctx = FhirContext(
        service=service,
        base_url=settings.server.public_base(),
        zone=ZoneInfo(zone_name),
        find=settings.find,
        max_body_bytes=settings.server.max_body_bytes,
        auth_enabled=settings.security.auth != "off",
        now=clock,
    )
    scheduler = AsyncIOScheduler(timezone=dt.UTC)

    async def sweep() -> None:
        # Expire holds and settle bookings whose outcome a crash left unknown (scheduling.state).
        await service.housekeeping(clock())

    async def start() -> None:
        await service.start()  # the backend's listeners and connections (an HL7v2 SIU feed)
        scheduler.add_job(
            sweep,
            "interval",
            seconds=settings.hold.sweep_seconds,
            id="hold-expiry",
            coalesce=True,
            max_instances=1,
            next_run_time=utc_now(),
        )  # first run at startup
        scheduler.start()
        # Everything built so far (modules, settings, mapping, app) lives as long as the process: keep it out of
        # the cyclic garbage collector's full passes. A long $find allocates thousands of short-lived rows and
        # spans, which triggers those passes; scanning the whole heap each time cost an uncached 20 x 90 $find
        # ~9 ms of its ~24 ms (bench/profile_find.py). Reference counting still frees these objects.
        gc.freeze()

    async def stop() -> None:
        scheduler.shutdown(wait=False)
        await service.stop()
        await state.close()

    security = build_security(settings)
    demo_page = settings.demo if settings.demo_page is None else settings.demo_page
    app = create_app(
        ctx,
        search_endpoint=search_endpoint,
        on_startup=[*security.on_startup, start],
        on_shutdown=[stop, *security.on_shutdown],
        middleware=security.middleware,
        describe=[security.describe],
        demo_page=demo_page,
    )
    app.state.audit = security.trail

    async def mapping_loaded() -> None:
        """The mapping was loaded and validated by ``_backend`` (or the app was never built)."""

    observability.install(
        app,
        {"legacy": backend.ping, "state": raw_state.calendar_version, "mapping": mapping_loaded},
        log_level=settings.server.log_level,
    )
    return app
