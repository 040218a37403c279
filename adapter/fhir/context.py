"""What every FHIR endpoint needs, built once per app: the service, the base URL, limits, the clock."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.requests import Request

from adapter.fhir.outcome import FhirError
from adapter.scheduling.service import SchedulingService
from adapter.settings import FindSettings


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(slots=True)
class FhirContext:
    service: SchedulingService
    base_url: str
    zone: dt.tzinfo
    find: FindSettings
    max_body_bytes: int
    auth_enabled: bool
    software_name: str = "sched-adapter"
    now: Callable[[], dt.datetime] = field(default=utc_now)


async def read_body(request: Request) -> bytes:
    """The request body, refusing more than ``max_body_bytes`` (413) without reading it all."""
    ctx: FhirContext = request.app.state.fhir
    limit = ctx.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise FhirError(413, "too-costly", f"the request body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise FhirError(413, "too-costly", f"the request body is larger than the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request.scope["sched.body"] = body  # idempotency scopes anonymous keys by the request itself
    return body


def client_id(request: Request) -> str | None:
    """Who is calling, for hold ownership and idempotency scoping.

    With authorization on, the token's client id (set by the auth middleware). Without it, the
    optional ``X-Client-Id`` header; anonymous callers are all distinct (no "same client" shortcut).
    """
    principal = request.scope.get("sched.client")
    if principal:
        return str(principal)
    header = request.headers.get("x-client-id")
    return header.strip()[:128] if header and header.strip() else None
