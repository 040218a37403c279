"""Issue 8: the HL7v2 backend over real sockets (MLLP to the simulator, HTTP to the adapter), every Appointment
checked with the conformance helpers, and a final agreement check between adapter and simulator."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from backendutil import Hl7Env, actor_id, appointments_of, issues_of, parameters, ref
from conformance import assert_avail_bundle, assert_ihe_appointment, assert_operation_outcome

from adapter.scheduling.service import placer_id_for


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Hl7Env]:
    e = Hl7Env(tmp_path)
    try:
        yield e
    finally:
        e.close()


def participants(patient: str = "PAT1", practitioner: str = "DOC1", location: str = "ROOM1") -> list[dict[str, Any]]:
    return [
        {"actor": {"reference": f"Practitioner/{practitioner}"}, "status": "accepted"},
        {"actor": {"reference": f"Location/{location}"}, "status": "accepted"},
        {"actor": {"reference": f"Patient/{patient}"}, "status": "accepted"},
    ]


def success(resp: httpx.Response, status: str) -> dict[str, Any]:
    assert resp.status_code == 200, resp.text
    bundle = resp.json()
    assert_avail_bundle(bundle)
    found = appointments_of(bundle)
    assert len(found) == 1 and found[0]["status"] == status, bundle
    assert_ihe_appointment(found[0])
    return found[0]


def failure(resp: httpx.Response, status: int, code: str, *fragments: str) -> str:
    assert resp.status_code == status, resp.text
    bundle = resp.json()
    assert_avail_bundle(bundle)
    assert appointments_of(bundle) == []
    for e in bundle["entry"]:
        assert_operation_outcome(e["resource"])
    issues = issues_of(bundle)
    assert issues[0]["severity"] == "fatal" and issues[0]["code"] == code, issues
    text = " ".join(i.get("diagnostics", "") for i in issues)
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"
    return text


def slot(appt: dict[str, Any]) -> tuple[str | None, str]:
    return actor_id(appt, "Practitioner"), appt["start"]


def test_issue8_2_find_hold_book_search_reschedule_cancel(env: Hl7Env) -> None:
    offered = env.find(day=1)
    assert offered, "the simulator's SQR offered nothing"
    for a in offered:
        assert_ihe_appointment(a)
    first = offered[0]

    held = success(env.hold(first["id"], "client-a"), "pending")
    assert held["id"] == first["id"]
    assert slot(first) not in {slot(a) for a in env.find(day=1)}, "a held slot was offered again"

    booked = success(env.book(first["id"], "client-a"), "booked")
    assert (booked["start"], booked["end"]) == (first["start"], first["end"])
    [in_sim] = env.sim.booked()
    assert booked["id"] == in_sim.filler_id
    assert {"system": "urn:sched-adapter:hl7v2:filler-id", "value": in_sim.filler_id} in booked["identifier"]
    assert in_sim.placer_id == placer_id_for(first["id"])  # ARQ-1 derived from the proposed id
    assert in_sim.patient_id == "PAT1" and in_sim.practitioner == "DOC1"
    assert slot(first) not in {slot(a) for a in env.find(day=1)}

    env.settle_siu()
    found = env.search("patient=Patient/PAT1")
    assert [a["id"] for a in found] == [booked["id"]]
    for a in found:
        assert_ihe_appointment(a)
    read = env.read(booked["id"])
    assert read.status_code == 200 and read.json()["status"] == "booked"
    assert_ihe_appointment(read.json())

    target = env.find(day=2)[3]
    resource = {
        "resourceType": "Appointment",
        "id": booked["id"],
        "status": "booked",
        "start": target["start"],
        "end": target["end"],
        "participant": participants(),
    }
    moved = success(env.book(resource=resource, client="client-a"), "booked")
    assert moved["id"] == booked["id"] and (moved["start"], moved["end"]) == (target["start"], target["end"])
    assert env.sim.booked()[0].start == dt.datetime.fromisoformat(target["start"])
    assert slot(first) in {slot(a) for a in env.find(day=1)}, "the old time is free again"

    resource = {**resource, "status": "cancelled", "start": target["start"], "end": target["end"]}
    cancelled = success(env.book(resource=resource, client="client-a"), "cancelled")
    assert cancelled["id"] == booked["id"]
    assert env.sim.booked() == []
    assert slot(target) in {slot(a) for a in env.find(day=2)}
    env.assert_agreement()
    read = env.read(booked["id"]).json()
    assert read["status"] == "cancelled"
    assert_ihe_appointment(read)


def test_issue8_4_race_twenty_clients_one_slot(env: Hl7Env) -> None:
    """The same race as the SQL backend's: exactly one booking wins, the filler holds exactly one appointment."""
    first = env.find(day=1)[0]
    tokens = [first["id"]] * 10
    # Ten more clients each found the same slot with another patient: different proposed ids, same time.
    for patient in ("PAT2",):
        other = next(a for a in env.find(day=1, patient=patient) if slot(a) == slot(first))
        tokens += [other["id"]] * 10

    def book(i: int) -> httpx.Response:
        with httpx.Client(base_url=env.base, timeout=60) as http:
            return http.post(
                "/Appointment/$book",
                json=parameters(ref(tokens[i])),
                headers={"Content-Type": "application/fhir+json", "X-Client-Id": f"racer-{i}"},
            )

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(book, range(20)))
    won = [r for r in responses if r.status_code == 200]
    lost = [r for r in responses if r.status_code != 200]
    assert len(won) == 1, [r.status_code for r in responses]
    assert all(r.status_code == 409 for r in lost), [r.text for r in lost if r.status_code != 409]
    success(won[0], "booked")
    assert len(env.sim.booked()) == 1
    env.assert_agreement()


