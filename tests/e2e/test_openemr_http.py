"""OpenEMR (``mappings/openemr.yaml``) end to end: OpenEMR's own tables in MariaDB, real uvicorn, real HTTP.

The database is OpenEMR's DDL (tests/data/openemr/) seeded by ``tests/openemrutil.py`` (providers 5, 6,
7; In Office / Out Of Office markers, recurring and single; lunch; an all-day absence; appointments
with several ``pc_apptstatus`` symbols). Every write is checked in ``openemr_postcalendar_events``
itself. The DDL is MariaDB/MySQL only, so these tests run on MariaDB only.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dbutil
import openemrutil
from conformance import assert_avail_bundle, assert_ihe_appointment
from serverutil import ProcessServers, ThreadServer, free_port, process_log

from adapter.server import build_app
from adapter.settings import Settings

pytestmark = pytest.mark.openemr

REPO = Path(__file__).resolve().parents[2]
MAPPING = REPO / "mappings" / "openemr.yaml"
ZONE = ZoneInfo(openemrutil.ZONE_NAME)
SECRET = "e2e-openemr-secret-0123456789"
STATUS_REASON_URL = "https://profiles.ihe.net/ITI/Scheduling/StructureDefinition/extension-status-reason"
CLIENTS = 20
NOTE = "Patientin möchte den Termin verschieben; " * 5


@dataclass
class OpenEmr:
    base: str
    dsn: str
    days: dict[str, dt.date]
    http: httpx.Client

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        return dbutil.legacy_rows("odbc", self.dsn, sql, *params)

    def post(self, path: str, body: dict[str, Any], client: str = "finder") -> httpx.Response:
        return self.http.post(self.base + path, json=body, headers={"X-Client-Id": client})

    def find(
        self, day: dt.date, practitioner: str, *, days: int = 1, visit_type: str | None = None
    ) -> list[dict[str, Any]]:
        start = dt.datetime.combine(day, dt.time(), tzinfo=ZONE)
        entries: list[dict[str, Any]] = [
            {"name": "start", "valueDateTime": start.isoformat()},
            {"name": "end", "valueDateTime": (start + dt.timedelta(days=days)).isoformat()},
            {"name": "practitioner", "valueReference": {"reference": f"Practitioner/{practitioner}"}},
            {"name": "patient-reference", "valueReference": {"reference": "Patient/2"}},
            {"name": "_count", "valueInteger": 500},
        ]
        if visit_type:
            entries.append({"name": "visit-type", "valueString": visit_type})
        resp = self.post("/Appointment/$find", {"resourceType": "Parameters", "parameter": entries})
        assert resp.status_code == 200, resp.text
        bundle = resp.json()
        assert_avail_bundle(bundle)
        return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Appointment"]

    def book(
        self, *, token: str | None = None, resource: dict[str, Any] | None = None, client: str = "c1"
    ) -> dict[str, Any]:
        params: list[dict[str, Any]] = []
        if token:
            params.append({"name": "appointment-reference", "valueReference": {"reference": f"Appointment/{token}"}})
        if resource:
            params.append({"name": "appointment-resource", "resource": resource})
        resp = self.post("/Appointment/$book", {"resourceType": "Parameters", "parameter": params}, client)
        assert resp.status_code == 200, resp.text
        appts = [e["resource"] for e in resp.json()["entry"] if e["resource"]["resourceType"] == "Appointment"]
        assert len(appts) == 1
        assert_ihe_appointment(appts[0])
        return appts[0]

    def event(self, eid: str) -> dict[str, Any]:
        cols = (
            "pc_catid, pc_aid, pc_pid, pc_title, pc_eventDate, pc_startTime, pc_endTime, pc_duration, "
            "pc_apptstatus, pc_facility, pc_eventstatus, pc_recurrtype, pc_informant, pc_hometext, pc_multiple"
        )
        rows = self.rows(f"SELECT {cols} FROM openemr_postcalendar_events WHERE pc_eid = ?", int(eid))
        assert len(rows) == 1
        return dict(zip([c.strip() for c in cols.split(",")], rows[0], strict=True))


def local(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(ZONE)


def hhmm(appts: list[dict[str, Any]]) -> list[str]:
    return [local(a["start"]).strftime("%H:%M") for a in appts]


def settings_for(tmp: Path, dsn: str, base_url: str) -> Settings:
    return Settings.model_validate(
        {
            "server": {"host": "127.0.0.1", "base_url": base_url + "/fhir"},
            "backend": {"mapping": str(MAPPING), "database_url": f"odbc:{dsn}", "pool_size": 4},
            "state": {"path": str(tmp / "state.sqlite")},
            "security": {"auth": "off", "signing_secret": SECRET},
        }
    )


@pytest.fixture(scope="module")
def openemr_dsn(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, dt.date]]]:
    """OpenEMR's tables in a fresh MariaDB database, seeded relative to today."""
    request.getfixturevalue("mariadb_admin_dsn")
    dsn = dbutil.fresh_database(dbutil.MARIADB, "openemr")
    try:
        days = openemrutil.load_and_seed(dsn, dt.datetime.now(ZONE).date())
        yield dsn, days
    finally:
        dbutil.drop_database(dbutil.MARIADB, dbutil.database_name_from_dsn(dsn))


