"""Schema loader and deterministic demo data for the embedded "ClinicWare PM 4" database.

Pure standard library plus DB-API: every function takes an open connection (``sqlite3``
or ``pyodbc`` to PostgreSQL / MariaDB; all three use ``?`` placeholders) and never
interpolates values into SQL.

What :func:`seed_demo` writes (deterministic for ``(today, seed)``; ``random.Random(seed)``
is the only source of randomness; dates are ``YYYYMMDD`` ints, times ``HHMM`` ints, local
wall-clock time of the zone the mapping declares, America/New_York):

* ``FACILITY``: 3 clinics, FAC_ID 1 "Riverside Family Health" (Boston), 2 "Harbor View
  Clinic" (Quincy), 3 "Maple Street Medical" (Cambridge).
* ``PROVIDER``: 21 rows, 20 active ('Y') in FP (5), CARD (4), DERM (3), PEDS (4), ORTH (4),
  plus 'WHITAKEH' (FP) inactive ('N', no templates, no blocks, no appointments).
  PROV_ID is the upper-case mnemonic (last name truncated to 7 letters + first initial),
  stored space-padded to 8 characters, e.g. ``'SPEARSB '``, ``'OKAFORC '``.
* ``PATIENT``: PAT_ID 1..200, MRN ``'MRN'`` + 7 digits (unique). PAT_ID 1 is always
  Patrick O'Brien (apostrophe), PAT_ID 2 is always Zoë Muñoz (non-ASCII); about a quarter
  of the patients are children (< 18 years on ``today``).
* ``APPT_TYPE``: NEWPT 40, FOLLOW 20 (any specialty); PHYS 30 FP, ECHO 60 CARD, SKIN 20
  DERM, WELL 30 PEDS, FRACT 20 ORTH.
* ``PROV_TEMPLATE``: Monday-Friday (DAY_OF_WEEK 1..5) weekly hours, EFF_FROM = today - 365
  days, EFF_THRU NULL (both bounds inclusive), mostly 0900-1700, some 0800-1200 + 1300-1700
  split days, some providers at a second facility on one weekday. Validity ranges matter:

  - 'OKAFORC ' (FP, FAC 1): Mon-Fri 0900-1700 through today+20 (EFF_THRU), then from
    today+21: Mon-Thu 0800-1600 (no Friday).
  - 'GOLDBERM' (CARD, FAC 1): Mon-Fri 0900-1700 through today+38, then from today+39:
    Mon-Fri 1000-1800.
  - 'PATELR  ' (FP, FAC 2) also has an expired template (0800-1600, today-730 ..
    today-366) that must be ignored.

* ``PROV_BLOCK``: full-day vacations (START_HHMM 0, END_HHMM 2400 = end of day) and
  meetings/training/admin time, between today-past_days and today+days-1, only on days the
  provider works.
* ``APPT``: APPT_ID from 1000 upward, in CREATED_TS order. From today through today+days-1
  about ``booked_fraction`` of the working minutes (template minutes minus blocked minutes)
  carry STATUS 'S' appointments: inside a template of that provider and day, at the
  template's facility, on 10-minute boundaries, never overlapping each other or a block,
  durations from the types of the provider's specialty or the specialty-less ones. Some
  cancellations ('C' staff, 'P' patient, 'L' late, only for today/tomorrow in the future)
  with CANCEL_RSN are added on top and may overlap anything. For the past ``past_days``
  days: 'D' done, 'N' no-show, 'A' arrived-but-never-checked-out (yesterday only), plus
  cancellations; and two overnight ECHO studies by 'CHENW   ' that cross midnight (today-2
  2330 for 60 min, today-9 2300 for 90 min; outside template hours on purpose). About 45% of the
  past working minutes are booked. No patient has two overlapping non-cancelled
  appointments (most have at most one a day; 200 patients are few for ~170 visits a day). BOOKED_BY 'LEGACY', CREATED_TS
  ``'YYYYMMDDHHMMSS'`` strictly before the appointment date.
* ``ID_COUNTER``: ('APPT_ID', next free APPT_ID).

Schedule facts tests may rely on, Dr. Beth Spears, ``'SPEARSB '``, family practice:

* works Monday-Friday 0900-1700 at FAC_ID 1, one open-ended template per weekday
  (EFF_FROM today-365, EFF_THRU NULL), no template changes;
* her only blocks are a "Staff meeting" 1200-1300 on every Wednesday from today-past_days
  through today+days-1; no vacation and no other block at any time;
* she gets booked appointments like everybody else (so her free time is the working time
  minus the Wednesday meeting minus her 'S' appointments).
"""

from __future__ import annotations

import datetime as _dt
import os
import random
import sqlite3
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "SCHEMA",
    "SeedSummary",
    "add_bulk_appointments",
    "create_schema",
    "ensure_demo_database",
    "schema_statements",
    "seed_demo",
]

SCHEMA: Traversable = resources.files(__package__) / "schema.sql"  # package data, so installed copies have it

FIRST_APPT_ID = 1000
BOOKED_BY = "LEGACY"
BULK_BOOKED_BY = "BULKLOAD"
BLOCKING_STATUSES = ("S", "A", "D", "N")
CANCELLED_STATUSES = ("C", "P", "L")

_PAST_BOOKED_FRACTION = 0.45
_SLOT = 10  # minutes; every template, block and appointment start is aligned to it
_SLOTS_PER_DAY = 24 * 60 // _SLOT


# --------------------------------------------------------------------------- schema


