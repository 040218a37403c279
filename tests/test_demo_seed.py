"""Tests for adapter.demo.seed: the embedded demo database (stdlib sqlite3 only)."""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
from collections import defaultdict

import pytest

from adapter.demo import seed as demo_seed

TODAY = dt.date(2025, 3, 12)  # a Wednesday
TABLES = ["FACILITY", "PROVIDER", "PATIENT", "APPT_TYPE", "PROV_TEMPLATE", "PROV_BLOCK", "APPT", "ID_COUNTER"]
BLOCKING = ("S", "A", "D", "N")


def ymd(d: dt.date) -> int:
    return d.year * 10000 + d.month * 100 + d.day


def from_ymd(v: int) -> dt.date:
    return dt.date(v // 10000, v // 100 % 100, v % 100)


def minutes(hhmm: int) -> int:
    return hhmm // 100 * 60 + hhmm % 100


def new_db(**kwargs) -> tuple[sqlite3.Connection, demo_seed.SeedSummary]:
    conn = sqlite3.connect(":memory:")
    demo_seed.create_schema(conn)
    summary = demo_seed.seed_demo(conn, **{"today": TODAY, **kwargs})
    return conn, summary


def dump(conn) -> dict[str, list[tuple]]:
    return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in TABLES}


@pytest.fixture(scope="module")
def seeded():
    conn, summary = new_db()
    yield conn, summary
    conn.close()


@pytest.fixture(scope="module")
def db(seeded):
    return seeded[0]


def templates_on(conn, prov: str, day: dt.date) -> list[tuple[int, int, int]]:
    """(fac, start_min, end_min) of the templates of ``prov`` effective on ``day``."""
    rows = conn.execute(
        "SELECT FAC_ID, START_HHMM, END_HHMM FROM PROV_TEMPLATE WHERE PROV_ID = ? AND DAY_OF_WEEK = ? "
        "AND EFF_FROM <= ? AND (EFF_THRU IS NULL OR EFF_THRU >= ?)",
        (prov, day.isoweekday(), ymd(day), ymd(day)),
    ).fetchall()
    return [(fac, minutes(s), minutes(e)) for fac, s, e in rows]


def blocks_on(conn, prov: str, day: dt.date) -> list[tuple[int, int]]:
    rows = conn.execute(
        "SELECT START_HHMM, END_HHMM FROM PROV_BLOCK WHERE PROV_ID = ? AND BLOCK_DT = ?", (prov, ymd(day))
    ).fetchall()
    return [(minutes(s), minutes(e)) for s, e in rows]


def working_and_booked_minutes(conn, today: dt.date, days: int) -> tuple[int, int]:
    provs = [r[0] for r in conn.execute("SELECT PROV_ID FROM PROVIDER WHERE ACTIVE_YN = 'Y'")]
    working = booked = 0
    for prov in provs:
        for k in range(days):
            day = today + dt.timedelta(days=k)
            free: set[int] = set()
            for _fac, s, e in templates_on(conn, prov, day):
                free.update(range(s, e))
            for s, e in blocks_on(conn, prov, day):
                free.difference_update(range(s, e))
            working += len(free)
    booked = conn.execute(
        "SELECT COALESCE(SUM(DUR_MIN), 0) FROM APPT WHERE STATUS_CD IN ('S', 'A', 'D', 'N') "
        "AND APPT_DT >= ? AND APPT_DT < ?",
        (ymd(today), ymd(today + dt.timedelta(days=days))),
    ).fetchone()[0]
    return working, booked


# ------------------------------------------------------------------------ schema


def test_issue13_1_schema_is_package_data():
    from importlib import resources

    assert demo_seed.SCHEMA == resources.files("adapter.demo") / "schema.sql"
    assert demo_seed.SCHEMA.is_file()


def test_schema_statements_strip_comments_and_cover_every_table():
    statements = demo_seed.schema_statements()
    assert all("--" not in s and not s.rstrip().endswith(";") for s in statements)
    created = sorted(re.match(r"CREATE TABLE (\w+)", s).group(1) for s in statements if s.startswith("CREATE TABLE"))
    assert created == sorted(TABLES)
    assert sum(s.startswith("CREATE INDEX") for s in statements) == 5


def test_create_schema_creates_empty_tables():
    conn = sqlite3.connect(":memory:")
    demo_seed.create_schema(conn)
    for table in TABLES:
        assert conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0


# ------------------------------------------------------------------------ determinism


