"""Issue 8 item 4/"done when": every SIU sample is ingested through the inbox (real socket, python-hl7 sender) and
yields the expected status, times with offsets, practitioner and location."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hl7v2util import SAMPLES, run, siu_stack

PLUS_0215 = timezone(timedelta(hours=2, minutes=15))
SEP24 = (datetime(2021, 9, 24, 9, 30, tzinfo=PLUS_0215), datetime(2021, 9, 24, 10, 20, tzinfo=PLUS_0215))
AUG18 = (datetime(2021, 8, 18, 11, 30, tzinfo=PLUS_0215), datetime(2021, 8, 18, 12, 30, tzinfo=PLUS_0215))
AUG20 = (datetime(2021, 8, 20, 11, 30, tzinfo=PLUS_0215), datetime(2021, 8, 20, 12, 30, tzinfo=PLUS_0215))
OCT = (datetime(2020, 10, 4, 11, 26, tzinfo=PLUS_0215), datetime(2020, 10, 8, 11, 26, tzinfo=PLUS_0215))
ONE = (("1210",), ("055",))
THREE = (("400", "500", "600"), ("LabUnit101", "DiagnosticUnit201", "OPD12"))

CASES = [
    # file, trigger, FHIR status, status reason, (start, end), (practitioners, locations)
    ("SIU-S12-01.hl7", "S12", "booked", None, SEP24, ONE),
    ("SIU-S12-02.hl7", "S12", "booked", None, AUG18, THREE),
    ("SIU-S12_1.hl7", "S12", "booked", None, OCT, (("400", "500", "600"), ("4E", "11", "22", "55"))),
    ("SIU-S13-01.hl7", "S13", "booked", None, SEP24, ONE),
    ("SIU-S13-02.hl7", "S13", "booked", None, AUG20, THREE),
    ("SIU-S14-01.hl7", "S14", "booked", None, SEP24, ONE),
    ("SIU-S14-02.hl7", "S14", "booked", None, AUG18, (THREE[0], ("LabUnit102", "DiagnosticUnit201", "OPD12"))),
    ("SIU-S15-01.hl7", "S15", "cancelled", None, SEP24, ONE),
    ("SIU-S15-02.hl7", "S15", "cancelled", None, AUG18, THREE),
    ("SIU-S16-01.hl7", "S16", "cancelled", "discontinued", SEP24, ONE),
    ("SIU-S16-02.hl7", "S16", "cancelled", "discontinued", AUG18, THREE),
    ("SIU-S17-01.hl7", "S17", "entered-in-error", None, SEP24, ONE),
    ("SIU-S17-02.hl7", "S17", "entered-in-error", None, AUG18, THREE),
    ("SIU-S26-01.hl7", "S26", "noshow", None, SEP24, ONE),
    ("SIU-S26-02.hl7", "S26", "noshow", None, AUG18, THREE),
]


def test_issue8_samples_table_covers_every_file() -> None:
    assert sorted(c[0] for c in CASES) == sorted(p.name for p in SAMPLES.glob("*.hl7"))


@pytest.mark.parametrize(("name", "trigger", "status", "reason", "times", "resources"), CASES)
def test_issue8_siu_sample_ingested(
    tmp_path: Path,
    name: str,
    trigger: str,
    status: str,
    reason: str | None,
    times: tuple[datetime, datetime],
    resources: tuple[tuple[str, ...], tuple[str, ...]],
) -> None:
    async def main() -> None:
        async with siu_stack(tmp_path / "hl7.sqlite") as stack:
            assert await stack.send((SAMPLES / name).read_bytes()) == ["AA"]
            assert await stack.drain() == 1
            appt = stack.applier.mirror.by_filler_id("36996")
            assert appt is not None
            assert appt.last_trigger == trigger and appt.placer_id == "12345"
            assert (appt.status, appt.status_reason) == (status, reason)
            assert (appt.start, appt.end) == times
            assert appt.start is not None and appt.start.utcoffset() == timedelta(hours=2, minutes=15)
            assert (appt.practitioner_ids, appt.location_ids) == resources
            assert "PATID1234" in appt.patient_ids
            found = stack.applier.mirror.for_actor(
                "practitioner", resources[0][0], times[0] - timedelta(hours=1), times[1]
            )
            assert [a.filler_id for a in found] == ["36996"]

    run(main())