def _strip_line_comment(line: str) -> str:
    """Drop a ``--`` comment from one line, ignoring ``--`` inside quoted literals."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in ("'", '"'):
            quote = ch
        elif ch == "-" and line.startswith("--", i):
            return line[:i].rstrip()
    return line.rstrip()


def schema_statements() -> list[str]:
    """The DDL statements of :data:`SCHEMA`, comments stripped, without the ``;``."""
    statements: list[str] = []
    current: list[str] = []
    for raw in SCHEMA.read_text(encoding="utf-8").splitlines():
        line = _strip_line_comment(raw)
        if not line.strip():
            continue
        if line.endswith(";"):
            current.append(line[:-1])
            statements.append("\n".join(current).strip())
            current = []
        else:
            current.append(line)
    tail = "\n".join(current).strip()
    if tail:
        statements.append(tail)
    return [s for s in statements if s]


class DbConnection(Protocol):
    """A DB-API 2 connection: sqlite3 for the demo file, pyodbc for the server databases (no common base)."""

    def cursor(self) -> Any: ...

    def commit(self) -> None: ...


_Row = tuple[Any, ...]  # one row for executemany
_Plan = dict[int, list[tuple[int, int, int]]]  # {day_of_week: [(fac, start_hhmm, end_hhmm), ...]}
# (day, prov, free facility per slot, capacity minutes, template intervals)
_ProviderDay = tuple[_dt.date, str, list[int], int, list[tuple[int, int, int]]]


def create_schema(conn: DbConnection) -> None:
    """Execute every statement of the demo schema and commit."""
    cur = conn.cursor()
    try:
        for statement in schema_statements():
            cur.execute(statement)
    finally:
        cur.close()
    conn.commit()


# --------------------------------------------------------------------------- fixed data

_FACILITIES = [
    (1, "Riverside Family Health", "1200 Commonwealth Ave", "Boston", "MA", "02134", "617-555-0100"),
    (2, "Harbor View Clinic", "85 Hancock St", "Quincy", "MA", "02169", "617-555-0110"),
    (3, "Maple Street Medical", "40 Maple St", "Cambridge", "MA", "02139", "617-555-0120"),
]

_APPT_TYPES = [
    ("NEWPT", "New patient visit", 40, None),
    ("FOLLOW", "Follow-up visit", 20, None),
    ("PHYS", "Annual physical", 30, "FP"),
    ("ECHO", "Echocardiogram", 60, "CARD"),
    ("SKIN", "Skin check", 20, "DERM"),
    ("WELL", "Well child visit", 30, "PEDS"),
    ("FRACT", "Fracture follow-up", 20, "ORTH"),
]
# Relative booking weights of a provider's types (specialty type, NEWPT, FOLLOW).
_TYPE_WEIGHTS = {"NEWPT": 2, "FOLLOW": 5}
_SPECIALTY_TYPE_WEIGHT = 3


def _week(
    home: int,
    *,
    split_days: tuple[int, ...] = (),
    away: tuple[int, int] | None = None,
    start: int = 900,
    end: int = 1700,
    weekdays: tuple[int, ...] = (1, 2, 3, 4, 5),
) -> _Plan:
    """A weekly plan: {day_of_week: [(fac, start_hhmm, end_hhmm), ...]}."""
    plan: _Plan = {}
    for dow in weekdays:
        fac = away[1] if away and away[0] == dow else home
        if dow in split_days:
            plan[dow] = [(fac, 800, 1200), (fac, 1300, 1700)]
        else:
            plan[dow] = [(fac, start, end)]
    return plan


# (last, first, title, spec, home_fac, weekly plan, change)
# change = (days after today the current plan ends (EFF_THRU, inclusive), replacement plan)
_PROVIDERS = [
    ("Spears", "Beth", "MD", "FP", 1, _week(1), None),
    ("Okafor", "Chidi", "MD", "FP", 1, _week(1), (20, _week(1, start=800, end=1600, weekdays=(1, 2, 3, 4)))),
    ("Lindqvist", "Anna", "DO", "FP", 2, _week(2, split_days=(1, 2, 3, 4, 5)), None),
    ("Nguyen", "Thomas", "NP", "FP", 3, _week(3, away=(2, 1)), None),
    ("Patel", "Ravi", "MD", "FP", 2, _week(2), None),
    ("Goldberg", "Miriam", "MD", "CARD", 1, _week(1), (38, _week(1, start=1000, end=1800))),
    ("Chen", "Wei", "MD", "CARD", 3, _week(3, away=(4, 1)), None),
    ("Alvarez", "Jorge", "MD", "CARD", 2, _week(2, split_days=(1, 3)), None),
    ("Brooks", "Dana", "NP", "CARD", 1, _week(1), None),
    ("Kowalski", "Irena", "MD", "DERM", 3, _week(3), None),
    ("Haddad", "Samir", "DO", "DERM", 1, _week(1, away=(5, 2)), None),
    ("Farrell", "Maeve", "NP", "DERM", 2, _week(2, split_days=(1, 2, 3, 4, 5)), None),
    ("Reyes", "Lucia", "MD", "PEDS", 2, _week(2), None),
    ("Thompson", "Grace", "MD", "PEDS", 1, _week(1, split_days=(2, 4)), None),
    ("Adeyemi", "Tunde", "MD", "PEDS", 3, _week(3, away=(3, 2)), None),
    ("Walsh", "Kevin", "NP", "PEDS", 3, _week(3), None),
    ("Bergstrom", "Erik", "MD", "ORTH", 1, _week(1, split_days=(1, 2, 3, 4, 5)), None),
    ("Tanaka", "Hiro", "MD", "ORTH", 2, _week(2, away=(1, 3)), None),
    ("Murphy", "Sean", "DO", "ORTH", 3, _week(3), None),
    ("Rossi", "Elena", "MD", "ORTH", 1, _week(1), None),
]
_INACTIVE_PROVIDER = ("Whitaker", "Harold", "MD", "FP", 1)
_EXPIRED_TEMPLATE_PROVIDER = "PATELR"
_SPEARS = "SPEARSB "
_OVERNIGHT_PROVIDER = "CHENW"

_MALE_FIRST = [
    "James",
    "Michael",
    "Robert",
    "David",
    "William",
    "Joseph",
    "Thomas",
    "Daniel",
    "Matthew",
    "Anthony",
    "Mark",
    "Steven",
    "Paul",
    "Kevin",
    "Brian",
    "George",
    "Edward",
    "Ronald",
    "Luis",
    "Carlos",
    "Wei",
    "Arjun",
    "Tyrone",
    "Sean",
    "Liam",
    "Noah",
    "Ethan",
    "Mason",
    "Lucas",
    "Owen",
    "José",
    "Declan",
]
_FEMALE_FIRST = [
    "Mary",
    "Patricia",
    "Jennifer",
    "Linda",
    "Elizabeth",
    "Barbara",
    "Susan",
    "Jessica",
    "Sarah",
    "Karen",
    "Nancy",
    "Lisa",
    "Margaret",
    "Sandra",
    "Ashley",
    "Emily",
    "Olivia",
    "Sophia",
    "Ava",
    "Isabella",
    "Mia",
    "Chloe",
    "Zoë",
    "Renée",
    "Siobhan",
    "Priya",
    "Mei",
    "Fatima",
    "Ana",
    "Grace",
    "Chloé",
    "Aoife",
]
_LAST = [
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Perez",
    "Thompson",
    "White",
    "Harris",
    "Sanchez",
    "Clark",
    "Ramirez",
    "Lewis",
    "Robinson",
    "Walker",
    "Young",
    "Allen",
    "King",
    "Wright",
    "Scott",
    "Torres",
    "Nguyen",
    "Hill",
    "Flores",
    "Green",
    "Adams",
    "Nelson",
    "Baker",
    "Hall",
    "Rivera",
    "Campbell",
    "Mitchell",
    "Carter",
    "Roberts",
    "O'Brien",
    "O'Connor",
    "Sullivan",
    "Kelly",
    "Murphy",
    "McCarthy",
    "Fitzgerald",
    "Doherty",
    "Muñoz",
    "Peña",
    "Ibáñez",
    "Núñez",
    "Costa",
    "Silva",
    "Pereira",
    "Santos",
    "Chen",
    "Wang",
    "Li",
    "Zhang",
    "Kim",
    "Park",
    "Patel",
    "Shah",
    "Cohen",
    "Levine",
    "Rossi",
    "Russo",
    "D'Angelo",
    "Byrne",
    "Walsh",
    "Novak",
    "Kowalczyk",
    "Nowak",
    "Schmidt",
    "Müller",
    "Jensen",
    "Larsen",
]
_PLACES = [
    ("Boston", "02118", "617"),
    ("Boston", "02127", "617"),
    ("Boston", "02130", "617"),
    ("Dorchester", "02124", "617"),
    ("Quincy", "02169", "617"),
    ("Quincy", "02171", "617"),
    ("Cambridge", "02138", "617"),
    ("Cambridge", "02139", "857"),
    ("Somerville", "02143", "617"),
    ("Braintree", "02184", "781"),
    ("Milton", "02186", "617"),
    ("Brookline", "02445", "617"),
    ("Weymouth", "02188", "781"),
    ("Medford", "02155", "781"),
    ("Newton", "02458", "617"),
]
_STREETS = [
    "Main St",
    "Washington St",
    "Hancock St",
    "Beacon St",
    "Centre St",
    "Adams St",
    "Elm St",
    "Pleasant St",
    "Highland Ave",
    "Massachusetts Ave",
    "Broadway",
    "School St",
    "Water St",
    "Chestnut St",
    "Franklin St",
    "Dorchester Ave",
]
_FIXED_PATIENTS = [
    # PAT_ID 1 and 2 are fixed so tests can rely on the awkward characters.
    ("O'Brien", "Patrick", "Sean", 19680412, "M"),
    ("Muñoz", "Zoë", None, 19910823, "F"),
]

_CANCEL_REASONS = {
    "P": ["Patient request", "Feeling better", "No transportation", "Work conflict", "Rescheduled by patient"],
    "C": ["Provider unavailable", "Clinic closed - weather", "Rescheduled by office", "Insurance not verified"],
    "L": ["Called same day - sick", "Late cancel - childcare", "Late cancel - car trouble"],
}
_NOTES = [
    "Needs interpreter (Spanish)",
    "Wheelchair access",
    "Bring medication list",
    "Fasting labs",
    "Pt prefers AM",
    "Ref'd by Dr. Okafor",
    "Parent will accompany",
    "Follow up on BP",
    "Recheck rash",
    "Post-cast check",
    "Pt asked for a call-back",
    "Copay due",
    "Señora prefers Spanish-speaking staff",
]
_MEETINGS = [
    (1200, 1300, "Department meeting"),
    (800, 900, "Training - EHR"),
    (1600, 1700, "Admin time"),
    (1300, 1700, "CME conference"),
]


# --------------------------------------------------------------------------- helpers


def _ymd(d: _dt.date) -> int:
    return d.year * 10000 + d.month * 100 + d.day


def _minutes(hhmm: int) -> int:
    return (hhmm // 100) * 60 + hhmm % 100


def _hhmm(minutes: int) -> int:
    return (minutes // 60) * 100 + minutes % 60


def _mnemonic(last: str, first: str) -> str:
    letters = "".join(ch for ch in last.upper() if "A" <= ch <= "Z")
    return (letters[:7] + first[:1].upper()).ljust(8)


def _npi(index: int) -> str:
    """A 10-digit NPI with a valid check digit (Luhn over '80840' + first 9 digits)."""
    base = f"{1234500000 // 10 + index * 7919:09d}"[:9]
    digits = [int(c) for c in "80840" + base]
    total = 0
    for pos, digit in enumerate(reversed(digits)):
        if pos % 2 == 0:  # rightmost payload digit gets doubled (check digit is appended)
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return base + str((10 - total % 10) % 10)


def _ts(day: _dt.date, rng: random.Random) -> str:
    return f"{_ymd(day):08d}{rng.randint(7, 17):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}"


def _executemany(conn: DbConnection, sql: str, rows: list[_Row]) -> None:
    if not rows:
        return
    cur = conn.cursor()
    try:
        cur.executemany(sql, rows)
    finally:
        cur.close()


_SQL_DBMS_NAME = 17  # ODBC SQLGetInfo code (pyodbc.SQL_DBMS_NAME), without importing pyodbc


def _bulk_cursor(conn: DbConnection) -> Any:
    """A cursor for big executemany calls.

    pyodbc's array binding (``fast_executemany``) is 2-3x faster with psqlODBC; it is left
    off elsewhere (MariaDB Connector/ODBC 3.1 raised MemoryError with it).
    """
    cur = conn.cursor()
    getinfo = getattr(conn, "getinfo", None)  # pyodbc only
    if hasattr(cur, "fast_executemany") and getinfo is not None:
        try:
            if str(getinfo(_SQL_DBMS_NAME)).lower().startswith("postgres"):
                cur.fast_executemany = True
        except Exception:  # a driver without the info type: seed with plain executemany (slower, same rows)
            pass
    return cur


def _begin_if_autocommit(conn: DbConnection) -> None:
    """sqlite3 in autocommit mode would commit every row of an executemany."""
    if isinstance(conn, sqlite3.Connection) and conn.isolation_level is None and not conn.in_transaction:
        conn.execute("BEGIN")


def _runs(free: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs (first_slot, end_slot, fac) of equal non-zero facility slots."""
    out = []
    i = 0
    n = len(free)
    while i < n:
        fac = free[i]
        if not fac:
            i += 1
            continue
        j = i + 1
        while j < n and free[j] == fac:
            j += 1
        out.append((i, j, fac))
        i = j
    return out


