"""Issue 8.3: ``sched-adapter demo --backend hl7v2`` starts the simulator and the adapter together; FHIR base on
--port, the adapter's SIU listener on --mllp-port."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
from serverutil import ProcessServers, free_port, port_accepts

SCRIPT = Path(sys.executable).parent / "sched-adapter"


def test_issue8_3_demo_backend_hl7v2_books_through_the_simulator(
    live_server_process: ProcessServers, tmp_path: Path
) -> None:
    port, mllp = free_port(), free_port()
    live_server_process.start(
        [
            str(SCRIPT),
            "demo",
            "--backend",
            "hl7v2",
            "--port",
            str(port),
            "--mllp-port",
            str(mllp),
            "--data-dir",
            str(tmp_path / "demo"),
        ],
        port=port,
        timeout=60,
    )
    assert port_accepts(mllp), "the adapter's SIU listener is not on --mllp-port"
    base = f"http://127.0.0.1:{port}/fhir"
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    with httpx.Client(base_url=base, timeout=60, headers=headers) as http:
        found = http.post(
            "/Appointment/$find",
            json={
                "resourceType": "Parameters",
                "parameter": [{"name": "patient-reference", "valueReference": {"reference": "Patient/PAT1"}}],
            },
        )
        assert found.status_code == 200, found.text
        first = next(e["resource"] for e in found.json()["entry"] if e["resource"]["resourceType"] == "Appointment")
        booked = http.post(
            "/Appointment/$book",
            json={
                "resourceType": "Parameters",
                "parameter": [
                    {"name": "appointment-reference", "valueReference": {"reference": f"Appointment/{first['id']}"}}
                ],
            },
        )
        assert booked.status_code == 200, booked.text
        appt = next(e["resource"] for e in booked.json()["entry"] if e["resource"]["resourceType"] == "Appointment")
        assert appt["status"] == "booked" and appt["id"].startswith("F")
        assert http.get(f"/Appointment/{appt['id']}").json()["status"] == "booked"
