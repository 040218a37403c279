"""Settings in, the security middleware, audit trail and CapabilityStatement hook out (used by
``adapter.server``, the composition root)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.middleware import Middleware

from adapter.audit.events import ServerIdentity
from adapter.audit.sinks import FhirSink, FileSink, Sink, SyslogTlsSink
from adapter.audit.trail import AuditTrail
from adapter.security.middleware import SecurityConfig, SecurityMiddleware
from adapter.security.ratelimit import RateLimiter
from adapter.security.smart import describe_security, smart_configuration
from adapter.security.tokens import Introspector, JwksSource, TokenValidator
from adapter.settings import Settings

log = logging.getLogger("adapter.security")


@dataclass(slots=True)
class Security:
    middleware: list[Middleware]
    describe: Callable[[dict[str, Any]], None]
    trail: AuditTrail | None
    on_startup: list[Callable[[], Any]] = field(default_factory=list)
    on_shutdown: list[Callable[[], Any]] = field(default_factory=list)


def build_sinks(settings: Settings) -> list[Sink]:
    audit = settings.audit
    sinks: list[Sink] = []
    for name in audit.sinks:
        if name == "file":
            sinks.append(FileSink(audit.file or settings.state.path.parent / "audit.jsonl"))
        elif name == "fhir":
            assert audit.fhir_url is not None
            sinks.append(FhirSink(audit.fhir_url, timeout_seconds=audit.timeout_seconds, ca_file=audit.fhir_ca_file))
        elif name == "syslog":
            assert audit.syslog_host is not None
            sinks.append(
                SyslogTlsSink(
                    audit.syslog_host,
                    audit.syslog_port,
                    ca_file=audit.syslog_ca_file,
                    client_cert=audit.syslog_client_cert,
                    client_key=audit.syslog_client_key,
                    timeout_seconds=audit.timeout_seconds,
                )
            )
    return sinks


def build_security(settings: Settings) -> Security:
    sec = settings.security
    validator = None
    smart = None
    if sec.auth == "smart":
        assert sec.issuer and sec.audience
        keys = None
        if sec.jwks_url or sec.jwks_file:
            keys = JwksSource(url=sec.jwks_url, file=sec.jwks_file, refresh_seconds=sec.jwks_refresh_seconds)
        introspector = None
        if sec.introspection_url:
            introspector = Introspector(
                sec.introspection_url,
                client_id=sec.introspection_client_id,
                client_secret=sec.introspection_client_secret,
                cache_seconds=sec.introspection_cache_seconds,
            )
        validator = TokenValidator(
            keys,
            issuer=sec.issuer,
            audience=sec.audience,
            leeway_seconds=sec.leeway_seconds,
            introspector=introspector,
        )
        smart = smart_configuration(
            issuer=sec.issuer,
            jwks_uri=sec.jwks_url,
            authorization_endpoint=sec.authorization_endpoint,
            token_endpoint=sec.token_endpoint,
            introspection_endpoint=sec.introspection_url,
        )
    trail = None
    sinks = build_sinks(settings)
    if sinks:
        trail = AuditTrail(
            sinks,
            ServerIdentity(settings.server.public_base(), site=settings.audit.site),
            settings.audit.spool or settings.state.path.parent / "audit-spool.sqlite",
            max_spool_events=settings.audit.spool_max_events,
            retry_seconds=settings.audit.retry_seconds,
        )
    limiter = RateLimiter(sec.rate_limit_per_minute) if sec.rate_limit_per_minute else None
    config = SecurityConfig(validator, smart, limiter, trail.submit if trail else None)

    def announce() -> None:
        if validator is None:
            log.warning(
                "AUTHORIZATION IS OFF (security.auth = off): anyone who can reach %s can read, book, cancel "
                "and reschedule every patient's appointments. Use this for demonstrations only.",
                settings.server.public_base(),
            )
        else:
            log.info("SMART on FHIR authorization on: tokens from %s for audience %s", sec.issuer, sec.audience)
        if trail is None:
            log.warning("audit trail is off (audit.sinks = [])")
        else:
            trail.start()

    async def stop_trail() -> None:
        if trail is not None:
            await asyncio.to_thread(trail.stop)

    return Security(
        middleware=[Middleware(SecurityMiddleware, config=config)],
        describe=describe_security(smart, audit=trail is not None),
        trail=trail,
        on_startup=[announce],
        on_shutdown=[stop_trail],
    )