@dataclass(frozen=True)
class SeedSummary:
    """What :func:`seed_demo` wrote."""

    facilities: int
    providers: int  # all PROVIDER rows (the inactive one included)
    active_providers: int
    patients: int
    appointment_types: int
    templates: int
    blocks: int
    future_appointments: int  # APPT_DT >= today, every status
    past_appointments: int  # APPT_DT < today, every status
    booked_fraction: float  # 'S' minutes / working minutes, today .. today+days-1
    next_appt_id: int

    @property
    def appointments(self) -> int:
        return self.future_appointments + self.past_appointments


# --------------------------------------------------------------------------- seeding


class _Schedule:
    """Templates of every provider, with per-date lookups."""

    def __init__(self, templates: list[_Row]) -> None:
        self.by_prov: dict[str, list[_Row]] = {}
        for row in templates:
            self.by_prov.setdefault(row[1], []).append(row)

    def intervals(self, prov: str, day: _dt.date) -> list[tuple[int, int, int]]:
        """(fac, start_min, end_min) of the templates effective on ``day``."""
        ymd = _ymd(day)
        dow = day.isoweekday()
        out = []
        for _tid, _p, fac, t_dow, start, end, eff_from, eff_thru in self.by_prov.get(prov, ()):
            if t_dow == dow and eff_from <= ymd and (eff_thru is None or ymd <= eff_thru):
                out.append((fac, _minutes(start), _minutes(end)))
        return out


