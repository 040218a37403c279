"""ITI-115 $find against the embedded demo database (real SQLite file, real app, no mocks).

Facts the seed guarantees (adapter/demo/seed.py): Dr. Beth Spears (Practitioner/SPEARSB, family
practice) works Mon-Fri 09:00-17:00 at Location/1 with a staff meeting 12:00-13:00 every Wednesday.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import pytest
from starlette.testclient import TestClient

from adapter.demo.seed import ensure_demo_database
from tests.apputil import appointments, issues, local_midnight, make_app, outcomes, parameters
from tests.conformance import assert_avail_bundle, assert_operation_outcome

NY = ZoneInfo("America/New_York")
FIND = "/fhir/Appointment/$find"


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("find") / "clinicware.sqlite"
    ensure_demo_database(path, today=dt.date.today())
    return path


@pytest.fixture(scope="module")
def client(demo_db: Path, tmp_path_factory: pytest.TempPathFactory):
    app = make_app(tmp_path_factory.mktemp("state"), f"sqlite:///{demo_db}")
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def window(days_from: int = 1, days: int = 7) -> tuple[str, str]:
    start = local_midnight(days_from)
    return start.isoformat(), (start + dt.timedelta(days=days)).isoformat()


def find(client: TestClient, *params: tuple[str, str, Any], **kwargs: Any):
    return client.post(FIND, json=parameters(*params), headers={"Content-Type": "application/fhir+json"}, **kwargs)


def spears(client: TestClient, days: int = 7, count: int = 500, **more: Any):
    s, e = window(1, days)
    return find(
        client,
        ("start", "valueDateTime", s),
        ("end", "valueDateTime", e),
        ("practitioner", "valueReference", {"reference": "Practitioner/SPEARSB"}),
        ("_count", "valueInteger", count),
    )


def _dt(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def test_req_115_01_post_find_returns_conformant_proposed_appointments(client: TestClient) -> None:
    r = spears(client)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/fhir+json")
    bundle = r.json()
    assert_avail_bundle(bundle)
    appts = appointments(bundle)
    assert appts, "Dr. Spears has free time in the next week"
    assert {a["status"] for a in appts} == {"proposed"}
    for a in appts:
        refs = [p["actor"].get("reference") for p in a["participant"]]
        assert "Practitioner/SPEARSB" in refs and "Location/1" in refs


def test_proposals_are_inside_window_working_hours_and_never_overlap_bookings(
    client: TestClient, demo_db: Path
) -> None:
    """The issue's core check, against the legacy tables themselves."""
    s, e = window(1, 7)
    appts = appointments(spears(client).json())
    con = sqlite3.connect(demo_db)
    booked = [
        (dt.datetime.strptime(f"{d}{t:04d}", "%Y%m%d%H%M").replace(tzinfo=NY), m)
        for d, t, m in con.execute(
            "SELECT APPT_DT, APPT_TM, DUR_MIN FROM APPT WHERE PROV_ID = 'SPEARSB ' AND STATUS_CD IN ('S','A','D','N')"
        )
    ]
    assert booked, "the seed books some of Dr. Spears' time"
    blocks = [
        (d, a, b)
        for d, a, b in con.execute("SELECT BLOCK_DT, START_HHMM, END_HHMM FROM PROV_BLOCK WHERE PROV_ID = 'SPEARSB '")
    ]
    for a in appts:
        start, end = _dt(a["start"]), _dt(a["end"])
        assert _dt(s) <= start and end <= _dt(e)
        local_start, local_end = start.astimezone(NY), end.astimezone(NY)
        assert local_start.isoweekday() <= 5
        assert (
            dt.time(9) <= local_start.time()
            and local_end.time() <= dt.time(17)
            and local_end.date() == local_start.date()
        )
        for b_start, minutes in booked:
            assert not (start < b_start + dt.timedelta(minutes=minutes) and b_start < end), (a["start"], b_start)
        day = int(local_start.strftime("%Y%m%d"))
        for d, bs, be in blocks:
            if d == day:
                assert not (
                    local_start.hour * 100 + local_start.minute < be and bs < local_end.hour * 100 + local_end.minute
                )


