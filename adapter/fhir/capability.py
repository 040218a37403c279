"""The server CapabilityStatement (``GET /metadata``): states only what really works."""

from __future__ import annotations

import datetime as dt
from typing import Any

from adapter.fhir.render import APPT_PROFILE, BUNDLE_PROFILE, IHE
from adapter.fhir.search.params import APPOINTMENT_SEARCH_PARAMS, SEARCH_INCLUDES, SearchParam


def capability_statement(
    *, base_url: str, software: str, version: str, auth_enabled: bool, search_enabled: bool
) -> dict[str, Any]:
    security: dict[str, Any] = {"cors": False}
    if auth_enabled:
        security["service"] = [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                        "code": "SMART-on-FHIR",
                    }
                ]
            }
        ]
        security["description"] = "SMART on FHIR / OAuth2 bearer tokens are required."
    else:
        security["description"] = "Authorization is switched OFF by configuration (security.auth = off)."
    appointment: dict[str, Any] = {
        "type": "Appointment",
        "profile": APPT_PROFILE,
        "interaction": [{"code": "read"}] + ([{"code": "search-type"}] if search_enabled else []),
        "operation": [
            {"name": "find", "definition": f"{IHE}/OperationDefinition/appointment-find"},
            {"name": "hold", "definition": f"{IHE}/OperationDefinition/appointment-hold"},
            {"name": "book", "definition": f"{IHE}/OperationDefinition/appointment-book"},
        ],
    }
    if search_enabled:
        appointment["extension"] = [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/capabilitystatement-search-parameter-combination",
                "extension": [
                    {"url": "required", "valueString": "patient"},
                    {"url": "required", "valueString": "date"},
                ],
            }
        ]
        appointment["searchInclude"] = list(SEARCH_INCLUDES)
        appointment["searchParam"] = [_search_param(p) for p in APPOINTMENT_SEARCH_PARAMS]
    actor_resources = [
        {
            "type": kind,
            "interaction": [{"code": "read"}, {"code": "search-type"}],
            "searchParam": [
                {"name": "_id", "type": "token"},
                {"name": "identifier", "type": "token"},
                {"name": "name", "type": "string"},
                {"name": "_count", "type": "number", "documentation": "page size; next links page with _offset"},
                {"name": "_summary", "type": "token", "documentation": "count only"},
            ],
        }
        for kind in ("Location", "Patient", "Practitioner")
    ]
    return {
        "resourceType": "CapabilityStatement",
        "id": "sched-adapter",
        "url": f"{base_url}/metadata",
        "name": "SchedAdapterScheduler",
        "title": "IHE ITI Scheduling Server facade over a legacy scheduling system",
        "status": "active",
        "date": dt.date.today().isoformat(),
        "kind": "instance",
        "instantiates": [f"{IHE}/CapabilityStatement/IHE.Scheduling.server"],
        "software": {"name": software, "version": version},
        "implementation": {"description": "sched-adapter", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "application/fhir+xml"],
        # BALP is not claimed: this server does not write AuditEvents yet.
        "implementationGuide": ["https://profiles.ihe.net/ITI/Scheduling/ImplementationGuide/ihe.iti.scheduling"],
        "rest": [
            {
                "mode": "server",
                "security": security,
                "resource": [appointment, {"type": "Bundle", "profile": BUNDLE_PROFILE}, *actor_resources],
            }
        ],
    }


def _search_param(param: SearchParam) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": param.name}
    if param.definition:
        entry["definition"] = param.definition
    entry["type"] = param.type
    if param.documentation:
        entry["documentation"] = param.documentation
    return entry