def _make_providers() -> tuple[list[_Row], list[tuple[str, str]]]:
    rows = []
    specs = []
    for index, (last, first, title, spec, home, _plan, _change) in enumerate(_PROVIDERS):
        rows.append((_mnemonic(last, first), last, first, title, spec, _npi(index), home, "Y"))
        specs.append((_mnemonic(last, first), spec))
    last, first, title, spec, home = _INACTIVE_PROVIDER
    rows.append((_mnemonic(last, first), last, first, title, spec, _npi(len(_PROVIDERS)), home, "N"))
    return rows, specs


def _make_templates(today: _dt.date) -> list[_Row]:
    eff_from = _ymd(today - _dt.timedelta(days=365))
    rows: list[_Row] = []

    def add(prov: str, plan: _Plan, start: int, thru: int | None) -> None:
        for dow in sorted(plan):
            for fac, s, e in plan[dow]:
                rows.append((len(rows) + 1, prov, fac, dow, s, e, start, thru))

    for last, first, _title, _spec, _home, plan, change in _PROVIDERS:
        prov = _mnemonic(last, first)
        if prov.strip() == _EXPIRED_TEMPLATE_PROVIDER:
            add(
                prov,
                _week(2, start=800, end=1600),
                _ymd(today - _dt.timedelta(days=730)),
                _ymd(today - _dt.timedelta(days=366)),
            )
        if change is None:
            add(prov, plan, eff_from, None)
        else:
            ends_after, new_plan = change
            add(prov, plan, eff_from, _ymd(today + _dt.timedelta(days=ends_after)))
            add(prov, new_plan, _ymd(today + _dt.timedelta(days=ends_after + 1)), None)
    return rows