def test_seed_is_deterministic_for_same_today_and_seed(db):
    other, _ = new_db()
    assert dump(other) == dump(db)


def test_seed_differs_for_another_seed(db):
    other, _ = new_db(seed=43)
    assert dump(other)["APPT"] != dump(db)["APPT"]
    # The fixed reference data does not depend on the seed.
    for table in ("FACILITY", "PROVIDER", "APPT_TYPE", "PROV_TEMPLATE"):
        assert dump(other)[table] == dump(db)[table]


# ------------------------------------------------------------------------ reference data


def test_seed_counts_facilities_providers_patients_and_types(seeded):
    db, summary = seeded
    assert db.execute("SELECT COUNT(*) FROM FACILITY").fetchone()[0] == 3 == summary.facilities
    active = db.execute("SELECT SPEC_CD, COUNT(*) FROM PROVIDER WHERE ACTIVE_YN = 'Y' GROUP BY SPEC_CD").fetchall()
    per_spec = dict(active)
    assert set(per_spec) == {"FP", "CARD", "DERM", "PEDS", "ORTH"}
    assert all(n >= 3 for n in per_spec.values())
    assert sum(per_spec.values()) >= 20 and sum(per_spec.values()) == summary.active_providers
    assert db.execute("SELECT COUNT(*) FROM PROVIDER").fetchone()[0] == summary.providers
    assert db.execute("SELECT COUNT(*) FROM PATIENT").fetchone()[0] == 200 == summary.patients
    assert [r[0] for r in db.execute("SELECT PAT_ID FROM PATIENT ORDER BY PAT_ID")] == list(range(1, 201))
    assert db.execute("SELECT COUNT(*) FROM APPT_TYPE").fetchone()[0] == 7 == summary.appointment_types
    assert db.execute("SELECT COUNT(*) FROM PROV_TEMPLATE").fetchone()[0] == summary.templates
    assert db.execute("SELECT COUNT(*) FROM PROV_BLOCK").fetchone()[0] == summary.blocks
    assert db.execute("SELECT COUNT(*) FROM APPT").fetchone()[0] == summary.appointments


def test_appointment_types_are_exactly_the_documented_rows(db):
    rows = db.execute("SELECT TYPE_CD, DESCR, DUR_MIN, SPEC_CD FROM APPT_TYPE ORDER BY TYPE_CD").fetchall()
    assert rows == sorted(
        [
            ("NEWPT", "New patient visit", 40, None),
            ("FOLLOW", "Follow-up visit", 20, None),
            ("PHYS", "Annual physical", 30, "FP"),
            ("ECHO", "Echocardiogram", 60, "CARD"),
            ("SKIN", "Skin check", 20, "DERM"),
            ("WELL", "Well child visit", 30, "PEDS"),
            ("FRACT", "Fracture follow-up", 20, "ORTH"),
        ]
    )


def test_facilities_are_three_massachusetts_clinics(db):
    rows = db.execute("SELECT FAC_ID, FAC_NAME, ADDR1, CITY, STATE, ZIP, PHONE FROM FACILITY ORDER BY 1").fetchall()
    assert [r[0] for r in rows] == [1, 2, 3]
    assert [r[1] for r in rows] == ["Riverside Family Health", "Harbor View Clinic", "Maple Street Medical"]
    assert all(r[4] == "MA" and r[2] and r[3] and re.fullmatch(r"\d{5}", r[5]) and r[6] for r in rows)


def test_provider_ids_are_uppercase_mnemonics_space_padded_to_8(db):
    rows = db.execute("SELECT PROV_ID, LAST_NM, FIRST_NM, NPI, TITLE FROM PROVIDER").fetchall()
    for prov, last, first, npi, title in rows:
        assert len(prov) == 8
        mnemonic = prov.rstrip()
        assert re.fullmatch(r"[A-Z]{2,8}", mnemonic)
        letters = re.sub(r"[^A-Z]", "", last.upper())
        assert mnemonic == letters[:7] + first[0].upper()
        assert re.fullmatch(r"\d{10}", npi)
        assert title in ("MD", "DO", "NP")
    assert len({r[0] for r in rows}) == len(rows)
    assert db.execute(
        "SELECT LAST_NM, FIRST_NM, SPEC_CD, HOME_FAC, ACTIVE_YN FROM PROVIDER WHERE PROV_ID = 'SPEARSB '"
    ).fetchone() == ("Spears", "Beth", "FP", 1, "Y")


