"""What the server tells clients about its security: ``.well-known/smart-configuration`` and the
CapabilityStatement's ``rest.security`` and ``implementationGuide``."""

from __future__ import annotations

from typing import Any

OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
SECURITY_SERVICE = "http://terminology.hl7.org/CodeSystem/restful-security-service"
BALP_IG = "https://profiles.ihe.net/ITI/BALP/ImplementationGuide/ihe.iti.balp"
SCOPES = [
    "patient/Appointment.read",
    "patient/Appointment.write",
    "patient/Appointment.rs",
    "patient/Appointment.cu",
    "user/Appointment.read",
    "user/Appointment.write",
    "user/Appointment.rs",
    "user/Appointment.cu",
    "system/Appointment.read",
    "system/Appointment.write",
    "system/Appointment.rs",
    "system/Appointment.cu",
    "patient/Patient.read",
    "user/Patient.read",
    "user/Practitioner.read",
    "user/Location.read",
    "system/Patient.read",
    "system/Practitioner.read",
    "system/Location.read",
]


def smart_configuration(
    *,
    issuer: str,
    jwks_uri: str | None,
    authorization_endpoint: str | None,
    token_endpoint: str | None,
    introspection_endpoint: str | None = None,
) -> dict[str, Any]:
    doc: dict[str, Any] = {"issuer": issuer}
    if jwks_uri:
        doc["jwks_uri"] = jwks_uri
    if authorization_endpoint:
        doc["authorization_endpoint"] = authorization_endpoint
        doc["grant_types_supported"] = ["authorization_code", "client_credentials"]
    else:
        doc["grant_types_supported"] = ["client_credentials"]
    if token_endpoint:
        doc["token_endpoint"] = token_endpoint
    if introspection_endpoint:
        doc["introspection_endpoint"] = introspection_endpoint
    doc.update(
        {
            "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic"],
            "scopes_supported": ["openid", "fhirUser", "launch/patient", *SCOPES],
            "response_types_supported": ["code"],
            "code_challenge_methods_supported": ["S256"],
            "capabilities": [
                "launch-standalone",
                "client-public",
                "client-confidential-symmetric",
                "client-confidential-asymmetric",
                "context-standalone-patient",
                "permission-patient",
                "permission-user",
                "permission-v1",
                "permission-v2",
            ],
        }
    )
    return doc


def describe_security(smart: dict[str, Any] | None, *, audit: bool) -> Any:
    """A hook for the CapabilityStatement: states the SMART endpoints, or that auth is off; BALP when auditing."""

    def apply(statement: dict[str, Any]) -> None:
        for rest in statement.get("rest", []):
            security: dict[str, Any] = {"cors": False}
            if smart is not None:
                uris = [{"url": "token", "valueUri": smart["token_endpoint"]}] if smart.get("token_endpoint") else []
                if smart.get("authorization_endpoint"):
                    uris.append({"url": "authorize", "valueUri": smart["authorization_endpoint"]})
                if smart.get("introspection_endpoint"):
                    uris.append({"url": "introspect", "valueUri": smart["introspection_endpoint"]})
                if uris:
                    security["extension"] = [{"url": OAUTH_URIS, "extension": uris}]
                security["service"] = [
                    {"coding": [{"system": SECURITY_SERVICE, "code": "SMART-on-FHIR", "display": "SMART-on-FHIR"}]}
                ]
                security["description"] = (
                    "SMART on FHIR / OAuth 2.0: every request except /metadata and "
                    "/.well-known/smart-configuration needs a bearer JWT access token from "
                    f"{smart['issuer']} (RS256, ES256 or ES384). Scopes: patient/, user/ or system/ "
                    "Appointment.read|rs for $find, search and read; Appointment.write|cu for $hold and $book. "
                    "A patient/ token acts only for the patient of its 'patient' claim."
                )
            else:
                security["description"] = (
                    "Authorization is switched OFF by configuration (security.auth = off): anyone who can "
                    "reach this server can read and change every appointment. For demonstrations only."
                )
            rest["security"] = security
        if audit:
            guides = statement.setdefault("implementationGuide", [])
            if BALP_IG not in guides:
                guides.append(BALP_IG)

    return apply
