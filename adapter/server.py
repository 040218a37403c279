"""The composition root: settings in, a running ASGI app out. The only place that wires layers."""

from __future__ import annotations

import datetime as dt
import logging
import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from zoneinfo import ZoneInfo

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from starlette.applications import Starlette

from adapter.backends.sql.backend import SqlBackend
from adapter.backends.sql.db import Database
from adapter.fhir.app import create_app
from adapter.fhir.context import FhirContext, utc_now
from adapter.fhir.search import search_endpoint
from adapter.mapping.loader import Mapping, MappingError, load_mapping
from adapter.scheduling.proposals import ProposalCodec
from adapter.scheduling.service import SchedulingService
from adapter.scheduling.state import SqliteStateStore, ThreadedStateStore
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


def build_app(settings: Settings, *, clock: Callable[[], dt.datetime] = utc_now) -> Starlette:
    """The whole server for ``settings``. ``clock`` is what every transaction and the housekeeping job take
    as "now" (holds, proposals, idempotency, expiry); tests pass a clock they can move forward."""
    ensure_demo_data(settings)
    mapping = load_mapping(settings.backend.mapping)
    check_live_mapping(mapping, settings)
    database = Database(
        settings.backend.database_url, pool_size=settings.backend.pool_size, timeout_s=settings.backend.timeout_seconds
    )
    backend = SqlBackend(mapping, database)
    state_timeout = settings.state.timeout_seconds or settings.backend.timeout_seconds
    state = ThreadedStateStore(SqliteStateStore(settings.state.path, timeout_s=state_timeout), timeout_s=state_timeout)
    codec = ProposalCodec(signing_secret(settings), state, dt.timedelta(seconds=settings.find.proposal_ttl_seconds))
    vt = mapping.doc.visit_types
    service = SchedulingService(
        backend,
        state,
        codec,
        hold_ttl=dt.timedelta(seconds=settings.hold.ttl_seconds),
        default_visit_type=vt.default,
        slot_step_minutes=vt.slot_step_minutes,
        organization_id=mapping.doc.system.organization.id if mapping.doc.system.organization else None,
        availability_cache_seconds=settings.find.cache_seconds,
        max_days_ahead=settings.find.max_days_ahead,
    )
    ctx = FhirContext(
        service=service,
        base_url=settings.server.public_base(),
        zone=ZoneInfo(mapping.doc.system.timezone),
        find=settings.find,
        max_body_bytes=settings.server.max_body_bytes,
        auth_enabled=settings.security.auth != "off",
        now=clock,
    )
    scheduler = AsyncIOScheduler(timezone=dt.UTC)

    async def sweep() -> None:
        # Expire holds and settle bookings whose outcome a crash left unknown (scheduling.state).
        await service.housekeeping(clock())

    def start() -> None:
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

    async def stop() -> None:
        scheduler.shutdown(wait=False)
        await backend.close()
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
    return app