def test_req_appt_02_times_carry_offsets_and_requested_period_is_the_window(client: TestClient) -> None:
    s, e = window(1, 7)
    for a in appointments(spears(client).json()):
        assert a["start"][-6] in "+-" or a["start"].endswith("Z")
        assert a["requestedPeriod"] == [{"start": s, "end": e}]
        assert a["appointmentType"]["coding"][0]["code"] == "FOLLOW"
        assert a["serviceType"][0]["coding"][0]["system"] == "http://snomed.info/sct"
        assert a["specialty"][0]["coding"][0]["code"] == "419772000"


def test_req_115_02_get_find_equals_post(client: TestClient) -> None:
    s, e = window(1, 3)
    post = find(
        client,
        ("start", "valueDateTime", s),
        ("end", "valueDateTime", e),
        ("practitioner", "valueReference", {"reference": "Practitioner/SPEARSB"}),
        ("_count", "valueInteger", 20),
    ).json()
    get = client.get(FIND, params={"start": s, "end": e, "practitioner": "Practitioner/SPEARSB", "_count": "20"}).json()
    assert get["total"] == post["total"]
    assert [(a["start"], a["end"]) for a in appointments(get)] == [(a["start"], a["end"]) for a in appointments(post)]


def test_req_115_04_missing_bounds_are_filled_with_a_warning(client: TestClient) -> None:
    r = find(client, ("practitioner", "valueReference", {"reference": "Practitioner/SPEARSB"}))
    assert r.status_code == 200
    bundle = r.json()
    assert_avail_bundle(bundle)
    warnings = [i for i in issues(bundle) if i["severity"] == "warning"]
    assert any("start and end not given" in i["diagnostics"] for i in warnings)
    appts = appointments(bundle)
    period = appts[0]["requestedPeriod"][0]
    assert _dt(period["end"]) - _dt(period["start"]) == dt.timedelta(days=14)


def test_req_115_04_a_given_start_is_kept(client: TestClient) -> None:
    s, _ = window(3, 1)
    bundle = find(
        client, ("start", "valueDateTime", s), ("practitioner", "valueReference", {"reference": "Practitioner/SPEARSB"})
    ).json()
    period = appointments(bundle)[0]["requestedPeriod"][0]
    assert period["start"] == s
    assert any("end not given" in i["diagnostics"] for i in issues(bundle))


@pytest.mark.parametrize(
    ("start", "end", "expr"),
    [
        ("2030-01-10T09:00:00-05:00", "2030-01-10T09:00:00-05:00", "end"),
        ("2030-01-10T09:00:00-05:00", "2030-01-09T09:00:00-05:00", "end"),
        ("2030-01-01T00:00:00-05:00", "2030-06-01T00:00:00-05:00", "end"),
        ("not-a-date", "2030-01-09T09:00:00-05:00", "start"),
        ("2030-01-10T09:00:00", "2030-01-11T09:00:00-05:00", "start"),
        ("2030-02-30", "2030-03-05", "start"),
    ],
)
def test_req_115_05_bad_windows_are_400_naming_the_parameter(
    client: TestClient, start: str, end: str, expr: str
) -> None:
    r = find(client, ("start", "valueDateTime", start), ("end", "valueDateTime", end))
    assert r.status_code == 400
    oo = r.json()
    assert_operation_outcome(oo)
    assert oo["issue"][0]["code"] == "invalid" and oo["issue"][0]["expression"] == [expr]
    assert oo["issue"][0]["details"]["text"] == "Bad Request"


def test_req_115_06_specialty_limits_practitioners(client: TestClient) -> None:
    s, e = window(1, 2)
    bundle = find(
        client,
        ("start", "valueDateTime", s),
        ("end", "valueDateTime", e),
        ("specialty", "valueString", "http://snomed.info/sct|394579002"),
        ("_count", "valueInteger", 500),
    ).json()
    appts = appointments(bundle)
    assert appts
    assert {a["specialty"][0]["coding"][0]["code"] for a in appts} == {"394579002"}


