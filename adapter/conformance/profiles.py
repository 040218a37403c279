"""Conformance checkers: FHIR R4 schema and the IHE ITI Scheduling profiles.

The one copy of these checks: the conformance kit (``sched-adapter conformance``) runs them on
every resource a server emits, and the test suite imports them through ``tests/conformance.py``.

Why hand-written: no offline tool checks the IHE profiles ``ihe-sched-appt`` and
``ihe-sched-avail-bundle`` (the IG ships differentials only, and writes ``participant.actor 1..1``
under a malformed element id that snapshot generators drop), and the official R4 JSON Schema checks
types, codes, ids and unknown elements but neither required-array cardinality nor invariants. The
rules below are transcribed from the IG's StructureDefinitions ``ihe-sched-appt`` and
``ihe-sched-avail-bundle``, the R4 Appointment invariants app-1..app-4
and the project's requirement catalogue (REQ-APPT-*, REQ-BNDL-*, REQ-GEN-22); each message names its rule.

Every ``*_problems`` function is pure and returns human-readable problem strings (empty list =
conformant) so a test can assert on one specific problem; the ``assert_*`` wrappers raise one
AssertionError listing all of them. The R4 schema is package data next to this module (see
``adapter/conformance/NOTICE.md`` for its source and licence).
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema_rs

SCHEMA_PATH = Path(__file__).resolve().parent / "fhir.schema.json"

STATUS_REASON_URL = "https://profiles.ihe.net/ITI/Scheduling/StructureDefinition/extension-status-reason"
ACTOR_TYPES = frozenset({"Patient", "Practitioner", "PractitionerRole", "Location", "HealthcareService"})
PARTICIPANT_STATUSES = frozenset({"accepted", "declined", "tentative", "needs-action"})
#: app-3: the only statuses that may lack start/end in base R4 (the IHE profile requires them anyway).
STATUSES_WITHOUT_TIMES = frozenset({"proposed", "cancelled", "waitlist"})
#: app-4: cancelationReason only for these statuses.
STATUSES_WITH_CANCELATION_REASON = frozenset({"cancelled", "noshow"})

ID_RE = re.compile(r"^[A-Za-z0-9\-\.]{1,64}$")
#: A dateTime/instant with a time part must end in Z or +hh:mm / -hh:mm (REQ-GEN-22).
TIME_WITH_OFFSET_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})$")
#: Literal reference: optional absolute base, then Type/id, optional /_history/vid.
LITERAL_REFERENCE_RE = re.compile(
    r"^(?:(?:https?://[^\s]+?/))?(?P<type>[A-Z][A-Za-z]+)/(?P<id>[^/\s]+)(?:/_history/[^/\s]+)?$"
)
_MAX_MESSAGE = 240


# --------------------------------------------------------------------------------------------------
# FHIR R4 JSON Schema
# --------------------------------------------------------------------------------------------------


@functools.cache
def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return schema


@functools.cache
def _validator() -> Any:
    """Compile the official schema once (~0.15 s); its top-level ``oneOf`` accepts any resource."""
    return jsonschema_rs.validator_for(_schema())


@functools.cache
def _branch_index() -> dict[str, int]:
    """resourceType -> index of its branch in the schema's ``oneOf`` (same order as ResourceList).

    Used to follow the ``discriminator`` by hand: jsonschema_rs reports a failed ``oneOf`` as one
    opaque error listing all 146 branches, so we pick the branch named by ``resourceType``.
    """
    refs = [branch["$ref"].rsplit("/", 1)[-1] for branch in _schema()["oneOf"]]
    return {name: index for index, name in enumerate(refs)}


def _fhir_path(root: str, instance_path: Iterable[Any]) -> str:
    path = root
    for step in instance_path:
        path += f"[{step}]" if isinstance(step, int) else f".{step}"
    return path


def _schema_messages(error: Any, root: str) -> list[str]:
    """Flatten one jsonschema_rs error, descending into the discriminated ``oneOf`` branch."""
    kind = error.kind
    instance = error.instance
    if isinstance(kind, jsonschema_rs.ValidationErrorKind.OneOfNotValid) and isinstance(instance, dict):
        where = _fhir_path(root, error.instance_path)
        resource_type = instance.get("resourceType")
        index = _branch_index().get(resource_type) if isinstance(resource_type, str) else None
        if index is None:
            return [f"R4 schema: {where}: unknown or missing resourceType {resource_type!r}"]
        return [msg for sub in kind.context[index] for msg in _schema_messages(sub, root)]
    message = error.message
    if len(message) > _MAX_MESSAGE:
        message = message[:_MAX_MESSAGE] + "..."
    return [f"R4 schema: {_fhir_path(root, error.instance_path)}: {message}"]


def r4_problems(resource: object) -> list[str]:
    """Problems found by the official FHIR R4 (4.0.1) JSON Schema; works for any resourceType."""
    if not isinstance(resource, dict):
        return [f"R4 schema: a resource must be a JSON object, not {type(resource).__name__}"]
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str) or resource_type not in _branch_index():
        return [f"R4 schema: unknown or missing resourceType {resource_type!r}"]
    validator = _validator()
    if resource_type == "CapabilityStatement" and resource.get("fhirVersion") == "4.0.1":
        # The published R4 schema's FHIRVersion enum stops at 4.0.0 (it was generated before the
        # 4.0.1 technical correction); 4.0.1 is the version this server must declare (REQ-GEN-01).
        resource = {**resource, "fhirVersion": "4.0.0"}
    if validator.is_valid(resource):
        return []
    problems: list[str] = []
    for error in validator.iter_errors(resource):
        problems.extend(_schema_messages(error, resource_type))
    return list(dict.fromkeys(problems))  # dedupe, keep order


# --------------------------------------------------------------------------------------------------
# ihe-sched-appt
# --------------------------------------------------------------------------------------------------


def _parse_time(value: object) -> datetime | None:
    """Python 3.11's fromisoformat reads every R4 instant/dateTime with a time (including "Z")."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _check_time(rule: str, where: str, value: object, problems: list[str]) -> None:
    if not isinstance(value, str) or not TIME_WITH_OFFSET_RE.match(value):
        problems.append(f"{rule}: {where} {value!r} must be a date-time with a timezone offset or Z")


