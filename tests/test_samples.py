"""samples/: the FHIR request bodies walked by samples/run.py against a real demo server, and the HL7v2 messages
read and answered by the project's own HL7v2 code with the demo mapping."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from apputil import REPO
from serverutil import ProcessServers, free_port

sys.path.insert(0, str(Path(__file__).resolve().parent / "hl7v2"))

from hl7v2util import demo_mapping, run, siu_stack

from adapter.hl7v2.inbound import parse_siu, parse_sqr, parse_srr
from adapter.mllp import MLLPClient, read_msh
from adapter.testing.hl7_simulator import LegacySchedulerSimulator, demo_templates

SAMPLES = REPO / "samples"
SCRIPT = Path(sys.executable).parent / "sched-adapter"
BERLIN = ZoneInfo("Europe/Berlin")
BOOKED_AT = datetime(2027, 1, 11, 8, 20, tzinfo=BERLIN)
MOVED_TO = datetime(2027, 1, 11, 10, 0, tzinfo=BERLIN)

# What samples/run.py prints for each step: label -> (status, the start of its summary).
EXPECTED = {
    "ITI-115 $find": (200, "proposed "),
    "ITI-116 $hold": (200, "pending "),
    "ITI-117 $book (new)": (200, "booked "),
    "bad: hold the booked time (other client)": (409, "fatal conflict: "),
    "ITI-117 $book (reschedule)": (200, "booked "),
    "ITI-117 $book (cancel)": (200, "cancelled "),
    "bad: wrong resource type to $find": (400, "fatal invalid: "),
    "bad: $hold without a parameter": (400, "fatal invalid: "),
}


def hl7(name: str) -> bytes:
    return (SAMPLES / "hl7v2" / name).read_bytes()


def test_samples_fhir_files_are_parameters_with_only_the_placeholders_run_py_fills() -> None:
    filled = {"TOMORROW", "IN_8_DAYS", "PROPOSED_ID", "APPOINTMENT_ID", "NEW_START", "NEW_END"}
    script = (SAMPLES / "run.py").read_text(encoding="utf-8")
    assert all(f'"{name}"' in script or f"{name}=" in script for name in filled)
    files = sorted((SAMPLES / "fhir").glob("*.json"))
    assert {f.name for f in files} >= {"find.json", "hold.json", "book-new.json", "book-cancel.json"}
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert set(re.findall(r"\{\{(\w+)\}\}", text)) <= filled, path.name
        body = json.loads(text)
        assert body["resourceType"] == ("Patient" if path.name == "bad-wrong-resource-type.json" else "Parameters")


def test_samples_walkthrough_gets_the_expected_answers(tmp_path: Path, live_server_process: ProcessServers) -> None:
    server = live_server_process.start(
        [str(SCRIPT), "demo", "--port", "{port}", "--data-dir", str(tmp_path / "demo")], cwd=tmp_path
    )
    base = f"{server.base_url}/fhir"  # type: ignore[attr-defined]
    # -I -S: no site-packages, so the walkthrough runs on the standard library alone.
    out = subprocess.run(
        [sys.executable, "-I", "-S", str(SAMPLES / "run.py"), "--base", base],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == "all answers as expected"
    seen = {}
    for line in lines[:-1]:
        label, status, verdict, summary = re.match(r"(.+?) +(\d{3}) (\S+) +(.*)$", line).groups()
        seen[label] = (int(status), verdict, summary)
    assert list(seen) == list(EXPECTED)
    for label, (status, summary) in EXPECTED.items():
        assert seen[label][:2] == (status, "ok"), label
        assert seen[label][2].startswith(summary), seen[label]


def test_samples_walkthrough_exits_2_when_the_server_cannot_be_reached() -> None:
    out = subprocess.run(
        [sys.executable, "-I", "-S", str(SAMPLES / "run.py"), "--base", f"http://127.0.0.1:{free_port()}/fhir"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr.startswith("cannot reach http://127.0.0.1:"), out.stderr


def test_samples_hl7v2_siu_messages_are_acknowledged_and_mirrored_with_the_demo_mapping(tmp_path: Path) -> None:
    mapping = demo_mapping()
    feed = [
        ("SIU-S12-booked.hl7", "S12", "booked", BOOKED_AT),
        ("SIU-S13-rescheduled.hl7", "S13", "booked", MOVED_TO),
        ("SIU-S15-cancelled.hl7", "S15", "cancelled", MOVED_TO),
    ]
    assert sorted(name for name, *_ in feed) == sorted(p.name for p in (SAMPLES / "hl7v2").glob("SIU-*.hl7"))
    for name, trigger, status, start in feed:
        event = parse_siu(hl7(name), mapping)
        assert (event.trigger, event.appointment.status, event.appointment.start) == (trigger, status, start)

    async def main() -> None:
        async with siu_stack(tmp_path / "siu.sqlite", mapping) as stack:
            for name, trigger, status, start in feed:
                assert await stack.send(hl7(name)) == ["AA"], name
                assert await stack.drain() == 1, name
                appt = stack.applier.mirror.by_filler_id("F00002")
                assert appt is not None
                assert (appt.last_trigger, appt.status, appt.start) == (trigger, status, start)
                assert (appt.practitioner_ids, appt.location_ids, appt.patient_ids) == (
                    ("DOC1",),
                    ("ROOM1",),
                    ("PAT1",),
                )

    run(main())


def test_samples_hl7v2_answers_read_with_the_demo_mapping() -> None:
    mapping = demo_mapping()
    srr = parse_srr(hl7("SRR-S01-booked.hl7"), mapping)
    assert srr.accepted and srr.appointment is not None
    assert (srr.appointment.filler_id, srr.appointment.status, srr.appointment.start) == ("F00002", "booked", BOOKED_AT)
    sqr = parse_sqr(hl7("SQR-S25-availability-answer.hl7"), mapping)
    assert sqr.ack_code == "AA"
    assert [(s.start.hour, s.start.minute, s.practitioner_ids) for s in sqr.slots] == [
        (8, 0, ("DOC1",)),
        (8, 20, ("DOC1",)),
        (8, 40, ("DOC1",)),
    ]


def test_samples_hl7v2_requests_are_answered_aa_by_the_demo_scheduler_in_order() -> None:
    requests = ["SQM-S25-availability-query.hl7", "SRM-S01-book.hl7", "SRM-S02-reschedule.hl7", "SRM-S04-cancel.hl7"]
    assert sorted(requests) == sorted(p.name for p in (SAMPLES / "hl7v2").glob("S[QR]M-*.hl7"))

    async def main() -> None:
        sim = LegacySchedulerSimulator(demo_templates())
        async with sim, MLLPClient("127.0.0.1", sim.port, timeout=5, retries=0) as client:
            for name in requests:
                answer = (await client.send(hl7(name))).message
                assert read_msh(answer).message_type == ("SQR" if name.startswith("SQM") else "SRR"), name
                assert b"\rMSA|AA|" in answer, (name, answer)
            (appt,) = sim.appointments.values()
            assert (appt.status, appt.start, appt.practitioner, appt.patient_id) == (
                "Cancelled",
                MOVED_TO,
                "DOC1",
                "PAT1",
            )

    run(main())