def test_req_115_09_bare_code_matches_with_a_warning(client: TestClient) -> None:
    s, e = window(1, 2)
    bundle = find(
        client, ("start", "valueDateTime", s), ("end", "valueDateTime", e), ("specialty", "valueString", "394579002")
    ).json()
    assert appointments(bundle)
    assert any(i["severity"] == "warning" and i["expression"] == ["specialty"] for i in issues(bundle))


def test_req_115_09_unknown_code_gives_empty_result_with_information(client: TestClient) -> None:
    s, e = window(1, 2)
    r = find(
        client,
        ("start", "valueDateTime", s),
        ("end", "valueDateTime", e),
        ("specialty", "valueString", "http://snomed.info/sct|000000"),
    )
    assert r.status_code == 200
    bundle = r.json()
    assert_avail_bundle(bundle)
    assert bundle["total"] == 0 and not appointments(bundle)
    assert len(outcomes(bundle)) == 1
    assert issues(bundle)[0]["severity"] == "information"


def test_req_115_07_visit_type_sets_duration_and_specialty(client: TestClient) -> None:
    s, e = window(1, 5)
    bundle = find(
        client,
        ("start", "valueDateTime", s),
        ("end", "valueDateTime", e),
        ("visit-type", "valueString", "urn:sched-adapter:clinicware:visit-type|ECHO"),
        ("_count", "valueInteger", 100),
    ).json()
    appts = appointments(bundle)
    assert appts
    for a in appts:
        assert _dt(a["end"]) - _dt(a["start"]) == dt.timedelta(minutes=60)
        assert a["specialty"][0]["coding"][0]["display"] == "Cardiology"


def test_req_115_10_logical_practitioner_reference_by_npi(client: TestClient) -> None:
    npi = client.get("/fhir/Practitioner/SPEARSB").json()["identifier"][0]
    s, e = window(1, 3)
    bundle = find(
        client,
        ("start", "valueDateTime", s),
        ("end", "valueDateTime", e),
        ("practitioner", "valueReference", {"identifier": {"system": npi["system"], "value": npi["value"]}}),
    ).json()
    appts = appointments(bundle)
    assert appts and all(a["participant"][0]["actor"]["reference"] == "Practitioner/SPEARSB" for a in appts)


def test_unknown_practitioner_gives_empty_result_naming_it(client: TestClient) -> None:
    s, e = window(1, 3)
    r = find(
        client,
        ("start", "valueDateTime", s),
        ("end", "valueDateTime", e),
        ("practitioner", "valueReference", {"reference": "Practitioner/NOBODY"}),
    )
    assert r.status_code == 200
    bundle = r.json()
    assert_avail_bundle(bundle)
    assert bundle["total"] == 0
    assert any("Practitioner/NOBODY" in i["diagnostics"] for i in issues(bundle))


def test_req_gen_16_reference_to_another_server_is_404(client: TestClient) -> None:
    s, e = window(1, 3)
    r = find(
        client,
        ("start", "valueDateTime", s),
        ("end", "valueDateTime", e),
        ("practitioner", "valueReference", {"reference": "https://elsewhere.example/fhir/Practitioner/SPEARSB"}),
    )
    assert r.status_code == 404
    assert r.json()["issue"][0]["code"] == "not-found"


def test_req_gen_16_absolute_reference_on_our_base_is_accepted(client: TestClient) -> None:
    s, e = window(1, 3)
    r = find(
        client,
        ("start", "valueDateTime", s),
        ("end", "valueDateTime", e),
        ("practitioner", "valueReference", {"reference": "http://testserver/fhir/Practitioner/SPEARSB"}),
    )
    assert r.status_code == 200 and appointments(r.json())


def test_req_115_12_location_string_is_case_and_accent_insensitive_prefix(client: TestClient) -> None:
    loc = client.get("/fhir/Location/2").json()
    city = loc["address"]["city"]
    s, e = window(1, 2)
    bundle = find(
        client,
        ("start", "valueDateTime", s),
        ("end", "valueDateTime", e),
        ("location-string", "valueString", city[:4].upper()),
        ("_count", "valueInteger", 500),
    ).json()
    appts = appointments(bundle)
    assert appts
    assert {
        p["actor"]["reference"]
        for a in appts
        for p in a["participant"]
        if p["actor"]["reference"].startswith("Location")
    } == {"Location/2"}


