"""ITI-116 ``$hold`` and ITI-117 ``$book`` end to end: real uvicorn, real HTTP (httpx), real databases.

Each flow runs against the embedded SQLite demo and, where the SQL write path matters, PostgreSQL
and MariaDB over ODBC as well. Every answer is checked with the conformance helpers, and every
"nothing was written" claim is checked in the legacy tables themselves.

One server per database per module (starting uvicorn per test would dominate the runtime); each
test takes its own free slots from a fresh ``$find``, so tests do not depend on each other.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from dbutil import legacy_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dbutil
from apputil import MovableClock
from conformance import assert_avail_bundle, assert_ihe_appointment, assert_operation_outcome
from serverutil import ThreadServer

from adapter.backends.sql.db import CommitOutcomeUnknown
from adapter.demo.seed import ensure_demo_database
from adapter.scheduling.proposals import Proposal, ProposalCodec
from adapter.server import build_app
from adapter.settings import Settings

REPO = Path(__file__).resolve().parents[2]
MAPPING = REPO / "mappings" / "demo.yaml"
ZONE = ZoneInfo("America/New_York")
SECRET = "e2e-hold-book-secret-0123456789"
PATIENT = "5"
SPEARS = "SPEARSB"  # works Mon-Fri 09:00-17:00 at Location/1 (adapter/demo/seed.py)
HOLD_EXPIRATION_URL = "https://sched-adapter.example.org/fhir/StructureDefinition/hold-expiration"
STATUS_REASON_URL = "https://profiles.ihe.net/ITI/Scheduling/StructureDefinition/extension-status-reason"
STATUS_REASON_SYSTEM = "https://profiles.ihe.net/ITI/Scheduling/CodeSystem/status-reason"


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def local_day(days_ahead: int) -> dt.datetime:
    day = dt.datetime.now(ZONE).date() + dt.timedelta(days=days_ahead)
    return dt.datetime.combine(day, dt.time(), tzinfo=ZONE)


def parse_instant(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def legacy_date_time(instant: str) -> tuple[int, int]:
    """A FHIR instant -> the legacy (APPT_DT YYYYMMDD, APPT_TM HHMM) in the mapping's zone."""
    t = parse_instant(instant).astimezone(ZONE)
    return t.year * 10000 + t.month * 100 + t.day, t.hour * 100 + t.minute


