"""Wire formats: which media type to answer in, how to read a body, how to write a resource.

Rules (docs/conformance.md#d1, REQ-GEN-04..06): ``_format`` wins over ``Accept``; JSON is the default. The body
is read by its ``Content-Type``; plain ``application/json`` and ``application/xml`` are accepted
because real clients (fhirpy, the JS fhirclient) send them. Anything else is 415.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from adapter.fhir.outcome import FhirError

JSON = "application/fhir+json"
XML = "application/fhir+xml"
_JSON_TYPES = {"application/fhir+json", "application/json", "application/json+fhir", "json", "text/json"}
_XML_TYPES = {"application/fhir+xml", "application/xml", "application/xml+fhir", "xml", "text/xml"}
FORM = "application/x-www-form-urlencoded"


def _media(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


def format_named(fmt: str) -> str:
    """The media type a ``_format`` value asks for (``json``, ``xml`` or a MIME type); else 415."""
    media = _media(fmt)
    if media in _XML_TYPES:
        return XML
    if media in _JSON_TYPES:
        return JSON
    raise FhirError(415, "not-supported", f"_format {fmt!r} is not supported; use json or xml", expression="_format")


def response_format(request: Request) -> str:
    fmt = request.query_params.get("_format")
    if fmt:
        return format_named(fmt)
    accept = request.headers.get("accept", "")
    best_json = best_xml = -1.0
    for part in accept.split(","):
        media, _, params = part.strip().partition(";")
        media = media.strip().lower()
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        if media in _XML_TYPES:
            best_xml = max(best_xml, q)
        elif media in _JSON_TYPES or media in ("*/*", "application/*"):
            best_json = max(best_json, q)
    return XML if best_xml > best_json else JSON


def parse_body(content_type: str | None, body: bytes) -> dict[str, Any]:
    media = _media(content_type or "")
    if not body.strip():
        raise FhirError(400, "invalid", "the request body is empty; expected a FHIR resource")
    if media in _JSON_TYPES or media == "":
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise FhirError(400, "structure", f"the body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise FhirError(400, "structure", "the body must be a JSON object (a FHIR resource)")
        return data
    if media in _XML_TYPES:
        from adapter.fhir.xml import FhirXmlError, xml_to_resource

        try:
            return xml_to_resource(body)
        except FhirXmlError as exc:
            raise FhirError(400, "structure", f"the body is not valid FHIR XML: {exc}") from None
    raise FhirError(
        415,
        "not-supported",
        f"Content-Type {content_type!r} is not supported; send application/fhir+json or application/fhir+xml",
    )


def _json_default(value: Any) -> Any:
    # XML input keeps decimals exact (decimal.Decimal); JSON has one number type.
    from decimal import Decimal

    if isinstance(value, Decimal):
        return float(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def render(resource: dict[str, Any], fmt: str, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    if fmt == XML:
        from adapter.fhir.xml import resource_to_xml

        body = resource_to_xml(resource)
    else:
        body = orjson.dumps(resource, default=_json_default)
    return Response(body, status_code=status, media_type=f"{fmt}; charset=utf-8", headers=headers)
