"""Tests of the conformance checkers themselves (tests/conformance.py).

The IG's own examples must pass; each deliberately broken copy must fail with the specific
problem text, so a checker that silently accepts everything cannot go unnoticed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from conformance import (
    STATUS_REASON_URL,
    appointment_problems,
    assert_avail_bundle,
    assert_ihe_appointment,
    assert_operation_outcome,
    assert_r4,
    avail_bundle_problems,
    operation_outcome_problems,
    r4_problems,
)

IG_DIR = Path(__file__).resolve().parent / "data" / "ig"


def _load(name: str) -> dict[str, Any]:
    return json.loads((IG_DIR / name).read_text(encoding="utf-8"))


@pytest.fixture
def bundle() -> dict[str, Any]:
    """A fresh copy of the IG's example $find response (Bundle/example-appt-bundle-1)."""
    return _load("example-iti-scheduling-bundle.json")


@pytest.fixture
def appt() -> dict[str, Any]:
    """A fresh copy of the IG's example booked Appointment (Appointment/appt1-1)."""
    return _load("example-appointment.json")


def _expect(problems: list[str], *fragments: str) -> None:
    """Assert that some problem contains every fragment (one problem, all fragments)."""
    assert any(all(f in p for f in fragments) for p in problems), (
        f"expected a problem containing {fragments!r}, got:\n" + "\n".join(problems or ["(none)"])
    )


# --- the IG examples pass ---------------------------------------------------------------------


def test_req_bndl_01_ig_example_bundle_passes(bundle: dict[str, Any]) -> None:
    assert avail_bundle_problems(bundle) == []
    assert_avail_bundle(bundle)


def test_req_appt_01_ig_example_appointment_passes(appt: dict[str, Any]) -> None:
    assert appointment_problems(appt) == []
    assert_ihe_appointment(appt)


def test_ig_examples_are_r4_valid() -> None:
    for name in ("example-patient.json", "example-practitioner.json", "example-appointment.json"):
        assert_r4(_load(name))


def test_req_bndl_06_ig_example_operation_outcome_passes(bundle: dict[str, Any]) -> None:
    assert_operation_outcome(bundle["entry"][3]["resource"])


def test_req_appt_04_display_only_actor_is_accepted(appt: dict[str, Any]) -> None:
    # The IG example itself has {"display": "Napa Office"}: the profile constrains the target type
    # of actor.reference, it does not require the reference.
    assert appt["participant"][1]["actor"] == {"display": "Napa Office"}
    assert appointment_problems(appt) == []


# --- ihe-sched-appt: broken copies fail ------------------------------------------------------


def test_req_appt_02_missing_end_is_rejected(appt: dict[str, Any]) -> None:
    del appt["end"]
    problems = appointment_problems(appt)
    _expect(problems, "REQ-APPT-02", "Appointment.end is required")
    _expect(problems, "app-2")


def test_req_appt_02_missing_start_is_rejected_even_when_proposed(appt: dict[str, Any]) -> None:
    appt["status"] = "proposed"
    del appt["start"], appt["end"]
    problems = appointment_problems(appt)
    _expect(problems, "REQ-APPT-02", "Appointment.start is required")
    assert not any(p.startswith("app-3") for p in problems)  # base R4 would allow it


def test_req_appt_02_start_without_offset_is_rejected(appt: dict[str, Any]) -> None:
    appt["start"] = "2025-03-17T00:45:00"
    _expect(appointment_problems(appt), "REQ-GEN-22", "Appointment.start", "timezone offset")


def test_req_appt_02_end_before_start_is_rejected(appt: dict[str, Any]) -> None:
    appt["start"], appt["end"] = appt["end"], appt["start"]
    _expect(appointment_problems(appt), "REQ-APPT-02", "is before start")


def test_req_appt_02_offsets_are_accepted(appt: dict[str, Any]) -> None:
    appt["start"], appt["end"] = "2025-03-17T01:45:00+01:00", "2025-03-16T21:00:00-04:00"
    assert appointment_problems(appt) == []