@pytest.fixture(scope="module")
def oe(openemr_dsn: tuple[str, dict[str, dt.date]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenEmr]:
    dsn, days = openemr_dsn
    tmp = tmp_path_factory.mktemp("openemr")
    holder: dict[str, Settings] = {}
    server = ThreadServer(lambda: build_app(holder["settings"]), factory=True)
    holder["settings"] = settings_for(tmp, dsn, server.base_url)
    server.start()
    with httpx.Client(timeout=60) as http:
        try:
            yield OpenEmr(server.base_url + "/fhir", dsn, days, http)
        finally:
            server.stop()


# --------------------------------------------------------------------------------------------------
# $find
# --------------------------------------------------------------------------------------------------
def test_issue9_1_find_respects_office_hours_lunch_and_existing_events(oe: OpenEmr) -> None:
    found = oe.find(oe.days["w1"], "5")
    starts = hhmm(found)
    assert starts, "no slot offered inside the recurring In Office / Out Of Office markers"
    for appt in found:
        s, e = local(appt["start"]), local(appt["end"])
        assert dt.time(9) <= s.time() and e.time() <= dt.time(17), appt["start"]
        assert (e - s) == dt.timedelta(minutes=15)  # Office Visit: pc_duration 900 s
        assert s.minute % 15 == 0
        assert not (dt.time(12) <= s.time() < dt.time(13)), "lunch (recurring category 8) is busy"
    # Busy: '-' 09:00, '@' 10:30, '?' 11:00, '^' 14:00. Free again: 'x' 09:30 and '%' 10:00.
    for taken in ("09:00", "10:30", "11:00", "14:00"):
        assert taken not in starts
    for freed in ("09:15", "09:30", "10:00", "16:45"):
        assert freed in starts
    assert all(any(p["actor"].get("reference") == "Location/1" for p in a["participant"]) for a in found)


def test_issue9_1_find_expands_weekday_recurrence_and_exdate(oe: OpenEmr) -> None:
    # Provider 6: Mon/Wed/Fri 08:00-12:00 at facility 2 (pc_recurrtype 3), except the exdate Wednesday.
    week = oe.find(oe.days["today"] + dt.timedelta(days=1), "6", days=14)
    days = {local(a["start"]).date() for a in week}
    assert days and all(d.weekday() in (0, 2, 4) for d in days)
    assert oe.days["exdate"] not in days
    assert oe.days["exdate"] + dt.timedelta(days=7) in days or oe.days["exdate"] + dt.timedelta(days=7) > max(days)
    for a in week:
        assert dt.time(8) <= local(a["start"]).time() and local(a["end"]).time() <= dt.time(12)
        assert any(p["actor"].get("reference") == "Location/2" for p in a["participant"])


def test_issue9_1_find_all_day_out_of_office_and_single_markers(oe: OpenEmr) -> None:
    assert oe.find(oe.days["off"], "5") == []  # all-day Out Of Office: a whole-day absence
    single = oe.find(oe.days["today"] + dt.timedelta(days=1), "7")  # non-recurring In 13:00 / Out 16:00
    assert hhmm(single)[0] == "13:00" and hhmm(single)[-1] == "15:45"


# --------------------------------------------------------------------------------------------------
# $hold, $book, read, search, reschedule, cancel
# --------------------------------------------------------------------------------------------------
def test_issue9_1_book_writes_the_row_openemr_writes(oe: OpenEmr) -> None:
    day = oe.days["w1"] + dt.timedelta(days=1)
    slot = next(a for a in oe.find(day, "5", visit_type="urn:sched-adapter:openemr:category|10"))
    assert local(slot["end"]) - local(slot["start"]) == dt.timedelta(minutes=30)
    held = oe.post(
        "/Appointment/$hold",
        {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "appointment-reference", "valueReference": {"reference": f"Appointment/{slot['id']}"}}
            ],
        },
        "c-book",
    )
    assert held.status_code == 200, held.text
    booked = oe.book(token=slot["id"], client="c-book")
    assert booked["status"] == "booked"
    row = oe.event(booked["id"])
    start = local(slot["start"])
    assert row["pc_catid"] == 10 and row["pc_title"] == "New Patient"
    assert (row["pc_aid"], row["pc_pid"]) == ("5", "2")
    assert row["pc_eventDate"] == start.date()
    assert str(row["pc_startTime"])[:8] == start.strftime("%H:%M:%S")
    assert str(row["pc_endTime"])[:8] == local(slot["end"]).strftime("%H:%M:%S")
    assert row["pc_duration"] == 1800  # seconds, as OpenEMR stores it
    assert (row["pc_apptstatus"], row["pc_eventstatus"], row["pc_recurrtype"], row["pc_facility"]) == ("-", 1, 0, 1)
    assert row["pc_informant"] == "c-book"
    # Read back, and $find no longer offers that time.
    read = oe.http.get(f"{oe.base}/Appointment/{booked['id']}")
    assert read.status_code == 200 and read.json()["start"] == booked["start"]
    assert start.strftime("%H:%M") not in hhmm(oe.find(day, "5"))


