"""Pure domain functions: slot maths, ranking, proposal ids (no I/O, so no services needed)."""

from __future__ import annotations

import datetime as dt
import re
from asyncio import run

import pytest

from adapter.backends.protocol import Interval, ResourceAvailability, VisitType
from adapter.intervals import merge, subtract
from adapter.scheduling.candidates import ResourcePlan, find_candidates, free_time, subtract_spans
from adapter.scheduling.proposals import Proposal, ProposalCodec, ProposalError

UTC = dt.UTC
T0 = dt.datetime(2030, 1, 7, 14, 0, tzinfo=UTC)


def iv(a: int, b: int) -> Interval:
    return Interval(T0 + dt.timedelta(minutes=a), T0 + dt.timedelta(minutes=b))


FOLLOW = VisitType("FOLLOW", "Follow-up", 20, ())


def test_subtract_and_merge() -> None:
    assert merge([iv(0, 10), iv(5, 20), iv(30, 40)]) == [iv(0, 20), iv(30, 40)]
    assert subtract([iv(0, 100)], [iv(10, 20), iv(15, 30), iv(90, 120)]) == [iv(0, 10), iv(30, 90)]


def test_subtract_spans_matches_interval_subtraction() -> None:
    free = [(0, 100), (200, 300)]
    taken = [(250, 260), (10, 20), (15, 30), (90, 210)]
    assert subtract_spans(free, taken) == [(0, 10), (30, 90), (210, 250), (260, 300)]
    assert subtract_spans(free, []) == free

    def as_intervals(spans: list[tuple[int, int]]) -> list[Interval]:
        return [iv(a, b) for a, b in spans]

    assert subtract_spans(free, taken) == [
        (int((i.start - T0).total_seconds()) // 60, int((i.end - T0).total_seconds()) // 60)
        for i in subtract(as_intervals(free), as_intervals(taken))
    ]


def test_candidates_skip_busy_and_held_time_and_count_all() -> None:
    ra = ResourceAvailability("P1", "L1", [iv(0, 120)], [iv(20, 40)])
    total, page = find_candidates(
        [ResourcePlan(free_time(ra), FOLLOW, (0,))],
        held={"P1": [iv(60, 80)]},
        now=T0,
        step_minutes=10,
        offset=0,
        limit=100,
    )
    starts = [int((c.interval.start - T0).total_seconds() // 60) for c in page]
    assert starts == [0, 40, 80, 90, 100]
    assert total == len(page)


def test_candidates_in_the_past_are_not_offered_and_grid_is_kept() -> None:
    ra = ResourceAvailability("P1", "L1", [iv(0, 60)], [])
    total, page = find_candidates(
        [ResourcePlan(free_time(ra), FOLLOW, (0,))],
        held={},
        now=T0 + dt.timedelta(minutes=13),
        step_minutes=10,
        offset=0,
        limit=10,
    )
    assert [int((c.interval.start - T0).total_seconds() // 60) for c in page] == [20, 30, 40]
    assert total == 3


def test_ranking_by_preference_then_start_and_paging() -> None:
    a = ResourcePlan(free_time(ResourceAvailability("A", "L", [iv(60, 100)], [])), FOLLOW, (1,))
    b = ResourcePlan(free_time(ResourceAvailability("B", "L", [iv(0, 40)], [])), FOLLOW, (0,))
    total, page = find_candidates([a, b], held={}, now=T0, step_minutes=20, offset=0, limit=10)
    assert [c.practitioner_id for c in page] == ["B", "B", "A", "A"]
    assert total == 4
    _, second = find_candidates([a, b], held={}, now=T0, step_minutes=20, offset=2, limit=1)
    assert [(c.practitioner_id, c.interval) for c in second] == [("A", iv(60, 80))]


@pytest.fixture
def codec():
    class MemoryStore:
        def __init__(self):
            self.data = {}

        async def put_proposal(self, pid, payload, expires_at):
            self.data[pid] = (payload, expires_at)

        async def get_proposal(self, pid, now):
            found = self.data.get(pid)
            return found[0] if found and found[1] > now else None

    return ProposalCodec(b"0123456789abcdef0123", MemoryStore(), dt.timedelta(hours=1))


def _proposal(prac: str = "SPEARSB", patients: tuple[str, ...] = ("7",)) -> Proposal:
    return Proposal(
        prac,
        "1",
        T0,
        20,
        "FOLLOW",
        patients,
        T0 - dt.timedelta(minutes=5),
        T0 - dt.timedelta(days=1),
        T0 + dt.timedelta(days=13),
    )


def test_req_115_28_compact_signed_id_round_trips(codec: ProposalCodec) -> None:
    p = _proposal()
    token = run(codec.encode(p))
    assert re.fullmatch(r"[A-Za-z0-9\-\.]{1,64}", token) and token.startswith("p2.")
    assert run(codec.decode(token, T0 - dt.timedelta(minutes=1))) == p


def test_the_batch_issuer_gives_the_same_ids_as_encode(codec: ProposalCodec) -> None:
    for p in (_proposal(), _proposal(prac="dr.dotted"), _proposal(patients=())):
        issue = codec.issuer(p.patient_ids, p.issued, p.window_start, p.window_end)
        token = issue(p.practitioner_id, p.location_id, p.start, p.minutes, p.visit_type_key)
        run(issue.save())
        assert run(codec.decode(token, T0)) == p
        if token.startswith("p2."):
            assert token == run(codec.encode(p))


def test_tampered_or_foreign_ids_are_rejected(codec: ProposalCodec) -> None:
    token = run(codec.encode(_proposal()))
    forged = token.replace("SPEARSB", "SPEARSC")
    with pytest.raises(ProposalError):
        run(codec.decode(forged, T0))
    with pytest.raises(ProposalError):
        run(codec.decode("whatever", T0))
    other = ProposalCodec(b"another-secret-0123456", codec._store, codec.ttl)
    with pytest.raises(ProposalError):
        run(other.decode(token, T0))


def test_expired_ids_are_rejected(codec: ProposalCodec) -> None:
    token = run(codec.encode(_proposal()))
    with pytest.raises(ProposalError, match="expired"):
        run(codec.decode(token, T0 + dt.timedelta(hours=2)))


def test_long_or_dotted_keys_fall_back_to_the_shared_store(codec: ProposalCodec) -> None:
    p = _proposal(prac="dr.with-dots", patients=tuple(str(10**12 + i) for i in range(4)))
    token = run(codec.encode(p))
    assert token.startswith("r") and len(token) == 21
    assert run(codec.decode(token, T0)) == p
    with pytest.raises(ProposalError):
        run(codec.decode("r" + "0" * 20, T0))


def test_issue7_3_starts_stay_on_the_working_time_grid() -> None:
    """The period starts at 0 (its anchor); the window was cut at 3:27, a booking ends at 25, a hold at 55
    and "now" is 70:05: every candidate is still on 0 + k * 10, never on those odd instants."""
    window_cut = T0 + dt.timedelta(minutes=3, seconds=27)
    ra = ResourceAvailability("P1", "L1", [Interval(window_cut, T0 + dt.timedelta(minutes=120))], [iv(5, 25)], [T0])
    total, page = find_candidates(
        [ResourcePlan(free_time(ra), FOLLOW, (0,))],
        held={"P1": [iv(40, 55)]},
        now=T0 + dt.timedelta(minutes=70, seconds=5),
        step_minutes=10,
        offset=0,
        limit=100,
    )
    starts = [(c.interval.start - T0).total_seconds() / 60 for c in page]
    assert starts == [80, 90, 100]
    assert total == 3
    # Without "now" in the way: 25-40 is too short for 20 minutes from 30; after the hold (ends 55) comes 60.
    _, page = find_candidates(
        [ResourcePlan(free_time(ra), FOLLOW, (0,))],
        held={"P1": [iv(40, 55)]},
        now=T0,
        step_minutes=10,
        offset=0,
        limit=100,
    )
    assert [(c.interval.start - T0).total_seconds() / 60 for c in page][:3] == [60, 70, 80]


def test_issue7_3_nothing_is_offered_after_the_latest_start() -> None:
    ra = ResourceAvailability("P1", "L1", [iv(0, 120)], [], [T0])
    total, page = find_candidates(
        [ResourcePlan(free_time(ra), FOLLOW, (0,))],
        held={},
        now=T0,
        step_minutes=10,
        offset=0,
        limit=100,
        latest_start=T0 + dt.timedelta(minutes=30),
    )
    assert [(c.interval.start - T0).total_seconds() / 60 for c in page] == [0, 10, 20, 30]
    assert total == 4


def test_issue7_8_proposals_expire_to_the_second(codec: ProposalCodec) -> None:
    codec = ProposalCodec(b"0123456789abcdef0123", codec._store, dt.timedelta(seconds=10))
    issued = dt.datetime(2030, 1, 7, 14, 0, 55, tzinfo=UTC)
    token = run(
        codec.encode(
            Proposal(
                "SPEARSB", "1", T0 + dt.timedelta(days=1), 20, "FOLLOW", ("7",), issued, T0, T0 + dt.timedelta(days=2)
            )
        )
    )
    assert run(codec.decode(token, issued + dt.timedelta(seconds=9))).issued == issued
    with pytest.raises(ProposalError, match="expired"):
        run(codec.decode(token, issued + dt.timedelta(seconds=11)))