def test_req_appt_03_two_requested_periods_are_rejected(appt: dict[str, Any]) -> None:
    appt["requestedPeriod"].append(copy.deepcopy(appt["requestedPeriod"][0]))
    _expect(appointment_problems(appt), "REQ-APPT-03", "exactly 1 Period, found 2")


def test_req_appt_03_missing_requested_period_is_rejected(appt: dict[str, Any]) -> None:
    del appt["requestedPeriod"]
    _expect(appointment_problems(appt), "REQ-APPT-03", "found 0")


def test_req_appt_04_participant_without_actor_is_rejected(appt: dict[str, Any]) -> None:
    del appt["participant"][0]["actor"]
    problems = appointment_problems(appt)
    _expect(problems, "REQ-APPT-04", "participant[0].actor is required")
    _expect(problems, "app-1", "participant[0]")


def test_req_appt_04_no_participant_is_rejected(appt: dict[str, Any]) -> None:
    appt["participant"] = []
    _expect(appointment_problems(appt), "REQ-APPT-04", "at least one")


@pytest.mark.parametrize("target", ["Organization", "RelatedPerson", "Device"])
def test_req_appt_04_actor_organization_is_rejected(appt: dict[str, Any], target: str) -> None:
    appt["participant"][0]["actor"] = {"reference": f"{target}/x1", "display": "X"}
    _expect(appointment_problems(appt), "REQ-APPT-04", f"references {target}")


def test_req_appt_04_absolute_and_typed_actor_references(appt: dict[str, Any]) -> None:
    appt["participant"][0]["actor"] = {"reference": "https://example.org/fhir/Location/loc-1"}
    appt["participant"][1]["actor"] = {
        "reference": "urn:uuid:7f1b2c3d-0000-4000-8000-000000000001",
        "type": "HealthcareService",
    }
    assert appointment_problems(appt) == []
    appt["participant"][1]["actor"] = {"reference": "urn:uuid:7f1b2c3d-0000-4000-8000-000000000001"}
    _expect(appointment_problems(appt), "REQ-APPT-04", "no determinable resource type")
    appt["participant"][1]["actor"] = {"identifier": {"value": "x"}, "type": "Device"}
    _expect(appointment_problems(appt), "REQ-APPT-04", "references Device")


def test_req_appt_05_bad_participant_status_is_rejected(appt: dict[str, Any]) -> None:
    appt["participant"][2]["status"] = "completed"
    problems = appointment_problems(appt)
    _expect(problems, "REQ-APPT-05", "participant[2].status 'completed'")
    _expect(problems, "R4 schema", "participant[2].status")


def test_req_appt_10_status_reason_extension(appt: dict[str, Any]) -> None:
    reason = {
        "coding": [
            {"system": "https://profiles.ihe.net/ITI/Scheduling/CodeSystem/status-reason", "code": "patient-cancel"}
        ]
    }
    appt["status"] = "cancelled"
    appt["extension"] = [{"url": STATUS_REASON_URL, "valueCodeableConcept": reason}]
    assert appointment_problems(appt) == []
    appt["extension"] = [{"url": STATUS_REASON_URL, "valueString": "patient called"}]
    problems = appointment_problems(appt)
    _expect(problems, "REQ-APPT-10", "only valueCodeableConcept", "valueString")
    _expect(problems, "REQ-APPT-10", "must have a valueCodeableConcept")
    appt["extension"] = [{"url": STATUS_REASON_URL, "valueCodeableConcept": reason}] * 2
    _expect(appointment_problems(appt), "REQ-APPT-10", "appears 2 times")


def test_req_appt_11_cancelation_reason_on_booked_is_rejected(appt: dict[str, Any]) -> None:
    appt["cancelationReason"] = {"text": "patient called"}
    _expect(appointment_problems(appt), "app-4", "status 'booked'")
    appt["status"] = "cancelled"
    assert appointment_problems(appt) == []