def test_exactly_one_inactive_provider_without_schedule(db):
    inactive = [r[0] for r in db.execute("SELECT PROV_ID FROM PROVIDER WHERE ACTIVE_YN = 'N'")]
    assert len(inactive) == 1
    for table in ("PROV_TEMPLATE", "PROV_BLOCK", "APPT"):
        assert db.execute(f"SELECT COUNT(*) FROM {table} WHERE PROV_ID = ?", (inactive[0],)).fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM PROVIDER WHERE ACTIVE_YN NOT IN ('Y', 'N')").fetchone()[0] == 0


def test_patients_have_unique_mrns_and_awkward_names(db):
    rows = db.execute("SELECT PAT_ID, MRN, LAST_NM, FIRST_NM, BIRTH_DT, SEX FROM PATIENT").fetchall()
    assert all(re.fullmatch(r"MRN\d{7}", r[1]) for r in rows)
    assert len({r[1] for r in rows}) == 200
    assert all(r[5] in ("M", "F", "U") for r in rows)
    for r in rows:
        from_ymd(r[4])  # a real date
    assert db.execute("SELECT LAST_NM, FIRST_NM FROM PATIENT WHERE PAT_ID = 1").fetchone() == ("O'Brien", "Patrick")
    assert db.execute("SELECT LAST_NM, FIRST_NM FROM PATIENT WHERE PAT_ID = 2").fetchone() == ("Muñoz", "Zoë")
    assert any("'" in r[2] for r in rows)
    assert any(not (r[2] + (r[3] or "")).isascii() for r in rows)
    children = [r for r in rows if r[4] > ymd(TODAY) - 180000]
    assert len(children) >= 20


# ------------------------------------------------------------------------ templates and blocks


def test_spears_works_monday_to_friday_9_to_5_at_facility_1(db):
    rows = db.execute(
        "SELECT FAC_ID, DAY_OF_WEEK, START_HHMM, END_HHMM, EFF_FROM, EFF_THRU FROM PROV_TEMPLATE "
        "WHERE PROV_ID = 'SPEARSB ' ORDER BY DAY_OF_WEEK"
    ).fetchall()
    year_ago = ymd(TODAY - dt.timedelta(days=365))
    assert rows == [(1, dow, 900, 1700, year_ago, None) for dow in range(1, 6)]


def test_spears_only_block_is_the_wednesday_noon_staff_meeting(db):
    rows = db.execute(
        "SELECT BLOCK_DT, START_HHMM, END_HHMM FROM PROV_BLOCK WHERE PROV_ID = 'SPEARSB ' ORDER BY BLOCK_DT"
    ).fetchall()
    wednesdays = [
        TODAY + dt.timedelta(days=k) for k in range(-30, 60) if (TODAY + dt.timedelta(days=k)).isoweekday() == 3
    ]
    assert rows == [(ymd(d), 1200, 1300) for d in wednesdays]


def test_templates_are_weekday_hours_with_some_splits_and_second_sites(db):
    rows = db.execute("SELECT PROV_ID, FAC_ID, DAY_OF_WEEK, START_HHMM, END_HHMM FROM PROV_TEMPLATE").fetchall()
    assert {r[2] for r in rows} == {1, 2, 3, 4, 5}
    assert any((r[3], r[4]) == (800, 1200) for r in rows)
    assert any((r[3], r[4]) == (1300, 1700) for r in rows)
    homes = dict(db.execute("SELECT PROV_ID, HOME_FAC FROM PROVIDER"))
    away = {r[0] for r in rows if r[1] != homes[r[0]]}
    assert len(away) >= 2
    assert all(r[3] % 10 == 0 and r[4] % 10 == 0 and r[3] < r[4] for r in rows)


def test_template_validity_ranges_change_hours_mid_window(db):
    changing = db.execute("SELECT PROV_ID, EFF_THRU FROM PROV_TEMPLATE WHERE EFF_THRU >= ?", (ymd(TODAY),)).fetchall()
    provs = sorted({p for p, _ in changing})
    assert len(provs) >= 2
    for prov in provs:
        thru = max(t for p, t in changing if p == prov)
        assert ymd(TODAY) < thru < ymd(TODAY + dt.timedelta(days=60))
        last_day = from_ymd(thru)
        week_before = [templates_on(db, prov, last_day - dt.timedelta(days=k)) for k in range(7)]
        week_after = [templates_on(db, prov, last_day + dt.timedelta(days=k)) for k in range(1, 8)]
        assert any(week_before) and any(week_after)
        assert sorted(map(sorted, week_before)) != sorted(map(sorted, week_after))
    assert (
        templates_on(db, "OKAFORC ", TODAY + dt.timedelta(days=20)) or (TODAY + dt.timedelta(days=20)).isoweekday() > 5
    )
    nxt = db.execute(
        "SELECT MIN(EFF_FROM) FROM PROV_TEMPLATE WHERE PROV_ID = 'OKAFORC ' AND EFF_FROM > ?", (ymd(TODAY),)
    ).fetchone()[0]
    assert nxt == ymd(TODAY + dt.timedelta(days=21))


