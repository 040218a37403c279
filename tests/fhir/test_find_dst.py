"""REQ-GEN-22: legacy wall-clock times are DST-correct on both edges of a transition.

A dedicated legacy database: one practitioner working 09:00-17:00 local every day of the week,
searched across the America/New_York spring-forward (2027-03-14) and fall-back (2027-11-07).
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from zoneinfo import ZoneInfo

import pytest
from apputil import appointments, make_app, parameters
from conformance import assert_avail_bundle
from starlette.testclient import TestClient

from adapter.demo.seed import create_schema
from adapter.mapping.expressions import attach_zone

NY = ZoneInfo("America/New_York")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("dst")
    path = folder / "dst.sqlite"
    con = sqlite3.connect(path)
    create_schema(con)
    con.execute("INSERT INTO FACILITY (FAC_ID, FAC_NAME, CITY, STATE) VALUES (1, 'Night Clinic', 'Boston', 'MA')")
    con.execute("INSERT INTO PROVIDER VALUES ('DAYW    ', 'Day', 'Wanda', 'MD', 'FP', '1234567893', 1, 'Y')")
    con.execute("INSERT INTO APPT_TYPE VALUES ('FOLLOW', 'Follow-up visit', 20, NULL)")
    for weekday in range(1, 8):
        con.execute(
            "INSERT INTO PROV_TEMPLATE VALUES (?, 'DAYW    ', 1, ?, 900, 1700, 20260101, NULL)", (weekday, weekday)
        )
    # A template that starts inside the skipped hour on spring-forward day.
    con.execute("INSERT INTO PROVIDER VALUES ('NIGHTN  ', 'Night', 'Nora', 'MD', 'FP', '1234567894', 1, 'Y')")
    con.execute("INSERT INTO PROV_TEMPLATE VALUES (20, 'NIGHTN  ', 1, 7, 130, 400, 20260101, NULL)")
    con.execute("INSERT INTO ID_COUNTER VALUES ('APPT_ID', 1)")
    con.commit()
    con.close()
    app = make_app(folder, f"sqlite:///{path}")
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _starts(client: TestClient, practitioner: str, first: dt.date, days: int) -> list[str]:
    start = dt.datetime.combine(first, dt.time(), tzinfo=NY)
    r = client.post(
        "/fhir/Appointment/$find",
        json=parameters(
            ("start", "valueDateTime", start.isoformat()),
            ("end", "valueDateTime", (start + dt.timedelta(days=days)).isoformat()),
            ("practitioner", "valueReference", {"reference": f"Practitioner/{practitioner}"}),
            ("_count", "valueInteger", 500),
        ),
    )
    assert r.status_code == 200, r.text
    assert_avail_bundle(r.json())
    return [a["start"] for a in appointments(r.json())]


def test_req_gen_22_nine_oclock_local_on_both_sides_of_spring_forward(client: TestClient) -> None:
    starts = _starts(client, "DAYW", dt.date(2027, 3, 13), 3)
    assert "2027-03-13T09:00:00-05:00" in starts  # Saturday, EST
    assert "2027-03-14T09:00:00-04:00" in starts  # Sunday, the change day, EDT
    assert "2027-03-15T09:00:00-04:00" in starts
    last = [s for s in starts if s.startswith("2027-03-14")][-1]
    assert last == "2027-03-14T16:40:00-04:00"  # 20-minute visits end at 17:00 local
    # 8 hours on a 10-minute grid (mapping: slot_step_minutes 10): (480 - 20) / 10 + 1 starts.
    assert len([s for s in starts if s.startswith("2027-03-14")]) == 47


def test_req_gen_22_nine_oclock_local_on_both_sides_of_fall_back(client: TestClient) -> None:
    starts = _starts(client, "DAYW", dt.date(2027, 11, 6), 3)
    assert "2027-11-06T09:00:00-04:00" in starts
    assert "2027-11-07T09:00:00-05:00" in starts
    assert "2027-11-08T09:00:00-05:00" in starts
    assert len([s for s in starts if s.startswith("2027-11-07")]) == 47


def test_req_gen_22_working_time_starting_in_the_skipped_hour_begins_at_the_gap_end(client: TestClient) -> None:
    # 01:30-04:00 local on 2027-03-14: 02:00-03:00 does not exist, so the real span is
    # 01:30 EST .. 04:00 EDT = 1.5 real hours: (90 - 20) / 10 + 1 = 8 starts on the 10-minute grid.
    starts = _starts(client, "NIGHTN", dt.date(2027, 3, 14), 1)
    assert starts[0] == "2027-03-14T01:30:00-05:00"
    assert all(dt.datetime.fromisoformat(s).astimezone(dt.UTC).minute % 10 == 0 for s in starts)
    total = dt.datetime.fromisoformat("2027-03-14T04:00:00-04:00") - dt.datetime.fromisoformat(starts[0])
    assert total == dt.timedelta(minutes=90)
    assert len(starts) == 8
    assert "2027-03-14T03:00:00-04:00" in starts  # the instant after 01:50 EST


def test_attach_zone_ambiguous_takes_first_and_nonexistent_moves_forward() -> None:
    ambiguous = attach_zone(dt.datetime(2027, 11, 7, 1, 30), NY)
    assert ambiguous.utcoffset() == dt.timedelta(hours=-4)
    skipped = attach_zone(dt.datetime(2027, 3, 14, 2, 30), NY)
    assert skipped.isoformat() == "2027-03-14T03:30:00-04:00"