def test_req_115_13_location_reference(client: TestClient) -> None:
    s, e = window(1, 2)
    bundle = find(
        client,
        ("start", "valueDateTime", s),
        ("end", "valueDateTime", e),
        ("location-reference", "valueReference", {"reference": "Location/3"}),
        ("_count", "valueInteger", 500),
    ).json()
    locs = {
        p["actor"]["reference"]
        for a in appointments(bundle)
        for p in a["participant"]
        if p["actor"]["reference"].startswith("Location")
    }
    assert locs == {"Location/3"}


def test_req_115_18_different_types_combine_with_and(client: TestClient) -> None:
    s, e = window(1, 5)
    bundle = find(
        client,
        ("start", "valueDateTime", s),
        ("end", "valueDateTime", e),
        ("practitioner", "valueReference", {"reference": "Practitioner/SPEARSB"}),
        ("location-reference", "valueReference", {"reference": "Location/3"}),
    ).json()
    assert bundle["total"] == 0  # she only works at Location/1


def test_req_115_16_patient_is_a_participant_and_travels_in_the_id(client: TestClient) -> None:
    s, e = window(1, 3)
    bundle = find(
        client,
        ("start", "valueDateTime", s),
        ("end", "valueDateTime", e),
        ("practitioner", "valueReference", {"reference": "Practitioner/SPEARSB"}),
        ("patient-reference", "valueReference", {"reference": "Patient/7"}),
    ).json()
    appts = appointments(bundle)
    assert appts
    assert all(
        {
            "actor": {"reference": "Patient/7", "display": p["actor"]["display"]},
            "required": "required",
            "status": "needs-action",
        }
        in a["participant"]
        for a in appts
        for p in a["participant"]
        if p["actor"]["reference"] == "Patient/7"
    )
    assert all(any(p["actor"]["reference"] == "Patient/7" for p in a["participant"]) for a in appts)
    # $book with only the reference books for Patient/7.
    token = appts[-1]["id"]
    r = client.post(
        "/fhir/Appointment/$book",
        json=parameters(("appointment-reference", "valueReference", {"reference": f"Appointment/{token}"})),
    )
    assert r.status_code == 200, r.text
    booked = appointments(r.json())[0]
    assert booked["status"] == "booked"
    assert any(p["actor"]["reference"] == "Patient/7" for p in booked["participant"])


def test_req_115_15_patient_resource_is_matched_by_identifier(client: TestClient) -> None:
    patient = client.get("/fhir/Patient/12").json()
    s, e = window(1, 3)
    bundle = find(
        client,
        ("start", "valueDateTime", s),
        ("end", "valueDateTime", e),
        ("practitioner", "valueReference", {"reference": "Practitioner/SPEARSB"}),
        ("patient-resource", "resource", {"resourceType": "Patient", "identifier": patient["identifier"]}),
    ).json()
    appts = appointments(bundle)
    assert appts and all(any(p["actor"]["reference"] == "Patient/12" for p in a["participant"]) for a in appts)


def test_req_115_17_referral_timing_insurance_are_accepted(client: TestClient) -> None:
    s, e = window(1, 3)
    r = find(
        client,
        ("start", "valueDateTime", s),
        ("end", "valueDateTime", e),
        ("referral-identifier", "valueIdentifier", {"system": "urn:x", "value": "R1"}),
        ("timing", "valueTiming", {"repeat": {"dayOfWeek": ["mon"]}}),
        ("insurance-reference", "valueReference", {"reference": "InsurancePlan/1"}),
        ("reason", "valueString", "http://snomed.info/sct|29857009"),
    )
    assert r.status_code == 200
    bundle = r.json()
    assert_avail_bundle(bundle)
    infos = {i["expression"][0] for i in issues(bundle) if i["severity"] == "information" and i.get("expression")}
    assert {"referral-identifier", "timing", "insurance-reference", "reason"} <= infos


