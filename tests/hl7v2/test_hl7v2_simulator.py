"""Issue 8 item 6: the legacy scheduler simulator over real sockets, one test per fault switch."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hl7v2util import SiuStack, demo_mapping, run, siu_stack

from adapter.hl7v2.inbound import parse_sqr, parse_srr
from adapter.hl7v2.mapping import Hl7v2Mapping
from adapter.hl7v2.outbound import AvailabilityRequest, BookingRequest, PatientRef, SrmTrigger, build_sqm, build_srm
from adapter.mllp import AckTimeout, MLLPClient
from adapter.testing.hl7_simulator import LegacySchedulerSimulator, demo_templates

BERLIN = ZoneInfo("Europe/Berlin")
MONDAY = datetime(2026, 1, 12, tzinfo=BERLIN)
_ids = itertools.count(1)


@dataclass
class World:
    sim: LegacySchedulerSimulator
    stack: SiuStack
    client: MLLPClient
    mapping: Hl7v2Mapping

    async def srm(self, trigger: SrmTrigger, placer: str, start: datetime, timeout: float | None = None) -> bytes:
        req = BookingRequest(
            placer, start, 20, "CHECKUP", "", ("DOC1",), ("ROOM1",), PatientRef("PAT1", "O'Brien|^~\\&", "Pat")
        )
        raw = build_srm(self.mapping.interface, trigger, req, control_id=f"M{next(_ids)}")
        return (await self.client.send(raw, timeout=timeout)).message

    async def settled(self) -> None:
        await self.sim.siu_idle()
        await self.stack.drain()


@asynccontextmanager
async def world(tmp_path: Path, timeout: float = 5.0, retries: int = 0) -> AsyncIterator[World]:
    mapping = demo_mapping()
    async with siu_stack(tmp_path / "adapter.sqlite", mapping) as stack:
        sim = LegacySchedulerSimulator(demo_templates(), siu_target=("127.0.0.1", stack.server.port))
        async with sim, MLLPClient("127.0.0.1", sim.port, timeout=timeout, retries=retries) as client:
            yield World(sim, stack, client, mapping)


def test_issue8_6_sqm_answers_template_slots_minus_bookings(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            await w.sim.front_desk_book("DOC1", MONDAY.replace(hour=8, minute=20), 20)
            q = AvailabilityRequest("Q1", MONDAY, MONDAY + timedelta(days=1), 20, "CHECKUP", "", ("DOC1",))
            reply = await w.client.send(build_sqm(w.mapping.interface, q, control_id="Q-M1"))
            slots = parse_sqr(reply.message, w.mapping).slots
            starts = [s.start.astimezone(BERLIN).strftime("%H:%M") for s in slots]
            assert starts[:3] == ["08:00", "08:40", "09:00"] and len(starts) == 11
            assert slots[0].practitioner_ids == ("DOC1",) and slots[0].location_ids == ("ROOM1",)

    run(main())


def test_issue8_6_srm_aa_then_ae_when_taken_and_siu_reaches_the_mirror(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            nine = MONDAY.replace(hour=9)
            ok = parse_srr(await w.srm("S01", "PL-1", nine), w.mapping)
            assert ok.accepted and ok.appointment is not None and ok.appointment.placer_id == "PL-1"
            filler = ok.appointment.filler_id
            again = parse_srr(await w.srm("S01", "PL-1", nine), w.mapping)  # a retry: same placer id
            assert again.accepted and again.appointment is not None and again.appointment.filler_id == filler
            taken = parse_srr(await w.srm("S01", "PL-2", nine), w.mapping)
            assert taken.ack_code == "AE" and taken.reason == "slot already taken"
            await w.settled()
            mirrored = w.stack.applier.mirror.by_filler_id(filler)
            assert mirrored is not None and mirrored.status == "booked" and mirrored.placer_id == "PL-1"
            assert mirrored.patient_family == "O'Brien|^~\\&"  # round trip SRM -> filler -> SIU
            assert len(w.sim.appointments) == 1
            cancel = parse_srr(await w.srm("S04", "PL-1", nine), w.mapping)
            assert cancel.accepted
            await w.settled()
            mirrored = w.stack.applier.mirror.by_filler_id(filler)
            assert mirrored is not None and mirrored.status == "cancelled"

    run(main())


def test_issue8_6_front_desk_booking_is_pushed_as_siu(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            appt = await w.sim.front_desk_book("DOC2", MONDAY.replace(hour=10), 20, family="Desk")
            await w.sim.front_desk_reschedule(appt.filler_id, MONDAY.replace(hour=11))
            await w.settled()
            m = w.stack.applier.mirror.by_filler_id(appt.filler_id)
            assert m is not None and m.last_trigger == "S13" and m.start == MONDAY.replace(hour=11)
            assert m.practitioner_ids == ("DOC2",)

    run(main())


def test_issue8_6_fault_drop_before_answer_resend_same_msh10(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path, retries=1) as w:
            w.sim.faults.drop = 1
            reply = parse_srr(await w.srm("S01", "PL-1", MONDAY.replace(hour=9)), w.mapping)
            assert reply.accepted
            assert w.client.stats.resent == 1 and w.client.stats.connects == 2
            first, second = w.sim.received
            assert first == second  # same bytes, same MSH-10
            assert len(w.sim.appointments) == 1

    run(main())


def test_issue8_6_fault_drop_after_apply_outcome_settled_by_siu(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path, retries=0) as w:
            w.sim.faults.drop, w.sim.faults.drop_after_apply = 1, True
            with pytest.raises(AckTimeout):
                await w.srm("S01", "PL-1", MONDAY.replace(hour=9), timeout=1.0)
            await w.settled()
            found = w.stack.applier.mirror.by_placer_id("PL-1")
            assert [a.status for a in found] == ["booked"]

    run(main())


def test_issue8_6_fault_delay_beyond_timeout(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path, timeout=0.3, retries=0) as w:
            w.sim.faults.delay, w.sim.faults.delay_seconds = 1, 1.0
            with pytest.raises(AckTimeout):
                await w.srm("S01", "PL-1", MONDAY.replace(hour=9))
            await asyncio.sleep(1.0)
            assert w.client.stats.stray == 1  # the late SRR arrived and matched nobody
            await w.settled()
            assert [a.status for a in w.stack.applier.mirror.by_placer_id("PL-1")] == ["booked"]

    run(main())


def test_issue8_6_fault_answer_twice(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            w.sim.faults.twice = 1
            assert parse_srr(await w.srm("S01", "PL-1", MONDAY.replace(hour=9)), w.mapping).accepted
            for _ in range(200):
                if w.client.stats.stray:
                    break
                await asyncio.sleep(0.01)
            assert w.client.stats.stray == 1
            assert parse_srr(await w.srm("S01", "PL-2", MONDAY.replace(hour=10)), w.mapping).accepted

    run(main())


def test_issue8_6_fault_answer_ae(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            w.sim.faults.ae = 1
            r = parse_srr(await w.srm("S01", "PL-1", MONDAY.replace(hour=9)), w.mapping)
            assert r.ack_code == "AE" and "forced error" in r.reason
            assert w.sim.appointments == {}

    run(main())


def test_issue8_6_fault_duplicate_siu_ignored(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            w.sim.faults.duplicate_siu = 1
            await w.sim.front_desk_book("DOC1", MONDAY.replace(hour=9), 20)
            await w.settled()
            assert len(w.sim.siu_sent) == 2 and w.sim.siu_sent[0] == w.sim.siu_sent[1]
            assert (w.stack.inbox.stored, w.stack.inbox.duplicates) == (1, 1)
            assert w.stack.applier.mirror.count() == 1

    run(main())


def test_issue8_6_fault_out_of_order_siu(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            w.sim.faults.out_of_order_siu = 1
            appt = await w.sim.front_desk_book("DOC1", MONDAY.replace(hour=9), 20)  # S12 held back
            await asyncio.sleep(0.01)  # distinct MSH-7 for the second event
            await w.sim.front_desk_reschedule(appt.filler_id, MONDAY.replace(hour=10))  # S13 first, then S12
            await w.settled()
            assert [m.split(b"|")[8] for m in w.sim.siu_sent] == [b"SIU^S13^SIU_S12", b"SIU^S12^SIU_S12"]
            m = w.stack.applier.mirror.by_filler_id(appt.filler_id)
            assert m is not None and m.last_trigger == "S13" and m.start == MONDAY.replace(hour=10)
            assert w.stack.applier.stats.stale == 1

    run(main())


@pytest.mark.parametrize("version", ["2.3", "2.4", "2.5.1"])
def test_issue8_3_book_and_mirror_per_agreed_version(tmp_path: Path, version: str) -> None:
    """Before v2.5 there is no TQ1: times travel in SCH-11 and AIS-4; the chain works the same."""

    async def main() -> None:
        mapping = demo_mapping()
        agreement = mapping.interface.model_copy(update={"version": version})
        async with siu_stack(tmp_path / "adapter.sqlite", mapping) as stack:
            sim = LegacySchedulerSimulator(
                demo_templates(), version=version, siu_target=("127.0.0.1", stack.server.port)
            )
            async with sim, MLLPClient("127.0.0.1", sim.port, timeout=5) as client:
                req = BookingRequest("PL-V", MONDAY.replace(hour=11), 20, "CHECKUP", "", ("DOC2",), ("ROOM2",))
                reply = await client.send(build_srm(agreement, "S01", req, control_id="V-1"))
                srr = parse_srr(reply.message, mapping)
                assert srr.accepted and srr.appointment is not None
                assert srr.appointment.start == MONDAY.replace(hour=11)
                await sim.siu_idle()
                await stack.drain()
                m = stack.applier.mirror.by_placer_id("PL-V")
                assert [(a.start, a.end, a.practitioner_ids) for a in m] == [
                    (MONDAY.replace(hour=11), MONDAY.replace(hour=11, minute=20), ("DOC2",))
                ]

    run(main())
