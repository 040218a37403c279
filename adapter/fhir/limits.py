"""Size and character limits on everything a client sends, checked before any handler runs.

Hostile or broken input must be a 4xx OperationOutcome naming the parameter or header, never a 500
and never a value that reaches the legacy database unchecked (README "Conformance notes", limits):

* query strings: at most ``MAX_PARAMS`` parameters and ``MAX_QUERY_BYTES`` bytes; names at most
  ``MAX_NAME`` characters, values at most ``MAX_STRING``; no character XML 1.0 cannot carry;
* headers: at most ``MAX_HEADER_BYTES`` in total (431), the ones the server interprets at most
  ``HEADER_LIMITS`` characters (400);
* strings inside a Parameters body: checked by :func:`check_text` (same rules).

``RequestGuard`` is a pure ASGI middleware: it answers refused requests itself (the routes never
see them) in the format the client asked for.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from adapter.fhir.formats import JSON, render, response_format
from adapter.fhir.outcome import FhirError, error_body

MAX_STRING = 1024
MAX_NAME = 64
MAX_PARAMS = 100
MAX_QUERY_BYTES = 16 * 1024
MAX_HEADER_BYTES = 32 * 1024
HEADER_LIMITS: dict[str, int] = {
    "idempotency-key": 255,
    "x-client-id": 128,
    "prefer": 1024,
    "accept": 1024,
    "content-type": 256,
}
# XML 1.0 Char excludes these; they also have no business in ids, codes or names of a legacy system.
NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff\ufffe\uffff]")


def printable(text: str, limit: int = 80) -> str:
    """``text`` safe to quote in a diagnostic or an ``expression`` (shortened, bad characters replaced)."""
    return NOT_XML.sub("\ufffd", text[:limit])


def check_text(value: str, name: str, *, limit: int = MAX_STRING, as_bundle: bool = False) -> None:
    """Refuse a client string that is too long or carries a character XML cannot (400, naming ``name``)."""
    where = printable(name, MAX_NAME)
    if len(value) > limit:
        raise FhirError(
            400,
            "too-long",
            f"{where} is {len(value)} characters long; the limit is {limit}",
            expression=where,
            as_bundle=as_bundle,
        )
    if NOT_XML.search(value):
        raise FhirError(
            400,
            "invalid",
            f"{where} contains a control character or another character FHIR strings cannot carry",
            expression=where,
            as_bundle=as_bundle,
        )


def check_params(params: Iterable[tuple[str, str]]) -> None:
    """Query or form parameters: count, name and value lengths, characters."""
    items = list(params)
    if len(items) > MAX_PARAMS:
        raise FhirError(400, "too-costly", f"the request has {len(items)} parameters; the limit is {MAX_PARAMS}")
    for name, value in items:
        if len(name) > MAX_NAME or NOT_XML.search(name):
            raise FhirError(
                400,
                "invalid",
                f"parameter name {printable(name)!r} is not acceptable (at most {MAX_NAME} characters, "
                "no control characters)",
                expression=printable(name, MAX_NAME),
            )
        check_text(value, name)


def check_resource_strings(value: Any, name: str, *, as_bundle: bool = False, _key: str = "") -> None:
    """Every string inside a JSON value (a Parameters entry, an embedded resource)."""
    if isinstance(value, str):
        # Attachment ``data`` (base64Binary) and a narrative ``div`` may legitimately be long; the body
        # size limit bounds them, and neither reaches the legacy system.
        check_text(value, name, limit=len(value) if _key in ("data", "div") else MAX_STRING, as_bundle=as_bundle)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k, name, limit=MAX_NAME, as_bundle=as_bundle)
            check_resource_strings(v, name, as_bundle=as_bundle, _key=k)
    elif isinstance(value, list):
        for v in value:
            check_resource_strings(v, name, as_bundle=as_bundle, _key=_key)


def check_headers(headers: list[tuple[bytes, bytes]]) -> None:
    total = sum(len(k) + len(v) + 4 for k, v in headers)
    if total > MAX_HEADER_BYTES:
        largest = max(headers, key=lambda kv: len(kv[1]))[0].decode("latin-1")
        raise FhirError(
            431,
            "too-costly",
            f"the request headers are {total} bytes; the limit is {MAX_HEADER_BYTES} (largest: {largest})",
            expression=largest,
        )
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").lower()
        limit = HEADER_LIMITS.get(name)
        if limit is None:
            continue
        value = raw_value.decode("latin-1")
        label = "-".join(p.capitalize() for p in name.split("-"))
        if len(value) > limit:
            raise FhirError(
                400,
                "too-long",
                f"header {label} is {len(value)} characters long; the limit is {limit}",
                expression=label,
            )
        if NOT_XML.search(value):
            raise FhirError(400, "invalid", f"header {label} contains a control character", expression=label)


def check_query(query_string: bytes) -> None:
    params = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True, encoding="utf-8", errors="replace")
    check_params(params)
    if len(query_string) > MAX_QUERY_BYTES:
        longest = max(params, key=lambda kv: len(kv[1]))[0] if params else "_query"
        raise FhirError(
            400,
            "too-long",
            f"the query string is {len(query_string)} bytes; the limit is {MAX_QUERY_BYTES}",
            expression=printable(longest, MAX_NAME),
        )


class RequestGuard:
    """Refuses over-long or unprintable input before routing (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            check_headers(list(scope.get("headers", [])))
            check_query(scope.get("query_string", b""))
        except FhirError as err:
            request = Request(scope, receive)
            try:
                fmt = response_format(request)
            except FhirError:
                fmt = JSON
            base = getattr(scope.get("app"), "state", None)
            ctx = getattr(base, "fhir", None) if base is not None else None
            response = render(error_body(err, getattr(ctx, "base_url", "")), fmt, err.status, err.headers)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