def test_issue9_1_search_translates_status_symbols(oe: OpenEmr) -> None:
    w1 = oe.days["w1"].isoformat()
    resp = oe.http.get(f"{oe.base}/Appointment", params={"practitioner": "5", "date": w1, "_count": "50"})
    assert resp.status_code == 200, resp.text
    appts = [e["resource"] for e in resp.json()["entry"] if e["resource"]["resourceType"] == "Appointment"]
    by_time = {local(a["start"]).strftime("%H:%M"): a for a in appts}
    assert {t: by_time[t]["status"] for t in ("09:00", "09:30", "10:00", "10:30", "11:00", "14:00")} == {
        "09:00": "booked",
        "09:30": "cancelled",
        "10:00": "cancelled",
        "10:30": "arrived",
        "11:00": "noshow",
        "14:00": "pending",
    }
    for a in appts:
        assert_ihe_appointment(a)
    late = by_time["10:00"]
    ext = [e for e in late.get("extension", []) if e["url"] == STATUS_REASON_URL]
    assert ext and ext[0]["valueCodeableConcept"]["coding"][0]["code"] == "patient-cancel"
    assert "24 hours" in late["cancelationReason"]["text"]
    assert not [e for e in by_time["09:30"].get("extension", []) if e["url"] == STATUS_REASON_URL]
    # status=cancelled searches both cancellation symbols, x and %.
    resp = oe.http.get(f"{oe.base}/Appointment", params={"practitioner": "5", "date": w1, "status": "cancelled"})
    got = sorted(hhmm([e["resource"] for e in resp.json()["entry"] if e["resource"]["resourceType"] == "Appointment"]))
    assert got == ["09:30", "10:00"]
    # A past appointment checked out ('>') is fulfilled.
    resp = oe.http.get(f"{oe.base}/Appointment", params={"patient": "1", "date": oe.days["past"].isoformat()})
    past = [e["resource"] for e in resp.json()["entry"] if e["resource"]["resourceType"] == "Appointment"]
    assert [a["status"] for a in past] == ["fulfilled"]


def test_issue9_1_reschedule_then_cancel(oe: OpenEmr) -> None:
    day = oe.days["w1"] + dt.timedelta(days=1)
    first, *_rest, last = oe.find(day, "5")
    booked = oe.book(token=first["id"], client="c-move")
    participants = booked["participant"]
    moved = oe.book(
        resource={
            "resourceType": "Appointment",
            "id": booked["id"],
            "status": "booked",
            "start": last["start"],
            "end": last["end"],
            "participant": participants,
            "comment": NOTE,
        },
        client="c-move",
    )
    assert moved["id"] == booked["id"] and moved["start"] == last["start"]
    row = oe.event(booked["id"])
    assert row["pc_hometext"] == NOTE  # regression: MariaDB ODBC garbled bound text longer than 127 characters
    assert str(row["pc_startTime"])[:5] == local(last["start"]).strftime("%H:%M") and row["pc_duration"] == 900
    assert local(first["start"]).strftime("%H:%M") in hhmm(oe.find(day, "5"))  # the old time is free again
    cancelled = oe.book(
        resource={
            "resourceType": "Appointment",
            "id": booked["id"],
            "status": "cancelled",
            "participant": participants,
        },
        client="c-move",
    )
    assert cancelled["status"] == "cancelled"
    assert oe.event(booked["id"])["pc_apptstatus"] == "x"
    assert local(last["start"]).strftime("%H:%M") in hhmm(oe.find(day, "5"))


