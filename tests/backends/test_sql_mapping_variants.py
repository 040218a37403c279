"""Mapping branches the demo mapping does not use (issue 13, item 7), each over real HTTP and a real database.

Every test takes the demo mapping, changes the one section under test, and runs the real app on it:

* id allocation ``database`` (SQLite generates the key, read back with ``last_id_sql``), ``uuid`` (a text key
  column) and ``sequence`` (a PostgreSQL sequence);
* working time ``kind: free_slots`` (the legacy system lists bookable periods itself);
* the ``python:module.function`` converter (the escape hatch), and its load-time errors;
* the generic ODBC dialect (SQL Server, Oracle, DB2): the ANSI ``OFFSET ... FETCH`` row limit and the mapping's own
  lock hints, exercised on PostgreSQL reached through a driver the adapter does not recognise by name.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pyodbc
import pytest
import yaml
from apputil import DEMO_MAPPING, appointments, make_app, parameters

from adapter.backends.sql.db import Database
from adapter.demo.seed import schema_statements, seed_demo
from adapter.mapping.loader import MappingError, load_mapping

ZONE = ZoneInfo("America/New_York")
SPEARS = "SPEARSB"
PATIENT = "7"

MappingEdit = Callable[[dict[str, Any]], None]


def variant(tmp_path: Path, edit: MappingEdit) -> Path:
    doc = yaml.safe_load(DEMO_MAPPING.read_text(encoding="utf-8"))
    edit(doc)
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
    load_mapping(path)  # a broken variant fails here, with file:line, not somewhere in a request
    return path


def sqlite_demo(tmp_path: Path, *, replace: tuple[str, str] | None = None, extra: tuple[str, ...] = ()) -> Path:
    """The seeded demo database, optionally with one schema text replaced and extra statements run after seeding."""
    path = tmp_path / "legacy.sqlite"
    conn = sqlite3.connect(path)
    try:
        for statement in schema_statements():
            conn.execute(statement.replace(*replace) if replace else statement)
        seed_demo(conn, today=dt.date.today())
        for statement in extra:
            conn.execute(statement)
        conn.commit()
    finally:
        conn.close()
    return path


def serve(live_server: Callable[..., str], tmp_path: Path, url: str, mapping: Path) -> httpx.Client:
    base = live_server(make_app(tmp_path, url, backend={"mapping": str(mapping)}))
    return httpx.Client(base_url=f"{base}/fhir", timeout=60)


def local_day(days_ahead: int) -> dt.datetime:
    day = dt.datetime.now(ZONE).date() + dt.timedelta(days=days_ahead)
    return dt.datetime.combine(day, dt.time(), tzinfo=ZONE)


def find(client: httpx.Client, start: dt.datetime, end: dt.datetime, count: int = 50) -> list[dict[str, Any]]:
    r = client.post(
        "/Appointment/$find",
        json=parameters(
            ("start", "valueDateTime", start.isoformat()),
            ("end", "valueDateTime", end.isoformat()),
            ("practitioner", "valueReference", {"reference": f"Practitioner/{SPEARS}"}),
            ("patient-reference", "valueReference", {"reference": f"Patient/{PATIENT}"}),
            ("_count", "valueInteger", count),
        ),
    )
    assert r.status_code == 200, r.text
    return appointments(r.json())


def book(client: httpx.Client, proposed: dict[str, Any], comment: str | None = None) -> dict[str, Any]:
    params: list[tuple[str, str, Any]] = [
        ("appointment-reference", "valueReference", {"reference": f"Appointment/{proposed['id']}"})
    ]
    if comment is not None:
        params.append(("comment", "valueString", comment))
    r = client.post("/Appointment/$book", json=parameters(*params))
    assert r.status_code == 200, r.text
    (booked,) = appointments(r.json())
    assert booked["status"] == "booked"
    return booked


def book_next_free(client: httpx.Client, comment: str | None = None) -> dict[str, Any]:
    proposals = find(client, local_day(1), local_day(8))
    assert proposals, "Dr. Spears has free time in the coming week"
    return book(client, proposals[0], comment)


def _id_allocation(spec: dict[str, Any]) -> MappingEdit:
    def edit(doc: dict[str, Any]) -> None:
        doc["writes"]["id_allocation"] = spec

    return edit


# --------------------------------------------------------------------------- id allocation


def test_issue13_7_id_strategy_database_reads_back_the_generated_key(
    tmp_path: Path, live_server: Callable[..., str]
) -> None:
    db = sqlite_demo(tmp_path)
    before = sqlite3.connect(db).execute("SELECT MAX(APPT_ID), (SELECT NEXT_VAL FROM ID_COUNTER) FROM APPT").fetchone()
    mapping = variant(
        tmp_path, _id_allocation({"strategy": "database", "last_id_sql": "SELECT last_insert_rowid() AS NEW_ID"})
    )
    with serve(live_server, tmp_path, f"sqlite:///{db}", mapping) as client:
        first = book_next_free(client)
        second = book_next_free(client)
        assert client.get(f"/Appointment/{second['id']}").json()["status"] == "booked"
    # INSERT wrote NULL into the INTEGER PRIMARY KEY: SQLite chose the key, the counter table was not touched.
    assert [first["id"], second["id"]] == [str(before[0] + 1), str(before[0] + 2)]
    assert sqlite3.connect(db).execute("SELECT NEXT_VAL FROM ID_COUNTER").fetchone()[0] == before[1]


def test_issue13_7_id_strategy_uuid_on_a_text_key(tmp_path: Path, live_server: Callable[..., str]) -> None:
    db = sqlite_demo(tmp_path, replace=("APPT_ID     INTEGER      NOT NULL", "APPT_ID     VARCHAR(40)  NOT NULL"))

    def edit(doc: dict[str, Any]) -> None:
        _id_allocation({"strategy": "uuid"})(doc)
        doc["appointments"]["id"] = {"key_type": "str"}
        doc["appointments"]["identifier_filters"]["urn:sched-adapter:clinicware:appt"]["value"] = "{value}"

    with serve(live_server, tmp_path, f"sqlite:///{db}", variant(tmp_path, edit)) as client:
        booked = book_next_free(client)
        read = client.get(f"/Appointment/{booked['id']}")
    assert read.status_code == 200 and read.json()["status"] == "booked"
    key = booked["id"]
    assert len(key) == 36 and key.count("-") == 4
    row = sqlite3.connect(db).execute("SELECT PROV_ID, STATUS_CD FROM APPT WHERE APPT_ID = ?", (key,)).fetchone()
    assert row == ("SPEARSB ", "S")


def test_issue13_7_id_strategy_sequence_on_postgresql(
    tmp_path: Path, live_server: Callable[..., str], fresh_pg_demo_dsn: str
) -> None:
    conn = pyodbc.connect(fresh_pg_demo_dsn, autocommit=True)
    try:
        conn.execute("CREATE SEQUENCE appt_seq START WITH 700000")
    finally:
        conn.close()
    mapping = variant(
        tmp_path, _id_allocation({"strategy": "sequence", "next_sql": "SELECT nextval('appt_seq') AS NEW_ID"})
    )
    with serve(live_server, tmp_path, f"odbc:{fresh_pg_demo_dsn}", mapping) as client:
        ids = [book_next_free(client)["id"], book_next_free(client)["id"]]
    assert ids == ["700000", "700001"]


# --------------------------------------------------------------------------- working time: free slots


def _next_saturday() -> dt.date:
    today = dt.datetime.now(ZONE).date()
    return today + dt.timedelta(days=(5 - today.weekday()) % 7 or 7)


def _free_slots(doc: dict[str, Any]) -> None:
    doc["availability"]["working_time"] = {
        "kind": "free_slots",
        "sql": "SELECT PROV_ID, FAC_ID, SLOT_DT, START_HHMM, END_HHMM FROM FREE_SLOT "
        "WHERE PROV_ID IN (:practitioner_keys) AND SLOT_DT BETWEEN :from_date AND :to_date",
        "binds": {"from_date": "{window_start|to_yyyymmdd}", "to_date": "{window_end|to_yyyymmdd}"},
        "fields": {
            "practitioner": "{PROV_ID|trim}",
            "location": "{FAC_ID|str}",
            "start": "{SLOT_DT,START_HHMM|local_datetime:yyyymmdd,hhmm}",
            "end": "{SLOT_DT,END_HHMM|local_datetime:yyyymmdd,hhmm}",
        },
    }


def test_issue13_7_working_time_free_slots(tmp_path: Path, live_server: Callable[..., str]) -> None:
    saturday = _next_saturday()  # no template, no seeded appointment: only the listed slot is free time
    ymd = saturday.year * 10000 + saturday.month * 100 + saturday.day
    db = sqlite_demo(
        tmp_path,
        extra=(
            "CREATE TABLE FREE_SLOT (PROV_ID CHAR(8), FAC_ID INTEGER, SLOT_DT INTEGER, START_HHMM INTEGER, "
            "END_HHMM INTEGER)",
            f"INSERT INTO FREE_SLOT VALUES ('SPEARSB ', 1, {ymd}, 1000, 1100)",
        ),
    )
    window = (local_day(1), dt.datetime.combine(saturday + dt.timedelta(days=2), dt.time(), tzinfo=ZONE))
    with serve(live_server, tmp_path, f"sqlite:///{db}", variant(tmp_path, _free_slots)) as client:
        offered = find(client, *window)
        # Weekdays offer nothing now: the weekly templates are no longer the working time.
        starts = [dt.datetime.fromisoformat(a["start"]).astimezone(ZONE) for a in offered]
        assert [s.strftime("%H:%M") for s in starts] == ["10:00", "10:10", "10:20", "10:30", "10:40"]
        assert {s.date() for s in starts} == {saturday}
        assert all(a["end"] == (s + dt.timedelta(minutes=20)).isoformat() for a, s in zip(offered, starts, strict=True))
        book(client, offered[0])
        left = [dt.datetime.fromisoformat(a["start"]).astimezone(ZONE).strftime("%H:%M") for a in find(client, *window)]
    assert left == ["10:20", "10:30", "10:40"]


# --------------------------------------------------------------------------- python: converter


def test_issue13_7_python_converter_in_a_mapping(tmp_path: Path, live_server: Callable[..., str]) -> None:
    def edit(doc: dict[str, Any]) -> None:
        doc["appointments"]["fields"]["comment"] = "{NOTE_TXT|trim|python:mapping_hooks.bracket}"

    with serve(live_server, tmp_path, f"sqlite:///{sqlite_demo(tmp_path)}", variant(tmp_path, edit)) as client:
        booked = book_next_free(client, comment="first visit")
        read = client.get(f"/Appointment/{booked['id']}").json()
    assert booked["comment"] == read["comment"] == "[first visit]"


@pytest.mark.parametrize(
    ("converter", "problem"),
    [
        ("python:no_such_module_here.f", "cannot import module 'no_such_module_here'"),
        ("python:mapping_hooks.missing", "'mapping_hooks' has no function 'missing'"),
    ],
)
def test_issue13_7_python_converter_errors_at_load_time(tmp_path: Path, converter: str, problem: str) -> None:
    def edit(doc: dict[str, Any]) -> None:
        doc["appointments"]["fields"]["comment"] = f"{{NOTE_TXT|{converter}}}"

    with pytest.raises(MappingError) as err:
        variant(tmp_path, edit)
    assert any("appointments.fields.comment" in p and problem in p for p in err.value.problems), err.value.problems


# --------------------------------------------------------------------------- generic ODBC dialect (SQL Server & co.)


GENERIC_ROLE = "sched_generic_odbc"


def _unrecognised_postgresql(dsn: str) -> str:
    """The same database through the driver's library path and a user whose name is no product name either:
    nothing in the connection string tells the adapter which DBMS it is."""
    library = Path("/usr/lib") / (sysconfig.get_config_var("MULTIARCH") or "") / "odbc" / "psqlodbcw.so"
    assert library.is_file(), f"{library}: the PostgreSQL ODBC driver (make system-deps) is missing"
    conn = pyodbc.connect(dsn, autocommit=True)
    try:
        conn.execute(f"DO $$ BEGIN CREATE ROLE {GENERIC_ROLE} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
        conn.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {GENERIC_ROLE}")
    finally:
        conn.close()
    return dsn.replace("DRIVER={PostgreSQL Unicode}", f"DRIVER={library}").replace(
        "UID=postgres", f"UID={GENERIC_ROLE}"
    )


def test_issue13_7_generic_odbc_dialect_pages_with_offset_fetch(
    tmp_path: Path, live_server: Callable[..., str], fresh_pg_demo_dsn: str
) -> None:
    generic = _unrecognised_postgresql(fresh_pg_demo_dsn)
    assert "POSTGRES" not in generic.upper()
    assert Database(f"odbc:{generic}").dialect == "odbc"
    query = "/Appointment?patient=Patient/1&_sort=date&_count=2"
    pages: dict[str, list[list[str]]] = {}
    for name, dsn in (("postgresql", fresh_pg_demo_dsn), ("generic", generic)):
        with serve(live_server, tmp_path / name, f"odbc:{dsn}", DEMO_MAPPING) as client:
            ids: list[list[str]] = []
            url: str | None = query
            while url and len(ids) < 3:
                bundle = client.get(url).json()
                assert bundle["resourceType"] == "Bundle", bundle
                ids.append([a["id"] for a in appointments(bundle)])
                url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
                if url:
                    url = url.split("/fhir", 1)[1]
            pages[name] = ids
    assert pages["generic"] == pages["postgresql"]
    assert len(pages["generic"]) >= 2 and all(len(p) == 2 for p in pages["generic"][:2])


def test_issue13_7_generic_odbc_dialect_books_with_locking_selects(
    tmp_path: Path, live_server: Callable[..., str], fresh_pg_demo_dsn: str
) -> None:
    generic = _unrecognised_postgresql(fresh_pg_demo_dsn)
    with serve(live_server, tmp_path, f"odbc:{generic}", DEMO_MAPPING) as client:
        first = book_next_free(client)
        second = book_next_free(client)
    assert int(second["id"]) == int(first["id"]) + 1


def test_issue13_7_lock_hints_written_by_the_mapping_are_kept() -> None:
    db = Database("odbc:DRIVER={ODBC Driver 18 for SQL Server};SERVER=db;DATABASE=pm")
    try:
        assert db.dialect == "odbc"
        hinted = "SELECT PROV_ID FROM PROVIDER WITH (UPDLOCK, HOLDLOCK) WHERE PROV_ID = :practitioner_key"
        assert db.lockable(hinted) == hinted
        assert db.lockable("UPDATE LOCKS SET N = N WHERE K = :k") == "UPDATE LOCKS SET N = N WHERE K = :k"
        assert db.lockable("SELECT K FROM T WHERE K = :k;") == "SELECT K FROM T WHERE K = :k FOR UPDATE"
    finally:
        asyncio.run(db.close())