def _make_patients(rng: random.Random, today: _dt.date, count: int = 200) -> list[_Row]:
    mrns = rng.sample(range(1, 10_000_000), count)
    rows = []
    for i in range(count):
        pat_id = i + 1
        if i < len(_FIXED_PATIENTS):
            last, first, middle, birth, sex = _FIXED_PATIENTS[i]
        else:
            roll = rng.random()
            sex = "U" if roll < 0.01 else ("F" if roll < 0.52 else "M")
            names = _FEMALE_FIRST if sex == "F" else _MALE_FIRST if sex == "M" else _FEMALE_FIRST + _MALE_FIRST
            first = rng.choice(names)
            last = rng.choice(_LAST)
            middle = None
            if rng.random() < 0.35:
                middle = rng.choice(names) if rng.random() < 0.5 else rng.choice("ABCDEFGHJKLMNPRSTW")
            age_days = rng.randint(30, 17 * 365) if rng.random() < 0.25 else rng.randint(19 * 365, 92 * 365)
            birth = _ymd(today - _dt.timedelta(days=age_days))
        city, zip_code, area = rng.choice(_PLACES)
        addr = f"{rng.randint(1, 480)} {rng.choice(_STREETS)}"
        if rng.random() < 0.2:
            addr += f" Apt {rng.randint(1, 12)}"
        phone = f"{area}-555-01{rng.randrange(100):02d}"
        rows.append((pat_id, f"MRN{mrns[i]:07d}", last, first, middle, birth, sex, phone, addr, city, "MA", zip_code))
    return rows


def _make_blocks(
    rng: random.Random, schedule: _Schedule, provs: list[str], start: _dt.date, today: _dt.date, end: _dt.date
) -> list[_Row]:
    """Blocks for [start, end); SPEARSB only has the Wednesday staff meeting."""
    blocks: list[_Row] = []
    all_days = [start + _dt.timedelta(days=k) for k in range((end - start).days)]
    for prov in provs:
        if prov == _SPEARS:
            for day in all_days:
                if day.isoweekday() == 3:
                    blocks.append((prov, _ymd(day), 1200, 1300, "Staff meeting"))
            continue
        work_days = [d for d in all_days if schedule.intervals(prov, d)]
        future = [d for d in work_days if d >= today]
        past = [d for d in work_days if d < today]
        off: list[tuple[_dt.date, str]] = []
        if future and rng.random() < 0.35:
            first = rng.randrange(len(future))
            length = rng.randint(2, 5)
            run = [d for d in future[first : first + 8] if (d - future[first]).days < 7][:length]
            off += [(d, "Vacation") for d in run]
        elif future:
            for d in rng.sample(future, min(len(future), rng.randint(0, 2))):
                off.append((d, "Personal day"))
        if past and rng.random() < 0.3:
            off.append((rng.choice(past), "Vacation"))
        off_days = [d for d, _ in off]
        for d, reason in sorted(off):
            blocks.append((prov, _ymd(d), 0, 2400, reason))
        for day in work_days:
            if day in off_days or rng.random() >= 0.08:
                continue
            s, e, reason = rng.choice(_MEETINGS)
            blocks.append((prov, _ymd(day), s, e, reason))
    blocks.sort(key=lambda b: (b[1], b[0], b[2]))
    return [(i + 1,) + b for i, b in enumerate(blocks)]