def test_req_115_19_ranked_by_practitioner_preference_then_start(client: TestClient) -> None:
    others = [
        p["resource"]["id"]
        for p in client.get("/fhir/Practitioner", params={"_count": "50"}).json()["entry"]
        if p["resource"]["id"] != "SPEARSB"
    ]
    second = others[0]
    s, e = window(1, 3)
    appts = appointments(
        find(
            client,
            ("start", "valueDateTime", s),
            ("end", "valueDateTime", e),
            ("practitioner", "valueReference", {"reference": f"Practitioner/{second}"}),
            ("practitioner", "valueReference", {"reference": "Practitioner/SPEARSB"}),
            ("_count", "valueInteger", 500),
        ).json()
    )
    pracs = [a["participant"][0]["actor"]["reference"] for a in appts]
    first_spears = pracs.index("Practitioner/SPEARSB")
    assert set(pracs[:first_spears]) == {f"Practitioner/{second}"}
    assert set(pracs[first_spears:]) == {"Practitioner/SPEARSB"}
    for block in (appts[:first_spears], appts[first_spears:]):
        starts = [_dt(a["start"]) for a in block]
        assert starts == sorted(starts)


def test_req_115_20_to_23_count_total_and_next_link(client: TestClient) -> None:
    full = spears(client, days=7, count=500).json()
    total = full["total"]
    assert total == len(appointments(full)) > 10
    page1 = spears(client, days=7, count=10).json()
    assert page1["total"] == total and len(appointments(page1)) == 10
    nxt = [lk["url"] for lk in page1["link"] if lk["relation"] == "next"][0]
    url = urlsplit(nxt)
    page2 = client.get(f"{url.path}?{url.query}").json()
    assert_avail_bundle(page2)
    assert [a["start"] for a in appointments(page2)] == [a["start"] for a in appointments(full)][10:20]


def test_req_115_21_count_from_url_and_cap(client: TestClient) -> None:
    s, e = window(1, 7)
    body = parameters(("start", "valueDateTime", s), ("end", "valueDateTime", e))
    assert len(appointments(client.post(FIND + "?_count=3", json=body).json())) == 3
    capped = find(
        client, ("start", "valueDateTime", s), ("end", "valueDateTime", e), ("_count", "valueString", "9999")
    ).json()
    assert len(appointments(capped)) == 500
    assert any(i.get("expression") == ["_count"] for i in issues(capped))


def test_req_115_26_no_options_is_total_zero_with_one_information_outcome(client: TestClient) -> None:
    # A Saturday-and-Sunday window: nobody in the demo works weekends.
    today = dt.datetime.now(NY).date()
    saturday = today + dt.timedelta(days=(5 - today.weekday()) % 7 or 7)
    start = dt.datetime.combine(saturday, dt.time(), tzinfo=NY)
    r = find(
        client,
        ("start", "valueDateTime", start.isoformat()),
        ("end", "valueDateTime", (start + dt.timedelta(days=2)).isoformat()),
    )
    bundle = r.json()
    assert r.status_code == 200 and bundle["total"] == 0
    assert_avail_bundle(bundle)
    assert len(bundle["entry"]) == 1 and bundle["entry"][0]["search"]["mode"] == "outcome"
    assert issues(bundle)[0]["severity"] == "information"


def test_req_115_28_ids_are_valid_fhir_ids_and_tampering_is_404(client: TestClient) -> None:
    appts = appointments(spears(client, days=2).json())
    import re

    assert all(re.fullmatch(r"[A-Za-z0-9\-\.]{1,64}", a["id"]) for a in appts)
    token = appts[0]["id"]
    tampered = token.replace(".k.", ".l.") if ".k." in token else token[:-1] + ("0" if token[-1] != "0" else "1")
    r = client.post(
        "/fhir/Appointment/$hold",
        json=parameters(("appointment-reference", "valueReference", {"reference": f"Appointment/{tampered}"})),
    )
    assert r.status_code == 404
    assert_avail_bundle(r.json())
    assert any(i["code"] == "not-found" and i["severity"] == "fatal" for i in issues(r.json()))