def test_blocks_include_full_day_vacations_and_meetings(db):
    rows = db.execute("SELECT PROV_ID, BLOCK_DT, START_HHMM, END_HHMM, REASON FROM PROV_BLOCK").fetchall()
    future = [r for r in rows if ymd(TODAY) <= r[1] < ymd(TODAY + dt.timedelta(days=60))]
    assert any((r[2], r[3]) == (0, 2400) for r in future)
    assert any((r[2], r[3]) == (1200, 1300) and r[0] != "SPEARSB " for r in future)
    assert all(r[4] for r in rows)
    assert all(0 <= r[2] < r[3] <= 2400 for r in rows)


# ------------------------------------------------------------------------ appointments


def test_no_overlapping_blocking_appointments_per_provider(db):
    per_prov: dict[str, list[tuple[dt.datetime, dt.datetime]]] = defaultdict(list)
    for prov, d, tm, dur in db.execute(
        "SELECT PROV_ID, APPT_DT, APPT_TM, DUR_MIN FROM APPT WHERE STATUS_CD IN ('S', 'A', 'D', 'N')"
    ):
        start = dt.datetime.combine(from_ymd(d), dt.time(tm // 100, tm % 100))
        per_prov[prov].append((start, start + dt.timedelta(minutes=dur)))
    assert per_prov
    for prov, spans in per_prov.items():
        spans.sort()
        for (_s1, e1), (s2, _e2) in zip(spans, spans[1:], strict=False):
            assert e1 <= s2, f"overlap for {prov!r} at {s2}"


def test_no_patient_has_overlapping_blocking_appointments(db):
    per_pat: dict[int, list[tuple[dt.datetime, dt.datetime]]] = defaultdict(list)
    for pat, d, tm, dur in db.execute(
        "SELECT PAT_ID, APPT_DT, APPT_TM, DUR_MIN FROM APPT WHERE STATUS_CD IN ('S', 'A', 'D', 'N')"
    ):
        start = dt.datetime.combine(from_ymd(d), dt.time(tm // 100, tm % 100))
        per_pat[pat].append((start, start + dt.timedelta(minutes=dur)))
    for pat, spans in per_pat.items():
        spans.sort()
        for (_s1, e1), (s2, _e2) in zip(spans, spans[1:], strict=False):
            assert e1 <= s2, f"patient {pat} double-booked at {s2}"


@pytest.mark.parametrize("today,seed", [(TODAY, 42), (dt.date(2024, 12, 29), 1), (dt.date(2028, 2, 27), 99)])
def test_seed_books_about_30_percent_of_working_time(today, seed):
    conn = sqlite3.connect(":memory:")
    demo_seed.create_schema(conn)
    summary = demo_seed.seed_demo(conn, today=today, seed=seed)
    working, booked = working_and_booked_minutes(conn, today, 60)
    assert working > 0
    assert 0.25 <= booked / working <= 0.35
    assert summary.booked_fraction == pytest.approx(booked / working)


def test_booked_fraction_parameter_is_honoured():
    conn, summary = new_db(booked_fraction=0.6, days=20)
    working, booked = working_and_booked_minutes(conn, TODAY, 20)
    assert 0.55 <= booked / working <= 0.65
    assert summary.booked_fraction == pytest.approx(booked / working)


def test_future_scheduled_appointments_fit_templates_and_avoid_blocks(db):
    types = {r[0]: (r[1], r[2]) for r in db.execute("SELECT TYPE_CD, DUR_MIN, SPEC_CD FROM APPT_TYPE")}
    specs = dict(db.execute("SELECT PROV_ID, SPEC_CD FROM PROVIDER"))
    rows = db.execute(
        "SELECT PROV_ID, FAC_ID, APPT_DT, APPT_TM, DUR_MIN, TYPE_CD FROM APPT WHERE STATUS_CD = 'S' AND APPT_DT >= ?",
        (ymd(TODAY),),
    ).fetchall()
    assert len(rows) > 1000
    for prov, fac, d, tm, dur, code in rows:
        day = from_ymd(d)
        start, end = minutes(tm), minutes(tm) + dur
        assert tm % 10 == 0
        assert types[code][0] == dur
        assert types[code][1] in (None, specs[prov])
        assert any(f == fac and s <= start and end <= e for f, s, e in templates_on(db, prov, day)), (prov, d, tm)
        assert all(end <= s or e <= start for s, e in blocks_on(db, prov, day)), (prov, d, tm)


def test_future_has_only_scheduled_or_cancelled_statuses(db):
    statuses = {r[0] for r in db.execute("SELECT DISTINCT STATUS_CD FROM APPT WHERE APPT_DT >= ?", (ymd(TODAY),))}
    assert "S" in statuses and statuses <= {"S", "C", "P", "L"}
    assert statuses & {"C", "P", "L"}


def test_past_has_done_no_show_arrived_and_cancelled(db):
    statuses = {r[0] for r in db.execute("SELECT DISTINCT STATUS_CD FROM APPT WHERE APPT_DT < ?", (ymd(TODAY),))}
    assert {"D", "N", "A"} <= statuses <= {"D", "N", "A", "C", "P", "L"}
    assert statuses & {"C", "P", "L"}


def test_cancelled_appointments_have_a_reason_and_others_do_not(db):
    assert (
        db.execute(
            "SELECT COUNT(*) FROM APPT WHERE STATUS_CD IN ('C', 'P', 'L') AND (CANCEL_RSN IS NULL OR CANCEL_RSN = '')"
        ).fetchone()[0]
        == 0
    )
    assert (
        db.execute(
            "SELECT COUNT(*) FROM APPT WHERE STATUS_CD NOT IN ('C', 'P', 'L') AND CANCEL_RSN IS NOT NULL"
        ).fetchone()[0]
        == 0
    )


def test_two_past_appointments_cross_midnight(db):
    rows = db.execute(
        "SELECT APPT_DT, APPT_TM, DUR_MIN, TYPE_CD FROM APPT "
        "WHERE (APPT_TM / 100) * 60 + APPT_TM % 100 + DUR_MIN > 1440"
    ).fetchall()
    assert len(rows) == 2
    assert all(r[0] < ymd(TODAY) and r[3] == "ECHO" for r in rows)


def test_appointment_rows_look_like_legacy_data(db):
    rows = db.execute(
        "SELECT APPT_ID, PAT_ID, APPT_DT, BOOKED_BY, CREATED_TS, NOTE_TXT, TYPE_CD FROM APPT ORDER BY APPT_ID"
    ).fetchall()
    assert rows[0][0] == 1000
    assert [r[0] for r in rows] == list(range(1000, 1000 + len(rows)))
    assert all(r[3] == "LEGACY" for r in rows)
    assert all(re.fullmatch(r"\d{14}", r[4]) and int(r[4][:8]) < r[2] for r in rows)
    assert all(int(r[4][:8]) <= ymd(TODAY) for r in rows)
    assert any(r[5] for r in rows)
    assert all(1 <= r[1] <= 200 for r in rows)
    assert {r[6] for r in rows} == {"NEWPT", "FOLLOW", "PHYS", "ECHO", "SKIN", "WELL", "FRACT"}


def test_id_counter_holds_the_next_free_appt_id(seeded):
    db, summary = seeded
    counter = db.execute("SELECT CTR_NAME, NEXT_VAL FROM ID_COUNTER").fetchall()
    assert counter == [("APPT_ID", db.execute("SELECT MAX(APPT_ID) + 1 FROM APPT").fetchone()[0])]
    assert summary.next_appt_id == counter[0][1]


def test_summary_counts_future_and_past_appointments(seeded):
    db, summary = seeded
    future = db.execute("SELECT COUNT(*) FROM APPT WHERE APPT_DT >= ?", (ymd(TODAY),)).fetchone()[0]
    assert summary.future_appointments == future
    assert summary.past_appointments == summary.appointments - future > 0


# ------------------------------------------------------------------------ files and bulk data


def test_ensure_demo_database_creates_once_then_returns_false(tmp_path):
    path = tmp_path / "var" / "demo" / "clinicware.sqlite"
    assert demo_seed.ensure_demo_database(path, today=TODAY) is True
    assert path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["clinicware.sqlite"]
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT COUNT(*) FROM PATIENT").fetchone()[0] == 200
        first = dump(conn)
    finally:
        conn.close()
    mtime = path.stat().st_mtime_ns
    assert demo_seed.ensure_demo_database(path, today=TODAY + dt.timedelta(days=1)) is False
    assert path.stat().st_mtime_ns == mtime
    conn = sqlite3.connect(path)
    try:
        assert dump(conn) == first
    finally:
        conn.close()


def test_add_bulk_appointments_adds_exactly_count_rows_and_updates_counter():
    conn, summary = new_db()
    before = conn.execute("SELECT COUNT(*) FROM APPT").fetchone()[0]
    added = demo_seed.add_bulk_appointments(conn, count=2500, today=TODAY, batch=1000)
    assert added == 2500
    assert conn.execute("SELECT COUNT(*) FROM APPT").fetchone()[0] == before + 2500
    ids = [
        r[0]
        for r in conn.execute("SELECT APPT_ID FROM APPT WHERE APPT_ID >= ? ORDER BY APPT_ID", (summary.next_appt_id,))
    ]
    assert ids == list(range(summary.next_appt_id, summary.next_appt_id + 2500))
    assert (
        conn.execute("SELECT NEXT_VAL FROM ID_COUNTER WHERE CTR_NAME = 'APPT_ID'").fetchone()[0]
        == summary.next_appt_id + 2500
    )
    lo, hi = conn.execute(
        "SELECT MIN(APPT_DT), MAX(APPT_DT) FROM APPT WHERE APPT_ID >= ?", (summary.next_appt_id,)
    ).fetchone()
    assert ymd(TODAY - dt.timedelta(days=731)) <= lo < ymd(TODAY - dt.timedelta(days=700))
    assert ymd(TODAY + dt.timedelta(days=330)) < hi < ymd(TODAY + dt.timedelta(days=366))
    active = {r[0] for r in conn.execute("SELECT PROV_ID FROM PROVIDER WHERE ACTIVE_YN = 'Y'")}
    bulk_provs = {
        r[0] for r in conn.execute("SELECT DISTINCT PROV_ID FROM APPT WHERE APPT_ID >= ?", (summary.next_appt_id,))
    }
    assert bulk_provs == active
    # A second call continues from the counter.
    assert demo_seed.add_bulk_appointments(conn, count=10, today=TODAY, seed=8) == 10
    assert conn.execute("SELECT NEXT_VAL FROM ID_COUNTER").fetchone()[0] == summary.next_appt_id + 2510
    assert conn.execute("SELECT MAX(APPT_ID) FROM APPT").fetchone()[0] == summary.next_appt_id + 2509


def test_add_bulk_appointments_works_on_an_autocommit_connection(tmp_path):
    path = tmp_path / "bulk.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    demo_seed.create_schema(conn)
    demo_seed.seed_demo(conn, today=TODAY, days=5, past_days=5)
    assert demo_seed.add_bulk_appointments(conn, count=300, today=TODAY, batch=128) == 300
    assert not conn.in_transaction
    conn.close()
    check = sqlite3.connect(path)
    assert check.execute("SELECT COUNT(*) FROM APPT WHERE BOOKED_BY = 'BULKLOAD'").fetchone()[0] == 300
    check.close()


def test_the_demo_mappings_busy_time_query_reads_only_the_appointment_index(db) -> None:
    """Every uncached $find runs this query: the demo schema's APPT_PROV_DT carries the columns it selects, so
    the database never visits the table rows (docs/connecting-your-database.md recommends the same)."""
    from pathlib import Path

    from adapter.backends.sql.db import bind
    from adapter.mapping.loader import load_mapping

    mapping = load_mapping(Path(__file__).resolve().parents[1] / "mappings" / "demo.yaml")
    provs = [r[0] for r in db.execute("SELECT PROV_ID FROM PROVIDER ORDER BY PROV_ID LIMIT 5")]
    text, params = bind(
        mapping.doc.availability.busy.sql,
        {"practitioner_keys": provs, "from_date": ymd(TODAY), "to_date": ymd(TODAY + dt.timedelta(days=14))},
    )
    plan = " ".join(str(r[-1]) for r in db.execute("EXPLAIN QUERY PLAN " + text, params))
    assert "USING COVERING INDEX APPT_PROV_DT" in plan, plan
