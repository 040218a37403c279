"""Issue 8: one test per fault switch of the legacy scheduler simulator, over real sockets. Each checks the status
and OperationOutcome the client gets, that an unknown outcome is settled, that duplicates are ignored, and ends
with adapter (mirror + journal) and simulator agreeing on every appointment.

Timeouts: the adapter waits 1 s per attempt and resends once (same MSH-10), so 2 s without an SRR is "unknown".
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from backendutil import Hl7Env, next_weekday
from test_hl7v2_backend_http import failure, participants, slot, success


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Hl7Env]:
    e = Hl7Env(tmp_path, hold={"sweep_seconds": 1})
    try:
        yield e
    finally:
        e.close()


def set_faults(env: Hl7Env, **switches: object) -> None:
    def apply() -> None:
        for name, value in switches.items():
            setattr(env.sim.sim.faults, name, value)

    env.sim.run(apply)


def test_issue8_6_drop_once_after_apply_is_resent_with_the_same_ids(env: Hl7Env) -> None:
    """The connection drops after the filler booked: the resend (same MSH-10, same placer id) is de-duplicated by
    the filler, so the client gets 200 and the filler holds one appointment."""
    first = env.find(day=1)[0]
    set_faults(env, drop=1, drop_after_apply=True)
    booked = success(env.book(first["id"], "client-d"), "booked")
    assert [a.filler_id for a in env.sim.booked()] == [booked["id"]]
    assert sum(b"SRM^S01" in m for m in env.sim.sim.received) == 2
    env.assert_agreement()


def test_issue8_6_drop_beyond_the_budget_is_504_then_settled_from_siu(env: Hl7Env) -> None:
    """Both attempts are dropped after the filler booked, and its S12 is held back: the adapter cannot tell, so
    504 "being confirmed"; the slot stays busy for everybody meanwhile; the next SIU settles it, and the retry with
    the same Idempotency-Key gets the booking."""
    first = env.find(day=1)[0]
    set_faults(env, drop=2, drop_after_apply=True, out_of_order_siu=1)
    text = failure(env.book(first["id"], "client-u", key="key-u"), 504, "timeout", "being confirmed")
    assert "Idempotency-Key" in text
    [in_sim] = env.sim.booked()
    assert env.journal_intents() == 1
    assert slot(first) not in {slot(a) for a in env.find(day=1, patient="PAT2")}, "an unsettled booking is busy"
    failure(env.book(first["id"], "client-other"), 409, "conflict")
    failure(env.hold(first["id"], "client-other"), 409, "conflict", "not confirmed it yet")
    # Another change at the filler releases the held S12: the feed settles the booking without any client.
    env.sim.call(env.sim.sim.front_desk_book("DOC2", next_weekday(2).replace(hour=9), 20))
    env.settle_siu()
    env.wait_for(lambda: env.journal_intents() == 0, "the unknown booking to be settled from the SIU feed")
    booked = success(env.book(first["id"], "client-u", key="key-u"), "booked")
    assert booked["id"] == in_sim.filler_id
    assert len([a for a in env.sim.booked() if a.practitioner == "DOC1"]) == 1
    env.assert_agreement()


def test_issue8_6_drop_before_apply_is_settled_as_not_booked(env: Hl7Env) -> None:
    first = env.find(day=1)[0]
    set_faults(env, drop=2, drop_after_apply=False)
    failure(env.book(first["id"], "client-n", key="key-n"), 504, "timeout", "being confirmed")
    assert env.sim.booked() == []
    # Nothing arrived at the filler: the settlement (a schedule query shows the slot free) drops the intent,
    # and the retry with the same key books it.
    booked = success(env.book(first["id"], "client-n", key="key-n"), "booked")
    assert [a.filler_id for a in env.sim.booked()] == [booked["id"]]
    env.assert_agreement()


def test_issue8_6_delay_beyond_timeout_is_504_and_settled(env: Hl7Env) -> None:
    first = env.find(day=1)[0]
    # The first attempt is answered after 2.5 s: past its 1 s, and past the resend's deadline too (the filler
    # answers one connection's messages in order), so the booking's outcome is unknown to the adapter.
    set_faults(env, delay=1, delay_seconds=2.5)
    resp = env.book(first["id"], "client-t", key="key-t")
    assert resp.status_code in (200, 504), resp.text
    # 200: the filler's SIU overtook its late SRR and settled the booking before the adapter answered.
    if resp.status_code == 504:
        failure(resp, 504, "timeout", "being confirmed")
        env.settle_siu()
        env.wait_for(lambda: env.journal_intents() == 0, "the unknown booking to be settled")
    [in_sim] = env.sim.booked()
    booked = success(env.book(first["id"], "client-t", key="key-t"), "booked")
    assert booked["id"] == in_sim.filler_id
    # Meanwhile nobody else could take the slot, and the late SRRs correlate with nothing.
    second = env.find(day=1)[1]
    other = success(env.book(second["id"], "client-t2"), "booked")
    assert other["id"] != booked["id"] and len(env.sim.booked()) == 2
    env.assert_agreement()


def test_issue8_6_answer_twice_is_correlated_once(env: Hl7Env) -> None:
    a, b = env.find(day=1)[:2]
    set_faults(env, twice=1)
    first = success(env.book(a["id"], "client-2"), "booked")
    second = success(env.book(b["id"], "client-2"), "booked")
    assert first["id"] != second["id"]
    assert {x.filler_id for x in env.sim.booked()} == {first["id"], second["id"]}
    assert (first["start"], second["start"]) == (a["start"], b["start"])
    env.assert_agreement()


def test_issue8_6_ae_is_409_with_the_fillers_reason(env: Hl7Env) -> None:
    first = env.find(day=1)[0]
    set_faults(env, ae=1)
    failure(env.book(first["id"], "client-e"), 409, "conflict", "forced error (simulator fault switch)")
    assert env.sim.booked() == []
    assert env.journal_intents() == 0
    assert slot(first) in {slot(x) for x in env.find(day=1)}
    success(env.book(first["id"], "client-e"), "booked")
    env.assert_agreement()


def test_issue8_6_ar_is_422_business_rule_with_the_fillers_reason(env: Hl7Env) -> None:
    """AR (application reject): the filler refuses the request by a rule of its own, so 422 business-rule with the
    filler's words; nothing is booked and the slot stays offered."""
    first = env.find(day=1)[0]
    set_faults(env, ar=1)
    failure(env.book(first["id"], "client-r"), 422, "business-rule", "rejected by rule (simulator fault switch)")
    assert env.sim.booked() == []
    assert env.sim.sim.faults.ar == 0
    assert env.journal_intents() == 0
    assert slot(first) in {slot(x) for x in env.find(day=1)}
    env.assert_agreement()