def test_req_appt_01_id_with_underscore_is_rejected(appt: dict[str, Any]) -> None:
    appt["id"] = "appt_1"
    problems = appointment_problems(appt)
    _expect(problems, "id: Appointment.id 'appt_1' does not match")
    _expect(problems, "R4 schema", "Appointment.id")


def test_req_appt_01_reference_id_with_underscore_is_rejected(appt: dict[str, Any]) -> None:
    appt["participant"][0]["actor"]["reference"] = "Practitioner/dr_y"
    _expect(appointment_problems(appt), "participant[0].actor.reference id 'dr_y'")


def test_req_appt_01_unknown_element_is_rejected_by_r4_schema(appt: dict[str, Any]) -> None:
    appt["colour"] = "blue"
    _expect(appointment_problems(appt), "R4 schema: Appointment:", "'colour' was unexpected")


def test_req_appt_01_wrong_resource_type_is_rejected(appt: dict[str, Any]) -> None:
    appt["resourceType"] = "Encounter"
    _expect(appointment_problems(appt), "REQ-APPT-01", "expected an Appointment")


# --- ihe-sched-avail-bundle: broken copies fail ----------------------------------------------


def test_req_bndl_02_bundle_type_collection_is_rejected(bundle: dict[str, Any]) -> None:
    bundle["type"] = "collection"
    _expect(avail_bundle_problems(bundle), "REQ-BNDL-02", "found 'collection'")


def test_req_bndl_03_bundle_without_total_is_rejected(bundle: dict[str, Any]) -> None:
    del bundle["total"]
    _expect(avail_bundle_problems(bundle), "REQ-BNDL-03", "Bundle.total is required")


def test_req_bndl_04_empty_entry_list_is_rejected(bundle: dict[str, Any]) -> None:
    bundle["entry"], bundle["total"] = [], 0
    _expect(avail_bundle_problems(bundle), "REQ-BNDL-04", "at least one entry")
    del bundle["entry"]
    _expect(avail_bundle_problems(bundle), "REQ-BNDL-04")


def test_req_bndl_04_empty_search_result_is_accepted_for_iti_118(bundle: dict[str, Any]) -> None:
    bundle["entry"], bundle["total"] = [], 0
    assert avail_bundle_problems(bundle, search=True) == []
    del bundle["entry"]
    assert_avail_bundle(bundle, search=True)


def test_req_bndl_05_appointment_entry_with_mode_outcome_is_rejected(bundle: dict[str, Any]) -> None:
    bundle["entry"][1]["search"]["mode"] = "outcome"
    _expect(avail_bundle_problems(bundle), "REQ-BNDL-05", "entry[1] (Appointment)", "'match', found 'outcome'")


def test_req_bndl_05_appointment_entry_is_checked_against_the_profile(bundle: dict[str, Any]) -> None:
    del bundle["entry"][0]["resource"]["end"]
    _expect(avail_bundle_problems(bundle), "REQ-BNDL-05", "entry[0].resource", "Appointment.end is required")


def test_req_bndl_06_outcome_entry_with_mode_match_is_rejected(bundle: dict[str, Any]) -> None:
    bundle["entry"][3]["search"]["mode"] = "match"
    _expect(avail_bundle_problems(bundle), "REQ-BNDL-06", "'outcome', found 'match'")


def test_req_bndl_06_outcome_entry_without_issue_is_rejected(bundle: dict[str, Any]) -> None:
    bundle["entry"][3]["resource"]["issue"] = []
    _expect(avail_bundle_problems(bundle), "REQ-BNDL-06", "at least one issue")


def test_req_bndl_07_included_practitioner_is_accepted(bundle: dict[str, Any]) -> None:
    practitioner = _load("example-practitioner.json")
    bundle["entry"].append(
        {
            "fullUrl": "https://example.com/base/Practitioner/dr-y",
            "resource": practitioner,
            "search": {"mode": "include"},
        }
    )
    assert avail_bundle_problems(bundle) == []
    bundle["entry"][-1]["search"]["mode"] = "match"
    _expect(avail_bundle_problems(bundle), "REQ-BNDL-07", "'include', found 'match'")
    bundle["entry"][-1]["search"]["mode"] = "include"
    practitioner["gender"] = "robot"
    _expect(avail_bundle_problems(bundle), "R4 schema: Bundle.entry[4].resource.gender")