def _check_start_end(appt: dict[str, Any], problems: list[str]) -> None:
    """REQ-APPT-02 (start/end 1..1 with offset) and R4 app-2/app-3."""
    has_start, has_end = "start" in appt, "end" in appt
    if has_start != has_end:
        problems.append("app-2: Appointment.start and Appointment.end must both be present or both absent")
    if not (has_start and has_end) and appt.get("status") not in STATUSES_WITHOUT_TIMES:
        problems.append(
            "app-3: only proposed, cancelled or waitlist appointments may lack start/end "
            f"(status {appt.get('status')!r})"
        )
    for name in ("start", "end"):
        if name not in appt:
            problems.append(f"REQ-APPT-02: Appointment.{name} is required (1..1) by ihe-sched-appt")
        else:
            _check_time("REQ-APPT-02/REQ-GEN-22", f"Appointment.{name}", appt[name], problems)
    start, end = _parse_time(appt.get("start")), _parse_time(appt.get("end"))
    if start and end and start.tzinfo and end.tzinfo and end < start:
        problems.append(f"REQ-APPT-02: Appointment.end {appt['end']!r} is before start {appt['start']!r}")


def _check_requested_period(appt: dict[str, Any], problems: list[str]) -> None:
    """REQ-APPT-03: requestedPeriod 1..1; R4 per-1 and REQ-GEN-22 inside it."""
    periods = appt.get("requestedPeriod")
    if not isinstance(periods, list) or len(periods) != 1:
        count = len(periods) if isinstance(periods, list) else 0
        problems.append(f"REQ-APPT-03: Appointment.requestedPeriod must hold exactly 1 Period, found {count}")
        return
    period = periods[0]
    if not isinstance(period, dict) or not ({"start", "end"} & period.keys()):
        problems.append("REQ-APPT-03: Appointment.requestedPeriod[0] must have a start or an end")
        return
    for name in ("start", "end"):
        value = period.get(name)
        if isinstance(value, str) and "T" in value:
            _check_time("REQ-GEN-22", f"Appointment.requestedPeriod[0].{name}", value, problems)
    start, end = _parse_time(period.get("start")), _parse_time(period.get("end"))
    if start and end and (start.tzinfo is None) == (end.tzinfo is None) and end < start:
        problems.append("per-1: Appointment.requestedPeriod[0].start must not be after its end")