def test_issue8_6_taken_at_the_front_desk_is_409_with_the_fillers_reason(env: Hl7Env) -> None:
    """The filler's own AE (slot taken) before its SIU reached the adapter: 409 with the filler's words."""
    first = env.find(day=1)[0]
    start = dt.datetime.fromisoformat(first["start"])
    env.sim.run(lambda: setattr(env.sim.sim, "_siu_queue", None))  # the front desk's SIU never arrives
    env.sim.call(env.sim.sim.front_desk_book("DOC1", start, 20))
    failure(env.book(first["id"], "client-f"), 409, "conflict", "slot already taken")


def test_issue8_6_duplicate_siu_is_ignored(env: Hl7Env) -> None:
    start = next_weekday(1).replace(hour=9)
    set_faults(env, duplicate_siu=1)
    walk_in = env.sim.call(env.sim.sim.front_desk_book("DOC1", start, 20))
    env.settle_siu()
    assert sum(b"SIU^S12" in m for m in env.sim.sim.siu_sent) == 2
    found = env.search("practitioner=Practitioner/DOC1")
    assert [a["id"] for a in found] == [walk_in.filler_id]
    assert start.isoformat() not in {a["start"] for a in env.find(day=1)}
    env.assert_agreement()


def test_issue8_6_out_of_order_siu_keeps_the_latest(env: Hl7Env) -> None:
    start = next_weekday(1).replace(hour=9)
    later = start.replace(hour=10)
    set_faults(env, out_of_order_siu=1)
    walk_in = env.sim.call(env.sim.sim.front_desk_book("DOC1", start, 20))
    env.sim.call(env.sim.sim.front_desk_reschedule(walk_in.filler_id, later))
    env.settle_siu()
    triggers = [m.split(b"|")[8] for m in env.sim.sim.siu_sent]
    assert triggers == [b"SIU^S13^SIU_S12", b"SIU^S12^SIU_S12"]  # the S12 came last
    read = env.read(walk_in.filler_id).json()
    assert dt.datetime.fromisoformat(read["start"]) == later
    env.assert_agreement()