def test_req_bndl_08_full_url_must_be_absolute_and_match(bundle: dict[str, Any]) -> None:
    bundle["entry"][0]["fullUrl"] = "Appointment/proposed-appt1a-1"
    _expect(avail_bundle_problems(bundle), "REQ-BNDL-08", "not an absolute")
    bundle["entry"][0]["fullUrl"] = "https://example.com/base/Appointment/other"
    _expect(avail_bundle_problems(bundle), "REQ-BNDL-08", "does not end with '/Appointment/proposed-appt1a-1'")
    del bundle["entry"][0]["fullUrl"]
    _expect(avail_bundle_problems(bundle), "REQ-BNDL-08", "fullUrl is missing")


def test_req_bndl_08_duplicate_full_urls_are_rejected(bundle: dict[str, Any]) -> None:
    bundle["entry"][1]["resource"]["id"] = "proposed-appt1a-1"
    bundle["entry"][1]["fullUrl"] = bundle["entry"][0]["fullUrl"]
    _expect(avail_bundle_problems(bundle), "bdl-7", "proposed-appt1a-1")


def test_req_bndl_09_total_below_match_count_is_rejected(bundle: dict[str, Any]) -> None:
    bundle["total"] = 2
    _expect(avail_bundle_problems(bundle), "REQ-BNDL-09", "total 2 is less than the 3")


def test_req_bndl_01_unknown_element_in_entry_is_reported_with_its_path(bundle: dict[str, Any]) -> None:
    bundle["entry"][2]["resource"]["participant"][0]["colour"] = "blue"
    _expect(avail_bundle_problems(bundle), "R4 schema: Bundle.entry[2].resource.participant[0]", "'colour'")


# --- generic helpers ---------------------------------------------------------------------------


def test_r4_problems_accepts_any_resource_type_and_rejects_unknown_ones() -> None:
    assert (
        r4_problems({"resourceType": "Parameters", "parameter": [{"name": "start", "valueDate": "2025-01-01"}]}) == []
    )
    _expect(r4_problems({"resourceType": "Banana"}), "unknown or missing resourceType 'Banana'")
    _expect(r4_problems({"resourceType": "Patient", "birthDate": "01/02/2003"}), "R4 schema: Patient.birthDate")


def test_operation_outcome_problems() -> None:
    ok = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found"}]}
    assert operation_outcome_problems(ok) == []
    _expect(operation_outcome_problems({"resourceType": "OperationOutcome", "issue": []}), "at least one issue")
    problems = operation_outcome_problems({"resourceType": "OperationOutcome", "issue": [{"severity": "error"}]})
    _expect(problems, "issue[0].code is required")
    bad_code = {"resourceType": "OperationOutcome", "issue": [{"severity": "fatal-ish", "code": "x"}]}
    _expect(operation_outcome_problems(bad_code), "R4 schema: OperationOutcome.issue[0].severity")


def test_assert_wrappers_list_every_problem(appt: dict[str, Any], bundle: dict[str, Any]) -> None:
    del appt["end"]
    appt["id"] = "a_b"
    with pytest.raises(AssertionError) as caught:
        assert_ihe_appointment(appt)
    message = str(caught.value)
    assert "Appointment/a_b" in message and "Appointment.end is required" in message and "'a_b'" in message
    bundle["type"] = "batch"
    with pytest.raises(AssertionError, match="REQ-BNDL-02"):
        assert_avail_bundle(bundle)
    with pytest.raises(AssertionError, match="at least one issue"):
        assert_operation_outcome({"resourceType": "OperationOutcome", "issue": []})
    with pytest.raises(AssertionError, match="R4 schema"):
        assert_r4({"resourceType": "Patient", "active": "yes"})