def _reference_type(reference: dict[str, Any], contained: dict[str, str]) -> tuple[str | None, str | None]:
    """(resource type, id) an actor Reference points to; (None, None) when it is not literal."""
    literal = reference.get("reference")
    declared = reference.get("type")
    if isinstance(literal, str):
        if literal.startswith("#"):
            return contained.get(literal[1:], declared), None
        match = LITERAL_REFERENCE_RE.match(literal)
        if match:
            return match["type"], match["id"]
    return (declared if isinstance(declared, str) else None), None


def _check_participants(appt: dict[str, Any], problems: list[str]) -> None:
    """REQ-APPT-04/05 and R4 app-1."""
    participants = appt.get("participant")
    if not isinstance(participants, list) or not participants:
        problems.append("REQ-APPT-04: Appointment.participant must have at least one entry (1..*)")
        return
    contained = {
        r["id"]: r["resourceType"]
        for r in appt.get("contained") or []
        if isinstance(r, dict) and isinstance(r.get("id"), str) and isinstance(r.get("resourceType"), str)
    }
    for index, participant in enumerate(participants):
        where = f"Appointment.participant[{index}]"
        if not isinstance(participant, dict):
            problems.append(f"REQ-APPT-04: {where} must be an object")
            continue
        if "type" not in participant and "actor" not in participant:
            problems.append(f"app-1: {where} must have a type or an actor")
        _check_actor(where, participant.get("actor"), contained, problems)
        status = participant.get("status")
        if status not in PARTICIPANT_STATUSES:
            problems.append(
                f"REQ-APPT-05: {where}.status {status!r} must be one of accepted, declined, tentative, needs-action"
            )


def _check_actor(where: str, actor: object, contained: dict[str, str], problems: list[str]) -> None:
    """actor 1..1; a reference may target only Patient/Practitioner/PractitionerRole/Location/HealthcareService.

    A display-only actor passes (the IG's own example has ``{"display": "Napa Office"}``): the
    profile constrains the target type, not the presence of ``reference``.
    """
    if not isinstance(actor, dict) or not actor:
        problems.append(f"REQ-APPT-04: {where}.actor is required (1..1) by ihe-sched-appt")
        return
    if not ({"reference", "identifier", "display"} & actor.keys()):
        problems.append(f"REQ-APPT-04: {where}.actor must have a reference, identifier or display")
    target, target_id = _reference_type(actor, contained)
    if "reference" in actor and target is None:
        problems.append(
            f"REQ-APPT-04: {where}.actor.reference {actor['reference']!r} has no determinable resource type"
        )
    elif target is not None and target not in ACTOR_TYPES:
        problems.append(
            f"REQ-APPT-04: {where}.actor references {target}; only "
            "Patient, Practitioner, PractitionerRole, Location or HealthcareService are allowed"
        )
    if target_id is not None and not ID_RE.match(target_id):
        problems.append(f"id: {where}.actor.reference id {target_id!r} does not match {ID_RE.pattern}")


def _check_status_reason(appt: dict[str, Any], problems: list[str]) -> None:
    """REQ-APPT-10: at most one status-reason extension, carrying only valueCodeableConcept."""
    extensions = [e for e in appt.get("extension") or [] if isinstance(e, dict) and e.get("url") == STATUS_REASON_URL]
    if len(extensions) > 1:
        problems.append(f"REQ-APPT-10: extension-status-reason appears {len(extensions)} times (max 1)")
    for extension in extensions:
        others = sorted(k for k in extension if k not in ("id", "url", "valueCodeableConcept"))
        if others:
            problems.append(
                f"REQ-APPT-10: extension-status-reason must carry only valueCodeableConcept, found {others}"
            )
        if not isinstance(extension.get("valueCodeableConcept"), dict):
            problems.append("REQ-APPT-10: extension-status-reason must have a valueCodeableConcept")


