"""The ASGI middleware in front of every FHIR endpoint: request id, rate limit, bearer token,
scopes, patient context, and the hand-off of each transaction to the audit trail.

It runs outside Starlette's exception handling, so its own refusals are rendered here, in the same
OperationOutcome shape the application uses. The request body is read once (for the patient-context
check and the audit record) and replayed to the application unchanged.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapter.audit.events import AuditRecord
from adapter.fhir.context import FhirContext
from adapter.fhir.formats import JSON, render, response_format
from adapter.fhir.outcome import FhirError, error_body
from adapter.security.policy import Transaction, check_patient_context, classify
from adapter.security.ratelimit import RateLimiter
from adapter.security.scopes import evaluate
from adapter.security.tokens import Principal, TokenError, TokenValidator

log = logging.getLogger("adapter.security")

PREFIX = "/fhir"
REQUEST_ID_HEADER = "x-request-id"
#: Response bodies kept for the audit record (to name the Appointment and Patient); bigger ones are
#: audited from the request alone.
AUDIT_BODY_LIMIT = 4 * 1024 * 1024
_AUDITED = frozenset({"find", "hold", "book", "search", "read", "read-actor", "search-actor"})


@dataclass(slots=True)
class SecurityConfig:
    validator: TokenValidator | None  # None: authorization is off (demo only)
    smart: dict[str, Any] | None  # the .well-known/smart-configuration document
    rate_limiter: RateLimiter | None
    audit: Callable[[AuditRecord], None] | None


class SecurityMiddleware:
    def __init__(self, app: ASGIApp, config: SecurityConfig) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope["path"]).startswith(PREFIX + "/"):
            await self.app(scope, receive, send)
            return
        rel = str(scope["path"])[len(PREFIX) :]
        request = Request(scope, receive)
        # Without a client id, the one the outer request log (adapter.observability) made up, so that
        # the log line, the audit record and the response header name the same id.
        request_id = (
            (request.headers.get(REQUEST_ID_HEADER) or "").strip()[:200]
            or str(scope.get("state", {}).get("request_id") or "")
            or uuid.uuid4().hex
        )
        send = _with_request_id(send, request_id)
        if rel == "/.well-known/smart-configuration" and scope["method"] == "GET":
            await self._smart_configuration(scope, receive, send)
            return
        tx = classify(str(scope["method"]), rel)
        if tx is None:
            await self.app(scope, receive, send)
            return
        await _Exchange(self, scope, receive, send, request, tx, request_id).run()

    async def _smart_configuration(self, scope: Scope, receive: Receive, send: Send) -> None:
        from starlette.responses import JSONResponse, Response

        response: Response
        if self.config.smart is None:
            response = JSONResponse({"error": "authorization is switched off on this server"}, status_code=404)
        else:
            response = JSONResponse(self.config.smart, headers={"Cache-Control": "max-age=3600"})
        await response(scope, receive, send)


def _with_request_id(send: Send, request_id: str) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
            headers.append((b"x-request-id", request_id.encode("latin-1", "replace")))
            message = {**message, "headers": headers}
        await send(message)

    return wrapped


class _Exchange:
    """One request through the checks, the application and the audit hand-off."""

    def __init__(
        self,
        mw: SecurityMiddleware,
        scope: Scope,
        receive: Receive,
        send: Send,
        request: Request,
        tx: Transaction,
        request_id: str,
    ) -> None:
        self.mw = mw
        self.scope = scope
        self.receive = receive
        self.send = send
        self.request = request
        self.tx = tx
        self.request_id = request_id
        self.principal: Principal | None = None
        self.body = b""
        self.body_complete = True
        self.status = 500
        self.response_type: str | None = None
        self.response_chunks: list[bytes] = []
        self.response_size = 0
        self._buffered = False
        self._pending: Message | None = None

    @property
    def ctx(self) -> FhirContext:
        app = self.scope["app"]
        ctx: FhirContext = app.state.fhir
        return ctx

    def address(self) -> str | None:
        client = self.scope.get("client")
        return str(client[0]) if client else None

    async def run(self) -> None:
        cfg = self.mw.config
        try:
            refused: FhirError | None = None
            if cfg.validator is not None:
                try:
                    self.principal = await self._authenticate(cfg.validator)
                except FhirError as err:
                    refused = err  # still counted against the address below: failed attempts are limited too
            if cfg.rate_limiter is not None:
                self._throttle(cfg.rate_limiter)
            if refused is not None:
                raise refused
            await self._read_body()
            if self.principal is not None:
                await self._authorize(self.principal)
                self.scope["sched.client"] = self.principal.party
                self.scope["sched.principal"] = self.principal
        except FhirError as err:
            await self._refuse(err)
            self._audit()
            return
        try:
            await self.mw.app(self.scope, self._replay(), self._capture)
        finally:
            self._audit()

    def _throttle(self, limiter: RateLimiter) -> None:
        p = self.principal
        key = f"client:{p.client_id}" if p is not None and p.client_id else f"address:{self.address()}"
        wait = limiter.take(key)
        if wait:
            raise FhirError(
                429,
                "throttled",
                f"too many requests from this client; try again in {wait} s",
                headers={"Retry-After": str(wait)},
            )

    async def _authenticate(self, validator: TokenValidator) -> Principal:
        header = self.request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise FhirError(
                401, "login", "this server needs a bearer access token", headers={"WWW-Authenticate": _challenge()}
            )
        if scheme.lower() != "bearer" or not token.strip():
            raise FhirError(
                401,
                "login",
                "the Authorization header must be 'Bearer <access token>'",
                headers={"WWW-Authenticate": _challenge("invalid_request", "Bearer token expected")},
            )
        try:
            return await validator.validate(token.strip())
        except TokenError as exc:
            raise FhirError(
                401,
                "login",
                f"invalid access token: {exc}",
                headers={"WWW-Authenticate": _challenge("invalid_token", str(exc))},
            ) from None

    async def _authorize(self, principal: Principal) -> None:
        need = self.tx.need
        if need is None:
            return
        grant = evaluate(principal.scopes, need)
        if not grant.allowed:
            raise FhirError(
                403,
                "forbidden",
                f"the access token does not grant this request; it needs a scope for {need.describe()} "
                "(patient/, user/ or system/)",
                headers={"WWW-Authenticate": _challenge("insufficient_scope", f"needs {need.describe()}")},
            )
        if not grant.patient_only:
            return
        if not principal.patient:
            raise FhirError(403, "forbidden", "the access token has patient/ scopes but no patient context")
        ctx = self.ctx
        await check_patient_context(
            ctx,
            self.tx,
            patient=principal.patient,
            party=principal.party,
            query=list(self.request.query_params.multi_items()),
            body=self.body,
            content_type=self.request.headers.get("content-type"),
            now=ctx.now(),
        )

    async def _read_body(self) -> None:
        """Buffer up to the body limit; a larger body is passed on as it comes (the handler refuses it)."""
        if self.scope["method"] not in ("POST", "PUT"):
            return
        limit = self.ctx.max_body_bytes
        declared = self.request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            self.body_complete = False
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] != "http.request":
                self._pending = message
                self.body_complete = False
                break
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if not message.get("more_body", False):
                break
            if size > limit:
                self.body_complete = False
                break
        self.body = b"".join(chunks)
        self._buffered = True

    def _replay(self) -> Receive:
        replay: list[Message] = []
        if self._buffered:
            replay.append({"type": "http.request", "body": self.body, "more_body": not self.body_complete})
        if self._pending is not None:
            replay.append(self._pending)

        async def receive() -> Message:
            if replay:
                return replay.pop(0)
            return await self.receive()

        return receive

    async def _capture(self, message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            for k, v in message.get("headers", []):
                if k.lower() == b"content-type":
                    self.response_type = v.decode("latin-1")
        elif message["type"] == "http.response.body" and self.tx.name in _AUDITED:
            chunk = message.get("body", b"")
            self.response_size += len(chunk)
            if self.response_size <= AUDIT_BODY_LIMIT:
                self.response_chunks.append(chunk)
            else:
                self.response_chunks = []
        await self.send(message)

    async def _refuse(self, err: FhirError) -> None:
        try:
            fmt = response_format(self.request)
        except FhirError:
            fmt = JSON
        response = render(error_body(err, self.ctx.base_url), fmt, err.status, err.headers)
        await response(self.scope, self.receive, self._capture)

    def _audit(self) -> None:
        sink = self.mw.config.audit
        if sink is None or self.tx.name not in _AUDITED:
            return
        p = self.principal
        body = b"".join(self.response_chunks) if self.response_size <= AUDIT_BODY_LIMIT else None
        try:
            sink(
                AuditRecord(
                    transaction=self.tx.name,
                    kind=self.tx.kind,
                    resource_id=self.tx.resource_id,
                    method=str(self.scope["method"]),
                    path=str(self.scope["path"]),
                    query=bytes(self.scope.get("query_string", b"")),
                    request_body=self.body if self.body_complete else b"",
                    request_type=self.request.headers.get("content-type"),
                    status=self.status,
                    response_type=self.response_type,
                    response_body=body,
                    client_id=p.client_id if p else (self.request.headers.get("x-client-id") or None),
                    subject=p.subject if p and p.subject != p.client_id else None,
                    user_name=p.name if p else None,
                    issuer=p.issuer if p else None,
                    token_patient=p.patient if p else None,
                    address=self.address(),
                    request_id=self.request_id,
                    recorded=dt.datetime.now(dt.UTC),
                )
            )
        except Exception:  # the audit trail must never break an answer that was already sent
            log.exception("audit: cannot queue the record of %s %s", self.scope["method"], self.scope["path"])


def _challenge(error: str | None = None, description: str | None = None) -> str:
    parts = ['Bearer realm="sched-adapter"']
    if error:
        parts.append(f'error="{error}"')
    if description:
        parts.append('error_description="{}"'.format(description.replace('"', "'")))
    return ", ".join(parts)
