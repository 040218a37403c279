"""Issue 7.3: the SQL backend books exactly the instant it is given or refuses; it never truncates a start
the legacy columns cannot hold (the demo's HHMM column keeps whole minutes)."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from adapter.backends.protocol import BusinessRuleViolation, Interval, NewBooking, SlotRequest
from adapter.backends.sql.backend import SqlBackend
from adapter.backends.sql.db import Database
from adapter.demo.seed import ensure_demo_database
from adapter.mapping.loader import load_mapping

DEMO = Path(__file__).resolve().parents[2] / "mappings" / "demo.yaml"
ZONE = ZoneInfo("America/New_York")


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[SqlBackend, Path]]:
    path = tmp_path / "demo.sqlite"
    ensure_demo_database(path, today=dt.date.today())
    backend = SqlBackend(load_mapping(DEMO), Database(f"sqlite:///{path}", pool_size=1, timeout_s=5))
    yield backend, path
    asyncio.run(backend.close())


def _count(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM APPT").fetchone()[0])
    finally:
        conn.close()


def test_issue7_3_a_start_with_seconds_is_refused_not_truncated(demo: tuple[SqlBackend, Path]) -> None:
    backend, path = demo
    day = dt.date.today() + dt.timedelta(days=400)  # far beyond the seeded bookings
    while day.isoweekday() > 5:
        day += dt.timedelta(days=1)
    start = dt.datetime.combine(day, dt.time(10, 0, 30), tzinfo=ZONE).astimezone(dt.UTC)
    slot = SlotRequest("SPEARSB", "1", Interval(start, start + dt.timedelta(minutes=20)), "FOLLOW", ("5",))
    gated: list[bool] = []

    def gate(slots: Sequence[SlotRequest]) -> None:
        gated.append(True)

    before = _count(path)
    with pytest.raises(BusinessRuleViolation, match="cannot be stored exactly"):
        asyncio.run(backend.book(NewBooking(slot, "5", None, "test"), gate))
    assert gated == [] and _count(path) == before
