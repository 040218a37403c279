"""OperationOutcome building and the one exception type the HTTP layer turns into an error answer.

Two shapes (docs/conformance.md#d18, docs/conformance.md#d19):

* request-level failures (bad body, media type, auth, size, backend down) -> a bare OperationOutcome;
* ``$hold``/``$book`` operation failures -> a searchset Bundle, ``total`` 0, holding only the
  OperationOutcome (``search.mode`` outcome), so the Bundle still validates against
  ``ihe-sched-avail-bundle``.

``details.text`` is the HTTP reason phrase, ``diagnostics`` the explanation, ``expression`` the
offending parameter.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any


class FhirError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        diagnostics: str,
        *,
        expression: str | None = None,
        severity: str = "fatal",
        as_bundle: bool = False,
        headers: dict[str, str] | None = None,
        extra_issues: Iterable[dict[str, Any]] = (),
    ) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.code = code
        self.diagnostics = diagnostics
        self.expression = expression
        self.severity = severity
        self.as_bundle = as_bundle
        self.headers = headers or {}
        self.extra_issues = list(extra_issues)

    def issue(self) -> dict[str, Any]:
        return issue(
            self.severity, self.code, self.diagnostics, expression=self.expression, details=reason_phrase(self.status)
        )


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return str(status)


def issue(
    severity: str, code: str, diagnostics: str, *, expression: str | None = None, details: str | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {"severity": severity, "code": code}
    if details:
        out["details"] = {"text": details}
    out["diagnostics"] = diagnostics
    if expression:
        out["expression"] = [expression]
    return out


def operation_outcome(issues: list[dict[str, Any]], *, oo_id: str | None = None) -> dict[str, Any]:
    oo: dict[str, Any] = {"resourceType": "OperationOutcome"}
    if oo_id:
        oo["id"] = oo_id
    oo["issue"] = issues
    return oo


def error_body(err: FhirError, base: str) -> dict[str, Any]:
    oo = operation_outcome([err.issue(), *err.extra_issues])
    if not err.as_bundle:
        return oo
    oo["id"] = "outcome"
    return {
        "resourceType": "Bundle",
        "meta": {"profile": ["https://profiles.ihe.net/ITI/Scheduling/StructureDefinition/ihe-sched-avail-bundle"]},
        "type": "searchset",
        "total": 0,
        "entry": [
            {
                "fullUrl": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, repr(oo))}",
                "resource": oo,
                "search": {"mode": "outcome"},
            }
        ],
    }
