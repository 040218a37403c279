"""Issue 8 items 3 and 5: outbound SQM/SRM per agreed version, SRR/SQR reading, escaping, the mapping loader."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import hl7
import pytest
from hl7v2util import DEMO_MAPPING, demo_mapping, siu

from adapter.hl7v2.escaping import escape, unescape
from adapter.hl7v2.inbound import parse_siu, parse_sqr, parse_srr
from adapter.hl7v2.mapping import OUTBOUND_VERSIONS, load_hl7v2_mapping
from adapter.hl7v2.outbound import AvailabilityRequest, BookingRequest, PatientRef, SrmTrigger, build_sqm, build_srm
from adapter.mapping.loader import MappingError
from adapter.mllp import read_msh

CET = timezone(timedelta(hours=1))
NASTY = "O'Brien|^~\\&"


def _booking(**kw: Any) -> BookingRequest:
    base = BookingRequest(
        placer_id="PL-42",
        start=datetime(2026, 1, 12, 9, 0, tzinfo=CET),
        duration_minutes=20,
        service="CHECKUP",
        service_text="Check-up",
        practitioner_ids=("DOC1",),
        location_ids=("ROOM1",),
        patient=PatientRef("PAT1", NASTY, "Pat"),
        reason="pain & fever",
    )
    return replace(base, **kw)


@pytest.mark.parametrize("version", OUTBOUND_VERSIONS)
@pytest.mark.parametrize("trigger", ["S01", "S02", "S04"])
def test_issue8_3_srm_built_and_validated_per_version(version: str, trigger: SrmTrigger) -> None:
    agreement = demo_mapping().interface.model_copy(update={"version": version})
    raw = build_srm(agreement, trigger, _booking(), control_id="M-1")
    msh = read_msh(raw)
    assert (msh.message_type, msh.trigger, msh.version, msh.control_id) == ("SRM", trigger, version, "M-1")
    parsed = hl7.parse(raw.decode())  # the independent peer reads it too
    assert str(parsed.segment("ARQ")(1)(1)(1)) == "PL-42"


@pytest.mark.parametrize("version", OUTBOUND_VERSIONS)
def test_issue8_3_sqm_built_and_validated_per_version(version: str) -> None:
    agreement = demo_mapping().interface.model_copy(update={"version": version})
    req = AvailabilityRequest(
        "Q-1", datetime(2026, 1, 12, tzinfo=CET), datetime(2026, 1, 19, tzinfo=CET), 20, "CHECKUP", "", ("DOC1",)
    )
    raw = build_sqm(agreement, req, control_id="M-2")
    assert read_msh(raw).trigger == "S25"
    assert b"ARQ|Q-1|" in raw and b"20260112000000+0100^20260119000000+0100" in raw


def test_issue8_3_enhanced_ack_mode_sets_msh15_msh16() -> None:
    agreement = demo_mapping().interface.model_copy(update={"ack_mode": "enhanced"})
    msh = read_msh(build_srm(agreement, "S01", _booking(), control_id="M-3"))
    assert (msh.accept_ack_type, msh.application_ack_type) == ("AL", "AL")


def test_issue8_5_escaping_both_ways() -> None:
    for text in [NASTY, "a\\b", "\\F\\", "line1\nline2", "plain"]:
        assert unescape(escape(text)) == text
    assert escape("|^~\\&") == "\\F\\\\S\\\\R\\\\E\\\\T\\"


def test_issue8_5_obrien_round_trips_into_srm_and_back_from_siu() -> None:
    mapping = demo_mapping()
    srm = build_srm(mapping.interface, "S01", _booking(), control_id="M-4")
    # The filler (python-hl7 here) reads the name unchanged from the SRM ...
    parsed = hl7.parse(srm.decode())
    assert parsed.unescape(str(parsed.segment("PID")(5)(1)(1))) == NASTY
    # ... and echoes the PID segment it received in its SIU, which the adapter reads back unchanged.
    pid_line = next(line for line in srm.decode().split("\r") if line.startswith("PID"))
    siu_raw = siu("S-1", "S12").decode().split("\r")
    siu_raw = [pid_line if s.startswith("PID") else s for s in siu_raw]
    event = parse_siu("\r".join(siu_raw).encode(), mapping)
    assert (event.appointment.patient_family, event.appointment.patient_given) == (NASTY, "Pat")
    assert event.appointment.patient_ids == ("PAT1",)


def test_issue8_3_srr_accept_and_refusal_with_err() -> None:
    mapping = demo_mapping()
    aa = (
        "MSH|^~\\&|LEGACY|F|ADAPTER|F|20260101||SRR^S01^SRR_S01|R1|P|2.5.1\rMSA|AA|M-1\r"
        "SCH|PL-42|FILL-9|||||^Check-up||||||||||||||||||Booked\rTQ1|||||||20260112090000+0100|20260112092000+0100\r"
        "RGS|1\rAIP|1||DOC1\r"
    )
    r = parse_srr(aa, mapping)
    assert r.accepted and r.acknowledged_control_id == "M-1"
    assert r.appointment is not None and (r.appointment.placer_id, r.appointment.filler_id) == ("PL-42", "FILL-9")
    assert r.appointment.status == "booked"
    ae_251 = (
        "MSH|^~\\&|LEGACY|F|ADAPTER|F|20260101||SRR^S01^SRR_S01|R2|P|2.5.1\rMSA|AE|M-1|refused\r"
        "ERR|||207^Application internal error^HL70357|E||||slot already taken\r"
    )
    r = parse_srr(ae_251, mapping)
    assert not r.accepted and r.reason == "slot already taken" and r.errors[0].code == "207"
    ar_23 = "MSH|^~\\&|L|F|A|F|20260101||SRR^S01|R3|P|2.3\rMSA|AR|M-1\rERR|ARQ^1^1^103&Table value not found\r"
    r = parse_srr(ar_23, mapping)
    assert r.ack_code == "AR" and r.errors[0].code == "103" and r.reason == "Table value not found"


def test_issue8_3_sqr_slots() -> None:
    raw = (
        "MSH|^~\\&|LEGACY|F|ADAPTER|F|20260101||SQR^S25^SQR_S25|R1|P|2.5.1\rMSA|AA|M-2\r"
        "SCH|||||||||||||||||||||||||Booked\rTQ1|||||||20260112090000+0100|20260112092000+0100\r"
        "RGS|1\rAIS|1||CHECKUP\rAIP|1||DOC1\rAIL|1||ROOM1\r"
        "SCH\rTQ1|||||||20260112093000+0100|20260112095000+0100\rRGS|1\rAIS|1||CHECKUP\rAIP|1||DOC1\rDSC\r"
    )
    r = parse_sqr(raw, demo_mapping())
    assert [s.start.strftime("%H:%M") for s in r.slots] == ["09:00", "09:30"]
    assert r.slots[0].practitioner_ids == ("DOC1",) and r.slots[0].location_ids == ("ROOM1",)
    assert r.slots[1].location_ids == ()


def test_issue8_5_mapping_errors_name_file_line_and_key(tmp_path: Path) -> None:
    text = DEMO_MAPPING.read_text()
    text = text.replace("  practitioner: [AIP-3.1.1, AIG-3.1.1]", "  practitioner: [AIP-3.1.1, AIG3]")
    text = text.replace("  Noshow: noshow", "  Noshow: no-show")
    text = text.replace("  timezone: Europe/Berlin", "  timezone: Mars/Olympus")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(MappingError) as info:
        load_hl7v2_mapping(bad)
    problems = "\n".join(info.value.problems)
    lines = text.splitlines()

    def line_of(prefix: str) -> int:
        return next(i for i, line in enumerate(lines, 1) if line.startswith(prefix))

    assert f"bad.yaml:{line_of('  timezone: Mars/Olympus')}: interface.timezone:" in problems
    assert f"bad.yaml:{line_of('  practitioner: [AIP-3.1.1, AIG3]')}: fields.practitioner.1:" in problems
    assert f"bad.yaml:{line_of('  Noshow: no-show')}: status.Noshow: expected a FHIR" in problems
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(DEMO_MAPPING.read_text().replace("  ack_mode: original", "  ack_mod: original"))
    with pytest.raises(MappingError, match=r"unknown.yaml:\d+: interface.ack_mod: unknown key"):
        load_hl7v2_mapping(unknown)


def test_issue8_5_times_rule_by_version() -> None:
    mapping = demo_mapping()
    both = siu("C1", "S12", start="20260110090000+0100", extra=())
    both = both.replace(b"^Check-up|||||", b"^Check-up||||^^^20260110140000+0100|")
    assert parse_siu(both, mapping).appointment.start == datetime(2026, 1, 10, 9, tzinfo=CET)  # 2.5.1: TQ1
    old = both.replace(b"|P|2.5.1", b"|P|2.4")
    assert parse_siu(old, mapping).appointment.start == datetime(2026, 1, 10, 14, tzinfo=CET)  # 2.4: SCH-11
    assert mapping.legacy_status("cancelled") == "Cancelled"