def parameters(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": list(entries)}


def ref_param(token: str, name: str = "appointment-reference") -> dict[str, Any]:
    return {"name": name, "valueReference": {"reference": f"Appointment/{token}"}}


def appointments_of(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", []) if e["resource"]["resourceType"] == "Appointment"]


def issues_of(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        i
        for e in bundle.get("entry", [])
        if e["resource"]["resourceType"] == "OperationOutcome"
        for i in e["resource"]["issue"]
    ]


def actor_id(appt: dict[str, Any], kind: str) -> str | None:
    for p in appt["participant"]:
        ref = p.get("actor", {}).get("reference", "")
        if ref.startswith(kind + "/"):
            return ref.split("/", 1)[1]
    return None


def slot_of(appt: dict[str, Any]) -> tuple[str | None, dt.datetime]:
    return actor_id(appt, "Practitioner"), parse_instant(appt["start"])


def overlaps(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (
        actor_id(a, "Practitioner") == actor_id(b, "Practitioner")
        and parse_instant(a["start"]) < parse_instant(b["end"])
        and parse_instant(b["start"]) < parse_instant(a["end"])
    )


def assert_success(resp: httpx.Response, status: str) -> dict[str, Any]:
    """A successful $hold/$book: 200, avail bundle, total 1, one Appointment with ``status``."""
    assert resp.status_code == 200, resp.text
    bundle = resp.json()
    assert_avail_bundle(bundle)
    assert bundle["total"] == 1
    found = appointments_of(bundle)
    assert len(found) == 1, bundle
    assert found[0]["status"] == status
    assert_ihe_appointment(found[0])
    return found[0]


def assert_failure(resp: httpx.Response, status: int, code: str, *fragments: str) -> list[dict[str, Any]]:
    """REQ-GEN-20: searchset Bundle, total 0, only a fatal OperationOutcome naming the problem."""
    assert resp.status_code == status, resp.text
    bundle = resp.json()
    assert_avail_bundle(bundle)
    assert bundle["type"] == "searchset" and bundle["total"] == 0
    assert appointments_of(bundle) == []
    assert all(e["resource"]["resourceType"] == "OperationOutcome" for e in bundle["entry"])
    for e in bundle["entry"]:
        assert_operation_outcome(e["resource"])
    issues = issues_of(bundle)
    assert issues[0]["severity"] == "fatal" and issues[0]["code"] == code, issues
    text = " ".join(i.get("diagnostics", "") for i in issues)
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"
    return issues


class LegacyDb:
    """Direct access to the legacy tables, to check what was (not) written."""

    def __init__(self, kind: str, target: str) -> None:
        self.kind = kind
        self.target = target  # SQLite path or ODBC DSN

    def rows(self, sql: str, *params: Any) -> list[tuple]:
        return legacy_rows(self.kind, self.target, sql, *params)

    def count_appts(self) -> int:
        return self.rows("SELECT COUNT(*) FROM APPT")[0][0]

    def blocking_at(self, appt: dict[str, Any]) -> list[tuple]:
        """Blocking legacy rows of the appointment's practitioner starting at its start."""
        day, hhmm = legacy_date_time(appt["start"])
        return self.rows(
            "SELECT APPT_ID, PAT_ID, STATUS_CD, DUR_MIN, BOOKED_BY FROM APPT WHERE TRIM(PROV_ID) = ? "
            "AND APPT_DT = ? AND APPT_TM = ? AND STATUS_CD IN ('S', 'A', 'D', 'N')",
            actor_id(appt, "Practitioner"),
            day,
            hhmm,
        )

    def appt(self, appt_id: str) -> tuple:
        rows = self.rows(
            "SELECT APPT_DT, APPT_TM, DUR_MIN, STATUS_CD, CANCEL_RSN, NOTE_TXT, TRIM(PROV_ID), PAT_ID "
            "FROM APPT WHERE APPT_ID = ?",
            int(appt_id),
        )
        assert len(rows) == 1
        return rows[0]


class Api:
    """A FHIR client for one server, with the calls these tests make."""

    def __init__(self, base_url: str, db: LegacyDb, state_path: Path) -> None:
        self.base = base_url.rstrip("/") + "/fhir"
        self.http = httpx.Client(base_url=self.base, timeout=60)
        self.db = db
        self.state_path = state_path

    def close(self) -> None:
        self.http.close()

    def post(
        self, path: str, body: dict[str, Any], client: str | None = None, key: str | None = None
    ) -> httpx.Response:
        headers = {"Content-Type": "application/fhir+json"}
        if client:
            headers["X-Client-Id"] = client
        if key:
            headers["Idempotency-Key"] = key
        return self.http.post(path, json=body, headers=headers)

    def find(
        self,
        *,
        days: tuple[int, int] = (1, 8),
        practitioner: str | None = SPEARS,
        client: str = "finder",
        patient: str | None = PATIENT,
        count: int = 200,
        visit_type: str | None = None,
    ) -> list[dict[str, Any]]:
        entries = [
            {"name": "start", "valueDateTime": local_day(days[0]).isoformat()},
            {"name": "end", "valueDateTime": local_day(days[1]).isoformat()},
            {"name": "_count", "valueInteger": count},
        ]
        if practitioner:
            entries.append({"name": "practitioner", "valueReference": {"reference": f"Practitioner/{practitioner}"}})
        if patient:
            entries.append({"name": "patient-reference", "valueReference": {"reference": f"Patient/{patient}"}})
        if visit_type:
            entries.append({"name": "visit-type", "valueString": visit_type})
        resp = self.post("/Appointment/$find", parameters(*entries), client=client)
        assert resp.status_code == 200, resp.text
        bundle = resp.json()
        assert_avail_bundle(bundle)
        return appointments_of(bundle)

    def free_slot(self, **kw: Any) -> dict[str, Any]:
        found = self.find(**kw)
        assert found, "no free slot offered"
        return found[0]

    def hold(self, token: str, client: str | None, key: str | None = None) -> httpx.Response:
        return self.post("/Appointment/$hold", parameters(ref_param(token)), client=client, key=key)

    def book(
        self,
        token: str | None = None,
        client: str | None = None,
        *,
        key: str | None = None,
        resource: dict[str, Any] | None = None,
        extra: tuple[dict[str, Any], ...] = (),
    ) -> httpx.Response:
        entries = [ref_param(token)] if token else []
        if resource is not None:
            entries.append({"name": "appointment-resource", "resource": resource})
        return self.post("/Appointment/$book", parameters(*entries, *extra), client=client, key=key)

    def read(self, appt_id: str) -> httpx.Response:
        return self.http.get(f"/Appointment/{appt_id}", headers={"Accept": "application/fhir+json"})

    def offered(self, appt: dict[str, Any], client: str = "finder") -> bool:
        """Is (practitioner, start) of ``appt`` offered by a fresh $find?"""
        start = parse_instant(appt["start"]).astimezone(ZONE)
        days = (
            (start.date() - dt.datetime.now(ZONE).date()).days,
            (start.date() - dt.datetime.now(ZONE).date()).days + 1,
        )
        found = self.find(days=days, practitioner=actor_id(appt, "Practitioner"), client=client, count=500)
        return slot_of(appt) in {slot_of(a) for a in found}

    def state_rows(self, sql: str, *params: Any) -> list[tuple]:
        conn = sqlite3.connect(self.state_path)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()


def settings_for(tmp: Path, database_url: str, base_url: str, **sections: dict[str, Any]) -> Settings:
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "base_url": base_url + "/fhir"},
        "backend": {"mapping": str(MAPPING), "database_url": database_url, "pool_size": 4, "timeout_seconds": 5},
        "state": {"path": str(tmp / "state.sqlite")},
        "security": {"auth": "off", "signing_secret": SECRET},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return Settings.model_validate(data)


@contextmanager
def running_api(
    tmp: Path, kind: str, target: str, clock: MovableClock | None = None, **sections: dict[str, Any]
) -> Iterator[Api]:
    """uvicorn in a thread serving build_app() for the given legacy database (on ``clock`` if given)."""
    url = f"sqlite:///{target}" if kind == "sqlite" else f"odbc:{target}"  # odbc-sqlite: a DSN too
    holder: dict[str, Settings] = {}
    app_clock = clock or MovableClock()
    server = ThreadServer(lambda: build_app(holder["settings"], clock=app_clock), factory=True)
    holder["settings"] = settings_for(tmp, url, server.base_url, **sections)
    server.start()
    api = Api(server.base_url, LegacyDb(kind, target), tmp / "state.sqlite")
    api.server = server  # type: ignore[attr-defined]
    api.clock = app_clock  # type: ignore[attr-defined]
    try:
        yield api
    finally:
        api.close()
        server.stop()


def seeded(kind: str, tmp: Path) -> str:
    if kind == "sqlite":
        path = tmp / "demo.sqlite"
        ensure_demo_database(path, today=dt.date.today())
        return str(path)
    return dbutil.seed_demo_database(kind, f"e2e_{kind}")


@pytest.fixture(scope="module", params=["sqlite", dbutil.POSTGRESQL, dbutil.MARIADB])
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One server per legacy database kind for the whole module."""
    kind = request.param
    if kind != "sqlite":
        request.getfixturevalue("pg_admin_dsn" if kind == dbutil.POSTGRESQL else "mariadb_admin_dsn")
    tmp = tmp_path_factory.mktemp(f"e2e-{kind}")
    target = seeded(kind, tmp)
    try:
        with running_api(tmp, kind, target) as a:
            yield a
    finally:
        if kind != "sqlite":
            dbutil.drop_database(kind, dbutil.database_name_from_dsn(target))


@pytest.fixture(scope="module")
def sq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """The SQLite server alone, for behaviour that does not depend on the SQL dialect."""
    tmp = tmp_path_factory.mktemp("e2e-sq")
    with running_api(tmp, "sqlite", seeded("sqlite", tmp)) as a:
        yield a


@pytest.fixture(scope="module")
def short_ttl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """A SQLite server on a movable clock whose holds last 60 s; the expiry job runs at startup and then
    hourly, so within these tests expiry is checked on read."""
    tmp = tmp_path_factory.mktemp("e2e-ttl")
    with running_api(tmp, "sqlite", seeded("sqlite", tmp), hold={"ttl_seconds": 60, "sweep_seconds": 3600}) as a:
        yield a


def two_overlapping(api: Api, **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two offered slots of one practitioner that overlap (20-minute visits on a 10-minute grid)."""
    found = api.find(**kw)
    for a in found:
        for b in found:
            if a is not b and overlaps(a, b) and parse_instant(b["start"]) > parse_instant(a["start"]):
                return a, b
    raise AssertionError("no overlapping pair of proposed appointments offered")


def apart(api: Api, first: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """An offered slot of the same practitioner that does not overlap ``first``."""
    for a in api.find(**kw):
        if not overlaps(a, first) and actor_id(a, "Practitioner") == actor_id(first, "Practitioner"):
            return a
    raise AssertionError("no second free slot")


def participants(patient: str = PATIENT, practitioner: str = SPEARS, location: str = "1") -> list[dict[str, Any]]:
    return [
        {"actor": {"reference": f"Practitioner/{practitioner}"}, "status": "accepted"},
        {"actor": {"reference": f"Location/{location}"}, "status": "accepted"},
        {"actor": {"reference": f"Patient/{patient}"}, "status": "accepted"},
    ]


# --------------------------------------------------------------------------------------------------
# Happy paths, on every database
# --------------------------------------------------------------------------------------------------
def test_req_116_04_find_hold_book_read(api: Api) -> None:
    proposed = api.free_slot()
    token = proposed["id"]

    held = assert_success(api.hold(token, "client-a"), "pending")
    assert held["id"] == token  # REQ-116-05
    assert (held["start"], held["end"]) == (proposed["start"], proposed["end"])
    expiry = [e["valueDateTime"] for e in held.get("extension", []) if e["url"] == HOLD_EXPIRATION_URL]
    assert len(expiry) == 1 and parse_instant(expiry[0]).utcoffset() is not None  # REQ-116-06
    hold_bundle = api.hold(token, "client-a").json()
    assert any(i["severity"] == "information" for i in issues_of(hold_bundle))
    read_held = api.read(token)
    assert read_held.status_code == 200 and read_held.json()["status"] == "pending"
    assert_ihe_appointment(read_held.json())

    booked = assert_success(api.book(token, "client-a"), "booked")
    assert (booked["start"], booked["end"]) == (proposed["start"], proposed["end"])
    assert actor_id(booked, "Patient") == PATIENT and actor_id(booked, "Practitioner") == SPEARS
    read = api.read(booked["id"])
    assert read.status_code == 200
    assert_ihe_appointment(read.json())
    assert read.json()["status"] == "booked" and read.json()["start"] == proposed["start"]

    rows = api.db.blocking_at(proposed)
    assert len(rows) == 1 and str(rows[0][0]) == booked["id"]
    assert rows[0][1] == int(PATIENT) and rows[0][2].strip() == "S" and rows[0][4].strip() == "client-a"
    # REQ-117-06: the booking replaced the hold.
    assert api.state_rows("SELECT COUNT(*) FROM holds WHERE id = ?", token) == [(0,)]
    assert api.read(token).status_code == 404
    assert not api.offered(proposed)


def test_req_117_02_find_then_book_directly(api: Api) -> None:
    proposed = api.free_slot()
    before = api.db.count_appts()
    booked = assert_success(api.book(proposed["id"], "client-direct"), "booked")
    assert api.db.count_appts() == before + 1
    assert [str(r[0]) for r in api.db.blocking_at(proposed)] == [booked["id"]]
    assert not api.offered(proposed)


def test_req_117_07_reschedule_moves_booking(api: Api) -> None:
    first = api.free_slot()
    booked = assert_success(api.book(first["id"], "client-r"), "booked")
    target = apart(api, first, days=(2, 9))
    resource = {
        "resourceType": "Appointment",
        "id": booked["id"],
        "status": "booked",
        "start": target["start"],
        "end": target["end"],
        "participant": participants(),
        "comment": "moved by the patient",
    }
    moved = assert_success(api.book(resource=resource, client="client-r"), "booked")
    assert moved["id"] == booked["id"]
    assert (moved["start"], moved["end"]) == (target["start"], target["end"])
    assert moved.get("comment") == "moved by the patient"
    day, hhmm = legacy_date_time(target["start"])
    row = api.db.appt(booked["id"])
    assert (row[0], row[1], row[2], row[3].strip()) == (day, hhmm, 20, "S")
    assert api.offered(first)  # the old time is free again
    assert not api.offered(target)


def test_req_117_08_reschedule_conflict_keeps_original(api: Api) -> None:
    a = api.free_slot()
    booked_a = assert_success(api.book(a["id"], "client-c"), "booked")
    b = apart(api, a)
    booked_b = assert_success(api.book(b["id"], "client-c"), "booked")
    original = api.db.appt(booked_a["id"])
    resource = {
        "resourceType": "Appointment",
        "id": booked_a["id"],
        "status": "booked",
        "start": booked_b["start"],
        "end": booked_b["end"],
        "participant": participants(),
    }
    assert_failure(api.book(resource=resource, client="client-c"), 409, "conflict", "already booked")
    assert api.db.appt(booked_a["id"]) == original
    # A time held by another client is not free either.
    c = apart(api, a, days=(3, 10))
    assert_success(api.hold(c["id"], "client-other"), "pending")
    resource.update(start=c["start"], end=c["end"])
    assert_failure(api.book(resource=resource, client="client-c"), 409, "conflict", "held by another client")
    assert api.db.appt(booked_a["id"]) == original
    read = api.read(booked_a["id"]).json()
    assert (read["start"], read["end"]) == (booked_a["start"], booked_a["end"])


def test_req_117_09_cancel_frees_slot_and_updates_legacy_status(api: Api) -> None:
    proposed = api.free_slot()
    booked = assert_success(api.book(proposed["id"], "client-x"), "booked")
    resource = {
        "resourceType": "Appointment",
        "id": booked["id"],
        "status": "cancelled",
        "cancelationReason": {
            "coding": [{"system": STATUS_REASON_SYSTEM, "code": "patient-cancel"}],
            "text": "Patient called to cancel",
        },
        "participant": participants(),
    }
    cancelled = assert_success(api.book(resource=resource, client="client-x"), "cancelled")
    assert cancelled["cancelationReason"]["text"] == "Patient called to cancel"
    assert any(c["code"] == "patient-cancel" for c in cancelled["cancelationReason"].get("coding", []))
    row = api.db.appt(booked["id"])
    assert row[3].strip() == "P" and row[4].strip() == "Patient called to cancel"
    assert api.offered(proposed)
    read = api.read(booked["id"]).json()
    assert_ihe_appointment(read)
    assert read["status"] == "cancelled"
    # Cancelling again changes nothing and still answers 200.
    assert_success(api.book(resource=resource, client="client-x"), "cancelled")


# --------------------------------------------------------------------------------------------------
# Holds: conflicts, expiry, idempotency (SQLite; the locking itself is covered per database in
# test_booking_races.py)
# --------------------------------------------------------------------------------------------------
def test_req_116_08_held_slot_conflicts_for_other_client(sq: Api) -> None:
    first, overlapping = two_overlapping(sq)
    held = assert_success(sq.hold(first["id"], "client-a"), "pending")
    assert not sq.offered(first, client="client-b")  # ITI-115: held appointments are never offered
    assert not sq.offered(first, client="client-a")
    before = sq.db.count_appts()
    issues = assert_failure(sq.hold(first["id"], "client-b"), 409, "conflict", "held by another client")
    assert any(i["severity"] == "fatal" and i["code"] == "not-found" for i in issues)  # REQ-116-09
    assert_failure(sq.book(first["id"], "client-b"), 409, "conflict", "held by another client")
    assert_failure(sq.hold(overlapping["id"], "client-b"), 409, "conflict")
    assert_failure(sq.book(overlapping["id"], "client-b"), 409, "conflict", "held by another client")
    assert_failure(sq.book(first["id"]), 409, "conflict")  # anonymous is "another client" too
    assert sq.db.count_appts() == before
    # REQ-116-11: the holder holding again gets the same hold, not extended.
    again = assert_success(sq.hold(first["id"], "client-a"), "pending")
    assert again["extension"] == held["extension"]
    booked = assert_success(sq.book(first["id"], "client-a"), "booked")
    assert [str(r[0]) for r in sq.db.blocking_at(first)] == [booked["id"]]


def move_past_expiry(api: Api, held: dict[str, Any]) -> None:
    """Move the server's clock past the hold's expiry instead of sleeping until then."""
    expires = parse_instant(next(e["valueDateTime"] for e in held["extension"] if e["url"] == HOLD_EXPIRATION_URL))
    clock: MovableClock = api.clock  # type: ignore[attr-defined]  # set by running_api
    assert expires - clock() <= dt.timedelta(seconds=61)  # ttl 60 s, whole seconds
    clock.advance_past(expires)


def test_req_116_07_expired_hold_frees_slot(short_ttl: Api) -> None:
    proposed = short_ttl.free_slot()
    held = assert_success(short_ttl.hold(proposed["id"], "client-a"), "pending")
    assert not short_ttl.offered(proposed, client="client-b")
    assert_failure(short_ttl.hold(proposed["id"], "client-b"), 409, "conflict")
    move_past_expiry(short_ttl, held)  # the sweep job has not run since: expiry is checked on read
    assert short_ttl.offered(proposed, client="client-b")
    # The hold is gone; the proposal itself is still valid, so its fullUrl reads as proposed (issue 7).
    after = short_ttl.read(proposed["id"])
    assert after.status_code == 200 and after.json()["status"] == "proposed"
    assert_success(short_ttl.hold(proposed["id"], "client-b"), "pending")
    assert_failure(short_ttl.book(proposed["id"], "client-a"), 409, "conflict")  # now b's
    booked = assert_success(short_ttl.book(proposed["id"], "client-b"), "booked")
    assert [str(r[0]) for r in short_ttl.db.blocking_at(proposed)] == [booked["id"]]


def test_req_116_07_expired_hold_can_be_booked_by_anyone(short_ttl: Api) -> None:
    proposed = short_ttl.free_slot()
    move_past_expiry(short_ttl, assert_success(short_ttl.hold(proposed["id"], "client-a"), "pending"))
    booked = assert_success(short_ttl.book(proposed["id"], "client-c"), "booked")
    assert [str(r[0]) for r in short_ttl.db.blocking_at(proposed)] == [booked["id"]]


def test_req_117_09_cancel_of_a_hold_releases_it(sq: Api) -> None:
    proposed = sq.free_slot()
    assert_success(sq.hold(proposed["id"], "client-h"), "pending")
    resource = {
        "resourceType": "Appointment",
        "id": proposed["id"],
        "status": "cancelled",
        "participant": participants(),
    }
    assert_failure(sq.book(resource=resource, client="client-other"), 409, "conflict", "held by another client")
    assert not sq.offered(proposed)
    cancelled = assert_success(sq.book(resource=resource, client="client-h"), "cancelled")
    assert cancelled["id"] == proposed["id"]
    assert sq.offered(proposed)


def test_req_117_09_cancel_reason_from_status_reason_extension(sq: Api) -> None:
    proposed = sq.free_slot()
    booked = assert_success(sq.book(proposed["id"], "client-e"), "booked")
    resource = {
        "resourceType": "Appointment",
        "id": booked["id"],
        "status": "cancelled",
        "extension": [
            {
                "url": STATUS_REASON_URL,
                "valueCodeableConcept": {
                    "coding": [{"system": STATUS_REASON_SYSTEM, "code": "staff-cancel", "display": "Staff Cancel"}],
                    "text": "Doctor ill " * 10,
                },
            }
        ],  # longer than CANCEL_RSN: cut to the column, not refused
        "participant": participants(),
    }
    cancelled = assert_success(sq.book(resource=resource, client="client-e"), "cancelled")
    assert any(c["code"] == "staff-cancel" for c in cancelled["cancelationReason"]["coding"])
    row = sq.db.appt(booked["id"])
    assert row[3].strip() == "C" and row[4].startswith("Doctor ill") and len(row[4]) <= 40
    assert sq.offered(proposed)


def test_req_117_07_reschedule_by_ten_minutes_overlapping_itself(sq: Api) -> None:
    first, later = two_overlapping(sq, days=(4, 11))
    booked = assert_success(sq.book(first["id"], "client-s"), "booked")
    resource = {
        "resourceType": "Appointment",
        "id": booked["id"],
        "status": "booked",
        "start": later["start"],
        "end": later["end"],
        "participant": participants(),
    }
    moved = assert_success(sq.book(resource=resource, client="client-s"), "booked")
    assert moved["start"] == later["start"]
    assert [str(r[0]) for r in sq.db.blocking_at(later)] == [booked["id"]]
    assert sq.db.blocking_at(first) == []


def test_req_117_16_idempotency_same_key_books_once(sq: Api) -> None:
    proposed = sq.free_slot()
    before = sq.db.count_appts()
    first = sq.book(proposed["id"], "client-i", key="key-1")
    second = sq.book(proposed["id"], "client-i", key="key-1")
    assert first.status_code == second.status_code == 200
    assert first.content == second.content  # the same answer, byte for byte
    assert second.headers.get("Idempotent-Replayed") == "true"
    assert sq.db.count_appts() == before + 1
    other = sq.free_slot()
    assert_failure(sq.book(other["id"], "client-i", key="key-1"), 422, "business-rule", "different request")
    assert sq.db.count_appts() == before + 1
    assert sq.offered(other)
    # The key is scoped to the client: another client's key-1 is a different key.
    assert_success(sq.book(other["id"], "client-j", key="key-1"), "booked")


def test_req_117_16_idempotent_failure_is_replayed(sq: Api) -> None:
    proposed = sq.free_slot()
    assert_success(sq.hold(proposed["id"], "client-a"), "pending")
    first = sq.book(proposed["id"], "client-b", key="fail-key")
    assert_failure(first, 409, "conflict")
    second = sq.book(proposed["id"], "client-b", key="fail-key")
    assert (second.status_code, second.content) == (409, first.content)


def test_req_116_11_hold_idempotency_key(sq: Api) -> None:
    proposed = sq.free_slot()
    first = sq.hold(proposed["id"], None, key="hold-key")  # anonymous, but the key identifies the retry
    second = sq.hold(proposed["id"], None, key="hold-key")
    assert first.status_code == second.status_code == 200
    assert first.content == second.content
    assert sq.state_rows("SELECT COUNT(*) FROM holds WHERE id = ?", proposed["id"]) == [(1,)]
    assert_failure(sq.hold(proposed["id"], None), 409, "conflict")  # without the key: another anonymous caller


def test_req_117_booking_same_id_again_by_same_client_returns_it(sq: Api) -> None:
    proposed = sq.free_slot()
    booked = assert_success(sq.book(proposed["id"], "client-again"), "booked")
    again = assert_success(sq.book(proposed["id"], "client-again"), "booked")
    assert again["id"] == booked["id"]
    assert "already booked by this client" in " ".join(
        i["diagnostics"] for i in issues_of(sq.book(proposed["id"], "client-again").json())
    )
    assert len(sq.db.blocking_at(proposed)) == 1
    assert_failure(sq.book(proposed["id"], "client-stranger"), 409, "conflict", "already booked")


# --------------------------------------------------------------------------------------------------
# Bad input: the right status, an OperationOutcome naming the problem, and no legacy row
# --------------------------------------------------------------------------------------------------
def _mint(api: Api, **changes: Any) -> str:
    """A correctly signed proposed id (the test knows the server secret), e.g. an expired one."""
    codec = ProposalCodec(SECRET.encode(), None, dt.timedelta(seconds=3600))  # type: ignore[arg-type]
    start = local_day(2).replace(hour=10).astimezone(dt.UTC)
    now = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
    fields = dict(
        practitioner_id=SPEARS,
        location_id="1",
        start=start,
        minutes=20,
        visit_type_key="FOLLOW",
        patient_ids=(PATIENT,),
        issued=now,
        window_start=start,
        window_end=start + dt.timedelta(minutes=20),
    )
    fields.update(changes)
    return asyncio.run(codec.encode(Proposal(**fields)))  # compact: the store (None) is not used


def test_req_116_10_unknown_tampered_expired_ids_are_404(api: Api) -> None:
    proposed = api.free_slot()
    token = proposed["id"]
    tampered = token[:-1] + ("0" if token[-1] != "0" else "1")
    moved = token.replace(".FOLLOW.", ".NEWPT.")
    expired = _mint(api, issued=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2))
    unknown_stored = "r" + "0" * 20
    before = api.db.count_appts()
    for bad in (tampered, moved, expired, unknown_stored, "nonsense"):
        assert_failure(api.hold(bad, "client-a"), 404, "not-found")
        assert_failure(api.book(bad, "client-a"), 404, "not-found")
    assert_failure(api.hold(expired, "client-a"), 404, "not-found", "expired")
    assert_failure(api.book(tampered, "client-a"), 404, "not-found", "not a proposed appointment issued by this server")
    # Modify and cancel of an unknown appointment (REQ-117-10).
    for status in ("booked", "cancelled"):
        resource = {
            "resourceType": "Appointment",
            "id": "987654",
            "status": status,
            "start": proposed["start"],
            "end": proposed["end"],
            "participant": participants(),
        }
        assert_failure(api.book(resource=resource, client="client-a"), 404, "not-found", "Appointment/987654")
    assert api.db.count_appts() == before
    assert api.state_rows(
        "SELECT COUNT(*) FROM holds WHERE client = 'client-a' AND id IN (?, ?, ?)", tampered, moved, expired
    ) == [(0,)]


def test_req_117_04_wrong_status_is_400(api: Api) -> None:
    proposed = api.free_slot()
    before = api.db.count_appts()
    for status in ("arrived", "fulfilled", "noshow"):
        resource = {
            "resourceType": "Appointment",
            "id": proposed["id"],
            "status": status,
            "start": proposed["start"],
            "end": proposed["end"],
            "participant": participants(),
        }
        assert_failure(
            api.book(resource=resource, client="client-a"), 400, "invalid", repr(status), "appointment-resource.status"
        )
    assert_failure(api.book(client="client-a"), 400, "invalid", "appointment-reference or appointment-resource")
    assert api.db.count_appts() == before
    assert api.offered(proposed)


def test_req_117_outside_working_hours_is_400(api: Api) -> None:
    start = local_day(2).replace(hour=3)  # 03:00 local: nobody works
    resource = {
        "resourceType": "Appointment",
        "status": "pending",
        "start": start.isoformat(),
        "end": (start + dt.timedelta(minutes=20)).isoformat(),
        "participant": participants(),
    }
    before = api.db.count_appts()
    assert_failure(api.book(resource=resource, client="client-a"), 400, "invalid", "outside working hours")
    # Rescheduling an existing booking there is refused the same way and leaves it unchanged.
    proposed = api.free_slot()
    booked = assert_success(api.book(proposed["id"], "client-a"), "booked")
    original = api.db.appt(booked["id"])
    move = dict(resource, id=booked["id"], status="booked")
    assert_failure(api.book(resource=move, client="client-a"), 400, "invalid", "outside working hours")
    assert api.db.appt(booked["id"]) == original
    assert api.db.count_appts() == before + 1


def test_req_117_12_unknown_patient_is_422(api: Api) -> None:
    proposed = api.free_slot()
    before = api.db.count_appts()
    unknown = {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:sched-adapter:clinicware:mrn", "value": "MRN-NOPE"}],
    }
    assert_failure(
        api.book(proposed["id"], "client-a", extra=({"name": "patient-resource", "resource": unknown},)),
        422,
        "business-rule",
        "MRN-NOPE",
    )
    resource = {
        "resourceType": "Appointment",
        "status": "pending",
        "start": proposed["start"],
        "end": proposed["end"],
        "participant": participants(patient="999999"),
    }
    assert_failure(api.book(proposed["id"], "client-a", resource=resource), 422, "business-rule", "Patient/999999")
    assert api.db.count_appts() == before
    assert api.offered(proposed)


def test_req_117_13_no_patient_is_400(api: Api) -> None:
    proposed = api.free_slot(patient=None)
    before = api.db.count_appts()
    assert_failure(api.book(proposed["id"], "client-a"), 400, "invalid", "no patient")
    assert api.db.count_appts() == before


def test_req_116_02_hold_needs_exactly_one_reference(sq: Api) -> None:
    proposed = sq.free_slot()
    assert_failure(
        sq.post("/Appointment/$hold", parameters(), client="client-a"), 400, "invalid", "appointment-reference"
    )
    twice = parameters(ref_param(proposed["id"]), ref_param(proposed["id"]))
    assert_failure(sq.post("/Appointment/$hold", twice, client="client-a"), 400, "invalid", "got 2")
    not_appt = parameters({"name": "appointment-reference", "valueReference": {"reference": "Patient/5"}})
    assert_failure(sq.post("/Appointment/$hold", not_appt, client="client-a"), 400, "invalid", "Appointment")
    assert sq.state_rows("SELECT COUNT(*) FROM holds WHERE id = ?", proposed["id"]) == [(0,)]
    assert sq.offered(proposed)


def test_req_117_11_reference_and_resource_times_must_match(sq: Api) -> None:
    proposed = sq.free_slot()
    shifted = (parse_instant(proposed["start"]) + dt.timedelta(minutes=10)).isoformat()
    resource = {
        "resourceType": "Appointment",
        "status": "pending",
        "start": shifted,
        "end": proposed["end"],
        "participant": participants(),
    }
    before = sq.db.count_appts()
    assert_failure(sq.book(proposed["id"], "client-a", resource=resource), 400, "invalid", "differ")
    bad_time = dict(resource, start="2026-13-01T10:00:00Z")
    assert_failure(sq.book(proposed["id"], "client-a", resource=bad_time), 400, "structure", "appointment-resource")
    no_offset = dict(resource, start=proposed["start"][:19], end=proposed["end"][:19])
    issues = assert_failure(sq.book(proposed["id"], "client-a", resource=no_offset), 400, "structure")
    assert issues[0]["expression"] == ["appointment-resource"]
    assert sq.db.count_appts() == before


def test_req_117_unknown_practitioner_in_resource_is_400(sq: Api) -> None:
    start = local_day(2).replace(hour=10)
    resource = {
        "resourceType": "Appointment",
        "status": "pending",
        "start": start.isoformat(),
        "end": (start + dt.timedelta(minutes=20)).isoformat(),
        "participant": participants(practitioner="NOSUCHDOCTORX"),
    }
    before = sq.db.count_appts()
    assert_failure(sq.book(resource=resource, client="client-a"), 400, "invalid", "Practitioner/NOSUCHDOCTORX")
    assert sq.db.count_appts() == before


# --------------------------------------------------------------------------------------------------
# Legacy outages and crashes
# --------------------------------------------------------------------------------------------------
class TcpProxy:
    """A loopback TCP proxy in front of a database server whose link the test can cut and restore."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Refuse new connections and reset every open one, as a crashed or unplugged server would."""
        if self._listener is not None:
            # shutdown() first: on Linux close() alone does not wake the thread blocked in accept(),
            # and the socket would go on accepting connections.
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._pairs.append((client, server))
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.mark.parametrize("kind", [dbutil.POSTGRESQL, dbutil.MARIADB])
def test_req_gen_21_legacy_outage_is_503_and_leaves_nothing(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    dsn = request.getfixturevalue("fresh_pg_demo_dsn" if kind == dbutil.POSTGRESQL else "fresh_mariadb_demo_dsn")
    upstream = 5432 if kind == dbutil.POSTGRESQL else 3306
    proxy = TcpProxy(upstream)
    proxied = dsn.replace(f"PORT={upstream}", f"PORT={proxy.port}")
    assert proxied != dsn
    try:
        with running_api(tmp_path, kind, proxied) as a:
            a.db = LegacyDb(kind, dsn)  # the test itself reads the database directly
            first, second = a.find()[:2]
            before = a.db.count_appts()
            proxy.cut()
            for resp in (
                a.hold(first["id"], "client-o", key="outage-hold"),
                a.book(second["id"], "client-o", key="outage-book"),
            ):
                assert resp.status_code == 503, resp.text
                assert resp.headers.get("Retry-After")
                oo = resp.json()
                assert oo["resourceType"] == "OperationOutcome"
                assert_operation_outcome(oo)
                assert oo["issue"][0]["code"] == "transient"
                assert "Traceback" not in resp.text
            # Nothing written, nothing left behind: no hold, no idempotency record, no booking intent.
            assert a.db.count_appts() == before
            assert a.state_rows("SELECT COUNT(*) FROM holds") == [(0,)]
            assert a.state_rows("SELECT COUNT(*) FROM idempotency") == [(0,)]
            assert a.state_rows("SELECT COUNT(*) FROM journal WHERE state = 'intent'") == [(0,)]
            proxy.restore()
            # Pooled connections that died with the link are replaced, not failed one by one.
            for _ in range(8):
                assert a.find(days=(1, 2))
            # The same keys now work: the 503s did not consume them.
            assert_success(a.hold(first["id"], "client-o", key="outage-hold"), "pending")
            booked = assert_success(a.book(second["id"], "client-o", key="outage-book"), "booked")
            assert a.db.count_appts() == before + 1
            assert [str(r[0]) for r in a.db.blocking_at(second)] == [booked["id"]]
    finally:
        proxy.cut()


def test_req_gen_21_unreachable_sqlite_is_503(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "legacy.sqlite"
    with running_api(tmp_path, "sqlite", str(missing)) as a:
        token = _mint(a)
        for resp in (
            a.hold(token, "client-a", key="k1"),
            a.book(token, "client-a", key="k2"),
            a.post("/Appointment/$find", parameters()),
        ):
            assert resp.status_code == 503, resp.text
            assert resp.headers.get("Retry-After")
            assert resp.json()["issue"][0]["code"] == "transient"
        assert a.state_rows("SELECT COUNT(*) FROM holds") == [(0,)]
        assert a.state_rows("SELECT COUNT(*) FROM idempotency") == [(0,)]
        assert a.state_rows("SELECT COUNT(*) FROM journal") == [(0,)]


def test_crash_after_legacy_commit_is_settled_on_restart(tmp_path: Path) -> None:
    """The process dies between the legacy COMMIT and recording it: the booking is not lost.

    Simulated in-process: recording the outcome raises a BaseException (as if the process stopped
    there; uvicorn answers 500); the
    server is then stopped and a new one started over the same files. Its startup housekeeping
    finds the unfinished journal intent, looks the booking up in the legacy database, records it
    and releases the hold; the client's retry gets its appointment back, nothing is booked twice.
    """
    target = seeded("sqlite", tmp_path)
    with running_api(tmp_path, "sqlite", target) as a:
        proposed = a.free_slot()
        assert_success(a.hold(proposed["id"], "client-k"), "pending")
        store = _find_state_store(a)

        class SimulatedCrash(BaseException):  # not an Exception: nothing in the app may swallow it
            pass

        def crash(*args: Any, **kwargs: Any) -> None:
            raise SimulatedCrash("the process dies right after the legacy commit")

        store.journal_done = crash  # type: ignore[method-assign]
        resp = a.book(proposed["id"], "client-k")
        assert resp.status_code == 500 and "Traceback" not in resp.text
        assert len(a.db.blocking_at(proposed)) == 1  # committed in the legacy system
        assert a.state_rows("SELECT state FROM journal WHERE token = ?", proposed["id"]) == [("intent",)]
    with running_api(tmp_path, "sqlite", target) as b:
        deadline = time.monotonic() + 10
        while b.state_rows("SELECT state FROM journal WHERE token = ?", proposed["id"]) != [("done",)]:
            assert time.monotonic() < deadline, "startup housekeeping did not settle the journal"
            time.sleep(0.05)
        assert b.state_rows("SELECT COUNT(*) FROM holds") == [(0,)]
        legacy_id = str(b.db.blocking_at(proposed)[0][0])
        again = assert_success(b.book(proposed["id"], "client-k"), "booked")
        assert again["id"] == legacy_id
        assert_failure(b.hold(proposed["id"], "client-z"), 409, "conflict")
        assert len(b.db.blocking_at(proposed)) == 1


def test_commit_outcome_unknown_then_retry_gets_the_booking(tmp_path: Path) -> None:
    """The connection breaks during COMMIT but the commit went through: 503, then the retry (same
    Idempotency-Key) settles the journal from the legacy system and returns that booking."""
    target = seeded("sqlite", tmp_path)
    with running_api(tmp_path, "sqlite", target) as a:
        proposed = a.free_slot()
        db = _find_service(a).backend.db
        original_write = db.write
        broken = {"armed": True}

        @contextmanager
        def write_then_lose_connection(conn: Any, lock_sql: Any, lock_binds: Any, **kw: Any) -> Iterator[Any]:
            with original_write(conn, lock_sql, lock_binds, **kw) as cur:
                yield cur
            if broken.pop("armed", False):  # committed; now pretend the answer never arrived
                raise CommitOutcomeUnknown("simulated: connection lost during COMMIT")

        db.write = write_then_lose_connection
        first = a.book(proposed["id"], "client-u", key="unknown-outcome")
        assert first.status_code == 503 and first.headers.get("Retry-After")
        assert len(a.db.blocking_at(proposed)) == 1
        assert a.state_rows("SELECT state, owner FROM journal WHERE token = ?", proposed["id"]) == [("intent", None)]
        retry = assert_success(a.book(proposed["id"], "client-u", key="unknown-outcome"), "booked")
        assert retry["id"] == str(a.db.blocking_at(proposed)[0][0])
        assert len(a.db.blocking_at(proposed)) == 1
        assert a.state_rows("SELECT state FROM journal WHERE token = ?", proposed["id"]) == [("done",)]


def _find_service(a: Api) -> Any:
    app = a.server.config.loaded_app  # type: ignore[attr-defined]
    while not hasattr(app, "state"):
        app = app.app
    return app.state.fhir.service


def _find_state_store(a: Api) -> Any:
    return _find_service(a).state


def test_req_116_07_holds_survive_a_restart(live_server_process: Any, tmp_path: Path) -> None:
    """Hold, stop the server process, start it again: the holder books; others still see the slot
    taken (absent from $find, 409 on $hold) until the hold expires, then it is free again. The expiry is
    reached by one more restart, into a server on the same files whose clock is past it (no sleeping)."""
    from serverutil import free_port

    target = seeded("sqlite", tmp_path)
    port = free_port()
    ttl = 600
    config = tmp_path / "restart.toml"
    config.write_text(
        f"""
[server]
host = "127.0.0.1"
port = {port}
workers = 1
log_level = "warning"
[backend]
mapping = '{MAPPING}'
database_url = 'sqlite:///{target}'
[state]
path = '{tmp_path / "state.sqlite"}'
[hold]
ttl_seconds = {ttl}
[security]
auth = "off"
signing_secret = "{SECRET}"
""",
        encoding="utf-8",
    )
    argv = [sys.executable, "-m", "adapter.cli", "serve", "--config", str(config)]
    proc = live_server_process.start(argv, env={"PYTHONPATH": str(REPO)}, port=port, cwd=str(REPO), timeout=60)
    a = Api(proc.base_url, LegacyDb("sqlite", target), tmp_path / "state.sqlite")
    try:
        first = a.free_slot()
        second = apart(a, first)
        assert_success(a.hold(first["id"], "client-a"), "pending")
        kept = assert_success(a.hold(second["id"], "client-a"), "pending")
        expires = parse_instant(kept["extension"][0]["valueDateTime"])

        proc = live_server_process.restart(proc, timeout=60)
        for slot in (first, second):
            assert not a.offered(slot, client="client-b")
            assert_failure(a.hold(slot["id"], "client-b"), 409, "conflict")
        booked = assert_success(a.book(first["id"], "client-a"), "booked")
        assert [str(r[0]) for r in a.db.blocking_at(first)] == [booked["id"]]
        assert a.read(second["id"]).json()["status"] == "pending"

    finally:
        a.close()
    live_server_process.stop(proc)
    clock = MovableClock()
    clock.advance_past(expires)
    with running_api(tmp_path, "sqlite", target, clock, hold={"ttl_seconds": ttl}) as b:
        assert b.read(second["id"]).json()["status"] == "proposed"
        assert b.offered(second, client="client-b")
        assert_success(b.hold(second["id"], "client-b"), "pending")


def test_state_store_failure_after_commit_still_answers_the_booking(tmp_path: Path) -> None:
    """The legacy booking is committed but the state store cannot record it: the client still gets
    its 200, and the housekeeping job settles the journal later."""
    target = seeded("sqlite", tmp_path)
    with running_api(tmp_path, "sqlite", target) as a:
        proposed = a.free_slot()
        service = _find_service(a)
        original = service.state.journal_done

        def failing(*args: Any, **kwargs: Any) -> None:
            raise sqlite3.OperationalError("database is locked")

        service.state.journal_done = failing
        booked = assert_success(a.book(proposed["id"], "client-s"), "booked")
        service.state.journal_done = original
        assert [str(r[0]) for r in a.db.blocking_at(proposed)] == [booked["id"]]
        service.state.gate.lease_seconds = 0  # let housekeeping treat the intent as stale right away
        asyncio.run(service.housekeeping(dt.datetime.now(dt.UTC)))
        assert a.state_rows("SELECT state, appointment_id FROM journal WHERE token = ?", proposed["id"]) == [
            ("done", booked["id"])
        ]


def test_sqlite_through_odbc_books_exactly_once(tmp_path: Path) -> None:
    """The SQLite ODBC driver runs in autocommit with our own BEGIN IMMEDIATE: 12 concurrent
    bookings of one slot give exactly one row."""
    path = seeded("sqlite", tmp_path)
    with running_api(tmp_path, "odbc-sqlite", dbutil.sqlite_dsn(path)) as a:
        a.db = LegacyDb("sqlite", path)
        proposed = a.free_slot()
        results: list[int] = []

        def book(i: int) -> None:
            with httpx.Client(base_url=a.base, timeout=60) as c:
                results.append(
                    c.post(
                        "/Appointment/$book",
                        json=parameters(ref_param(proposed["id"])),
                        headers={"X-Client-Id": f"odbc-{i}"},
                    ).status_code
                )

        threads = [threading.Thread(target=book, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [200] + [409] * 11
        assert len(a.db.blocking_at(proposed)) == 1


# --------------------------------------------------------------------------------------------------
# Issue 7: booking integrity (the patient's own calendar, whose appointment it is, the slot grid)
# --------------------------------------------------------------------------------------------------
def legacy_exec(api: Api, sql: str, *params: Any) -> None:
    """A direct write to the legacy tables (what staff or another program would do)."""
    if api.db.kind == "sqlite":
        conn = sqlite3.connect(api.db.target)
        try:
            conn.execute(sql, params)
            conn.commit()
        finally:
            conn.close()
        return
    import pyodbc

    conn = pyodbc.connect(api.db.target, autocommit=True)
    try:
        conn.execute(sql, *params)
    finally:
        conn.close()


def diagnostics(resp: httpx.Response) -> str:
    return " ".join(i.get("diagnostics", "") for i in issues_of(resp.json()))


def same_time_groups(api: Api, patient: str, days: tuple[int, int], size: int) -> list[list[dict[str, Any]]]:
    """Proposals for ``patient`` at one start time with ``size`` different practitioners, per start time,
    the groups not overlapping each other."""
    by_start: dict[str, dict[str | None, dict[str, Any]]] = {}
    for a in api.find(days=days, practitioner=None, patient=patient, count=500):
        by_start.setdefault(a["start"], {}).setdefault(actor_id(a, "Practitioner"), a)
    groups: list[list[dict[str, Any]]] = []
    for pracs in by_start.values():
        group = list(pracs.values())[:size]
        if len(group) == size and not any(
            parse_instant(group[0]["start"]) < parse_instant(g[0]["end"])
            and parse_instant(g[0]["start"]) < parse_instant(group[0]["end"])
            for g in groups
        ):
            groups.append(group)
    return groups


def test_issue7_1_patient_calendar_spans_practitioners(api: Api) -> None:
    """$hold, $book and reschedule refuse a time that overlaps the patient's booking or hold with any
    practitioner (409 naming the other appointment, times in the mapping's zone)."""
    patient = "31"
    groups = same_time_groups(api, patient, (40, 47), 3)
    assert len(groups) >= 3, "not enough times offered by three practitioners"
    (a1, a2, a3), (b1, b2, b3), (c1, _, _) = groups[:3]
    before = api.db.count_appts()
    booked = assert_success(api.book(a1["id"], "client-p1"), "booked")
    # Practitioner conflicts state times in the mapping's zone too, and name the appointment (issue 7.8).
    resp = api.book(a1["id"], "client-p9")
    assert_failure(resp, 409, "conflict", f"already booked from {booked['start']} to {booked['end']}")
    assert f"Appointment/{booked['id']}" in diagnostics(resp)
    # A hold and a booking of the same patient at the same time with other practitioners: 409.
    for resp in (api.hold(a2["id"], "client-p2"), api.book(a3["id"], "client-p3")):
        assert_failure(resp, 409, "conflict", f"Patient/{patient} already has Appointment/{booked['id']}")
        assert f"from {booked['start']} to {booked['end']}" in diagnostics(resp)  # local time, as rendered
    # Another active hold for the patient blocks the patient too, for $hold and for $book.
    assert_success(api.hold(b1["id"], "client-p1"), "pending")
    for resp in (api.hold(b2["id"], "client-p2"), api.book(b3["id"], "client-p3")):
        assert_failure(resp, 409, "conflict", f"Patient/{patient} already has an appointment held")
        assert f"from {b1['start']} to {b1['end']}" in diagnostics(resp)
    assert api.db.count_appts() == before + 1
    # $find no longer offers the patient those times, with any practitioner.
    for a in api.find(days=(40, 47), practitioner=None, patient=patient, count=500):
        for taken in (a1, b1):
            assert not (
                parse_instant(a["start"]) < parse_instant(taken["end"])
                and parse_instant(taken["start"]) < parse_instant(a["end"])
            ), (a["start"], taken["start"])
    # Reschedule: moving another booking of the patient onto the booked time is 409, row untouched.
    other = assert_success(api.book(c1["id"], "client-p1"), "booked")
    original = api.db.appt(other["id"])
    resource = {
        "resourceType": "Appointment",
        "id": other["id"],
        "status": "booked",
        "start": a2["start"],
        "end": a2["end"],
        "participant": participants(patient, actor_id(a2, "Practitioner") or "", actor_id(a2, "Location") or ""),
    }
    resp = api.book(resource=resource, client="client-p1")  # same visit type (the default), same length
    assert_failure(resp, 409, "conflict", f"Patient/{patient} already has Appointment/{booked['id']}")
    assert api.db.appt(other["id"]) == original
    # The holder still books its own hold: its own hold is not a conflict.
    assert_success(api.book(b1["id"], "client-p1"), "booked")


def test_issue7_1_proposal_for_one_patient_cannot_be_booked_for_another(api: Api) -> None:
    proposed = api.free_slot(patient=PATIENT, days=(48, 55))
    before = api.db.count_appts()
    other = {"name": "patient-resource", "resource": {"resourceType": "Patient", "id": "6"}}
    resp = api.book(proposed["id"], "client-x", extra=(other,))
    assert_failure(resp, 422, "business-rule", f"proposed for Patient/{PATIENT}", "Patient/6")
    resource = {"resourceType": "Appointment", "status": "proposed", "participant": participants(patient="6")}
    assert_failure(api.book(proposed["id"], "client-x", resource=resource), 422, "business-rule", "Patient/6")
    assert api.db.count_appts() == before
    # Naming the patient it was proposed for is fine.
    same = {"name": "patient-resource", "resource": {"resourceType": "Patient", "id": PATIENT}}
    assert_success(api.book(proposed["id"], "client-x", extra=(same,)), "booked")


def test_issue7_2_cancel_and_reschedule_check_the_patient(api: Api) -> None:
    """A Patient participant that is not the appointment's patient is 409 and changes nothing; a
    request without a Patient participant is accepted (no token-based authorization yet)."""
    first = api.free_slot(days=(56, 63))
    booked = assert_success(api.book(first["id"], "client-o"), "booked")
    target = apart(api, first, days=(56, 63))
    original = api.db.appt(booked["id"])
    cancel = {
        "resourceType": "Appointment",
        "id": booked["id"],
        "status": "cancelled",
        "participant": participants("6"),
    }
    move = {
        "resourceType": "Appointment",
        "id": booked["id"],
        "status": "booked",
        "start": target["start"],
        "end": target["end"],
        "participant": participants("6"),
    }
    for resource in (cancel, move):
        resp = api.book(resource=resource, client="client-o")
        assert_failure(resp, 409, "conflict", f"Appointment/{booked['id']} is not an appointment of Patient/6")
        assert api.db.appt(booked["id"]) == original
    move["participant"] = participants()[:2]  # Practitioner and Location only: accepted
    moved = assert_success(api.book(resource=move, client="client-o"), "booked")
    assert moved["start"] == target["start"]
    cancel["participant"] = participants(PATIENT)
    assert_success(api.book(resource=cancel, client="client-o"), "cancelled")


def test_issue7_2_reschedule_keeps_visit_type_duration_and_offering_practitioner(sq: Api) -> None:
    echo = sq.free_slot(practitioner="GOLDBERM", visit_type="ECHO", days=(64, 71))
    booked = assert_success(sq.book(echo["id"], "client-v"), "booked")
    original = sq.db.appt(booked["id"])
    start = parse_instant(echo["start"]) + dt.timedelta(days=7)
    move = {
        "resourceType": "Appointment",
        "id": booked["id"],
        "status": "booked",
        "start": start.isoformat(),
        "end": (start + dt.timedelta(minutes=20)).isoformat(),
        "participant": participants(practitioner="GOLDBERM"),
    }
    resp = sq.book(resource=move, client="client-v")
    assert_failure(resp, 422, "business-rule", "of 60 minutes", "20 minutes apart", "keeps the visit type")
    move["end"] = (start + dt.timedelta(minutes=60)).isoformat()
    move["participant"] = participants(practitioner=SPEARS)  # family practice: no echocardiograms
    assert_failure(sq.book(resource=move, client="client-v"), 422, "business-rule", f"Practitioner/{SPEARS}")
    assert sq.db.appt(booked["id"]) == original


def test_issue7_8_cancel_of_a_visit_that_took_place_is_409(api: Api) -> None:
    proposed = api.free_slot(days=(72, 79))
    booked = assert_success(api.book(proposed["id"], "client-s"), "booked")
    cancel = {"resourceType": "Appointment", "id": booked["id"], "status": "cancelled", "participant": participants()}
    for code, state in (("A", "arrived"), ("D", "fulfilled"), ("N", "noshow")):
        legacy_exec(api, "UPDATE APPT SET STATUS_CD = ? WHERE APPT_ID = ?", code, int(booked["id"]))
        resp = api.book(resource=cancel, client="client-s")
        assert_failure(resp, 409, "conflict", f"Appointment/{booked['id']} is {state}")
        assert api.db.appt(booked["id"])[3].strip() == code
    legacy_exec(api, "UPDATE APPT SET STATUS_CD = 'S' WHERE APPT_ID = ?", int(booked["id"]))
    assert_success(api.book(resource=cancel, client="client-s"), "cancelled")
    assert_success(api.book(resource=cancel, client="client-s"), "cancelled")  # idempotent


# -- the slot grid, the horizon, proposal lifetime (a server of its own: its calendar is changed) ----
@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """SQLite; Dr. Spears works 08:15-17:00 (a grid that does not start on the hour), bookings are
    offered 30 days ahead, proposals live 10 s, and the clock can be set (``fhir.now``)."""
    tmp = tmp_path_factory.mktemp("e2e-grid")
    target = seeded("sqlite", tmp)
    conn = sqlite3.connect(target)
    conn.execute("UPDATE PROV_TEMPLATE SET START_HHMM = 815 WHERE PROV_ID = ?", (SPEARS + " ",))
    conn.commit()
    conn.close()
    with running_api(tmp, "sqlite", target, find={"max_days_ahead": 30, "proposal_ttl_seconds": 10}) as a:
        yield a


def _fhir(a: Api) -> Any:
    app = a.server.config.loaded_app  # type: ignore[attr-defined]
    while not hasattr(app, "state"):
        app = app.app
    return app.state.fhir


def _find_from(api: Api, start: dt.datetime, days: int = 3) -> list[dict[str, Any]]:
    body = parameters(
        {"name": "start", "valueDateTime": start.isoformat()},
        {"name": "end", "valueDateTime": (start + dt.timedelta(days=days)).isoformat()},
        {"name": "practitioner", "valueReference": {"reference": f"Practitioner/{SPEARS}"}},
        {"name": "patient-reference", "valueReference": {"reference": f"Patient/{PATIENT}"}},
        {"name": "_count", "valueInteger": 500},
    )
    resp = api.post("/Appointment/$find", body, client="finder")
    assert resp.status_code == 200, resp.text
    return appointments_of(resp.json())


def on_spears_grid(instant: str) -> bool:
    local = parse_instant(instant).astimezone(ZONE)
    minutes = local.hour * 60 + local.minute - (8 * 60 + 15)
    return local.second == 0 and local.microsecond == 0 and minutes >= 0 and minutes % 10 == 0


def test_issue7_3_proposals_lie_on_the_working_time_grid(grid: Api) -> None:
    # A window starting mid-slot, with seconds, on a working day.
    day = local_day(7)
    while day.isoweekday() > 5:
        day += dt.timedelta(days=1)
    found = _find_from(grid, day.replace(hour=9, minute=3, second=27))
    assert found and all(on_spears_grid(a["start"]) for a in found), [a["start"] for a in found[:5]]
    assert parse_instant(found[0]["start"]).astimezone(ZONE).time() >= dt.time(9, 5)  # 09:05 may be booked
    # A window starting now rounds up to the next grid point, never the current second.
    now_found = _find_from(grid, dt.datetime.now(ZONE))
    assert now_found and all(on_spears_grid(a["start"]) for a in now_found)
    # Every proposed start books exactly as proposed.
    booked = assert_success(grid.book(found[0]["id"], "client-g"), "booked")
    assert booked["start"] == found[0]["start"]
    assert grid.db.appt(booked["id"])[:2] == legacy_date_time(found[0]["start"])


def test_issue7_3_resource_bookings_are_checked_against_grid_and_horizon(grid: Api) -> None:
    day = local_day(8)
    while day.isoweekday() > 5:
        day += dt.timedelta(days=1)
    before = grid.db.count_appts()

    def resource(start: dt.datetime, minutes: int = 20) -> dict[str, Any]:
        return {
            "resourceType": "Appointment",
            "status": "proposed",
            "appointmentType": {"coding": [{"system": "urn:sched-adapter:clinicware:visit-type", "code": "FOLLOW"}]},
            "start": start.isoformat(),
            "end": (start + dt.timedelta(minutes=minutes)).isoformat(),
            "participant": participants(),
        }

    good = parse_instant(_find_from(grid, day)[0]["start"]).astimezone(ZONE)  # free, on the grid
    off_grid = good + dt.timedelta(minutes=5)  # the grid is 08:15 + k * 10 min
    resp = grid.book(resource=resource(off_grid), client="client-g")
    nearest = [t.isoformat() for t in (good, good + dt.timedelta(minutes=10))]
    assert_failure(resp, 422, "business-rule", "not on the slot grid", *nearest)
    with_seconds = good + dt.timedelta(seconds=30)
    assert_failure(grid.book(resource=resource(with_seconds), client="client-g"), 422, "business-rule", "slot grid")
    far = local_day(45)
    while far.isoweekday() > 5:
        far += dt.timedelta(days=1)
    resp = grid.book(resource=resource(far.replace(hour=10, minute=5)), client="client-g")
    assert_failure(resp, 422, "business-rule", "beyond the booking horizon", "30 days ahead")
    wrong_length = grid.book(resource=resource(good, minutes=25), client="client-g")
    assert_failure(wrong_length, 422, "business-rule", "20 minutes")
    assert grid.db.count_appts() == before
    # On the grid, within the horizon, the visit type's length: booked exactly then.
    booked = assert_success(grid.book(resource=resource(good), client="client-g"), "booked")
    assert parse_instant(booked["start"]) == good
    assert grid.db.appt(booked["id"])[:2] == legacy_date_time(booked["start"])


def test_issue7_3_find_offers_nothing_beyond_the_horizon(grid: Api) -> None:
    horizon = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
    found = grid.find(days=(25, 40), count=500)
    assert found and max(parse_instant(a["start"]) for a in found) <= horizon
    resp = grid.post(
        "/Appointment/$find",
        parameters(
            {"name": "start", "valueDateTime": local_day(35).isoformat()},
            {"name": "end", "valueDateTime": local_day(40).isoformat()},
        ),
        client="finder",
    )
    assert resp.status_code == 200 and appointments_of(resp.json()) == []
    assert "30 days ahead" in " ".join(i.get("diagnostics", "") for i in issues_of(resp.json()))


def test_issue7_8_proposals_live_their_ttl_to_the_second(grid: Api) -> None:
    """proposal_ttl_seconds = 10: a proposal issued at hh:mm:55 is still valid at hh:(mm+1):03 (it was
    cut to the minute and expired at once) and expires after 10 s."""
    fhir = _fhir(grid)
    real = fhir.now
    issued = dt.datetime.now(dt.UTC).replace(second=55, microsecond=0) + dt.timedelta(minutes=1)
    try:
        fhir.now = lambda: issued
        first, second = grid.find(days=(2, 9), count=2)
        fhir.now = lambda: issued + dt.timedelta(seconds=8)
        assert_success(grid.hold(first["id"], "client-t"), "pending")
        fhir.now = lambda: issued + dt.timedelta(seconds=11)
        assert_failure(grid.book(second["id"], "client-t"), 404, "not-found", "expired")
    finally:
        fhir.now = real


def _insert_appt(api: Api, appt_id: int, patient: str, when: dt.datetime, status: str) -> None:
    legacy_exec(
        api,
        "INSERT INTO APPT (APPT_ID, PAT_ID, PROV_ID, FAC_ID, APPT_DT, APPT_TM, DUR_MIN, TYPE_CD, STATUS_CD, "
        "NOTE_TXT, BOOKED_BY, CREATED_TS) VALUES (?, ?, ?, 1, ?, ?, 20, 'FOLLOW', ?, NULL, 'LEGACY', '20260101000000')",
        appt_id,
        int(patient),
        SPEARS + " ",
        when.year * 10000 + when.month * 100 + when.day,
        when.hour * 100 + when.minute,
        status,
    )


def _search(api: Api, ids: str) -> dict[str, Any]:
    resp = api.http.get("/Appointment", params={"_id": ids}, headers={"Accept": "application/fhir+json"})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_issue7_8_unknown_legacy_code_is_skipped_with_a_warning(sq: Api) -> None:
    """A legacy status code missing from a code table without a fallback: that row is left out with a
    warning issue; the rest of the search answers (it was a 500 for the whole search)."""
    patient = "42"
    when = local_day(-3).replace(hour=10)
    _insert_appt(sq, 990001, patient, when, "Z")
    _insert_appt(sq, 990002, patient, when + dt.timedelta(hours=1), "S")
    bundle = _search(sq, "990001,990002")
    assert [a["id"] for a in appointments_of(bundle)] == ["990002"]
    warnings = [i for i in issues_of(bundle) if i["severity"] == "warning"]
    assert any("990001" in i["diagnostics"] and "'Z'" in i["diagnostics"] for i in warnings), warnings


def test_issue7_8_code_table_fallback_renders_the_row(tmp_path: Path) -> None:
    """``fallback:`` on a code table: the row is shown with the fallback code, plus a warning issue."""
    text = MAPPING.read_text(encoding="utf-8")
    marker = "    entries: {S: booked, A: arrived, D: fulfilled, C: cancelled, P: cancelled, L: cancelled, N: noshow}\n"
    assert marker in text
    mapping = tmp_path / "fallback.yaml"
    mapping.write_text(text.replace(marker, marker + "    fallback: entered-in-error\n"), encoding="utf-8")
    target = seeded("sqlite", tmp_path)
    with running_api(tmp_path, "sqlite", target, backend={"mapping": str(mapping)}) as a:
        when = local_day(-3).replace(hour=10)
        _insert_appt(a, 990003, "43", when, "Z")
        bundle = _search(a, "990003")
        found = appointments_of(bundle)
        assert [(x["id"], x["status"]) for x in found] == [("990003", "entered-in-error")]
        warnings = [i for i in issues_of(bundle) if i["severity"] == "warning"]
        assert any("Appointment/990003" in i["diagnostics"] and "fallback" in i["diagnostics"] for i in warnings)
