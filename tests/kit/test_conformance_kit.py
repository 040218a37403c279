"""Issue 12 item 2: the conformance kit against our own server (all green) and a broken one (caught)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from broken_server import DEFECTS, broken_app
from serverutil import ThreadServer, free_port

from adapter.cli import main

PATIENT = "7"

#: Each planted defect and the requirement whose check must fail because of it.
CAUGHT_BY = {
    "drop_requested_period": "REQ-APPT-03",
    "conflict_200": "REQ-116-08",
    "wrong_total": "REQ-115-22",
    "empty_find_no_outcome": "REQ-115-26",
    "no_xml": "REQ-GEN-04",
}


def kit(base: str, report: Path, *extra: str) -> tuple[int, dict[str, dict[str, object]]]:
    code = main(["conformance", "--base", base, "--patient", PATIENT, "--report", str(report), *extra])
    data = json.loads(report.read_text(encoding="utf-8"))
    return code, {row["id"]: row for row in data["requirements"]}


def test_issue12_2_own_server_passes_every_check(
    demo_base: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, rows = kit(demo_base, tmp_path / "report.json")
    out = capsys.readouterr().out
    failed = {k: v for k, v in rows.items() if v["status"] != "pass"}
    assert code == 0 and not failed, out
    assert len(rows) >= 70
    # The report names requirements only from the catalogue, with a level and evidence per check.
    data = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert data["reportVersion"] == 1 and data["summary"]["requirements"]["fail"] == 0
    assert data["server"]["software"]["name"] == "sched-adapter"
    row = rows["REQ-116-08"]
    assert row["level"] == "SHALL" and row["checks"][0]["evidence"][0]["response"]["status"] == 409


def test_issue12_2_html_report_has_one_row_per_requirement(demo_base: str, tmp_path: Path) -> None:
    assert main(["conformance", "--base", demo_base, "--patient", PATIENT, "--report", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert page.count("<tr id='REQ-") >= 70 and page.count("<details>") == page.count("<tr id='REQ-")
    assert "<tr id='REQ-115-22'>" in page and "class='pass'>PASS</td>" in page


def test_issue12_2_without_patient_booking_checks_are_skipped_with_why(demo_base: str, tmp_path: Path) -> None:
    code = main(["conformance", "--base", demo_base, "--report", str(tmp_path / "r.json")])
    rows = {r["id"]: r for r in json.loads((tmp_path / "r.json").read_text())["requirements"]}
    assert code == 0
    assert rows["REQ-116-04"]["status"] == "skip"
    assert "no --patient given" in rows["REQ-116-04"]["checks"][0]["message"]
    assert rows["REQ-115-22"]["status"] == "pass"


@contextmanager
def proxy(demo_base: str, defect: str) -> Iterator[str]:
    own: dict[str, str] = {}
    server = ThreadServer(broken_app(demo_base, defect, own))
    own["url"] = server.base_url + "/fhir"
    server.start()
    try:
        yield own["url"]
    finally:
        server.stop()


@pytest.fixture(params=DEFECTS)
def broken_base(request: pytest.FixtureRequest, demo_base: str) -> Iterator[tuple[str, str]]:
    with proxy(demo_base, request.param) as base:
        yield request.param, base


def test_issue12_2_unclaimed_feature_is_skipped_with_why(demo_base: str, tmp_path: Path) -> None:
    with proxy(demo_base, "unclaimed_hold") as base:
        code, rows = kit(base, tmp_path / "report.json")
    for requirement in ("REQ-116-04", "REQ-116-08", "REQ-116-11"):
        assert rows[requirement]["status"] == "skip"
        assert rows[requirement]["checks"][0]["message"] == "the CapabilityStatement does not claim op:hold"
        assert rows[requirement]["checks"][0]["evidence"] == []  # nothing was sent
    assert rows["REQ-GEN-09"]["status"] == "fail"  # SHOULD declare $hold
    assert rows["REQ-117-05"]["status"] == "pass" and rows["REQ-118-05"]["status"] == "pass"
    assert code == 1


def test_issue12_2_each_planted_defect_fails_its_named_check(broken_base: tuple[str, str], tmp_path: Path) -> None:
    defect, base = broken_base
    code, rows = kit(base, tmp_path / "report.json")
    requirement = CAUGHT_BY[defect]
    assert code == 1
    assert rows[requirement]["status"] == "fail", rows[requirement]
    failing = [c for c in rows[requirement]["checks"] if c["status"] == "fail"]
    # Evidence: the request and the response that show the defect.
    evidence = failing[0]["evidence"][0]
    assert evidence["request"]["url"].startswith(base) and evidence["response"]["body"]


def test_issue12_2_unreachable_server_exits_2(tmp_path: Path) -> None:
    assert main(["conformance", "--base", f"http://127.0.0.1:{free_port()}/fhir"]) == 2
