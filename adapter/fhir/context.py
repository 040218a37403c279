"""What every FHIR endpoint needs, built once per app: the service, the base URL, limits, the clock."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from starlette.requests import Request

from adapter.fhir.outcome import FhirError
from adapter.scheduling.service import SchedulingService
from adapter.settings import FindSettings


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class ResponseMemo:
    """A small LRU of finished answers (body bytes and media type) by a key that names everything they depend on.

    An entry is served for at most ``max_age`` seconds of this process's monotonic clock whatever the key says, so
    an injected request clock that stands still cannot stretch it. ``fhir.find`` builds the keys (its docstring says
    what goes in them).
    """

    def __init__(self, max_entries: int = 1024, max_age: float = 1.0, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_entries = max_entries
        self.max_age = max_age
        self.max_bytes = max_bytes  # 1,024 answers of 500 entries would be ~700 MB: bounded by size as well
        self._entries: OrderedDict[Hashable, tuple[float, bytes, str]] = OrderedDict()
        self._bytes = 0
        # Answers being computed, by key: a burst of the same request (every connection of a portal at the turn
        # of a second) waits for one computation instead of running the whole $find once per connection.
        self._computing: dict[Hashable, asyncio.Future[tuple[bytes, str]]] = {}

    def computing(self, key: Hashable) -> asyncio.Future[tuple[bytes, str]] | None:
        """The answer to ``key`` that another request is computing now, if any."""
        return self._computing.get(key)

    def begin(self, key: Hashable) -> asyncio.Future[tuple[bytes, str]]:
        """This request computes ``key``; others may wait for it (``computing``) until ``end``."""
        future: asyncio.Future[tuple[bytes, str]] = asyncio.get_running_loop().create_future()
        self._computing[key] = future
        return future

    def end(self, key: Hashable, future: asyncio.Future[tuple[bytes, str]], answer: tuple[bytes, str] | None) -> None:
        """The computation of ``key`` is over: ``answer``, or None when it failed (the waiters compute their own)."""
        if self._computing.get(key) is future:
            del self._computing[key]
        if future.done():
            return
        if answer is None:
            future.cancel()
        else:
            future.set_result(answer)

    def get(self, key: Hashable) -> tuple[bytes, str] | None:
        found = self._entries.get(key)
        if found is None:
            return None
        if time.monotonic() - found[0] >= self.max_age:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return found[1], found[2]

    def put(self, key: Hashable, body: bytes, media_type: str) -> None:
        self._drop(key)
        self._entries[key] = (time.monotonic(), body, media_type)
        self._bytes += len(body)
        while self._entries and (len(self._entries) > self.max_entries or self._bytes > self.max_bytes):
            self._drop(next(iter(self._entries)))

    def _drop(self, key: Hashable) -> None:
        gone = self._entries.pop(key, None)
        if gone is not None:
            self._bytes -= len(gone[1])

    def __len__(self) -> int:
        return len(self._entries)


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
    find_memo: ResponseMemo = field(default_factory=ResponseMemo)  # fhir.find: repeated $find within a second


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
