"""A small FHIR R4 HTTP client for the IHE ITI Scheduling transactions (the Scheduling Client actor).

It speaks only the public FHIR API of a Scheduling Server (any vendor's): ``metadata``,
``Appointment/$find``, ``$hold``, ``$book``, ITI-118 search and read. Every call returns an
:class:`Exchange` that keeps the request and the response, so a caller (the CLI, the conformance
kit) can show both as evidence. A server that cannot be reached raises :class:`Unreachable`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

FHIR_JSON = "application/fhir+json"
HOLD_EXPIRATION_URL = "https://sched-adapter.example.org/fhir/StructureDefinition/hold-expiration"
STATUS_REASON_URL = "https://profiles.ihe.net/ITI/Scheduling/StructureDefinition/extension-status-reason"
STATUS_REASON_SYSTEM = "https://profiles.ihe.net/ITI/Scheduling/CodeSystem/status-reason"
#: Evidence bodies longer than this are cut (a $find page can be large).
_EVIDENCE_LIMIT = 20_000


class Unreachable(Exception):
    """The server (or the token endpoint) did not answer: connection refused, DNS, timeout."""


@dataclass(slots=True)
class Exchange:
    """One HTTP request and its response, as seen on the wire."""

    method: str
    url: str
    request_headers: dict[str, str]
    request_body: str | None
    status: int
    response_headers: dict[str, str]
    response_text: str
    elapsed_ms: float = 0.0
    _json: Any = field(default=None, repr=False)
    _parsed: bool = field(default=False, repr=False)

    @property
    def body(self) -> Any:
        """The response body parsed as JSON, or None when it is not JSON."""
        if not self._parsed:
            self._parsed = True
            try:
                self._json = json.loads(self.response_text) if self.response_text else None
            except ValueError:
                self._json = None
        return self._json

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def evidence(self) -> dict[str, Any]:
        """Request and response for a report (bodies cut at a readable length)."""
        return {
            "request": {
                "method": self.method,
                "url": self.url,
                "headers": {k: v for k, v in self.request_headers.items() if k.lower() != "authorization"},
                "body": _cut(self.request_body),
            },
            "response": {
                "status": self.status,
                "headers": dict(self.response_headers),
                "body": _cut(self.response_text),
            },
        }


def _cut(text: str | None) -> str | None:
    if text is None or len(text) <= _EVIDENCE_LIMIT:
        return text
    return text[:_EVIDENCE_LIMIT] + f"\n... ({len(text) - _EVIDENCE_LIMIT} more characters)"


class TokenSource:
    """Bearer tokens: a fixed one, or OAuth 2.0 client credentials fetched (and refreshed) on demand."""

    def __init__(
        self,
        token: str | None = None,
        *,
        client_id: str | None = None,
        client_secret: str | None = None,
        token_url: str | None = None,
        scope: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        if (client_id or client_secret or token_url) and not (client_id and client_secret and token_url):
            raise ValueError("client credentials need --client-id, --client-secret and --token-url together")
        self._token = token
        self._client_id = client_id
        self._client_secret = client_secret
        self._token_url = token_url
        self._scope = scope
        self._timeout = timeout
        self._expires = 0.0
        self._lock = threading.Lock()

    def header(self) -> str | None:
        if self._token and not self._token_url:
            return f"Bearer {self._token}"
        if not self._token_url:
            return None
        with self._lock:
            if not self._token or time.monotonic() >= self._expires:
                self._fetch()
        return f"Bearer {self._token}"

    def _fetch(self) -> None:
        form = {"grant_type": "client_credentials"}
        if self._scope:
            form["scope"] = self._scope
        assert self._token_url and self._client_id and self._client_secret
        try:
            resp = httpx.post(
                self._token_url, data=form, auth=(self._client_id, self._client_secret), timeout=self._timeout
            )
        except httpx.TransportError as exc:
            raise Unreachable(f"token endpoint {self._token_url}: {exc}") from exc
        if resp.status_code != 200:
            raise PermissionError(f"token endpoint {self._token_url} answered {resp.status_code}: {resp.text[:500]}")
        data = resp.json()
        self._token = str(data["access_token"])
        # Refresh a little early so a request never goes out with a token about to expire.
        self._expires = time.monotonic() + max(float(data.get("expires_in", 300)) - 30, 5)


def parameters(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": list(entries)}


def reference_parameter(name: str, reference: str) -> dict[str, Any]:
    return {"name": name, "valueReference": {"reference": reference}}


def find_parameters(
    *,
    start: str | None = None,
    end: str | None = None,
    specialty: Sequence[str] = (),
    visit_type: Sequence[str] = (),
    practitioner: Sequence[str] = (),
    location: Sequence[str] = (),
    location_string: Sequence[str] = (),
    patient: Sequence[str] = (),
    organization: Sequence[str] = (),
    count: int | None = None,
) -> dict[str, Any]:
    """A ``$find`` Parameters resource; references may be given as ``123`` or ``Type/123``."""
    entries: list[dict[str, Any]] = []
    if start:
        entries.append({"name": "start", "valueDateTime": start})
    if end:
        entries.append({"name": "end", "valueDateTime": end})
    entries += [{"name": "specialty", "valueString": v} for v in specialty]
    entries += [{"name": "visit-type", "valueString": v} for v in visit_type]
    entries += [reference_parameter("practitioner", typed("Practitioner", v)) for v in practitioner]
    entries += [reference_parameter("location-reference", typed("Location", v)) for v in location]
    entries += [{"name": "location-string", "valueString": v} for v in location_string]
    entries += [reference_parameter("patient-reference", typed("Patient", v)) for v in patient]
    entries += [reference_parameter("organization", typed("Organization", v)) for v in organization]
    if count is not None:
        entries.append({"name": "_count", "valueInteger": count})
    return parameters(*entries)


def typed(kind: str, ref: str) -> str:
    """``123`` -> ``Kind/123``; a reference that already names a type (or a URL) stays as it is."""
    return ref if "/" in ref else f"{kind}/{ref}"


def appointment_reference(appointment_id: str) -> str:
    return typed("Appointment", appointment_id)


def cancel_resource(appointment_id: str, reason: str, patient: str | None = None) -> dict[str, Any]:
    """The ``appointment-resource`` that asks ``$book`` to cancel: status cancelled plus the reason code."""
    reason_concept = {"coding": [{"system": STATUS_REASON_SYSTEM, "code": reason}]}
    resource: dict[str, Any] = {
        "resourceType": "Appointment",
        "id": appointment_id.rsplit("/", 1)[-1],
        "status": "cancelled",
        "cancelationReason": reason_concept,
        "extension": [{"url": STATUS_REASON_URL, "valueCodeableConcept": reason_concept}],
    }
    if patient:
        resource["participant"] = [{"actor": {"reference": typed("Patient", patient)}, "status": "declined"}]
    return resource


class SchedulingClient:
    """Synchronous client for one Scheduling Server base URL (``.../fhir``)."""

    def __init__(
        self,
        base_url: str,
        *,
        tokens: TokenSource | None = None,
        client_id: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.tokens = tokens or TokenSource()
        self.client_id = client_id
        self._http = httpx.Client(timeout=timeout, transport=transport, follow_redirects=False)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SchedulingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw ----------------------------------------------------------------------------------------
    def url(self, path: str) -> str:
        if path.startswith(("http://", "https://")):
            return path
        return f"{self.base_url}/{path.lstrip('/')}"

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        json_body: Any = None,
        content: str | bytes | None = None,
        headers: Mapping[str, str] | None = None,
        authorize: bool = True,
    ) -> Exchange:
        """One request; ``json_body`` is sent as FHIR JSON, ``content`` as given (set Content-Type yourself)."""
        all_headers: dict[str, str] = {"Accept": FHIR_JSON}
        if self.client_id:
            all_headers["X-Client-Id"] = self.client_id
        if authorize:
            auth = self.tokens.header()
            if auth:
                all_headers["Authorization"] = auth
        body: str | bytes | None = content
        if json_body is not None:
            body = json.dumps(json_body)
            all_headers["Content-Type"] = FHIR_JSON
        all_headers.update(headers or {})
        request = self._http.build_request(
            method,
            self.url(path),
            # No params at all (not an empty set) keeps a query string already in the URL, e.g. a next link.
            params=None
            if params is None
            else httpx.QueryParams(list(params.items() if isinstance(params, Mapping) else params)),
            content=body,
            headers=all_headers,
        )
        began = time.monotonic()
        try:
            response = self._http.send(request)
        except httpx.TransportError as exc:
            raise Unreachable(f"{method} {request.url}: {exc.__class__.__name__}: {exc}") from exc
        text_body = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        return Exchange(
            method=method,
            url=str(request.url),
            request_headers=dict(request.headers),
            request_body=text_body,
            status=response.status_code,
            response_headers=dict(response.headers),
            response_text=response.text,
            elapsed_ms=(time.monotonic() - began) * 1000,
        )

    # -- transactions -------------------------------------------------------------------------------
    def metadata(self) -> Exchange:
        return self.request("GET", "metadata")

    def find(self, params: dict[str, Any], *, idempotency_key: str | None = None) -> Exchange:
        return self.request("POST", "Appointment/$find", json_body=params)

    def hold(self, appointment_id: str, *, idempotency_key: str | None = None) -> Exchange:
        body = parameters(reference_parameter("appointment-reference", appointment_reference(appointment_id)))
        return self.request("POST", "Appointment/$hold", json_body=body, headers=_idem(idempotency_key))

    def book(
        self,
        appointment_id: str | None = None,
        *,
        resource: dict[str, Any] | None = None,
        comment: str | None = None,
        patient_resource: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Exchange:
        entries: list[dict[str, Any]] = []
        if appointment_id:
            entries.append(reference_parameter("appointment-reference", appointment_reference(appointment_id)))
        if resource is not None:
            entries.append({"name": "appointment-resource", "resource": resource})
        if patient_resource is not None:
            entries.append({"name": "patient-resource", "resource": patient_resource})
        if comment:
            entries.append({"name": "comment", "valueString": comment})
        return self.request("POST", "Appointment/$book", json_body=parameters(*entries), headers=_idem(idempotency_key))

    def cancel(self, appointment_id: str, reason: str, *, patient: str | None = None) -> Exchange:
        return self.book(resource=cancel_resource(appointment_id, reason, patient))

    def read(self, appointment_id: str) -> Exchange:
        return self.request("GET", appointment_reference(appointment_id))

    def search(self, query: Sequence[tuple[str, str]]) -> Exchange:
        return self.request("GET", "Appointment", params=query)

    def pages(self, first: Exchange, max_pages: int = 100) -> Iterator[Exchange]:
        """The first answer, then every page its ``next`` links lead to (at most ``max_pages`` in all)."""
        page: Exchange | None = first
        seen = 0
        while page is not None and seen < max_pages:
            yield page
            seen += 1
            link = next_link(page.body) if page.ok else None
            page = self.request("GET", link) if link else None


def _idem(key: str | None) -> dict[str, str]:
    return {"Idempotency-Key": key} if key else {}


def next_link(bundle: Any) -> str | None:
    if not isinstance(bundle, dict):
        return None
    for link in bundle.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            return str(link["url"])
    return None


def entries(bundle: Any, resource_type: str | None = None, mode: str | None = None) -> list[dict[str, Any]]:
    """Resources of a Bundle, optionally only one type and/or one ``search.mode``."""
    if not isinstance(bundle, dict):
        return []
    found: list[dict[str, Any]] = []
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            continue
        if resource_type and resource.get("resourceType") != resource_type:
            continue
        if mode and (entry.get("search") or {}).get("mode") != mode:
            continue
        found.append(resource)
    return found


def issues(body: Any) -> list[dict[str, Any]]:
    """Every OperationOutcome issue of a bare OperationOutcome or of a Bundle's outcome entries."""
    if not isinstance(body, dict):
        return []
    outcomes = [body] if body.get("resourceType") == "OperationOutcome" else entries(body, "OperationOutcome")
    return [i for oo in outcomes for i in oo.get("issue") or [] if isinstance(i, dict)]


def actor(appointment: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The first participant actor of that resource type (``Practitioner``, ``Location``, ``Patient``)."""
    for participant in appointment.get("participant") or []:
        ref = (participant.get("actor") or {}) if isinstance(participant, dict) else {}
        reference = ref.get("reference")
        if isinstance(reference, str) and reference.rsplit("/", 2)[-2:-1] == [kind]:
            return dict(ref)
    return None


def hold_expiration(appointment: dict[str, Any]) -> str | None:
    for ext in appointment.get("extension") or []:
        if isinstance(ext, dict) and ext.get("url") == HOLD_EXPIRATION_URL:
            value = ext.get("valueDateTime")
            return str(value) if value else None
    return None