def test_req_115_24_held_appointments_are_never_offered(client: TestClient) -> None:
    appts = appointments(spears(client, days=3).json())
    token = appts[1]["id"]
    r = client.post(
        "/fhir/Appointment/$hold",
        json=parameters(("appointment-reference", "valueReference", {"reference": f"Appointment/{token}"})),
    )
    assert r.status_code == 200, r.text
    again = appointments(spears(client, days=3).json())
    held = (appts[1]["start"], appts[1]["end"])
    assert all(not (_dt(a["start"]) < _dt(held[1]) and _dt(held[0]) < _dt(a["end"])) for a in again)


# --- bad input ---------------------------------------------------------------------------------


def test_malformed_json_is_400_structure(client: TestClient) -> None:
    r = client.post(FIND, content=b'{"resourceType": "Parameters", ', headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == 400
    oo = r.json()
    assert_operation_outcome(oo)
    assert oo["issue"][0]["code"] == "structure" and "JSON" in oo["issue"][0]["diagnostics"]


def test_wrong_resource_type_is_400(client: TestClient) -> None:
    r = client.post(FIND, json={"resourceType": "Patient"})
    assert r.status_code == 400
    assert "Parameters" in r.json()["issue"][0]["diagnostics"]


def test_wrong_value_type_names_the_parameter(client: TestClient) -> None:
    r = find(client, ("start", "valueString", "2030-01-01"))
    assert r.status_code == 400
    assert r.json()["issue"][0]["expression"] == ["start"]


def test_req_gen_06_unsupported_media_type_is_415(client: TestClient) -> None:
    r = client.post(FIND, content=b"start=2030", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    assert r.json()["issue"][0]["code"] == "not-supported"


def test_oversize_body_is_413_too_costly(client: TestClient) -> None:
    big = {"resourceType": "Parameters", "parameter": [{"name": "reason", "valueString": "x" * 2_000_000}]}
    r = client.post(FIND, json=big)
    assert r.status_code == 413
    assert r.json()["issue"][0]["code"] == "too-costly"


def test_plain_application_json_is_accepted(client: TestClient) -> None:
    s, e = window(1, 2)
    r = client.post(
        FIND,
        json=parameters(("start", "valueDateTime", s), ("end", "valueDateTime", e)),
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    assert r.status_code == 200 and r.json()["resourceType"] == "Bundle"


def test_unknown_route_is_an_operation_outcome(client: TestClient) -> None:
    r = client.get("/fhir/Nope/1")
    assert r.status_code == 404 and r.json()["resourceType"] == "OperationOutcome"


def test_req_115_14_a_patients_existing_bookings_are_not_offered_to_them(client: TestClient, demo_db: Path) -> None:
    con = sqlite3.connect(demo_db)
    rows = con.execute(
        "SELECT PAT_ID, PROV_ID, APPT_DT, APPT_TM, DUR_MIN FROM APPT WHERE STATUS_CD = 'S' "
        "AND PROV_ID <> 'SPEARSB ' AND APPT_DT > ? ORDER BY APPT_DT, APPT_TM LIMIT 1",
        (int((dt.date.today() + dt.timedelta(days=1)).strftime("%Y%m%d")),),
    ).fetchall()
    pat, _, day, hhmm, minutes = rows[0]
    busy_start = dt.datetime.strptime(f"{day}{hhmm:04d}", "%Y%m%d%H%M").replace(tzinfo=NY)
    busy_end = busy_start + dt.timedelta(minutes=minutes)
    start = dt.datetime.combine(busy_start.date(), dt.time(), tzinfo=NY)
    common = [
        ("start", "valueDateTime", start.isoformat()),
        ("end", "valueDateTime", (start + dt.timedelta(days=1)).isoformat()),
        ("visit-type", "valueString", "urn:sched-adapter:clinicware:visit-type|FOLLOW"),
        ("_count", "valueInteger", 500),
    ]

    def overlapping(bundle: dict) -> list[dict]:
        return [a for a in appointments(bundle) if _dt(a["start"]) < busy_end and busy_start < _dt(a["end"])]

    anyone = find(client, *common).json()
    assert overlapping(anyone), "other patients are offered that time"
    theirs = find(client, *common, ("patient-reference", "valueReference", {"reference": f"Patient/{pat}"})).json()
    assert_avail_bundle(theirs)
    assert not overlapping(theirs)
    assert theirs["total"] < anyone["total"]
