"""Declarative forms of the mapping format, end to end (issue 9 item 5): a slot grid aligned to the clock
instead of the session start, and the ``booked_by`` bind in reschedule and cancel statements.

Each test runs a real server (uvicorn in a thread) on a seeded SQLite copy of the demo database with a
copy of the demo mapping changed in one place.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path

from test_hold_book_http import (
    MAPPING,
    PATIENT,
    SPEARS,
    ZONE,
    _find_from as find_from,
    assert_success,
    local_day,
    parse_instant,
    participants,
    running_api,
    seeded,
)


def _mapping_copy(tmp: Path, old: str, new: str) -> Path:
    text = MAPPING.read_text()
    assert text.count(old) == 1, old
    path = tmp / "mapping.yaml"
    path.write_text(text.replace(old, new))
    return path


def _spears_opens_at(target: str, hhmm: int) -> None:
    conn = sqlite3.connect(target)
    conn.execute("UPDATE PROV_TEMPLATE SET START_HHMM = ? WHERE PROV_ID = ?", (hhmm, SPEARS + " "))
    conn.commit()
    conn.close()


def _weekday(days_ahead: int) -> dt.datetime:
    day = local_day(days_ahead)
    while day.isoweekday() > 5:
        day += dt.timedelta(days=1)
    return day


def test_issue9_5_slot_grid_aligned_to_the_clock(tmp_path: Path) -> None:
    """Dr. Spears opens at 08:05; with ``slot_alignment: clock`` and a 15-minute step the starts are 08:15, 08:30,
    ... (on the clock), not 08:05, 08:20 (the session's own grid, the default ``period``)."""
    target = seeded("sqlite", tmp_path)
    _spears_opens_at(target, 805)
    mapping = _mapping_copy(
        tmp_path,
        "  slot_step_minutes: 10 ",
        "  slot_alignment: clock\n  slot_step_minutes: 15 ",
    )
    with running_api(tmp_path, "sqlite", target, backend={"mapping": str(mapping)}) as api:
        day = _weekday(9)
        found = find_from(api, day.replace(hour=0), days=1)
        starts = [parse_instant(a["start"]).astimezone(ZONE) for a in found]
        assert starts and all(s.minute % 15 == 0 and s.second == 0 for s in starts), starts[:5]
        assert min(starts).time() >= dt.time(8, 15)
        # A client-described booking off that grid is refused, one on it is booked exactly.
        off = day.replace(hour=10, minute=5)
        body = {
            "resourceType": "Appointment",
            "status": "proposed",
            "appointmentType": {"coding": [{"system": "urn:sched-adapter:clinicware:visit-type", "code": "FOLLOW"}]},
            "start": off.isoformat(),
            "end": (off + dt.timedelta(minutes=20)).isoformat(),
            "participant": participants(),
        }
        refused = api.book(resource=body, client="grid-client")
        assert refused.status_code == 422 and "not on the slot grid" in refused.text, refused.text
        free = next(s for s in starts if s.hour >= 10)
        body |= {"start": free.isoformat(), "end": (free + dt.timedelta(minutes=20)).isoformat()}
        booked = assert_success(api.book(resource=body, client="grid-client"), "booked")
        assert parse_instant(booked["start"]) == free


def test_issue9_5_period_alignment_stays_the_default(tmp_path: Path) -> None:
    target = seeded("sqlite", tmp_path)
    _spears_opens_at(target, 805)
    mapping = _mapping_copy(tmp_path, "  slot_step_minutes: 10 ", "  slot_step_minutes: 15 ")
    with running_api(tmp_path, "sqlite", target, backend={"mapping": str(mapping)}) as api:
        found = find_from(api, _weekday(9).replace(hour=0), days=1)
        starts = [parse_instant(a["start"]).astimezone(ZONE) for a in found]
        assert starts and all((s.hour * 60 + s.minute - (8 * 60 + 5)) % 15 == 0 for s in starts), starts[:5]


def test_issue9_5_reschedule_and_cancel_statements_get_booked_by(tmp_path: Path) -> None:
    """``:booked_by`` (the client making the change) is a bind of reschedule and cancel, as of book."""
    target = seeded("sqlite", tmp_path)
    mapping = _mapping_copy(
        tmp_path,
        "UPDATE APPT SET STATUS_CD = :status, CANCEL_RSN = :cancel_text\n",
        "UPDATE APPT SET STATUS_CD = :status, CANCEL_RSN = :cancel_text, BOOKED_BY = :booked_by\n",
    )
    with running_api(tmp_path, "sqlite", target, backend={"mapping": str(mapping)}) as api:
        proposed = api.free_slot(days=(20, 27))
        booked = assert_success(api.book(proposed["id"], "front-desk-1"), "booked")
        cancel = {
            "resourceType": "Appointment",
            "id": booked["id"],
            "status": "cancelled",
            "participant": participants(),
        }
        assert_success(api.book(resource=cancel, client="call-centre-9"), "cancelled")
        rows = api.db.rows("SELECT BOOKED_BY, STATUS_CD, PAT_ID FROM APPT WHERE APPT_ID = ?", int(booked["id"]))
        assert rows == [("call-centre-9", "C", int(PATIENT))]
