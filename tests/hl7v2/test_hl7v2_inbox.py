"""Issue 8 item 4: durable before ACK, de-duplication, out-of-order events, tolerant reading."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hl7v2util import demo_mapping, run, siu, siu_stack

from adapter.hl7v2.inbound import parse_siu
from adapter.hl7v2.inbox import SiuInbox, SiuListener
from adapter.mllp import MLLPServer, Peer, encode_frame


def test_issue8_4_duplicate_msh10_acknowledged_but_stored_once(tmp_path: Path) -> None:
    async def main() -> None:
        async with siu_stack(tmp_path / "db.sqlite") as stack:
            m = siu("C1", "S12")
            assert await stack.send(m, m, m) == ["AA", "AA", "AA"]
            assert await stack.inbox.count() == 1
            assert (stack.inbox.stored, stack.inbox.duplicates) == (1, 2)
            await stack.drain()
            assert stack.applier.stats.applied == 1

    run(main())


def test_issue8_4_same_msh10_from_another_sender_is_not_a_duplicate(tmp_path: Path) -> None:
    async def main() -> None:
        async with siu_stack(tmp_path / "db.sqlite") as stack:
            other = siu("C1", "S12").replace(b"|LEGACY|FAC|", b"|OTHER|FAC|")
            await stack.send(siu("C1", "S12"), other)
            assert await stack.inbox.count() == 2

    run(main())


def test_issue8_4_message_is_on_disk_when_the_ack_arrives(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite"

    async def main() -> None:
        async with siu_stack(db) as stack:
            await stack.send(siu("C7", "S12"))
            # Another connection (another process could do the same) sees the committed row at ACK time.
            rows = sqlite3.connect(db).execute("SELECT control_id, state FROM hl7_inbox").fetchall()
            assert rows == [("C7", 0)]

    run(main())


def test_issue8_4_store_failure_means_no_ack(tmp_path: Path) -> None:
    class BrokenInbox(SiuInbox):
        async def store(self, sender: str, control_id: str, message_type: str, raw: bytes) -> bool:
            raise sqlite3.OperationalError("disk I/O error")

    async def main() -> None:
        inbox = BrokenInbox(tmp_path / "db.sqlite")
        async with MLLPServer(SiuListener(inbox).handle) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(encode_frame(siu("C1", "S12")))
            await writer.drain()
            assert await reader.read() == b""  # connection closed, no ACK: the sender will resend
            writer.close()
            await writer.wait_closed()
        await inbox.close()

    run(main())


def test_issue8_4_non_siu_refused_with_ar_and_not_stored(tmp_path: Path) -> None:
    async def main() -> None:
        async with siu_stack(tmp_path / "db.sqlite") as stack:
            adt = siu("C1", "S12").replace(b"SIU^S12^SIU_S12", b"ADT^A01^ADT_A01")
            assert await stack.send(adt) == ["AR"]
            assert await stack.inbox.count() == 0

    run(main())


def test_issue8_4_enhanced_mode_gets_commit_accept(tmp_path: Path) -> None:
    async def main() -> None:
        async with siu_stack(tmp_path / "db.sqlite") as stack:
            m = siu("C1", "S12").replace(b"|P|2.5.1\r", b"|P|2.5.1|||AL|NE\r")
            assert await stack.send(m) == ["CA"]

    run(main())


def test_issue8_4_s14_before_s12_keeps_the_newer_state(tmp_path: Path) -> None:
    async def main() -> None:
        async with siu_stack(tmp_path / "db.sqlite") as stack:
            s12 = siu("C1", "S12", msg_time="20260105100000+0100", start="20260110090000+0100")
            s14 = siu(
                "C2", "S14", msg_time="20260105110000+0100", start="20260110100000+0100", end="20260110103000+0100"
            )
            s15 = siu("C3", "S15", msg_time="20260105120000+0100", status="Cancelled")
            await stack.send(s14, s12)  # modification arrives first
            await stack.drain()
            appt = stack.applier.mirror.by_filler_id("F1")
            assert appt is not None and appt.last_trigger == "S14"
            assert appt.start == datetime(2026, 1, 10, 9, 0, tzinfo=UTC) + timedelta(hours=0)
            assert stack.applier.stats.stale == 1
            await stack.send(s15, siu("C4", "S12", msg_time="20260105100500+0100"))  # a late S12 after the cancel
            await stack.drain()
            appt = stack.applier.mirror.by_filler_id("F1")
            assert appt is not None and appt.status == "cancelled" and appt.last_trigger == "S15"
            assert stack.applier.mirror.stale_count() == 2

    run(main())


def test_issue8_4_tolerant_reading_lf_crlf_missing_structure_and_z_segments() -> None:
    mapping = demo_mapping()
    for sep in ("\r", "\n", "\r\n"):
        m = siu("C1", "S13", sep=sep, extra=("ZXT|1|custom^value",)).replace(b"SIU^S13^SIU_S12", b"SIU^S13")
        event = parse_siu(m, mapping)
        assert event.trigger == "S13" and event.appointment.practitioner_ids == ("DOC1",)
        assert event.z_segments == ("ZXT|1|custom^value",)
        assert "ZXT|1|custom^value" in event.raw


def test_issue8_4_v22_practice_management_feed_without_tq1() -> None:
    """The legacy PM shape: v2.2, MSH-9 without structure, start only in SCH-11.4, duration in SCH-9/10, provider in
    AIG-3, no SCH-25 (the trigger decides), timestamps without offset (read in the agreement's zone)."""
    raw = (
        b"MSH|^~\\&|PM|CLINIC|ADAPTER|CLINIC|200403221200||SIU^S12|8001|T|2.2\r"
        b"SCH|5001|5001|||||Follow up|FOLLOWUP|10|minutes|^^^200403221320\r"
        b"PID|1||PM-77||Roe^Ann\r"
        b"RGS|1\r"
        b"AIG|1||jdoe^Doe^Jane\r"
        b"AIL|1||MAIN^^^Main Street Clinic\r"
    )
    event = parse_siu(raw, demo_mapping())
    a = event.appointment
    assert (a.filler_id, a.status, a.practitioner_ids, a.location_ids) == ("5001", "booked", ("jdoe",), ("MAIN",))
    assert a.start is not None and a.start.isoformat() == "2004-03-22T13:20:00+01:00"
    assert a.end is not None and (a.end - a.start) == timedelta(minutes=10)


def test_issue8_4_unparseable_message_is_marked_failed_not_retried_forever(tmp_path: Path) -> None:
    async def main() -> None:
        async with siu_stack(tmp_path / "db.sqlite") as stack:
            bad = siu("C1", "S12").replace(b"SIU^S12^SIU_S12", b"SIU^S99")
            await stack.send(bad, siu("C2", "S12"))
            assert await stack.drain() == 2
            assert stack.applier.stats.failed == 1 and stack.applier.stats.applied == 1
            assert await stack.drain() == 0

    run(main())


def test_issue8_4_listener_reads_only_msh_before_ack(tmp_path: Path) -> None:
    """A message whose body no parser could read is still stored and acknowledged: parsing happens after the ACK."""

    async def main() -> None:
        inbox = SiuInbox(tmp_path / "db.sqlite")
        listener = SiuListener(inbox)
        ack = await listener.handle(b"MSH|^~\\&|A|B|C|D|20260101||SIU^S12|X1|P|2.5\r\x00garbage\r", Peer("h", 1))
        assert b"MSA|AA|X1" in ack
        assert await inbox.count() == 1
        await inbox.close()

    run(main())


def test_issue8_4_applier_task_applies_after_wake(tmp_path: Path) -> None:
    async def main() -> None:
        async with siu_stack(tmp_path / "db.sqlite") as stack:
            stack.listener.on_stored = stack.applier.wake
            stack.applier.start(poll_seconds=30)
            await stack.send(siu("C1", "S12"))
            for _ in range(500):
                if stack.applier.stats.applied:
                    break
                await asyncio.sleep(0.01)
            assert stack.applier.stats.applied == 1

    run(main())
