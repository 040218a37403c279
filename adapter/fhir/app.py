"""The Starlette application: routes under ``/fhir`` and the error handling every answer goes through.

No handler returns a stack trace: ``FhirError`` becomes its OperationOutcome; the legacy system
being unreachable (or busy beyond ``backend.timeout_seconds``) and the adapter's state store being
locked or unwritable become 503 ``transient`` with ``Retry-After``; anything unexpected is logged
with an incident id and answered with a 500 OperationOutcome that names only that id.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from adapter.backends.protocol import BackendUnavailable
from adapter.fhir.capability import capability_statement
from adapter.fhir.context import FhirContext
from adapter.fhir.find import find_endpoint
from adapter.fhir.formats import JSON, render, response_format
from adapter.fhir.limits import RequestGuard
from adapter.fhir.operations import book_endpoint, hold_endpoint
from adapter.fhir.outcome import FhirError, error_body
from adapter.fhir.read import ACTOR_KINDS, read_actor, read_appointment, search_actor
from adapter.scheduling.state import StateUnavailable

log = logging.getLogger("adapter.fhir")


def _format_or_json(request: Request) -> str:
    try:
        return response_format(request)
    except FhirError:
        return JSON


def _error_response(request: Request, err: FhirError) -> Response:
    ctx: FhirContext = request.app.state.fhir
    return render(error_body(err, ctx.base_url), _format_or_json(request), err.status, err.headers)


async def _on_fhir_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FhirError)
    return _error_response(request, exc)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not-found", 405: "not-supported"}.get(exc.status_code, "processing")
    text = {
        404: f"no such endpoint: {request.method} {request.url.path}",
        405: f"{request.method} is not allowed on {request.url.path}",
    }.get(exc.status_code, str(exc.detail))
    return _error_response(request, FhirError(exc.status_code, code, text))


async def _on_backend_unavailable(request: Request, exc: Exception) -> Response:
    log.warning("legacy backend unavailable: %s", exc)
    return _error_response(
        request,
        FhirError(
            503, "transient", f"the legacy scheduling system is not available: {exc}", headers={"Retry-After": "5"}
        ),
    )


async def _on_state_unavailable(request: Request, exc: Exception) -> Response:
    log.warning("state store unavailable: %s", exc)
    return _error_response(
        request,
        FhirError(503, "transient", f"the server cannot record this now: {exc}", headers={"Retry-After": "5"}),
    )


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    incident = uuid.uuid4().hex[:12]
    log.exception("incident %s: unexpected error on %s %s", incident, request.method, request.url.path)
    # Starlette re-raises after this answer and uvicorn then drops the connection: say so, or the
    # client's next request on this keep-alive connection is reset (issue 7, item 7).
    return _error_response(
        request,
        FhirError(
            500,
            "exception",
            f"internal error (incident {incident}); the details are in the server log",
            headers={"Connection": "close"},
        ),
    )


def create_app(
    ctx: FhirContext,
    *,
    search_endpoint: Callable[..., Any] | None = None,
    on_startup: list[Callable[[], Any]] | None = None,
    on_shutdown: list[Callable[[], Any]] | None = None,
    version: str = "0.1.0",
    demo_page: bool = False,
    middleware: Sequence[Middleware] = (),
    describe: Sequence[Callable[[dict[str, Any]], None]] = (),
) -> Starlette:
    metadata = capability_statement(
        base_url=ctx.base_url,
        software=ctx.software_name,
        version=version,
        auth_enabled=ctx.auth_enabled,
        search_enabled=search_endpoint is not None,
    )
    for hook in describe:  # security and audit describe themselves (adapter.security.smart)
        hook(metadata)

    async def metadata_endpoint(request: Request) -> Response:
        return render(metadata, response_format(request))

    routes = [
        Route("/metadata", metadata_endpoint, methods=["GET"]),
        Route("/Appointment/$find", find_endpoint, methods=["GET", "POST"]),
        Route("/Appointment/$hold", hold_endpoint, methods=["POST"]),
        Route("/Appointment/$book", book_endpoint, methods=["POST"]),
    ]
    if search_endpoint is not None:
        routes += [
            Route("/Appointment", search_endpoint, methods=["GET"]),
            Route("/Appointment/_search", search_endpoint, methods=["POST"]),
        ]
    routes.append(Route("/Appointment/{id}", read_appointment, methods=["GET"]))
    kinds = "|".join(ACTOR_KINDS)
    routes += [
        Route("/{kind:str}/{id}", _only(kinds, read_actor), methods=["GET"]),
        Route("/{kind:str}", _only(kinds, search_actor), methods=["GET"]),
    ]

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        for fn in on_startup or []:
            result = fn()
            if hasattr(result, "__await__"):
                await result
        yield
        for fn in on_shutdown or []:
            result = fn()
            if hasattr(result, "__await__"):
                await result

    top_routes: list[Any] = [Mount("/fhir", routes=routes)]
    if demo_page:
        from starlette.staticfiles import StaticFiles

        from adapter.demo_page import PAGE_DIR

        top_routes.append(Mount("/demo", StaticFiles(directory=PAGE_DIR, html=True), name="demo"))
    app = Starlette(
        routes=top_routes,
        exception_handlers={
            FhirError: _on_fhir_error,
            HTTPException: _on_http_error,
            BackendUnavailable: _on_backend_unavailable,
            StateUnavailable: _on_state_unavailable,
            Exception: _on_unexpected,
        },
        lifespan=lifespan,
        middleware=[Middleware(RequestGuard), *middleware],
    )
    app.state.fhir = ctx
    return app


def _only(kinds: str, endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    allowed = set(kinds.split("|"))

    async def guarded(request: Request) -> Response:
        if request.path_params["kind"] not in allowed:
            raise FhirError(404, "not-found", f"resource type {request.path_params['kind']!r} is not supported here")
        return await endpoint(request)

    return guarded
