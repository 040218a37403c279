"""An OpenEMR calendar database for tests: OpenEMR's own tables (tests/data/openemr/) in a fresh MariaDB
database, seeded the way OpenEMR's calendar screens fill them, relative to "today" in the practice zone.

What the seed holds (ids are what tests refer to):

* facilities 1 "Main Street Clinic", 2 "Riverside Office" (+ 3, not a service location);
* users: 1 admin (not a provider); providers 5 Ana Müller (NPI 1234567893), 6 Ben Okafor, 7 Carla Díaz;
* patients (patient_data.pid) 1..4;
* provider 5: In Office 09:00 / Out Of Office 17:00 every work day (pc_recurrtype 1, freq type 4) at
  facility 1, a daily Lunch 12:00-13:00 (category 8, recurring), an all-day Out Of Office on
  ``days["off"]``, and on ``days["w1"]`` appointments 09:00 '-', 09:30 'x', 10:00 '%', 10:30 '@',
  11:00 '?', 14:00 '^' (15 minutes each);
* provider 6: In 08:00 / Out 12:00 on Mon, Wed, Fri (pc_recurrtype 3, days "2,4,6") at facility 2,
  except ``days["exdate"]`` (a Wednesday, listed in the rule's exdate);
* provider 7: single (non-recurring) In 13:00 / Out 16:00 markers on each of the next 10 days, facility 1;
* a fulfilled ('>') appointment of provider 5 for patient 1 on ``days["past"]``.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import pyodbc

DDL = Path(__file__).resolve().parent / "data" / "openemr" / "openemr-scheduling-tables.sql"
ZONE_NAME = "America/New_York"


def _spec(**values: str) -> str:
    """A PHP-serialized pc_recurrspec, as OpenEMR writes it (every value a string)."""
    keys = {
        "event_repeat_freq": "0",
        "event_repeat_freq_type": "0",
        "event_repeat_on_num": "1",
        "event_repeat_on_day": "0",
        "event_repeat_on_freq": "0",
        "exdate": "",
    } | values
    body = "".join(f's:{len(k)}:"{k}";s:{len(v.encode())}:"{v}";' for k, v in keys.items())
    return f"a:{len(keys)}:{{{body}}}"


def ddl_statements() -> list[str]:
    text = "\n".join(line for line in DDL.read_text(encoding="utf-8").splitlines() if not line.startswith("--"))
    return [s.strip() for s in re.split(r";\s*\n", text) if s.strip()]


def _next_weekday(day: dt.date, weekday: int) -> dt.date:
    """The first date >= day with ``weekday`` (0 = Monday)."""
    return day + dt.timedelta(days=(weekday - day.weekday()) % 7)


def _workday(day: dt.date) -> dt.date:
    while day.weekday() >= 5:
        day += dt.timedelta(days=1)
    return day


def seed_days(today: dt.date) -> dict[str, dt.date]:
    w1 = _workday(today + dt.timedelta(days=2))
    off = _workday(w1 + dt.timedelta(days=3))
    exdate = _next_weekday(today + dt.timedelta(days=1), 2)
    return {
        "today": today,
        "start": today - dt.timedelta(days=28),
        "w1": w1,
        "off": off,
        "exdate": exdate,
        "past": _workday(today - dt.timedelta(days=9)),
    }


_EVENT_COLUMNS = (
    "pc_catid, pc_multiple, pc_aid, pc_pid, pc_title, pc_time, pc_hometext, pc_informant, pc_eventDate, pc_endDate, "
    "pc_duration, pc_recurrtype, pc_recurrspec, pc_recurrfreq, pc_startTime, pc_endTime, pc_alldayevent, "
    "pc_apptstatus, pc_location, pc_eventstatus, pc_sharing, pc_facility, pc_billing_location"
)


def _event(
    cur: Any,
    *,
    cat: int,
    title: str,
    aid: int,
    day: dt.date,
    start: str,
    seconds: int,
    pid: str = "",
    status: str = "-",
    recurrtype: int = 0,
    spec: str | None = None,
    end_date: str = "0000-00-00",
    allday: int = 0,
    facility: int = 1,
) -> None:
    start_t = dt.datetime.strptime(start, "%H:%M")
    # The rule goes in as a literal: MariaDB Connector/ODBC garbles bound text parameters longer than
    # 127 characters (seen with pyodbc 5.5 and Connector/ODBC 3.1), and the seed's values hold no quote.
    rule = spec or _spec()
    assert "'" not in rule and "\\" not in rule
    end = (start_t + dt.timedelta(seconds=seconds)).strftime("%H:%M:%S")
    cur.execute(
        f"INSERT INTO openemr_postcalendar_events ({_EVENT_COLUMNS}) "
        f"VALUES (?, 0, ?, ?, ?, NOW(), '', 'admin', ?, ?, ?, ?, '{rule}', 0, ?, ?, ?, ?, '', 1, 1, ?, ?)",
        cat,
        str(aid),
        pid,
        title,
        day.isoformat(),
        end_date,
        seconds,
        recurrtype,
        start_t.strftime("%H:%M:%S"),
        end,
        allday,
        status,
        facility,
        facility,
    )


def load_and_seed(dsn: str, today: dt.date) -> dict[str, dt.date]:
    """Create OpenEMR's tables in the (empty) database of ``dsn`` and seed them; returns the seed's days."""
    conn = pyodbc.connect(dsn, autocommit=True, timeout=10)
    try:
        cur = conn.cursor()
        for statement in ddl_statements():
            cur.execute(statement)
        days = seed_days(today)
        cur.execute(
            "INSERT INTO facility (id, name, phone, street, city, state, postal_code, service_location) VALUES "
            "(1, 'Main Street Clinic', '555-0100', '1 Main Street', 'Springfield', 'MA', '01101', 1), "
            "(2, 'Riverside Office', '555-0200', '20 River Road', 'Springfield', 'MA', '01103', 1), "
            "(3, 'Billing Office', '555-0300', '3 Ledger Lane', 'Springfield', 'MA', '01104', 0)"
        )
        users = [
            (1, "admin", "Administrator", "", "Admin", None, None, 1, 0, 0),
            (5, "amuller", "Ana", "", "Müller", "Dr.", "1234567893", 1, 1, 1),
            (6, "bokafor", "Ben", "T", "Okafor", "Dr.", "1245319599", 2, 1, 1),
            (7, "cdiaz", "Carla", "", "Díaz", None, "1003000126", 1, 1, 1),
        ]
        for uid, username, fname, mname, lname, title, npi, fac, authorized, calendar in users:
            cur.execute(
                "INSERT INTO users (id, username, fname, mname, lname, title, npi, facility_id, facility, active, "
                "authorized, calendar, specialty) VALUES (?, ?, ?, ?, ?, ?, ?, ?, '', 1, ?, ?, 'Family Medicine')",
                uid,
                username,
                fname,
                mname,
                lname,
                title,
                npi,
                fac,
                authorized,
                calendar,
            )
        patients = [
            (1, "PUB-0001", "Zoë", "Ångström", "1980-04-02", "Female"),
            (2, "PUB-0002", "Marcus", "Hill", "1975-11-20", "Male"),
            (3, "PUB-0003", "Priya", "Shah", "1992-07-14", "Female"),
            (4, "PUB-0004", "Tom", "Becker", "2001-01-30", "Male"),
        ]
        for pid, pubpid, fname, lname, dob, sex in patients:
            cur.execute(
                "INSERT INTO patient_data (id, pid, pubpid, fname, lname, DOB, sex, phone_home, street, city, state, "
                "postal_code) VALUES (?, ?, ?, ?, ?, ?, ?, CONCAT('555-010', ?), '5 Elm Street', 'Springfield', 'MA', '01101')",
                pid,
                pid,
                pubpid,
                fname,
                lname,
                dob,
                sex,
                str(pid),
            )
        start = days["start"]
        workdays = _spec(event_repeat_freq="1", event_repeat_freq_type="4")
        _event(cur, cat=2, title="In Office", aid=5, day=start, start="09:00", seconds=0, recurrtype=1, spec=workdays)
        _event(
            cur, cat=3, title="Out Of Office", aid=5, day=start, start="17:00", seconds=0, recurrtype=1, spec=workdays
        )
        _event(cur, cat=8, title="Lunch", aid=5, day=start, start="12:00", seconds=3600, recurrtype=1, spec=workdays)
        _event(cur, cat=3, title="Out Of Office", aid=5, day=days["off"], start="00:00", seconds=86400, allday=1)
        mwf = _spec(event_repeat_freq="2,4,6", event_repeat_freq_type="6", exdate=days["exdate"].strftime("%Y%m%d"))
        for cat, title, at in ((2, "In Office", "08:00"), (3, "Out Of Office", "12:00")):
            _event(cur, cat=cat, title=title, aid=6, day=start, start=at, seconds=0, recurrtype=3, spec=mwf, facility=2)
        for n in range(1, 11):
            day = today + dt.timedelta(days=n)
            _event(cur, cat=2, title="In Office", aid=7, day=day, start="13:00", seconds=0)
            _event(cur, cat=3, title="Out Of Office", aid=7, day=day, start="16:00", seconds=0)
        w1 = days["w1"]
        for at, status, pid in (
            ("09:00", "-", "1"),
            ("09:30", "x", "2"),
            ("10:00", "%", "3"),
            ("10:30", "@", "1"),
            ("11:00", "?", "4"),
            ("14:00", "^", "2"),
        ):
            _event(cur, cat=5, title="Office Visit", aid=5, day=w1, start=at, seconds=900, pid=pid, status=status)
        _event(
            cur, cat=5, title="Office Visit", aid=5, day=days["past"], start="10:00", seconds=900, pid="1", status=">"
        )
        return days
    finally:
        conn.close()
