"""The ``$find`` response memo across worker processes (issue 14): ``sched-adapter serve`` with TWO uvicorn workers
on the SQLite demo. Each worker memoises ``$find`` answers for up to a second; a ``$hold`` or a ``$book`` answered
by one worker must be visible in the very next ``$find`` answered by either (the change counters in the shared
mapped file are bumped before the answer goes out). Every request opens its own connection, so both workers serve
the warm-up and the checks."""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serverutil import ProcessServers, free_port, process_log

from adapter.demo.seed import ensure_demo_database

REPO = Path(__file__).resolve().parents[2]
MAPPING = REPO / "mappings" / "demo.yaml"
ZONE = ZoneInfo("America/New_York")
ROUNDS = 24  # $find per check, each on a new connection


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("memo-workers")
    db = tmp / "demo.sqlite"
    ensure_demo_database(db, today=dt.date.today())
    port = free_port()
    config = tmp / "memo.toml"
    config.write_text(
        f"""
[server]
host = "127.0.0.1"
port = {port}
workers = 2
log_level = "warning"

[backend]
mapping = '{MAPPING}'
database_url = 'sqlite:///{db}'

[state]
path = '{tmp / "state.sqlite"}'

[find]
cache_seconds = 30

[security]
auth = "off"
signing_secret = "memo-test-secret-0123456789abcdef"
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
        yield proc.base_url + "/fhir"
        assert proc.poll() is None, process_log(proc)
    finally:
        servers.stop_all()


def _find_body() -> dict[str, Any]:
    start = dt.datetime.combine(dt.datetime.now(ZONE).date() + dt.timedelta(days=1), dt.time(), tzinfo=ZONE)
    return {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "start", "valueDateTime": start.isoformat()},
            {"name": "end", "valueDateTime": (start + dt.timedelta(days=5)).isoformat()},
            {"name": "practitioner", "valueReference": {"reference": "Practitioner/SPEARSB"}},
            {"name": "patient-reference", "valueReference": {"reference": "Patient/7"}},
            {"name": "_count", "valueInteger": 30},
        ],
    }


def _ref(token: str) -> dict[str, Any]:
    return {
        "resourceType": "Parameters",
        "parameter": [{"name": "appointment-reference", "valueReference": {"reference": f"Appointment/{token}"}}],
    }


def _offers(fhir: str, body: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """``ROUNDS`` answers to the same $find, each over a new connection (either worker may take it)."""
    out = []
    for _ in range(ROUNDS):
        with httpx.Client(timeout=30) as c:
            r = c.post(f"{fhir}/Appointment/$find", json=body)
        assert r.status_code == 200, r.text
        out.append([e["resource"] for e in r.json().get("entry", []) if e["resource"]["resourceType"] == "Appointment"])
    return out


def _starts(appts: list[dict[str, Any]]) -> set[str]:
    return {a["start"] for a in appts}


def test_issue14_a_hold_and_a_booking_in_one_worker_are_seen_at_once_by_every_worker_memo(base: str) -> None:
    body = _find_body()
    warm = _offers(base, body)
    slots = warm[-1]
    held, booked = slots[0], slots[5]
    with httpx.Client(timeout=30) as c:
        r = c.post(f"{base}/Appointment/$hold", json=_ref(held["id"]), headers={"X-Client-Id": "a"})
    assert r.status_code == 200, r.text
    after_hold = _offers(base, body)
    assert all(held["start"] not in _starts(offer) for offer in after_hold)
    assert all(booked["start"] in _starts(offer) for offer in after_hold)

    with httpx.Client(timeout=30) as c:
        r = c.post(f"{base}/Appointment/$book", json=_ref(booked["id"]), headers={"X-Client-Id": "b"})
    assert r.status_code == 200, r.text
    after_book = _offers(base, body)
    assert all(booked["start"] not in _starts(offer) for offer in after_book)
    assert all(held["start"] not in _starts(offer) for offer in after_book)
