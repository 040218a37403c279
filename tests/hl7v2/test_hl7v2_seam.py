"""Issue 8.1: the backend seam made for both kinds of legacy system (SQL with locks, HL7v2 without)."""

from __future__ import annotations

import ast
import datetime as dt
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from backendutil import Hl7Env, next_weekday
from test_hl7v2_backend_http import slot, success

from adapter.backends.hl7v2.backend import Hl7v2Backend
from adapter.backends.protocol import Interval, SchedulingBackend
from adapter.backends.sql.backend import SqlBackend
from adapter.scheduling import domain
from adapter.scheduling.state import HoldConflict, SqliteStateStore
from adapter.settings import Hl7v2Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
UTC = dt.UTC
NOW = dt.datetime(2030, 3, 4, 14, 0, tzinfo=UTC)


def payload(practitioner: str, start: dt.datetime, patient: str) -> dict[str, object]:
    return {
        "practitioner_id": practitioner,
        "location_id": "ROOM1",
        "start": start.isoformat(),
        "minutes": 20,
        "visit_type_key": "CHECKUP",
        "patient_ids": [],
        "patient_id": patient,
    }


def test_issue8_1_domain_types_live_in_the_scheduling_layer() -> None:
    import adapter.backends.protocol as protocol

    for name in ("Interval", "Appointment", "Actor", "VisitType", "AvailabilityQuery", "NewBooking", "SlotConflict"):
        assert getattr(protocol, name) is getattr(domain, name)
        assert getattr(domain, name).__module__ == "adapter.scheduling.domain"
    tree = ast.parse((ROOT / "adapter" / "backends" / "protocol.py").read_text())
    defined = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert defined == {"SchedulingBackend"}, "the protocol module defines only the one backend Protocol"


def test_issue8_1_fhir_layer_reaches_the_legacy_system_only_through_scheduling() -> None:
    for path in (ROOT / "adapter" / "fhir").glob("*.py"):
        text = path.read_text()
        assert "service.backend" not in text, f"{path.name} calls the backend directly"


def test_issue8_1_capabilities_choose_the_conflict_strategy() -> None:
    assert SqlBackend.capabilities.can_lock and not SqlBackend.capabilities.pushes_changes
    for backend in (SqlBackend, Hl7v2Backend):
        for method in ("start", "stop", "book", "find_booked", "availability"):
            assert hasattr(backend, method)
    assert SchedulingBackend.__annotations__["capabilities"] in ("Capabilities", domain.Capabilities)


def test_issue8_1_in_flight_intents_are_busy_time_without_a_lock(tmp_path: Path) -> None:
    """Two requests for overlapping time race through journal_intent_exclusive: exactly one records its intent;
    the other is refused until the first one's outcome is known (done or dropped)."""
    path = tmp_path / "state.sqlite"
    start = NOW + dt.timedelta(days=1)
    span = Interval(start, start + dt.timedelta(minutes=20))
    results: list[str] = []
    barrier = threading.Barrier(8)

    def attempt(i: int) -> None:
        store = SqliteStateStore(path)
        try:
            barrier.wait()
            store.journal_intent_exclusive(
                f"token-{i}",
                client=f"c{i}",
                request_key=None,
                payload=payload("DOC1", start, f"PAT{i}"),
                now=NOW,
                practitioner_id="DOC1",
                patient_ids=(f"PAT{i}",),
                interval=span,
            )
            results.append("won")
        except HoldConflict:
            results.append("lost")
        finally:
            store.close()

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["lost"] * 7 + ["won"]
    store = SqliteStateStore(path)
    try:
        [(prac, busy, _)] = store.intents_overlapping(span)
        assert (prac, busy) == ("DOC1", span)
        winner = next(r[0] for r in store._conn().execute("SELECT token FROM journal"))
        # The same patient elsewhere at the same time is busy too.
        with pytest.raises(HoldConflict):
            store.journal_intent_exclusive(
                "other",
                client=None,
                request_key=None,
                payload=payload("DOC2", start, winner.replace("token-", "PAT")),
                now=NOW,
                practitioner_id="DOC2",
                patient_ids=(winner.replace("token-", "PAT"),),
                interval=span,
            )
        store.journal_done(winner, "F00001", NOW, release_hold=False)
        assert store.intents_overlapping(span) == []
    finally:
        store.close()


def test_issue8_1_settings_for_the_hl7v2_backend(tmp_path: Path) -> None:
    config = tmp_path / "s.toml"
    config.write_text(
        '[backend]\nkind = "hl7v2"\nmapping = "m.yaml"\n[hl7v2]\npeer_port = 3000\nmode = "templates"\n'
        '[security]\nauth = "off"\nsigning_secret = "0123456789abcdef0123"\n'
    )
    s = load_settings(config, {"SCHED_HL7V2__LISTEN_PORT": "2600", "SCHED_HL7V2__INBOX": "x/inbox.sqlite"})
    assert s.backend.kind == "hl7v2" and s.backend.database_url == ""
    assert (s.hl7v2.peer_host, s.hl7v2.peer_port, s.hl7v2.listen_port, s.hl7v2.mode) == (
        "127.0.0.1",
        3000,
        2600,
        "templates",
    )
    assert s.hl7v2.timeout_seconds is None and str(s.hl7v2.inbox) == "x/inbox.sqlite"
    assert Hl7v2Settings().listen_port == 2575 and Hl7v2Settings().mode == "query"


@pytest.fixture
def templates(tmp_path: Path) -> Iterator[Hl7Env]:
    e = Hl7Env(tmp_path, hl7v2={"mode": "templates"})
    try:
        yield e
    finally:
        e.close()


def test_issue8_2_templates_mode_is_sessions_minus_the_mirror(templates: Hl7Env) -> None:
    env = templates
    offered = env.find(day=1)
    assert len(offered) == 12  # 08:00-12:00 in 20-minute slots
    assert not [m for m in env.sim.sim.received if b"SQM^S25" in m], "templates mode sends no schedule query"
    start = next_weekday(1).replace(hour=9)
    env.sim.call(env.sim.sim.front_desk_book("DOC1", start, 20))
    env.settle_siu()
    env.wait_for(lambda: start.isoformat() not in {a["start"] for a in env.find(day=1)}, "the mirror to block 09:00")
    first = env.find(day=1)[0]
    booked = success(env.book(first["id"], "client-t"), "booked")
    assert slot(first) not in {slot(a) for a in env.find(day=1)}
    assert booked["id"] in {a.filler_id for a in env.sim.booked()}
    env.assert_agreement()


def test_issue8_1_legacy_changes_bump_the_calendar_version(templates: Hl7Env) -> None:
    env = templates

    def version() -> int:
        store = SqliteStateStore(env.settings.state.path)
        try:
            return store.calendar_version()
        finally:
            store.close()

    before = version()
    env.sim.call(env.sim.sim.front_desk_book("DOC2", next_weekday(1).replace(hour=10), 20))
    env.settle_siu()
    env.wait_for(lambda: version() > before, "the SIU to bump the calendar version")