def test_issue9_5_refused_state_is_409_naming_it(oe: OpenEmr) -> None:
    resp = oe.http.get(f"{oe.base}/Appointment", params={"practitioner": "5", "date": oe.days["w1"].isoformat()})
    arrived = next(
        e["resource"] for e in resp.json()["entry"] if e["resource"].get("status") == "arrived"
    )  # pc_apptstatus '@'
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {
                "name": "appointment-resource",
                "resource": {
                    "resourceType": "Appointment",
                    "id": arrived["id"],
                    "status": "cancelled",
                    "participant": arrived["participant"],
                },
            }
        ],
    }
    refused = oe.post("/Appointment/$book", body, "c-state")
    assert refused.status_code == 409, refused.text
    assert f"Appointment/{arrived['id']} is arrived" in refused.text  # the generic rule (service) names the state
    assert oe.event(arrived["id"])["pc_apptstatus"] == "@"
    later = dt.datetime.combine(oe.days["w1"] + dt.timedelta(days=7), dt.time(15, 30), tzinfo=ZONE)
    body["parameter"][0]["resource"].update(
        status="booked", start=later.isoformat(), end=(later + dt.timedelta(minutes=15)).isoformat()
    )
    refused = oe.post("/Appointment/$book", body, "c-state")
    assert refused.status_code == 409, refused.text
    assert "is arrived; this system lets only booked, pending appointments be rescheduled" in refused.text
    assert str(oe.event(arrived["id"])["pc_startTime"])[:5] == "10:30"


def test_issue9_5_name_search_ignores_accents_and_case_in_sql(oe: OpenEmr) -> None:
    def names(kind: str, name: str) -> list[str]:
        resp = oe.http.get(f"{oe.base}/{kind}", params={"name": name})
        assert resp.status_code == 200, resp.text
        return sorted(
            e["resource"]["id"] for e in resp.json().get("entry", []) if e["resource"]["resourceType"] == kind
        )

    assert names("Practitioner", "muller") == ["5"]  # Müller
    assert names("Practitioner", "MÜL") == ["5"]
    assert names("Practitioner", "diaz") == ["7"]  # Díaz
    assert names("Patient", "angstrom") == ["1"]  # Ångström
    assert names("Patient", "zoe") == ["1"]  # Zoë
    assert names("Patient", "%") == []  # a LIKE wildcard in the input is no wildcard
    assert names("Location", "river") == ["2"]


# --------------------------------------------------------------------------------------------------
# Race: 20 clients, one slot, two worker processes
# --------------------------------------------------------------------------------------------------
def test_issue9_1_openemr_race_twenty_clients_one_row(
    openemr_dsn: tuple[str, dict[str, dt.date]], tmp_path: Path
) -> None:
    dsn, days = openemr_dsn
    port = free_port()
    config = tmp_path / "openemr.toml"
    config.write_text(
        f"""
[server]
host = "127.0.0.1"
port = {port}
workers = 2
log_level = "warning"
[backend]
mapping = '{MAPPING}'
database_url = 'odbc:{dsn}'
pool_size = 8
timeout_seconds = 15
[state]
path = '{tmp_path / "state.sqlite"}'
single_host = true
[security]
auth = "off"
signing_secret = "{SECRET}"
""",
        encoding="utf-8",
    )
    servers = ProcessServers()
    try:
        proc = servers.start(
            [sys.executable, "-m", "adapter.cli", "serve", "--config", str(config)],
            env={"PYTHONPATH": str(REPO)},
            port=port,
            cwd=str(REPO),
            timeout=60,
        )
        base = proc.base_url + "/fhir"
        with httpx.Client(timeout=60) as http:
            oe = OpenEmr(base, dsn, days, http)
            slot = oe.find(days["w1"] + dt.timedelta(days=7), "5")[3]  # a work day, not the day off

        async def race() -> list[httpx.Response]:
            body = {
                "resourceType": "Parameters",
                "parameter": [
                    {"name": "appointment-reference", "valueReference": {"reference": f"Appointment/{slot['id']}"}}
                ],
            }
            limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                await asyncio.gather(*(client.get(f"{base}/metadata") for _ in range(CLIENTS)))
                return list(
                    await asyncio.gather(
                        *(
                            client.post(f"{base}/Appointment/$book", json=body, headers={"X-Client-Id": f"racer-{i}"})
                            for i in range(CLIENTS)
                        )
                    )
                )

        responses = asyncio.run(race())
        codes = sorted(r.status_code for r in responses)
        assert codes == [200] + [409] * (CLIENTS - 1), (codes, process_log(proc))
        start = local(slot["start"])
        rows = oe.rows(
            "SELECT pc_eid FROM openemr_postcalendar_events WHERE pc_aid = '5' AND pc_eventDate = ? "
            "AND pc_startTime = ? AND pc_apptstatus NOT IN ('x', '%')",
            start.date(),
            start.strftime("%H:%M:%S"),
        )
        assert len(rows) == 1
    finally:
        servers.stop_all()