def _booked_with_siu_settled(env: Hl7Env, client: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A booking of DOC1 on day 1 whose SIU has reached the mirror, and the change request to move it to day 2."""
    booked = success(env.book(env.find(day=1)[0]["id"], client), "booked")
    env.settle_siu()
    target = env.find(day=2)[3]
    resource = {
        "resourceType": "Appointment",
        "id": booked["id"],
        "status": "booked",
        "start": target["start"],
        "end": target["end"],
        "participant": participants(),
    }
    return booked, resource


def test_issue8_6_reschedule_beyond_the_budget_is_504_then_replayed_after_the_siu(env: Hl7Env) -> None:
    """A reschedule whose SRR never arrives (both attempts dropped after the filler moved it, its S13 held back) is
    504 and journaled; the S13 settles it, and the retry with the same Idempotency-Key gets the moved appointment
    without sending the S02 again."""
    booked, resource = _booked_with_siu_settled(env, "client-m")
    set_faults(env, drop=2, drop_type="SRM", drop_after_apply=True, out_of_order_siu=1)
    failure(env.book(resource=resource, client="client-m", key="key-m"), 504, "timeout", "being confirmed")
    assert env.journal_intents() == 1
    sent = sum(b"SRM^S02" in m for m in env.sim.sim.received)
    env.sim.call(env.sim.sim.front_desk_book("DOC2", next_weekday(2).replace(hour=9), 20))  # releases the S13
    env.settle_siu()
    env.wait_for(lambda: env.journal_intents() == 0, "the unknown reschedule to be settled from the SIU feed")
    moved = success(env.book(resource=resource, client="client-m", key="key-m"), "booked")
    assert moved["id"] == booked["id"] and (moved["start"], moved["end"]) == (resource["start"], resource["end"])
    assert sum(b"SRM^S02" in m for m in env.sim.sim.received) == sent, "the settled reschedule was sent again"
    [in_sim] = [a for a in env.sim.booked() if a.practitioner == "DOC1"]
    assert in_sim.filler_id == booked["id"] and in_sim.start == dt.datetime.fromisoformat(resource["start"])
    env.assert_agreement()


def test_issue8_6_cancel_beyond_the_budget_is_504_then_replayed_after_the_siu(env: Hl7Env) -> None:
    booked, resource = _booked_with_siu_settled(env, "client-c")
    cancel = {**resource, "status": "cancelled", "start": booked["start"], "end": booked["end"]}
    set_faults(env, drop=2, drop_type="SRM", drop_after_apply=True, out_of_order_siu=1)
    failure(env.book(resource=cancel, client="client-c", key="key-c"), 504, "timeout", "being confirmed")
    assert env.journal_intents() == 1
    sent = sum(b"SRM^S04" in m for m in env.sim.sim.received)
    env.sim.call(env.sim.sim.front_desk_book("DOC2", next_weekday(2).replace(hour=9), 20))  # releases the S15
    env.settle_siu()
    env.wait_for(lambda: env.journal_intents() == 0, "the unknown cancel to be settled from the SIU feed")
    cancelled = success(env.book(resource=cancel, client="client-c", key="key-c"), "cancelled")
    assert cancelled["id"] == booked["id"]
    assert sum(b"SRM^S04" in m for m in env.sim.sim.received) == sent, "the settled cancel was sent again"
    assert [a.practitioner for a in env.sim.booked()] == ["DOC2"]
    env.assert_agreement()


def test_issue8_1_a_reschedule_is_journaled_before_its_srm_leaves_and_its_new_time_is_busy(env: Hl7Env) -> None:
    """No lock at the filler: the reschedule's intent is recorded before the SRM^S02 is sent (a crash while it is
    in flight leaves a journal entry for the housekeeping job, not a change nobody knows about), and while the SRR
    is outstanding the new time is busy for everybody else (another patient's booking of it is 409)."""
    import threading

    booked, resource = _booked_with_siu_settled(env, "client-r")
    other = next(
        a for a in env.find(day=2, patient="PAT2") if (a["start"], a["end"]) == (resource["start"], resource["end"])
    )
    # The SQM and the SRM^S02 each answered 0.8 s late (within the 1 s per-attempt timeout).
    set_faults(env, delay=2, delay_seconds=0.8)
    answers: list[Any] = []
    mover = threading.Thread(target=lambda: answers.append(env.book(resource=resource, client="client-r")))
    mover.start()
    try:
        env.wait_for(lambda: env.journal_intents() == 1, "the reschedule's intent before its SRR")
        assert not answers, "the reschedule answered before its SRR"
        failure(env.book(other["id"], "client-other"), 409, "conflict")
    finally:
        mover.join(15)
    moved = success(answers[0], "booked")
    assert moved["id"] == booked["id"] and moved["start"] == resource["start"]
    assert env.journal_intents() == 0, "a confirmed reschedule leaves no intent behind"
    env.assert_agreement()


def test_issue8_1_a_cancel_is_journaled_before_its_srm_leaves(env: Hl7Env) -> None:
    import threading

    booked, resource = _booked_with_siu_settled(env, "client-k")
    cancel = {**resource, "status": "cancelled", "start": booked["start"], "end": booked["end"]}
    set_faults(env, delay=1, delay_seconds=0.8)
    answers: list[Any] = []
    canceller = threading.Thread(target=lambda: answers.append(env.book(resource=cancel, client="client-k")))
    canceller.start()
    try:
        env.wait_for(lambda: env.journal_intents() == 1, "the cancel's intent before its SRR")
        assert not answers, "the cancel answered before its SRR"
    finally:
        canceller.join(15)
    success(answers[0], "cancelled")
    assert env.journal_intents() == 0
    env.assert_agreement()


def test_issue8_1_a_booking_in_flight_is_busy_for_the_very_next_find_even_within_the_memo_second(
    env: Hl7Env,
) -> None:
    """The one-second ``$find`` memo must not hide a booking whose SRR is still outstanding: recording the intent
    moves the change counters, so the same ``$find`` asked again in the same second is computed afresh."""
    import threading
    import time

    time.sleep(1 - time.time() % 1 + 0.01)  # start of a second: both $find calls below fall in the same one
    before = env.find(day=1, patient="PAT2")
    first = env.find(day=1)[0]
    assert slot(first) in {slot(a) for a in before}
    set_faults(env, delay=1, delay_type="SRM", delay_seconds=0.8)
    answers: list[Any] = []
    booker = threading.Thread(target=lambda: answers.append(env.book(first["id"], "client-f")))
    booker.start()
    try:
        env.wait_for(lambda: env.journal_intents() == 1, "the booking's intent before its SRR")
        # (This $find may wait for the outstanding SRR on the filler connection; busy either way.)
        after = env.find(day=1, patient="PAT2")
    finally:
        booker.join(15)
    assert slot(first) not in {slot(a) for a in after}, "a booking in flight was offered from the memo"
    success(answers[0], "booked")
    env.assert_agreement()
