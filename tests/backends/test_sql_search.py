"""ITI-118 search, SQL side: ``adapter.backends.sql.search`` against a small database with known answers.

The fixture database (``build_search_db``) is the demo schema with a handful of hand-written rows whose
instants are worked out below; ``tests/fhir/test_search_iti118.py`` loads the same builder. It also
checks the mapping format additions (``appointments.filters.start_from``/``start_before``, ``binds``,
``start_resolution_seconds``, ``identifier_filters``, ``codes``, ``order``), their portability to other
legacy shapes (one DATETIME column, a DATE + TIME pair), index use and bound parameters, and the same
queries on PostgreSQL and MariaDB over ODBC.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import sqlite3
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml

from adapter.backends.protocol import AppointmentQuery, Identifier, Interval, InvalidRequest
from adapter.backends.sql import search as sql_search
from adapter.backends.sql.backend import SqlBackend
from adapter.backends.sql.db import Database, bind
from adapter.backends.sql.search import legacy_bound, split_top_level
from adapter.demo.seed import create_schema
from adapter.mapping.codes import CodeTables
from adapter.mapping.loader import MappingError, load_mapping

REPO = Path(__file__).resolve().parents[2]
DEMO_MAPPING = REPO / "mappings" / "demo.yaml"
NY = ZoneInfo("America/New_York")
UTC = dt.UTC

# --------------------------------------------------------------------------------------------------
# The fixture database: every row and its instant (America/New_York wall clock -> UTC)
# --------------------------------------------------------------------------------------------------
FACILITIES = [
    (1, "Alpha Clinic", "1 Main St", "Boston", "MA", "02110", "617-555-0001"),
    (2, "Beta Clinic", "2 Side St", "Quincy", "MA", "02169", "617-555-0002"),
]
PROVIDERS = [
    ("SMITHJ  ", "Smith", "Jane", "MD", "FP", "1111111111", 1, "Y"),
    ("JONESA  ", "Jones", "Adam", "MD", "CARD", "2222222222", 2, "Y"),
]
PATIENTS = [
    (1, "MRN0000001", "Able", "Ann", None, 19800101, "F", "555-0101", "1 A St", "Boston", "MA", "02110"),
    (2, "MRN0000002", "Baker", "Bob", None, 19900202, "M", "555-0102", "2 B St", "Boston", "MA", "02110"),
    (3, "MRN0000003", "Cole", "Cid", None, 20000303, "M", "555-0103", "3 C St", "Boston", "MA", "02110"),
]
APPT_TYPES = [
    ("NEWPT", "New patient visit", 40, None),
    ("FOLLOW", "Follow-up visit", 20, None),
    ("PHYS", "Annual physical", 30, "FP"),
    ("ECHO", "Echocardiogram", 60, "CARD"),
]

# id: (patient, provider, facility, YYYYMMDD, HHMM, minutes, type, status, cancel reason)
APPTS: dict[int, tuple] = {
    101: (1, "SMITHJ  ", 1, 20260302, 900, 30, "PHYS", "S", None),  # 14:00Z, ends 09:30 (a bound below)
    102: (1, "SMITHJ  ", 1, 20260302, 1000, 20, "FOLLOW", "S", None),  # 15:00Z, starts exactly at a bound
    103: (1, "JONESA  ", 2, 20260307, 2330, 60, "ECHO", "D", None),  # 04:30Z Mar 8, crosses midnight
    104: (1, "JONESA  ", 2, 20260308, 130, 30, "ECHO", "S", None),  # 06:30Z, EST, before the spring jump
    105: (1, "JONESA  ", 2, 20260308, 330, 30, "ECHO", "S", None),  # 07:30Z, EDT, after it
    106: (1, "SMITHJ  ", 1, 20260308, 900, 20, "FOLLOW", "A", None),  # 13:00Z
    107: (1, "SMITHJ  ", 1, 20261101, 130, 30, "FOLLOW", "S", None),  # 05:30Z: repeated hour, first pass (EDT)
    108: (1, "SMITHJ  ", 1, 20261101, 300, 40, "NEWPT", "S", None),  # 08:00Z, EST
    109: (1, "SMITHJ  ", 1, 20261031, 900, 20, "FOLLOW", "C", "Clinic closed"),  # 13:00Z
    110: (1, "SMITHJ  ", 1, 20261201, 900, 20, "FOLLOW", "P", "Patient request"),  # 14:00Z
    111: (1, "SMITHJ  ", 1, 20261202, 900, 20, "FOLLOW", "L", "Called in late"),  # 14:00Z
    112: (1, "SMITHJ  ", 1, 20261203, 900, 20, "FOLLOW", "N", None),  # 14:00Z
    113: (1, "SMITHJ  ", 1, 20270104, 900, 30, "PHYS", "S", None),  # 14:00Z
    201: (2, "JONESA  ", 2, 20260302, 900, 60, "ECHO", "S", None),  # 14:00Z, same start as 101
    202: (2, "SMITHJ  ", 1, 20260308, 900, 20, "FOLLOW", "C", "Weather"),
}
# Patient 3: twelve appointments for paging, two of each start (ties broken by id).
for _i in range(12):
    APPTS[301 + _i] = (
        3,
        "SMITHJ  " if _i % 2 == 0 else "JONESA  ",
        1 + _i % 2,
        20260504 + _i // 2,
        1400,
        20,
        "FOLLOW",
        "S",
        None,
    )

STARTS_UTC = {
    101: "2026-03-02T14:00:00Z",
    102: "2026-03-02T15:00:00Z",
    103: "2026-03-08T04:30:00Z",
    104: "2026-03-08T06:30:00Z",
    105: "2026-03-08T07:30:00Z",
    106: "2026-03-08T13:00:00Z",
    107: "2026-11-01T05:30:00Z",
    108: "2026-11-01T08:00:00Z",
    109: "2026-10-31T13:00:00Z",
    110: "2026-12-01T14:00:00Z",
    111: "2026-12-02T14:00:00Z",
    112: "2026-12-03T14:00:00Z",
    113: "2027-01-04T14:00:00Z",
    201: "2026-03-02T14:00:00Z",
    202: "2026-03-08T13:00:00Z",
}
PATIENT1 = [101, 102, 103, 104, 105, 106, 109, 107, 108, 110, 111, 112, 113]  # in start order


def insert_fixture_rows(conn: Any) -> None:
    cur = conn.cursor()
    cur.executemany("INSERT INTO FACILITY VALUES (?, ?, ?, ?, ?, ?, ?)", FACILITIES)
    cur.executemany("INSERT INTO PROVIDER VALUES (?, ?, ?, ?, ?, ?, ?, ?)", PROVIDERS)
    cur.executemany("INSERT INTO PATIENT VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", PATIENTS)
    cur.executemany("INSERT INTO APPT_TYPE VALUES (?, ?, ?, ?)", APPT_TYPES)
    cur.executemany(
        "INSERT INTO APPT (APPT_ID, PAT_ID, PROV_ID, FAC_ID, APPT_DT, APPT_TM, DUR_MIN, TYPE_CD, STATUS_CD, "
        "CANCEL_RSN, NOTE_TXT, BOOKED_BY, CREATED_TS) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(k, *v[:9], None, "TEST", "20260101120000") for k, v in sorted(APPTS.items())],
    )
    cur.execute("INSERT INTO ID_COUNTER (CTR_NAME, NEXT_VAL) VALUES ('APPT_ID', 1000)")
    conn.commit()


def build_search_db(path: Path) -> Path:
    """The fixture database as a SQLite file (the demo schema, the rows above)."""
    conn = sqlite3.connect(path)
    try:
        create_schema(conn)
        insert_fixture_rows(conn)
    finally:
        conn.close()
    return path


def utc(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def search_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_search_db(tmp_path_factory.mktemp("sqlsearch") / "search.sqlite")


@pytest.fixture
def backend(search_db: Path):
    b = SqlBackend(load_mapping(DEMO_MAPPING), Database(f"sqlite:///{search_db}"))
    yield b
    run(b.close())


def ids(page) -> list[int]:
    return [int(a.id) for a in page.appointments]


async def _search(b: SqlBackend, **kw: Any):
    return await b.search_appointments(AppointmentQuery(**kw))


def search(b: SqlBackend, **kw: Any):
    return run(_search(b, **kw))


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def test_req_118_11_legacy_codes_returns_every_legacy_code_for_a_fhir_code() -> None:
    codes = load_mapping(DEMO_MAPPING).codes
    assert codes.legacy_codes("appointment_status", "cancelled") == ["C", "P", "L"]
    assert codes.legacy_codes("appointment_status", "booked") == ["S"]
    assert codes.legacy_codes("appointment_status", "pending") == []
    assert codes.legacy_codes("specialty", "http://snomed.info/sct|394579002") == ["CARD"]
    assert codes.legacy_codes("specialty", "394579002") == ["CARD"]  # bare code: any system
    assert codes.legacy_codes("specialty", "http://other|394579002") == []
    assert codes.legacy_codes("specialty", "|394579002") == []  # explicitly no system
    assert len(codes.legacy_codes("specialty", "http://snomed.info/sct|")) == 5  # every code of the system
    assert codes.legacy_codes("appointment_status", "|cancelled") == ["C", "P", "L"]  # plain codes have no system
    assert codes.legacy_codes(
        "appointment_type", {"system": "http://terminology.hl7.org/CodeSystem/v2-0276", "code": "FOLLOWUP"}
    ) == ["FOLLOW", "FRACT"]
    assert CodeTables().names() == set()


@pytest.mark.parametrize(
    "instant, resolution, wall",
    [
        ("2026-03-02T14:00:00Z", 60, "2026-03-02T09:00:00"),
        ("2026-03-02T14:00:30Z", 60, "2026-03-02T09:01:00"),  # rounds up to the columns' minute grid
        ("2026-03-02T14:00:30Z", 1, "2026-03-02T09:00:30"),
        ("2026-03-08T06:59:30Z", 60, "2026-03-08T02:00:00"),  # 01:59:30 EST -> first wall minute after it
        ("2026-03-08T07:00:00Z", 60, "2026-03-08T03:00:00"),  # the jump: 02:00 EST == 03:00 EDT
        ("2026-11-01T05:15:00Z", 60, "2026-11-01T01:15:00"),  # repeated hour, first pass (EDT)
        ("2026-11-01T06:15:00Z", 60, "2026-11-01T02:00:00"),  # second pass (EST): no legacy value names it
        ("2026-11-01T07:00:00Z", 60, "2026-11-01T02:00:00"),
        ("2026-12-31T23:59:30-05:00", 60, "2027-01-01T00:00:00"),  # rounding crosses midnight and the year
    ],
)
def test_req_118_05_legacy_bound_is_the_smallest_wall_clock_at_or_after_the_instant(
    instant: str, resolution: int, wall: str
) -> None:
    w = legacy_bound(utc(instant), NY, resolution)
    assert w.tzinfo is NY and w.replace(tzinfo=None).isoformat() == wall
    assert w.astimezone(NY) is w or w.astimezone(NY) == w  # converters see the wall clock unchanged


def test_req_118_05_legacy_bound_is_exact_for_every_minute_around_both_dst_changes() -> None:
    """start >= X  <=>  wall >= legacy_bound(X), for every legacy minute and bound across both transitions."""
    from adapter.mapping.expressions import attach_zone

    for day in (dt.datetime(2026, 3, 8), dt.datetime(2026, 11, 1)):
        walls = [day + dt.timedelta(minutes=m) for m in range(0, 6 * 60, 5)]
        instants = [attach_zone(w, NY) for w in walls]
        base = attach_zone(day, NY)
        for k in range(0, 6 * 60 * 2):  # every 30 s for six hours
            x = base + dt.timedelta(seconds=30 * k)
            b = legacy_bound(x, NY, 60).replace(tzinfo=None)
            for w, t in zip(walls, instants, strict=False):
                if w.replace(tzinfo=None).hour == 2 and day.month == 3:
                    continue  # wall times in the spring gap do not exist (see the module docs)
                assert (t >= x) == (w >= b), (x, w, t, b)


def test_split_top_level_keeps_function_calls_together() -> None:
    assert split_top_level("APPT_DT, APPT_TM") == ["APPT_DT", "APPT_TM"]
    assert split_top_level("COALESCE(A, B), 'x,y', C") == ["COALESCE(A, B)", "'x,y'", "C"]


# --------------------------------------------------------------------------------------------------
# Criteria
# --------------------------------------------------------------------------------------------------


def test_req_118_03_patient_ids_narrow_and_sort_by_start(backend: SqlBackend) -> None:
    page = search(backend, patient_ids=("1",), limit=50)
    assert ids(page) == PATIENT1 and page.total == 13 and not page.has_more
    assert {a.id: a.interval.start for a in page.appointments}["105"] == utc(STARTS_UTC[105])
    assert search(backend, patient_ids=("abc",)).total == 0  # cannot be a legacy key: matches nothing


def test_req_118_07_ids_and_identifiers(backend: SqlBackend) -> None:
    assert ids(search(backend, ids=("102", "201", "999"))) == [201, 102]  # 201 14:00Z < 102 15:00Z
    assert ids(search(backend, identifiers=(Identifier("urn:sched-adapter:clinicware:appt", "110"),))) == [110]
    assert ids(search(backend, identifiers=(Identifier("", "110"),))) == [110]  # any known system
    assert search(backend, identifiers=(Identifier("urn:other", "110"),)).total == 0
    assert search(backend, identifiers=(Identifier("urn:sched-adapter:clinicware:appt", "abc"),)).total == 0


def test_req_118_11_statuses_translate_to_all_legacy_codes(backend: SqlBackend) -> None:
    assert ids(search(backend, statuses=("cancelled",))) == [202, 109, 110, 111]
    assert ids(search(backend, statuses=("noshow", "arrived"))) == [106, 112]
    assert search(backend, statuses=("pending",)).total == 0
    assert [a.status for a in search(backend, ids=("110",)).appointments] == ["cancelled"]


def test_req_118_10_specialty_codes_and_keys(backend: SqlBackend) -> None:
    card = "http://snomed.info/sct|394579002"
    fp = "http://snomed.info/sct|419772000"
    assert ids(search(backend, patient_ids=("1",), specialty_codes=((card,),))) == [103, 104, 105]
    assert ids(search(backend, patient_ids=("2",), specialty_codes=((card, fp),))) == [201, 202]
    assert search(backend, specialty_codes=((card,), (fp,))).total == 0  # AND of two specialties
    assert ids(search(backend, patient_ids=("1",), specialty_keys=("CARD",))) == [103, 104, 105]
    assert search(backend, specialty_codes=(("http://snomed.info/sct|0",),)).total == 0


def test_req_118_09_practitioner_location_and_visit_type(backend: SqlBackend) -> None:
    assert ids(search(backend, patient_ids=("1",), practitioner_ids=("JONESA",))) == [103, 104, 105]
    assert ids(search(backend, patient_ids=("1", "2"), location_ids=("2",))) == [201, 103, 104, 105]
    assert ids(search(backend, patient_ids=("1",), visit_type_keys=("PHYS", "NEWPT"))) == [101, 108, 113]
    assert search(backend, practitioner_ids=("TOOLONGID",)).total == 0  # longer than CHAR(8)


@pytest.mark.parametrize(
    "bounds, expected",
    [
        ((("ge", "2026-03-02T15:00:00Z"),), [102]),
        ((("gt", "2026-03-02T14:59:59Z"),), [102]),
        ((("gt", "2026-03-02T15:00:00Z"),), []),
        ((("lt", "2026-03-02T15:00:00Z"),), [101]),
        ((("le", "2026-03-02T15:00:00Z"),), [101, 102]),
        ((("ge", "2026-03-02T14:30:00Z"),), [102]),  # 101 ends exactly here but starts before
        ((("ge", "2026-03-02T14:00:30Z"),), [102]),  # seconds round up to the next legacy minute
        ((("lt", "2026-03-02T14:00:30Z"),), [101]),
        ((("ge", "2026-03-02T00:00:00Z"), ("lt", "2026-03-03T00:00:00Z")), [101, 102]),
    ],
)
def test_req_118_05_start_bounds(backend: SqlBackend, bounds: tuple, expected: list[int]) -> None:
    b = tuple((op, utc(t)) for op, t in bounds)
    day = (("ge", utc("2026-03-01T00:00:00Z")), ("lt", utc("2026-03-04T00:00:00Z")))
    assert ids(search(backend, patient_ids=("1",), start_bounds=b + day)) == expected


def test_req_118_05_dst_both_sides(backend: SqlBackend) -> None:
    def window(lo: str, hi: str) -> list[int]:
        return ids(search(backend, patient_ids=("1",), start_bounds=(("ge", utc(lo)), ("lt", utc(hi)))))

    # spring: 01:30 EST (06:30Z) and 03:30 EDT (07:30Z) are an hour apart, not two
    assert window("2026-03-08T06:30:00Z", "2026-03-08T07:30:00Z") == [104]
    assert window("2026-03-08T07:00:00Z", "2026-03-08T08:00:00Z") == [105]
    # autumn: 01:30 is read as its first occurrence (EDT, 05:30Z); 03:00 EST is 08:00Z
    assert window("2026-11-01T05:30:00Z", "2026-11-01T05:31:00Z") == [107]
    assert window("2026-11-01T06:15:00Z", "2026-11-01T08:00:00Z") == []  # the second pass holds no legacy row
    assert window("2026-11-01T06:15:00Z", "2026-11-01T08:00:01Z") == [108]
    # midnight: 103 starts on Mar 7 (local) and ends on Mar 8
    assert window("2026-03-07T05:00:00Z", "2026-03-08T05:00:00Z") == [103]


def test_req_118_05_excluded_ranges_and_empty_bounds(backend: SqlBackend) -> None:
    ne = (Interval(utc("2026-03-08T05:00:00Z"), utc("2026-03-09T04:00:00Z")),)  # local Mar 8
    day_span = (("ge", utc("2026-03-01T00:00:00Z")), ("lt", utc("2026-03-10T00:00:00Z")))
    assert ids(search(backend, patient_ids=("1",), start_bounds=day_span, exclude_start_ranges=ne)) == [101, 102, 103]
    assert (
        search(
            backend,
            patient_ids=("1",),
            start_bounds=(("ge", utc("2026-05-01T00:00:00Z")), ("lt", utc("2026-04-01T00:00:00Z"))),
        ).total
        == 0
    )


def test_end_bounds_are_exact_on_the_narrowed_rows(backend: SqlBackend) -> None:
    # 101 ends 09:30 EST (14:30Z), 102 at 10:20 (15:20Z), 103 at 00:30 Mar 8 (05:30Z)
    page = search(backend, patient_ids=("1",), end_bounds=(("le", utc("2026-03-02T14:30:00Z")),))
    assert ids(page) == [101] and page.total == 1
    page = search(
        backend,
        patient_ids=("1",),
        end_bounds=(("gt", utc("2026-03-08T05:00:00Z")), ("lt", utc("2026-03-08T07:00:00Z"))),
    )
    assert ids(page) == [103]  # 104 ends exactly at 07:00Z
    page = search(
        backend,
        patient_ids=("1",),
        end_bounds=(("gt", utc("2026-03-08T05:00:00Z")), ("le", utc("2026-03-08T07:00:00Z"))),
    )
    assert ids(page) == [103, 104]


def test_end_bounds_refuse_to_scan_a_large_set(backend: SqlBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sql_search, "PYTHON_FILTER_CAP", 3)
    with pytest.raises(InvalidRequest, match="narrow the search"):
        search(backend, patient_ids=("1",), end_bounds=(("gt", utc("2020-01-01T00:00:00Z")),))


# --------------------------------------------------------------------------------------------------
# Paging: keyset on (start, id)
# --------------------------------------------------------------------------------------------------


def test_req_118_14_keyset_pages_forward_and_backward(backend: SqlBackend) -> None:
    all_rows = ids(search(backend, patient_ids=("3",), limit=50))
    assert all_rows == list(range(301, 313))
    seen, after = [], None
    while True:
        page = search(backend, patient_ids=("3",), limit=5, after=after)
        seen += ids(page)
        assert page.total == 12
        if not page.has_more:
            break
        last = page.appointments[-1]
        after = (last.interval.start, last.id)
    assert seen == all_rows
    # descending from the end, through the ties
    last = search(backend, ids=("312",)).appointments[0]
    page = search(backend, patient_ids=("3",), limit=4, descending=True, after=(last.interval.start, last.id))
    assert ids(page) == [311, 310, 309, 308] and page.has_more
    assert ids(search(backend, patient_ids=("3",), limit=3, descending=True)) == [312, 311, 310]


def test_req_118_13_total_is_optional_and_count_zero_reads_no_rows(backend: SqlBackend) -> None:
    page = search(backend, patient_ids=("3",), limit=5, want_total=False)
    assert page.total is None and len(page.appointments) == 5 and page.has_more
    page = search(backend, patient_ids=("3",), limit=0)
    assert page.total == 12 and page.appointments == [] and not page.has_more


def test_issue14_5_a_capped_count_is_exact_up_to_the_cap_and_absent_beyond(
    backend: SqlBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured = _capture(monkeypatch)
    assert search(backend, patient_ids=("3",), limit=2, total_cap=11).total is None  # 12 match
    assert "LIMIT 12" in captured[-1][0]  # the count reads at most cap + 1 rows
    assert search(backend, patient_ids=("3",), limit=2, total_cap=12).total == 12
    assert search(backend, patient_ids=("3",), limit=2, total_cap=None).total == 12
    assert search(backend, patient_ids=("3",), limit=0, total_cap=None).total == 12
    captured.clear()
    page = search(backend, patient_ids=("3",), limit=20, total_cap=1)
    assert page.total == 12 and not page.has_more  # the first page is the last: exact whatever the cap
    assert len(captured) == 1  # and no count query was needed


# --------------------------------------------------------------------------------------------------
# SQL: bound values only, indexes used, no whole-table work in Python
# --------------------------------------------------------------------------------------------------


def _capture(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict]]:
    captured: list[tuple[str, dict]] = []
    real = sql_search.query

    def spy(conn: Any, sql: str, values: dict) -> list[dict]:
        captured.append((sql, dict(values)))
        return real(conn, sql, values)

    monkeypatch.setattr(sql_search, "query", spy)
    return captured


def test_req_118_06_patient_and_date_use_the_patient_index_with_bound_values(
    backend: SqlBackend, search_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured = _capture(monkeypatch)
    page = search(
        backend,
        patient_ids=("1",),
        start_bounds=(("ge", utc("2026-11-01T00:00:00Z")), ("lt", utc("2026-12-02T00:00:00Z"))),
        limit=2,
    )
    assert ids(page) == [107, 108] and page.total == 3
    assert len(captured) == 2  # one page query, one count
    conn = sqlite3.connect(search_db)
    try:
        for sql, values in captured:
            assert "20261101" not in sql and "'1'" not in sql and " 1)" not in sql  # values are bound
            text, params = bind(sql, values)
            plan = " ".join(r[-1] for r in conn.execute("EXPLAIN QUERY PLAN " + text, params).fetchall())
            assert "APPT_PAT_DT" in plan, plan
            assert not re.search(r"\bSCAN (A|APPT)\b(?! USING)", plan), plan
    finally:
        conn.close()


def test_req_118_14_cursor_query_uses_the_date_index(
    backend: SqlBackend, search_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured = _capture(monkeypatch)
    first = search(backend, practitioner_ids=("SMITHJ",), limit=2).appointments[-1]
    search(backend, practitioner_ids=("SMITHJ",), limit=2, after=(first.interval.start, first.id))
    sql, values = captured[-2]
    conn = sqlite3.connect(search_db)
    try:
        text, params = bind(sql, values)
        plan = " ".join(r[-1] for r in conn.execute("EXPLAIN QUERY PLAN " + text, params).fetchall())
        assert "USING INDEX" in plan and "APPT_PROV_DT" in plan, plan
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------------
# The mapping format: validation, and other legacy shapes of the start time
# --------------------------------------------------------------------------------------------------


def _demo_doc() -> dict:
    return yaml.safe_load(DEMO_MAPPING.read_text(encoding="utf-8"))


def _write_mapping(tmp_path: Path, doc: dict, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda ap: ap["filters"].update(when="X = 1"), "unknown filter(s) ['when']"),
        (lambda ap: ap["filters"].pop("start_before"), "'start_from' and 'start_before' go together"),
        (lambda ap: ap["filters"].update(patient="PAT_ID IN (:pat)"), "unknown bind parameter :pat"),
        (lambda ap: ap["filters"].update(start_from="APPT_DT >= :nope"), "unknown bind parameter :nope"),
        (lambda ap: ap["binds"].update(start_date="{when|to_yyyymmdd}"), "unknown value 'when'"),
        (lambda ap: ap.update(binds={}), "need 'binds'"),
        (lambda ap: ap["order"].pop("start"), "need order.start"),
        (lambda ap: ap["codes"].update(status="nope"), "code table 'nope' is not declared"),
        (lambda ap: ap["codes"].pop("status"), "filter 'status' needs codes.status"),
        (lambda ap: ap.update(start_resolution_seconds=7), "divides 3600"),
        (lambda ap: ap["identifier_filters"].update({"urn:x": "APPT_ID IN (:v)"}), "unknown bind parameter :v"),
        (lambda ap: ap["order"].update(then="X"), "unknown sort key(s) ['then']"),
    ],
)
def test_mapping_appointments_section_is_validated(tmp_path: Path, change: Any, message: str) -> None:
    doc = _demo_doc()
    change(doc["appointments"])
    with pytest.raises(MappingError) as err:
        load_mapping(_write_mapping(tmp_path, doc))
    assert any(message in p for p in err.value.problems), err.value.problems
    assert all(re.match(r".+\.yaml:\d+: ", p) for p in err.value.problems)  # file:line


SHAPES = {
    # one DATETIME column (stored by SQLite as ISO text), bound as a naive local timestamp string
    "datetime": {
        "ddl": "CREATE TABLE APPT2 (APPT_ID INTEGER PRIMARY KEY, PAT_ID INTEGER, PROV_ID CHAR(8), FAC_ID INTEGER, "
        "START_TS TIMESTAMP, DUR_MIN INTEGER, TYPE_CD VARCHAR(6), STATUS_CD CHAR(1), CANCEL_RSN VARCHAR(40), "
        "NOTE_TXT VARCHAR(255), CREATED_TS VARCHAR(14)); CREATE INDEX APPT2_PAT ON APPT2 (PAT_ID, START_TS)",
        "copy": "INSERT INTO APPT2 SELECT APPT_ID, PAT_ID, PROV_ID, FAC_ID, "
        "substr(APPT_DT,1,4)||'-'||substr(APPT_DT,5,2)||'-'||substr(APPT_DT,7,2)||' '||"
        "substr(printf('%04d',APPT_TM),1,2)||':'||substr(printf('%04d',APPT_TM),3,2)||':00', "
        "DUR_MIN, TYPE_CD, STATUS_CD, CANCEL_RSN, NOTE_TXT, CREATED_TS FROM APPT",
        "select": "SELECT A.APPT_ID, A.PAT_ID, A.PROV_ID, A.FAC_ID, A.START_TS, A.DUR_MIN, A.TYPE_CD, A.STATUS_CD, "
        "A.CANCEL_RSN, A.NOTE_TXT, A.CREATED_TS, P.SPEC_CD FROM APPT2 A JOIN PROVIDER P ON P.PROV_ID = A.PROV_ID",
        "start_from": "START_TS >= :ts",
        "start_before": "START_TS < :ts",
        "binds": {"ts": "{bound|format:%Y-%m-%d %H:%M:%S}"},
        "resolution": 1,
        "start": "{START_TS|local_datetime:datetime}",
        "order": "START_TS",
    },
    # a DATE + TIME pair (OpenEMR's pc_eventDate + pc_startTime), ISO text in SQLite
    "date+time": {
        "ddl": "CREATE TABLE APPT2 (APPT_ID INTEGER PRIMARY KEY, PAT_ID INTEGER, PROV_ID CHAR(8), FAC_ID INTEGER, "
        "EV_DATE DATE, EV_TIME TIME, DUR_MIN INTEGER, TYPE_CD VARCHAR(6), STATUS_CD CHAR(1), "
        "CANCEL_RSN VARCHAR(40), NOTE_TXT VARCHAR(255), CREATED_TS VARCHAR(14)); "
        "CREATE INDEX APPT2_PAT ON APPT2 (PAT_ID, EV_DATE)",
        "copy": "INSERT INTO APPT2 SELECT APPT_ID, PAT_ID, PROV_ID, FAC_ID, "
        "substr(APPT_DT,1,4)||'-'||substr(APPT_DT,5,2)||'-'||substr(APPT_DT,7,2), "
        "substr(printf('%04d',APPT_TM),1,2)||':'||substr(printf('%04d',APPT_TM),3,2)||':00', "
        "DUR_MIN, TYPE_CD, STATUS_CD, CANCEL_RSN, NOTE_TXT, CREATED_TS FROM APPT",
        "select": "SELECT A.APPT_ID, A.PAT_ID, A.PROV_ID, A.FAC_ID, A.EV_DATE, A.EV_TIME, A.DUR_MIN, A.TYPE_CD, "
        "A.STATUS_CD, A.CANCEL_RSN, A.NOTE_TXT, A.CREATED_TS, P.SPEC_CD "
        "FROM APPT2 A JOIN PROVIDER P ON P.PROV_ID = A.PROV_ID",
        "start_from": "EV_DATE >= :d AND (EV_DATE > :d OR EV_TIME >= :t)",
        "start_before": "EV_DATE <= :d AND (EV_DATE < :d OR EV_TIME < :t)",
        "binds": {"d": "{bound|format:%Y-%m-%d}", "t": "{bound|format:%H:%M:%S}"},
        "resolution": 1,
        "start": "{EV_DATE,EV_TIME|local_datetime:date,time}",
        "order": "EV_DATE, EV_TIME",
    },
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_req_118_05_start_filters_are_declarable_for_other_legacy_shapes(tmp_path: Path, shape: str) -> None:
    s = SHAPES[shape]
    db = build_search_db(tmp_path / "shape.sqlite")
    conn = sqlite3.connect(db)
    conn.executescript(s["ddl"] + ";\n" + s["copy"] + ";")
    conn.commit()
    conn.close()
    doc = _demo_doc()
    ap = doc["appointments"]
    ap["select"] = s["select"]
    ap["filters"]["start_from"], ap["filters"]["start_before"] = s["start_from"], s["start_before"]
    ap["binds"] = s["binds"]
    ap["start_resolution_seconds"] = s["resolution"]
    ap["order"]["start"] = s["order"]
    ap["fields"]["start"] = s["start"]
    b = SqlBackend(load_mapping(_write_mapping(tmp_path, doc)), Database(f"sqlite:///{db}"))
    demo = SqlBackend(load_mapping(DEMO_MAPPING), Database(f"sqlite:///{db}"))
    try:
        queries = [
            dict(patient_ids=("1",)),
            dict(patient_ids=("1",), start_bounds=(("ge", utc("2026-03-08T07:00:00Z")),)),
            dict(
                patient_ids=("1",),
                start_bounds=(("ge", utc("2026-11-01T05:30:00Z")), ("lt", utc("2026-11-01T08:00:00Z"))),
            ),
            dict(
                patient_ids=("1",),
                start_bounds=(("gt", utc("2026-03-02T14:00:00Z")), ("le", utc("2026-03-08T06:30:00Z"))),
            ),
            dict(
                patient_ids=("1",),
                exclude_start_ranges=(Interval(utc("2026-03-08T05:00:00Z"), utc("2026-03-09T04:00:00Z")),),
            ),
            dict(statuses=("cancelled",), descending=True),
        ]
        for kw in queries:
            got, want = search(b, **kw), search(demo, **kw)
            assert ids(got) == ids(want) and got.total == want.total, kw
            assert [a.interval for a in got.appointments] == [a.interval for a in want.appointments]
        first = search(b, patient_ids=("3",), limit=5)
        last = first.appointments[-1]
        assert ids(search(b, patient_ids=("3",), limit=5, after=(last.interval.start, last.id))) == list(
            range(306, 311)
        )
    finally:
        run(b.close())
        run(demo.close())


def test_a_mapping_without_date_filters_says_what_it_cannot_search(tmp_path: Path, search_db: Path) -> None:
    doc = _demo_doc()
    ap = doc["appointments"]
    for name in ("start_from", "start_before", "status"):
        ap["filters"].pop(name)
    ap["binds"] = {}
    b = SqlBackend(load_mapping(_write_mapping(tmp_path, doc)), Database(f"sqlite:///{search_db}"))
    try:
        with pytest.raises(InvalidRequest, match="filters.status"):
            search(b, statuses=("booked",))
        with pytest.raises(InvalidRequest, match="filters.start_from"):
            search(b, patient_ids=("1",), start_bounds=(("ge", utc("2026-01-01T00:00:00Z")),))
    finally:
        run(b.close())


# --------------------------------------------------------------------------------------------------
# Portability: the same queries on PostgreSQL and MariaDB over ODBC
# --------------------------------------------------------------------------------------------------

PORTABLE_QUERIES = [
    dict(patient_ids=("1",), limit=5),
    dict(patient_ids=("1",), start_bounds=(("ge", utc("2026-03-08T07:00:00Z")), ("lt", utc("2026-11-01T08:00:01Z")))),
    dict(patient_ids=("1",), start_bounds=(("gt", utc("2026-03-02T14:00:00Z")),), descending=True, limit=3),
    dict(statuses=("cancelled",)),
    dict(practitioner_ids=("JONESA",), location_ids=("2",), visit_type_keys=("ECHO",)),
    dict(specialty_codes=(("http://snomed.info/sct|419772000",),), patient_ids=("2",)),
    dict(identifiers=(Identifier("urn:sched-adapter:clinicware:appt", "105"),)),
    dict(ids=("101", "201", "113")),
    dict(patient_ids=("3",), limit=4, after=(utc("2026-05-05T18:00:00Z"), "303")),
    dict(patient_ids=("3",), limit=4, after=(utc("2026-05-05T18:00:00Z"), "303"), descending=True),
    dict(
        patient_ids=("1",), exclude_start_ranges=(Interval(utc("2026-03-08T05:00:00Z"), utc("2026-03-09T04:00:00Z")),)
    ),
    dict(patient_ids=("3",), limit=2, total_cap=5),  # more than the cap: no total
    dict(patient_ids=("3",), limit=2, total_cap=12),  # exactly the cap: exact
]


@pytest.fixture(scope="module")
def expected_sqlite(search_db: Path) -> list[tuple[list[int], int | None, bool]]:
    b = SqlBackend(load_mapping(DEMO_MAPPING), Database(f"sqlite:///{search_db}"))
    try:
        return [(ids(p), p.total, p.has_more) for p in (search(b, **kw) for kw in PORTABLE_QUERIES)]
    finally:
        run(b.close())


@pytest.mark.parametrize("kind", ["postgresql", "mariadb"])
def test_req_118_sql_is_portable_to_postgresql_and_mariadb(kind: str, fresh_db: Any, expected_sqlite: list) -> None:
    import pyodbc

    dsn = fresh_db(kind, "search")
    conn = pyodbc.connect(dsn, autocommit=False)
    try:
        create_schema(conn)
        insert_fixture_rows(conn)
    finally:
        conn.close()
    b = SqlBackend(load_mapping(DEMO_MAPPING), Database("odbc:" + dsn))
    try:
        got = [(ids(p), p.total, p.has_more) for p in (search(b, **kw) for kw in PORTABLE_QUERIES)]
    finally:
        run(b.close())
    assert got == expected_sqlite
    assert expected_sqlite[0] == ([101, 102, 103, 104, 105], 13, True)
    assert expected_sqlite[3][0] == [202, 109, 110, 111]