def test_issue8_4_obrien_round_trips_through_srm_and_siu(env: Hl7Env) -> None:
    name = "O'Brien|^~\\&"
    first = env.find(day=1, patient="PAT3")[0]
    booked = success(env.book(first["id"], "client-o"), "booked")
    [in_sim] = env.sim.booked()
    assert (in_sim.family, in_sim.given) == (name, "Seán")  # SRM: escaped on the wire, unescaped by the filler
    sent = [m for m in env.sim.sim.received if b"SRM^S01" in m][-1]
    assert b"O'Brien\\F\\\\S\\\\R\\\\E\\\\T\\" in sent
    env.settle_siu()
    siu = env.sim.sim.siu_sent[-1]
    assert b"O'Brien\\F\\\\S\\\\R\\\\E\\\\T\\" in siu
    # The FHIR side shows the name as the SIU told it.
    bundle = env.http.get(
        f"/Appointment?_id={booked['id']}&_include=Appointment:actor", headers={"Accept": "application/fhir+json"}
    ).json()
    read = env.http.get("/Patient/PAT3", headers={"Accept": "application/fhir+json"}).json()
    assert read["name"][0]["family"] == name and read["name"][0]["given"] == ["Seán"], read
    appt = env.read(booked["id"]).json()
    assert any(p["actor"].get("display") == f"Seán {name}" for p in appt["participant"] if actor_id(appt, "Patient")), (
        appt
    )
    assert bundle["resourceType"] == "Bundle"


def test_issue8_4_race_twenty_holds_one_slot(env: Hl7Env) -> None:
    first = env.find(day=1)[0]

    def hold(i: int) -> httpx.Response:
        with httpx.Client(base_url=env.base, timeout=60) as http:
            return http.post(
                "/Appointment/$hold",
                json=parameters(ref(first["id"])),
                headers={"Content-Type": "application/fhir+json", "X-Client-Id": f"holder-{i}"},
            )

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(hold, range(20)))
    assert sorted(r.status_code for r in responses) == [200] + [409] * 19
    assert env.sim.booked() == []  # a hold never reaches the legacy scheduler


def test_issue8_2_reschedule_into_a_taken_time_is_409_and_keeps_the_original(env: Hl7Env) -> None:
    first, second = env.find(day=1)[:2]
    booked = success(env.book(first["id"], "client-r"), "booked")
    taken = success(env.book(second["id"], "client-s"), "booked")
    resource = {
        "resourceType": "Appointment",
        "id": booked["id"],
        "status": "booked",
        "start": taken["start"],
        "end": taken["end"],
        "participant": participants(),
    }
    failure(env.book(resource=resource, client="client-r"), 409, "conflict", "is booked")
    read = env.read(booked["id"]).json()
    assert (read["start"], read["end"]) == (first["start"], first["end"])
    env.assert_agreement()
