"""AuditEvents shaped per the IHE Scheduling audit profiles and BALP (Basic Audit Log Patterns).

What the profiles ask for, in short:

* ITI-115/116/117 at the server ("Recipient" profiles, built on BALP ``PatientCreate``): ``type``
  rest, ``action`` C, ``subtype`` restful-interaction ``create`` plus the ITI code, agents ``client``
  (DCM 110153, who + its network address) and ``server`` (DCM 110152, who = ``source.observer``,
  network = its URL), an optional ``user`` agent (requestor), ``entity[patient]`` (Person/Patient)
  and ``entity[data]`` (System Object/Domain Resource, the Appointment).
* ITI-118 (BALP ``PatientQuery``): ``action`` E, ``subtype`` ``search-type``, ``entity[query]``
  (role 24) holding the base64 search request, one event per patient the results reference.
* Reads (BALP ``PatientRead``): ``action`` R, ``subtype`` ``read``.
* A failed transaction keeps the same shape with ``outcome`` 4 (client error), 8 (server error)
  or 12 (unexpected failure) and an ``outcomeDesc``, and claims no profile: the profiles fix
  ``outcome`` to 0.
* ``X-Request-Id`` becomes ``entity[transaction]``.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import functools
import uuid
from typing import Any
from urllib.parse import parse_qsl

import orjson

IHE_SCHED = "https://profiles.ihe.net/ITI/Scheduling/StructureDefinition"
BALP = "https://profiles.ihe.net/ITI/BALP/StructureDefinition"
PROFILES = {
    "find": f"{IHE_SCHED}/IHE.Scheduling.FindPotential.Audit.Recipient",
    "hold": f"{IHE_SCHED}/IHE.Scheduling.Hold.Audit.Recipient",
    "book": f"{IHE_SCHED}/IHE.Scheduling.Book.Audit.Recipient",
    "search": f"{BALP}/IHE.BasicAudit.PatientQuery",
    "read": f"{BALP}/IHE.BasicAudit.PatientRead",
}
ITI = {
    "find": ("ITI-115", "Find Potential Appointments"),
    "hold": ("ITI-116", "Hold Appointment"),
    "book": ("ITI-117", "Book Appointment"),
    "search": ("ITI-118", "Find Existing Appointments"),
}
DCM = "http://dicom.nema.org/resources/ontology/DCM"
V3_PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
BALP_ENTITY_TYPE = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
RESTFUL = "http://hl7.org/fhir/restful-interaction"
URI_SYSTEM = "urn:ietf:rfc:3986"


@dataclasses.dataclass(frozen=True, slots=True)
class AuditRecord:
    """What the middleware saw of one transaction; turned into AuditEvents in the audit thread."""

    transaction: str  # find | hold | book | search | read | read-actor | search-actor
    kind: str
    resource_id: str | None
    method: str
    path: str
    query: bytes
    request_body: bytes
    request_type: str | None
    status: int
    response_type: str | None
    response_body: bytes | None
    client_id: str | None
    subject: str | None
    user_name: str | None
    issuer: str | None
    token_patient: str | None
    address: str | None
    request_id: str
    recorded: dt.datetime


@dataclasses.dataclass(frozen=True, slots=True)
class ServerIdentity:
    base_url: str
    software: str = "sched-adapter"
    site: str | None = None


def outcome_code(status: int) -> str:
    if status < 400:
        return "0"
    if status < 500:
        return "4"
    return "8" if status in (502, 503, 504) else "12"


def build_events(record: AuditRecord, server: ServerIdentity) -> list[dict[str, Any]]:
    """The AuditEvents for one transaction: one, or for a search one per patient in the results."""
    response, appointments, in_response = _read_response(record.response_type, record.response_body)
    request = _parse(record.request_type, record.request_body) if record.request_body else None
    patients = list(in_response)
    if not patients:
        patients = _patients_in_request(record, request, response)
    ok = record.status < 400
    if record.transaction == "search" and ok and len(patients) > 1:
        return [_event(record, server, [p], appointments, response, request, ok) for p in patients]
    return [_event(record, server, patients, appointments, response, request, ok)]


def _event(
    record: AuditRecord,
    server: ServerIdentity,
    patients: list[str],
    appointments: list[dict[str, Any]],
    response: dict[str, Any] | None,
    request: dict[str, Any] | None,
    ok: bool,
) -> dict[str, Any]:
    tx = record.transaction
    reading = tx in ("read", "read-actor")
    searching = tx in ("search", "search-actor")
    action = "R" if reading else "E" if searching else "C"
    interaction = "read" if reading else "search-type" if searching else "create"
    subtype: list[dict[str, Any]] = [{"system": RESTFUL, "code": interaction, "display": interaction}]
    if tx in ITI:
        code, display = ITI[tx]
        subtype.append({"system": "urn:ihe:event-type-code", "code": code, "display": display})
    observer = {"identifier": {"system": URI_SYSTEM, "value": server.base_url}, "display": server.software}
    agents: list[dict[str, Any]] = [_client_agent(record, has_user=record.subject is not None)]
    agents.append(
        {
            "type": {"coding": [{"system": DCM, "code": "110152", "display": "Destination Role ID"}]},
            "who": observer,
            "requestor": False,
            "network": {"address": server.base_url, "type": "5"},
        }
    )
    if record.subject is not None:
        user_type = "IRCP" if searching or reading else "AUT"
        user: dict[str, Any] = {
            "type": {"coding": [{"system": V3_PARTICIPATION, "code": user_type}]},
            "who": {"identifier": {"value": record.subject, **({"system": record.issuer} if record.issuer else {})}},
            "requestor": True,
        }
        if record.user_name:
            user["name"] = record.user_name
        agents.append(user)
    entities: list[dict[str, Any]] = []
    for pid in patients:
        entities.append(
            {
                "what": {"reference": f"Patient/{pid}"},
                "type": {"system": ENTITY_TYPE, "code": "1", "display": "Person"},
                "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"},
            }
        )
    data_ids = _data_ids(record, appointments, request)
    for kind, rid in data_ids:
        entities.append(
            {
                "what": {"reference": f"{kind}/{rid}"},
                "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                "role": {"system": OBJECT_ROLE, "code": "4", "display": "Domain Resource"},
            }
        )
    query = _raw_query(record)
    if tx == "find":
        # ITI-115 has no Appointment yet: the data entity is the request itself (what was asked for).
        entities.append(
            {
                "what": {"display": "Appointment/$find"},
                "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                "role": {"system": OBJECT_ROLE, "code": "4", "display": "Domain Resource"},
                "query": base64.b64encode(query).decode("ascii"),
            }
        )
    elif searching:
        entities.append(
            {
                "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                "role": {"system": OBJECT_ROLE, "code": "24", "display": "Query"},
                "query": base64.b64encode(query).decode("ascii"),
            }
        )
    entities.append(
        {
            "what": {"identifier": {"value": record.request_id}},
            "type": {"system": BALP_ENTITY_TYPE, "code": "XrequestId"},
        }
    )
    event: dict[str, Any] = {"resourceType": "AuditEvent", "id": uuid.uuid4().hex}
    patient_read = tx == "read-actor" and record.kind == "Patient"
    profile = PROFILES.get("read" if tx == "read" or patient_read else tx)
    complete = bool(patients) and (tx not in ("hold", "book", "read", "read-actor") or bool(data_ids))
    if ok and profile and complete:
        event["meta"] = {"profile": [profile]}
    event.update(
        {
            "type": {
                "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
                "code": "rest",
                "display": "Restful Operation",
            },
            "subtype": subtype,
            "action": action,
            "recorded": record.recorded.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "outcome": outcome_code(record.status),
        }
    )
    if not ok:
        event["outcomeDesc"] = f"HTTP {record.status}: {_diagnostics(response) or 'request refused'}"
    event["agent"] = agents
    event["source"] = {
        "site": server.site or server.base_url,
        "observer": observer,
        "type": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                "code": "4",
                "display": "Application Server",
            }
        ],
    }
    event["entity"] = entities
    return event


def _client_agent(record: AuditRecord, *, has_user: bool) -> dict[str, Any]:
    who: dict[str, Any]
    if record.client_id:
        who = {"identifier": {"value": record.client_id}, "display": record.client_id}
    else:
        who = {"display": f"anonymous client at {record.address or 'unknown address'}"}
    agent: dict[str, Any] = {
        "type": {"coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]},
        "who": who,
        "requestor": not has_user,
    }
    if record.address:
        agent["network"] = {"address": record.address, "type": "2"}
    return agent


_RESPONSE_CACHE_MAX_BYTES = 512 * 1024  # keeps the cache of parsed answers below 32 MB


def _read_response(
    content_type: str | None, body: bytes | None
) -> tuple[dict[str, Any] | None, list[dict[str, Any]], tuple[str, ...]]:
    """The parsed response, its Appointments and the patients they name: read once per distinct answer (issue 14).

    A busy ``$find`` answers the same bytes many times a second (the response memo of ``fhir.find`` hands out the
    very same bytes object, whose hash Python keeps), and parsing a 50-entry Bundle cost more than the request
    itself. What comes back is shared between calls: read only.
    """
    if body is not None and len(body) > _RESPONSE_CACHE_MAX_BYTES:
        return _read_response_uncached(content_type, body)
    return _read_response_cached(content_type, body)


def _read_response_uncached(
    content_type: str | None, body: bytes | None
) -> tuple[dict[str, Any] | None, list[dict[str, Any]], tuple[str, ...]]:
    response = _parse(content_type, body)
    appointments = _appointments(response)
    return response, appointments, tuple(_patients_in(appointments))


_read_response_cached = functools.lru_cache(maxsize=64)(_read_response_uncached)


def _parse(content_type: str | None, body: bytes | None) -> dict[str, Any] | None:
    if not body:
        return None
    media = (content_type or "").split(";", 1)[0].strip().lower()
    try:
        if media.endswith("xml"):
            from adapter.fhir.formats import parse_body

            return parse_body(media, body)
        if media.endswith("json"):
            value = orjson.loads(body)
            return value if isinstance(value, dict) else None
    except Exception:  # an unreadable body is audited from the request line alone
        return None
    return None


def _resources(bundle_or_resource: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not bundle_or_resource:
        return []
    if bundle_or_resource.get("resourceType") == "Bundle":
        return [e["resource"] for e in bundle_or_resource.get("entry") or [] if isinstance(e.get("resource"), dict)]
    return [bundle_or_resource]


def _appointments(response: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [r for r in _resources(response) if r.get("resourceType") == "Appointment"]


def _ref_id(reference: str, kind: str) -> str | None:
    parts = reference.split("/")
    return parts[-1] if len(parts) >= 2 and parts[-2] == kind and parts[-1] else None


def _patients_in(appointments: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for appt in appointments:
        for part in appt.get("participant") or []:
            rid = _ref_id(str((part.get("actor") or {}).get("reference") or ""), "Patient")
            if rid and rid not in out:
                out.append(rid)
    return out


def _patients_in_request(
    record: AuditRecord, request: dict[str, Any] | None, response: dict[str, Any] | None
) -> list[str]:
    out: list[str] = []

    def add(rid: str | None) -> None:
        if rid and rid not in out:
            out.append(rid)

    if record.kind == "Patient" and record.resource_id:
        add(record.resource_id)
    for r in _resources(response):
        if r.get("resourceType") == "Patient" and r.get("id"):
            add(str(r["id"]))
    params = [*parse_qsl(record.query.decode("utf-8", "replace"))]
    if record.request_type and "x-www-form-urlencoded" in record.request_type:
        params += parse_qsl(record.request_body.decode("utf-8", "replace"))
    for key, value in params:
        if key in ("patient", "patient-reference") or key.startswith("patient:"):
            for v in value.split(","):
                add(_ref_id(v, "Patient") or (v if "/" not in v else None))
    if request and request.get("resourceType") == "Parameters":
        for p in request.get("parameter") or []:
            if p.get("name") == "patient-reference":
                add(_ref_id(str((p.get("valueReference") or {}).get("reference") or ""), "Patient"))
            elif p.get("name") == "patient-resource" and isinstance(p.get("resource"), dict):
                add(p["resource"].get("id"))
    if not out and record.token_patient:
        add(record.token_patient)
    return out


def _data_ids(
    record: AuditRecord, appointments: list[dict[str, Any]], request: dict[str, Any] | None
) -> list[tuple[str, str]]:
    if record.transaction in ("hold", "book", "read"):
        ids = [("Appointment", str(a["id"])) for a in appointments if a.get("id")]
        if not ids and record.transaction == "read" and record.resource_id:
            ids = [("Appointment", record.resource_id)]
        if not ids and request is not None:
            ids = [("Appointment", rid) for rid in _requested_appointments(request)]
        return ids
    if record.transaction == "read-actor" and record.resource_id and record.status < 400:
        return [(record.kind, record.resource_id)]
    return []


def _requested_appointments(request: dict[str, Any]) -> list[str]:
    """The Appointment a failed $hold/$book was about, as the request named it."""
    out: list[str] = []
    for p in request.get("parameter") or [] if request.get("resourceType") == "Parameters" else []:
        if not isinstance(p, dict):
            continue
        if p.get("name") == "appointment-reference":
            rid = _ref_id(str((p.get("valueReference") or {}).get("reference") or ""), "Appointment")
        elif p.get("name") == "appointment-resource" and isinstance(p.get("resource"), dict):
            rid = p["resource"].get("id")
        else:
            continue
        if rid and isinstance(rid, str) and rid not in out:
            out.append(rid)
    return out


def _raw_query(record: AuditRecord) -> bytes:
    """The search request as sent: the query string, plus the body of a POST (form or Parameters)."""
    if record.method == "POST" and record.request_body:
        return (
            record.query + (b"&" if record.query else b"") + record.request_body
            if record.transaction == "search"
            else record.request_body
        )
    return record.query


def _diagnostics(response: dict[str, Any] | None) -> str | None:
    for r in _resources(response):
        if r.get("resourceType") == "OperationOutcome":
            texts = [str(i.get("diagnostics")) for i in r.get("issue") or [] if i.get("diagnostics")]
            if texts:
                return "; ".join(texts)[:1000]
    return None