def _free_slots(intervals: list[tuple[int, int, int]], day_blocks: Iterable[tuple[int, int]]) -> list[int]:
    """Per 10-minute slot: the facility id where the provider is free, else 0."""
    free = [0] * _SLOTS_PER_DAY
    for fac, s, e in intervals:
        for k in range(s // _SLOT, e // _SLOT):
            free[k] = fac
    for s, e in day_blocks:
        for k in range(s // _SLOT, -(-e // _SLOT)):
            free[k] = 0
    return free


def seed_demo(
    conn: DbConnection,
    *,
    today: _dt.date,
    seed: int = 42,
    days: int = 60,
    past_days: int = 30,
    booked_fraction: float = 0.30,
) -> SeedSummary:
    """Fill every table of an empty demo schema; deterministic for ``(today, seed)``; commits."""
    rng = random.Random(seed)
    one = _dt.timedelta(days=1)

    provider_rows, prov_specs = _make_providers()
    active = [p for p, _s in prov_specs]
    spec_of = dict(prov_specs)
    home_of = {r[0]: r[6] for r in provider_rows}
    template_rows = _make_templates(today)
    schedule = _Schedule(template_rows)
    patient_rows = _make_patients(rng, today)

    first_day = today - past_days * one
    end_day = today + days * one
    block_rows = _make_blocks(rng, schedule, active, first_day, today, end_day)
    blocks_by: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for _bid, prov, dt, s, e, _r in block_rows:
        blocks_by.setdefault((prov, dt), []).append((_minutes(s), _minutes(e)))

    # Patients eligible per specialty.
    age_limit = _ymd(today) - 180000  # born after this -> under 18
    children = [r[0] for r in patient_rows if r[5] > age_limit]
    adults = [r[0] for r in patient_rows if r[5] <= age_limit]
    over35 = [r[0] for r in patient_rows if r[5] <= _ymd(today) - 350000] or adults
    everyone = [r[0] for r in patient_rows]
    pool: dict[str, list[int]] = {
        "PEDS": children or everyone,
        "CARD": over35,
        "FP": everyone,
        "DERM": everyone,
        "ORTH": everyone,
    }

    # Bookable types per specialty, expanded by weight.
    types_for: dict[str, list[tuple[str, int]]] = {}
    for spec in ("FP", "CARD", "DERM", "PEDS", "ORTH"):
        weighted = []
        for code, _descr, dur, t_spec in _APPT_TYPES:
            if t_spec is None:
                weighted += [(code, dur)] * _TYPE_WEIGHTS[code]
            elif t_spec == spec:
                weighted += [(code, dur)] * _SPECIALTY_TYPE_WEIGHT
        types_for[spec] = weighted

    # Every provider-day with its free slots.
    provider_days: list[_ProviderDay] = []  # (day, prov, free_slots, capacity_minutes, intervals)
    day = first_day
    while day < end_day:
        for prov in active:
            intervals = schedule.intervals(prov, day)
            if not intervals:
                continue
            free = _free_slots(intervals, blocks_by.get((prov, _ymd(day)), ()))
            cap = sum(1 for f in free if f) * _SLOT
            provider_days.append((day, prov, free, cap, intervals))
        day += one

    patients_on: dict[int, dict[int, list[tuple[int, int]]]] = {}
    appts: list[list[Any]] = []  # [created_ts, dt, tm, prov, pat, fac, dur, type, status, rsn, note]

    def pick_patient(prov: str, ymd: int, start: int, end: int) -> int:
        """A patient of the specialty's pool without another visit that day, else at least
        one without an overlapping visit (the pool is small for this many visits)."""
        visits = patients_on.setdefault(ymd, {})
        candidates = pool[spec_of[prov]]
        pat = rng.choice(candidates)
        if pat in visits:
            fresh = [p for p in candidates if p not in visits]
            if not fresh:
                fresh = [p for p in candidates if all(e <= start or end <= s for s, e in visits[p])] or candidates
            pat = rng.choice(fresh)
        visits.setdefault(pat, []).append((start, end))
        return pat

    def created(appt_day: _dt.date, lead_max: int) -> str:
        made = min(appt_day - rng.randint(1, lead_max) * one, today)
        if made >= appt_day:
            made = appt_day - one
        return _ts(made, rng)

    def note() -> str | None:
        return rng.choice(_NOTES) if rng.random() < 0.15 else None

    def book(group: list[_ProviderDay], fraction: float, future: bool) -> tuple[int, int]:
        total_cap = sum(pd[3] for pd in group)
        if not total_cap or fraction <= 0:
            return 0, total_cap
        weights = []
        for d, _p, _f, cap, _i in group:
            near = 1.0
            if future:  # the next days are fuller than the far ones
                near = 1.5 - (d - today).days / max(1, days)
            weights.append(cap * near * rng.uniform(0.5, 1.5))
        scale = fraction * total_cap / (sum(weights) or 1)
        order = list(range(len(group)))
        rng.shuffle(order)
        carry = 0.0
        booked_total = 0
        for idx in order:
            d, prov, free, cap, _intervals = group[idx]
            target = min(weights[idx] * scale, cap * 0.95) + carry
            booked = 0
            free = list(free)
            misses = 0
            ymd = _ymd(d)
            while misses < 4:
                code, dur = rng.choice(types_for[spec_of[prov]])
                if booked + dur / 2 > target:
                    misses += 1
                    continue
                need = dur // _SLOT
                starts: list[tuple[int, int]] = []
                for a, b, fac in _runs(free):
                    starts.extend((k, fac) for k in range(a, b - need + 1))
                if not starts:
                    misses += 1
                    continue
                k, fac = rng.choice(starts)
                for j in range(k, k + need):
                    free[j] = 0
                booked += dur
                if future:
                    status = "S"
                else:
                    roll = rng.random()
                    status = "A" if (d == today - one and roll < 0.15) else ("N" if roll > 0.93 else "D")
                lead = 90 if code in ("NEWPT", "PHYS", "ECHO", "WELL") else 30
                pat = pick_patient(prov, ymd, k * _SLOT, k * _SLOT + dur)
                appts.append([created(d, lead), ymd, _hhmm(k * _SLOT), prov, pat, fac, dur, code, status, None, note()])
            carry = target - booked
            booked_total += booked
        return booked_total, total_cap

    future_days = [pd for pd in provider_days if pd[0] >= today]
    past_days_list = [pd for pd in provider_days if pd[0] < today]
    future_booked, future_cap = book(future_days, booked_fraction, True)
    book(past_days_list, _PAST_BOOKED_FRACTION, False)

    # Cancellations: non-blocking, anywhere inside the template hours.
    for d, prov, _free, _cap, intervals in provider_days:
        if rng.random() >= 0.12:
            continue
        fac, s, e = rng.choice(intervals)
        code, dur = rng.choice(types_for[spec_of[prov]])
        if e - s < dur:
            continue
        start = s + rng.randrange((e - s - dur) // _SLOT + 1) * _SLOT
        if d >= today:
            status = rng.choice("PPPCC" + ("LL" if d <= today + one else ""))
        else:
            status = rng.choice("PPPCCLL")
        ymd = _ymd(d)
        appts.append(
            [
                created(d, 45),
                ymd,
                _hhmm(start),
                prov,
                rng.choice(pool[spec_of[prov]]),
                fac,
                dur,
                code,
                status,
                rng.choice(_CANCEL_REASONS[status]),
                note(),
            ]
        )

    # Two overnight studies crossing midnight (past only, outside template hours).
    overnight_prov = next(p for p in active if p.strip() == _OVERNIGHT_PROVIDER)
    for offset, tm, dur in ((2, 2330, 60), (9, 2300, 90)):
        if offset > past_days:
            continue
        d = today - offset * one
        ymd = _ymd(d)
        pat = pick_patient(overnight_prov, ymd, _minutes(tm), _minutes(tm) + dur)
        appts.append(
            [
                created(d, 30),
                ymd,
                tm,
                overnight_prov,
                pat,
                home_of[overnight_prov],
                dur,
                "ECHO",
                "D",
                None,
                "Overnight study - ambulatory monitor hookup",
            ]
        )

    appts.sort(key=lambda a: (a[0], a[1], a[2], a[3]))
    appt_rows = []
    for offset, (cts, ymd, tm, prov, pat, fac, dur, code, status, rsn, txt) in enumerate(appts):
        appt_rows.append((FIRST_APPT_ID + offset, pat, prov, fac, ymd, tm, dur, code, status, rsn, txt, BOOKED_BY, cts))
    next_id = FIRST_APPT_ID + len(appt_rows)

    _begin_if_autocommit(conn)
    _executemany(
        conn,
        "INSERT INTO FACILITY (FAC_ID, FAC_NAME, ADDR1, CITY, STATE, ZIP, PHONE) VALUES (?, ?, ?, ?, ?, ?, ?)",
        _FACILITIES,
    )
    _executemany(
        conn,
        "INSERT INTO PROVIDER (PROV_ID, LAST_NM, FIRST_NM, TITLE, SPEC_CD, NPI, "
        "HOME_FAC, ACTIVE_YN) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        provider_rows,
    )
    _executemany(
        conn,
        "INSERT INTO PATIENT (PAT_ID, MRN, LAST_NM, FIRST_NM, MIDDLE_NM, BIRTH_DT, "
        "SEX, PHONE, ADDR1, CITY, STATE, ZIP) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
        "?, ?)",
        patient_rows,
    )
    _executemany(conn, "INSERT INTO APPT_TYPE (TYPE_CD, DESCR, DUR_MIN, SPEC_CD) VALUES (?, ?, ?, ?)", _APPT_TYPES)
    _executemany(
        conn,
        "INSERT INTO PROV_TEMPLATE (TMPL_ID, PROV_ID, FAC_ID, DAY_OF_WEEK, START_HHMM, "
        "END_HHMM, EFF_FROM, EFF_THRU) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        template_rows,
    )
    _executemany(
        conn,
        "INSERT INTO PROV_BLOCK (BLOCK_ID, PROV_ID, BLOCK_DT, START_HHMM, END_HHMM, REASON) VALUES (?, ?, ?, ?, ?, ?)",
        block_rows,
    )
    _executemany(
        conn,
        "INSERT INTO APPT (APPT_ID, PAT_ID, PROV_ID, FAC_ID, APPT_DT, APPT_TM, DUR_MIN, "
        "TYPE_CD, STATUS_CD, CANCEL_RSN, NOTE_TXT, BOOKED_BY, CREATED_TS) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        appt_rows,
    )
    _executemany(conn, "INSERT INTO ID_COUNTER (CTR_NAME, NEXT_VAL) VALUES (?, ?)", [("APPT_ID", next_id)])
    conn.commit()

    today_ymd = _ymd(today)
    future_count = sum(1 for r in appt_rows if r[4] >= today_ymd)
    return SeedSummary(
        facilities=len(_FACILITIES),
        providers=len(provider_rows),
        active_providers=sum(1 for r in provider_rows if r[7] == "Y"),
        patients=len(patient_rows),
        appointment_types=len(_APPT_TYPES),
        templates=len(template_rows),
        blocks=len(block_rows),
        future_appointments=future_count,
        past_appointments=len(appt_rows) - future_count,
        booked_fraction=(future_booked / future_cap) if future_cap else 0.0,
        next_appt_id=next_id,
    )


# --------------------------------------------------------------------------- sqlite file


def ensure_demo_database(path: Path, *, today: _dt.date) -> bool:
    """Create and seed the sqlite demo database at ``path`` unless it exists.

    Returns True when it was created. The database is built in a temporary file next to
    ``path`` and moved into place atomically (without clobbering a file another process
    created meanwhile), so a crash never leaves a half-seeded database behind.
    """
    path = Path(path)
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        conn = sqlite3.connect(tmp)
        try:
            create_schema(conn)
            seed_demo(conn, today=today)
        finally:
            conn.close()
        try:
            os.link(tmp, path)  # atomic and fails if someone else won the race
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system
            if path.exists():
                return False
            os.replace(tmp, path)
        return True
    finally:
        for leftover in (tmp, Path(f"{tmp}-journal")):
            try:
                leftover.unlink()
            except FileNotFoundError:
                pass


# --------------------------------------------------------------------------- bulk data


def _scalar(conn: DbConnection, sql: str, params: tuple[Any, ...] = ()) -> Any:
    cur = conn.cursor()
    try:
        cur.execute(sql, params)
        row = cur.fetchone()
    finally:
        cur.close()
    return None if row is None else row[0]


def _rows(conn: DbConnection, sql: str) -> list[_Row]:
    cur = conn.cursor()
    try:
        cur.execute(sql)
        return [tuple(r) for r in cur.fetchall()]
    finally:
        cur.close()


def add_bulk_appointments(conn: DbConnection, *, count: int, today: _dt.date, seed: int = 7, batch: int = 10000) -> int:
    """Append ``count`` appointments for load testing; returns the number of rows added.

    Rows are spread evenly, in date order, over the weekdays from today-730 days to
    today+364 days, and randomly over the active providers and all patients, 0800-1550 on 10-minute boundaries at the provider's
    home facility, with types of the provider's specialty. Past rows are mostly 'D' (some
    'N', 'C', 'P', 'L'), future rows mostly 'S' (some 'C', 'P'). They deliberately ignore
    templates, blocks and each other (a million rows cannot fit a 20-provider calendar),
    and carry BOOKED_BY 'BULKLOAD'. APPT_IDs continue from ID_COUNTER, which is advanced
    in the same transaction as each batch of ``batch`` rows.
    """
    if count <= 0:
        return 0
    rng = random.Random(seed)
    rnd = rng.random
    # Sorted here, not by the DBMS, so every backend (collation, CHAR padding) yields the same rows.
    provs = sorted(
        _rows(conn, "SELECT PROV_ID, SPEC_CD, HOME_FAC FROM PROVIDER WHERE ACTIVE_YN = 'Y'"),
        key=lambda r: str(r[0]).rstrip(),
    )
    pats = sorted(int(r[0]) for r in _rows(conn, "SELECT PAT_ID FROM PATIENT"))
    type_rows = sorted(_rows(conn, "SELECT TYPE_CD, DUR_MIN, SPEC_CD FROM APPT_TYPE"), key=lambda r: str(r[0]))
    if not provs or not pats or not type_rows:
        raise ValueError("add_bulk_appointments needs providers, patients and appointment types")
    prov_info = []
    for prov_id, spec, home in provs:
        types = [(t, int(d)) for t, d, s in type_rows if s is None or s == spec] or [
            (t, int(d)) for t, d, _ in type_rows
        ]
        prov_info.append((str(prov_id).ljust(8), int(home or 1), types))

    counter = _scalar(conn, "SELECT NEXT_VAL FROM ID_COUNTER WHERE CTR_NAME = 'APPT_ID'")
    max_id = _scalar(conn, "SELECT MAX(APPT_ID) FROM APPT")
    next_id = max(
        int(counter) if counter is not None else FIRST_APPT_ID, int(max_id) + 1 if max_id is not None else FIRST_APPT_ID
    )
    if counter is None:
        _begin_if_autocommit(conn)
        _executemany(conn, "INSERT INTO ID_COUNTER (CTR_NAME, NEXT_VAL) VALUES (?, ?)", [("APPT_ID", next_id)])
        conn.commit()

    one = _dt.timedelta(days=1)
    start = today - 730 * one
    days_info = []  # (ymd, is_past, created_ts)
    for k in range(730 + 365):
        d = start + k * one
        if d.isoweekday() > 5:
            continue
        created = _ymd(min(d - 14 * one, today))
        days_info.append((_ymd(d), d < today, f"{created:08d}101500"))
    n_days = len(days_info)
    n_provs = len(prov_info)
    n_pats = len(pats)
    reasons_p = _CANCEL_REASONS["P"][0]
    reasons_c = _CANCEL_REASONS["C"][0]
    reasons_l = _CANCEL_REASONS["L"][0]

    sql = (
        "INSERT INTO APPT (APPT_ID, PAT_ID, PROV_ID, FAC_ID, APPT_DT, APPT_TM, DUR_MIN, TYPE_CD, "
        "STATUS_CD, CANCEL_RSN, NOTE_TXT, BOOKED_BY, CREATED_TS) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    update = "UPDATE ID_COUNTER SET NEXT_VAL = ? WHERE CTR_NAME = 'APPT_ID'"
    added = 0
    while added < count:
        size = min(batch, count - added)
        rows: list[_Row] = []
        append = rows.append
        for i in range(size):
            # Chronological order keeps the index inserts local (fast on big tables).
            ymd, past, cts = days_info[(added + i) * n_days // count]
            prov, fac, types = prov_info[int(rnd() * n_provs)]
            code, dur = types[int(rnd() * len(types))]
            slot = int(rnd() * 48)
            tm = (8 + slot // 6) * 100 + (slot % 6) * 10
            roll = rnd()
            if past:
                if roll < 0.82:
                    status, rsn = "D", None
                elif roll < 0.88:
                    status, rsn = "N", None
                elif roll < 0.94:
                    status, rsn = "P", reasons_p
                elif roll < 0.97:
                    status, rsn = "C", reasons_c
                else:
                    status, rsn = "L", reasons_l
            elif roll < 0.88:
                status, rsn = "S", None
            elif roll < 0.95:
                status, rsn = "P", reasons_p
            else:
                status, rsn = "C", reasons_c
            append(
                (
                    next_id + i,
                    pats[int(rnd() * n_pats)],
                    prov,
                    fac,
                    ymd,
                    tm,
                    dur,
                    code,
                    status,
                    rsn,
                    None,
                    BULK_BOOKED_BY,
                    cts,
                )
            )
        _begin_if_autocommit(conn)
        cur = _bulk_cursor(conn)
        try:
            cur.executemany(sql, rows)
            cur.execute(update, (next_id + size,))
        finally:
            cur.close()
        conn.commit()
        next_id += size
        added += size
    return added