def _check_ids(appt: dict[str, Any], problems: list[str]) -> None:
    """Resource ids (the Appointment's and its contained resources') match the R4 id pattern."""
    resources = [("Appointment", appt)] + [
        (f"Appointment.contained[{i}]", r) for i, r in enumerate(appt.get("contained") or []) if isinstance(r, dict)
    ]
    for where, resource in resources:
        if "id" in resource and not (isinstance(resource["id"], str) and ID_RE.match(resource["id"])):
            problems.append(f"id: {where}.id {resource['id']!r} does not match {ID_RE.pattern}")


def _appointment_profile_problems(appt: dict[str, Any]) -> list[str]:
    """ihe-sched-appt and R4 invariant checks, without the (separately run) schema validation."""
    if not isinstance(appt, dict) or appt.get("resourceType") != "Appointment":
        found = appt.get("resourceType") if isinstance(appt, dict) else type(appt).__name__
        return [f"REQ-APPT-01: expected an Appointment, found {found!r}"]
    problems: list[str] = []
    _check_ids(appt, problems)
    status = appt.get("status")
    if not isinstance(status, str):
        problems.append("REQ-APPT-06: Appointment.status is required (1..1)")
    if "cancelationReason" in appt and status not in STATUSES_WITH_CANCELATION_REASON:
        problems.append(
            f"app-4: cancelationReason is only allowed when status is cancelled or noshow (status {status!r})"
        )
    _check_start_end(appt, problems)
    _check_requested_period(appt, problems)
    _check_participants(appt, problems)
    _check_status_reason(appt, problems)
    return problems


def appointment_problems(appt: dict[str, Any]) -> list[str]:
    """Problems against ``ihe-sched-appt`` (REQ-APPT-01..11, REQ-GEN-22) plus the R4 schema."""
    problems = _appointment_profile_problems(appt)
    if isinstance(appt, dict):
        problems += r4_problems(appt)
    return problems


# --------------------------------------------------------------------------------------------------
# OperationOutcome
# --------------------------------------------------------------------------------------------------


def _operation_outcome_rules(oo: dict[str, Any], where: str = "OperationOutcome") -> list[str]:
    if not isinstance(oo, dict) or oo.get("resourceType") != "OperationOutcome":
        return [f"expected an OperationOutcome at {where}"]
    issues = oo.get("issue")
    if not isinstance(issues, list) or not issues:
        return [f"OperationOutcome: {where}.issue must have at least one issue (1..*)"]
    problems = []
    for index, issue in enumerate(issues):
        for name in ("severity", "code"):
            if not isinstance(issue, dict) or not isinstance(issue.get(name), str):
                problems.append(f"OperationOutcome: {where}.issue[{index}].{name} is required (1..1)")
    return problems


def operation_outcome_problems(oo: dict[str, Any]) -> list[str]:
    """R4-valid OperationOutcome with at least one issue, each with severity and code."""
    problems = _operation_outcome_rules(oo)
    if isinstance(oo, dict):
        problems += r4_problems(oo)
    return problems


# --------------------------------------------------------------------------------------------------
# ihe-sched-avail-bundle
# --------------------------------------------------------------------------------------------------

_EXPECTED_MODE = {"Appointment": "match", "OperationOutcome": "outcome"}


