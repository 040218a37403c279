"""A deliberately broken Scheduling Server for the conformance kit's tests.

A small starlette app that forwards every request to a real server and plants one defect in the
answers, so a test can show that the kit's named check catches it. The defects:

``drop_requested_period``  Appointments lose ``requestedPeriod`` (ihe-sched-appt requires 1..1)
``conflict_200``           a 409 conflict is answered 200 (a second client "gets" a held slot)
``wrong_total``            ``$find`` reports the page size as ``total``
``empty_find_no_outcome``  an empty ``$find`` answer has no OperationOutcome entry
``no_xml``                 XML requests are refused with 415 although the CapabilityStatement claims XML

Not a defect but a smaller server: ``unclaimed_hold`` removes ``hold`` from the CapabilityStatement
(the kit must then skip the hold checks and say why).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

DEFECTS = ("drop_requested_period", "conflict_200", "wrong_total", "empty_find_no_outcome", "no_xml")
VARIANTS = ("unclaimed_hold",)
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "content-encoding", "host"}


def broken_app(upstream: str, defect: str, own_base: dict[str, str]) -> Starlette:
    """Proxy ``/fhir/...`` to ``upstream`` (a FHIR base); ``own_base["url"]`` is this proxy's FHIR base."""
    if defect not in DEFECTS + VARIANTS:
        raise ValueError(defect)
    client = httpx.AsyncClient(timeout=30)

    async def proxy(request: Request) -> Response:
        wants_xml = "xml" in (
            request.query_params.get("_format", "")
            + request.headers.get("accept", "")
            + request.headers.get("content-type", "")
        )
        if defect == "no_xml" and wants_xml:
            oo = {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "fatal", "code": "not-supported", "diagnostics": "XML is not supported"}],
            }
            return Response(json.dumps(oo), 415, media_type="application/fhir+json")
        path = request.url.path[len("/fhir") :]
        upstream_response = await client.request(
            request.method,
            upstream + path,
            params=list(request.query_params.multi_items()),
            content=await request.body(),
            headers={k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS},
        )
        status = upstream_response.status_code
        text = upstream_response.text.replace(upstream, own_base["url"])
        if "json" in upstream_response.headers.get("content-type", "") and text:
            body = json.loads(text)
            body, status = _plant(defect, path, body, status)
            text = json.dumps(body)
        headers = {k: v for k, v in upstream_response.headers.items() if k.lower() not in _HOP_HEADERS}
        return Response(text, status, headers=headers)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    return Starlette(routes=[Route("/fhir/{path:path}", proxy, methods=["GET", "POST"])], lifespan=lifespan)


def _appointments(body: Any) -> list[dict[str, Any]]:
    if isinstance(body, dict) and body.get("resourceType") == "Appointment":
        return [body]
    if isinstance(body, dict) and body.get("resourceType") == "Bundle":
        return [e["resource"] for e in body.get("entry") or [] if e["resource"]["resourceType"] == "Appointment"]
    return []


def _plant(defect: str, path: str, body: Any, status: int) -> tuple[Any, int]:
    if defect == "drop_requested_period":
        for appt in _appointments(body):
            appt.pop("requestedPeriod", None)
    elif defect == "conflict_200" and status == 409:
        status = 200
    elif defect == "wrong_total" and path.endswith("$find") and isinstance(body, dict):
        body["total"] = len([e for e in body.get("entry") or [] if e["search"]["mode"] == "match"])
    elif defect == "unclaimed_hold" and path == "/metadata" and isinstance(body, dict):
        for resource in body["rest"][0]["resource"]:
            resource["operation"] = [o for o in resource.get("operation") or [] if o["name"] != "hold"]
    elif defect == "empty_find_no_outcome" and path.endswith("$find") and isinstance(body, dict):
        if body.get("total") == 0:
            body["entry"] = []
    return body, status
