"""Issue 8 items 2-4 together: ``Placer`` outcomes (confirmed, refused, unknown, not delivered) against the
simulator, and ``SiuFeed`` settling an unknown outcome from the SIU the filler sends."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hl7v2util import demo_mapping, run

from adapter.hl7v2.feed import SiuFeed
from adapter.hl7v2.outbound import AvailabilityRequest, BookingRequest, PatientRef
from adapter.hl7v2.placer import Confirmed, NotDelivered, Placer, Refused, Unknown
from adapter.testing.hl7_simulator import LegacySchedulerSimulator, demo_templates

NINE = datetime(2026, 1, 12, 9, tzinfo=ZoneInfo("Europe/Berlin"))


def _booking(placer: str, start: datetime = NINE) -> BookingRequest:
    return BookingRequest(placer, start, 20, "CHECKUP", "", ("DOC1",), ("ROOM1",), PatientRef("PAT1", "Roe", "Ann"))


def test_issue8_placer_outcomes_and_feed_settles_unknown(tmp_path: Path) -> None:
    mapping = demo_mapping()
    mapping = replace(mapping, interface=mapping.interface.model_copy(update={"timeout_seconds": 0.3, "retries": 0}))

    async def main() -> None:
        feed = SiuFeed(tmp_path / "feed.sqlite", mapping, port=0, poll_seconds=0.05)
        await feed.start()
        sim = LegacySchedulerSimulator(demo_templates(), siu_target=("127.0.0.1", feed.port))
        async with sim:
            placer = Placer(mapping, "127.0.0.1", sim.port)
            try:
                ok = await placer.request("S01", _booking("PL-1"))
                assert isinstance(ok, Confirmed) and ok.appointment is not None
                refused = await placer.request("S01", _booking("PL-2"))
                assert isinstance(refused, Refused) and refused.reason == "slot already taken"
                sim.faults.delay, sim.faults.delay_seconds = 1, 1.0
                unknown = await placer.request("S01", _booking("PL-3", NINE + timedelta(hours=1)))
                assert isinstance(unknown, Unknown) and unknown.placer_id == "PL-3"
                await asyncio.sleep(1.0)  # the filler answers one message per connection at a time
                slots = await placer.query(
                    AvailabilityRequest("Q", NINE, NINE + timedelta(hours=3), 20, "CHECKUP", "", ("DOC1",))
                )
                assert NINE not in [s.start for s in slots.slots]
                await sim.siu_idle()
                mirror = feed.mirror()
                try:
                    for _ in range(200):
                        settled = await asyncio.to_thread(mirror.by_placer_id, "PL-3")
                        if settled:
                            break
                        await asyncio.sleep(0.05)
                    assert [a.status for a in settled] == ["booked"]
                finally:
                    mirror.close()
            finally:
                await placer.close()
        await feed.stop()

    run(main())


def test_issue8_placer_unreachable_filler_is_not_delivered() -> None:
    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        placer = Placer(demo_mapping(), "127.0.0.1", port)
        with pytest.raises(NotDelivered):
            await placer.request("S01", _booking("PL-9"))
        await placer.close()

    run(main())