def _check_full_url(where: str, entry: dict[str, Any], resource: dict[str, Any], problems: list[str]) -> None:
    """REQ-BNDL-08: absolute fullUrl ending in /<resourceType>/<id>; an OperationOutcome, which no server
    keeps, may instead have a ``urn:uuid:`` (every other fullUrl must resolve)."""
    full_url = entry.get("fullUrl")
    if not isinstance(full_url, str):
        problems.append(f"REQ-BNDL-08: {where}.fullUrl is missing")
        return
    if resource.get("resourceType") == "OperationOutcome" and full_url.startswith("urn:"):
        if not re.fullmatch(r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", full_url):
            problems.append(f"REQ-BNDL-08: {where}.fullUrl {full_url!r} is not a valid urn:uuid")
        return
    parts = urlsplit(full_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        problems.append(f"REQ-BNDL-08: {where}.fullUrl {full_url!r} is not an absolute http(s) URL")
    suffix = f"/{resource.get('resourceType')}/{resource.get('id')}"
    if not full_url.endswith(suffix):
        problems.append(f"REQ-BNDL-08: {where}.fullUrl {full_url!r} does not end with {suffix!r}")


def _search_mode(entry: object) -> object:
    search = entry.get("search") if isinstance(entry, dict) else None
    return search.get("mode") if isinstance(search, dict) else None


def _entry_problems(index: int, entry: object) -> list[str]:
    where = f"Bundle.entry[{index}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
        return [f"REQ-BNDL-01: {where} has no resource"]
    resource = entry["resource"]
    resource_type = resource.get("resourceType")
    problems: list[str] = []
    _check_full_url(where, entry, resource, problems)
    mode = _search_mode(entry)
    expected = _EXPECTED_MODE.get(resource_type, "include")
    if mode != expected:
        rule = {"Appointment": "REQ-BNDL-05", "OperationOutcome": "REQ-BNDL-06"}.get(resource_type, "REQ-BNDL-07")
        problems.append(f"{rule}: {where} ({resource_type}) must have search.mode {expected!r}, found {mode!r}")
    if resource_type == "Appointment":
        problems += [f"REQ-BNDL-05: {where}.resource: {p}" for p in _appointment_profile_problems(resource)]
    elif resource_type == "OperationOutcome":
        problems += [f"REQ-BNDL-06: {p}" for p in _operation_outcome_rules(resource, f"{where}.resource")]
    return problems


def avail_bundle_problems(bundle: dict[str, Any], *, search: bool = False) -> list[str]:
    """Problems against ``ihe-sched-avail-bundle`` (REQ-BNDL-01..09) plus the R4 schema.

    ``search=True`` checks an ITI-118 search response, a plain searchset that may have no entry
    (REQ-BNDL-04); every other rule is the same.
    """
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        return ["REQ-BNDL-01: expected a Bundle"]
    problems: list[str] = []
    if bundle.get("type") != "searchset":
        problems.append(f"REQ-BNDL-02: Bundle.type must be 'searchset', found {bundle.get('type')!r}")
    total = bundle.get("total")
    if not isinstance(total, int) or isinstance(total, bool):
        problems.append("REQ-BNDL-03: Bundle.total is required (1..1), even when 0")
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        entries = []
    if not entries and not search:
        problems.append("REQ-BNDL-04: Bundle.entry must have at least one entry (1..*); use an OperationOutcome")
    for index, entry in enumerate(entries):
        problems += _entry_problems(index, entry)
    url_counts = Counter(e["fullUrl"] for e in entries if isinstance(e, dict) and isinstance(e.get("fullUrl"), str))
    duplicates = sorted(url for url, count in url_counts.items() if count > 1)
    if duplicates:
        problems.append(f"bdl-7: fullUrl must be unique within the Bundle, repeated: {duplicates}")
    matches = sum(1 for e in entries if _search_mode(e) == "match")
    if isinstance(total, int) and total < matches:
        problems.append(f"REQ-BNDL-09: Bundle.total {total} is less than the {matches} match entries present")
    return problems + r4_problems(bundle)


# --------------------------------------------------------------------------------------------------
# assert_* wrappers
# --------------------------------------------------------------------------------------------------


def _raise_if(problems: list[str], what: str) -> None:
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise AssertionError(f"{len(problems)} conformance problem(s) in {what}:\n{listing}")


def _label(resource: object) -> str:
    if isinstance(resource, dict):
        return f"{resource.get('resourceType')}/{resource.get('id', '<no id>')}"
    return type(resource).__name__


def assert_r4(resource: dict[str, Any]) -> None:
    """Raise AssertionError listing every R4 schema problem of ``resource``."""
    _raise_if(r4_problems(resource), _label(resource))


def assert_ihe_appointment(appt: dict[str, Any]) -> None:
    """Raise AssertionError unless ``appt`` conforms to ihe-sched-appt and R4."""
    _raise_if(appointment_problems(appt), _label(appt))


def assert_avail_bundle(bundle: dict[str, Any], *, search: bool = False) -> None:
    """Raise AssertionError unless ``bundle`` conforms to ihe-sched-avail-bundle and R4."""
    _raise_if(avail_bundle_problems(bundle, search=search), _label(bundle))


def assert_operation_outcome(oo: dict[str, Any]) -> None:
    """Raise AssertionError unless ``oo`` is an R4 OperationOutcome with well-formed issues."""
    _raise_if(operation_outcome_problems(oo), _label(oo))
