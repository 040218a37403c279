"""Helpers for the HL7v2 tests: the adapter's SIU listener stack on a real socket, python-hl7 as the sender."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import hl7.mllp

from adapter.hl7v2.inbox import SiuInbox, SiuListener
from adapter.hl7v2.mapping import Hl7v2Mapping, load_hl7v2_mapping
from adapter.hl7v2.mirror import InboxApplier
from adapter.mllp import MLLPServer, read_msa

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "tests" / "data" / "hl7v2"
DEMO_MAPPING = ROOT / "mappings" / "hl7v2-demo.yaml"

T = TypeVar("T")


async def send_for_acks(port: int, *messages: bytes) -> list[str]:
    """Send with python-hl7 on one connection to 127.0.0.1:``port``, waiting for each ACK; returns MSA-1 of each."""
    reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", port)
    codes = []
    try:
        for m in messages:
            writer.writeblock(m)
            await writer.drain()
            ack = read_msa(await reader.readblock())
            codes.append(ack.code if ack else "")
    finally:
        writer.close()
    return codes


def demo_mapping() -> Hl7v2Mapping:
    return load_hl7v2_mapping(DEMO_MAPPING)


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 60)

    return asyncio.run(bounded())


@dataclass
class SiuStack:
    server: MLLPServer
    inbox: SiuInbox
    listener: SiuListener
    applier: InboxApplier

    async def send(self, *messages: bytes) -> list[str]:
        """Send with python-hl7 on one connection, waiting for each ACK; returns MSA-1 of each."""
        return await send_for_acks(self.server.port, *messages)

    async def drain(self) -> int:
        return await asyncio.to_thread(self.applier.drain)


@asynccontextmanager
async def siu_stack(db: Path, mapping: Hl7v2Mapping | None = None) -> AsyncIterator[SiuStack]:
    inbox = SiuInbox(db)
    await inbox.open()
    applier = InboxApplier(db, mapping or demo_mapping())
    listener = SiuListener(inbox)
    server = MLLPServer(listener.handle)
    await server.start()
    try:
        yield SiuStack(server, inbox, listener, applier)
    finally:
        await server.stop()
        await applier.stop()
        await inbox.close()


def siu(
    control_id: str,
    trigger: str,
    *,
    filler: str = "F1",
    placer: str = "P1",
    msg_time: str = "20260105100000+0100",
    start: str = "20260110090000+0100",
    end: str = "20260110093000+0100",
    status: str = "Booked",
    practitioner: str = "DOC1",
    location: str = "ROOM1",
    patient: str = "PAT1",
    family: str = "Doe",
    sep: str = "\r",
    version: str = "2.5.1",
    extra: tuple[str, ...] = (),
) -> bytes:
    segs = [
        f"MSH|^~\\&|LEGACY|FAC|ADAPTER|FAC|{msg_time}||SIU^{trigger}^SIU_S12|{control_id}|P|{version}",
        f"SCH|{placer}|{filler}|||||^Check-up||||||||||||||||||{status}",
        f"TQ1|||||||{start}|{end}",
        f"PID|1||{patient}||{family}^Jo",
        "RGS|1|A",
        "AIS|1|A|CHECKUP^Check-up",
        f"AIL|1|A|{location}",
        f"AIP|1|A|{practitioner}",
        *extra,
    ]
    return (sep.join(segs) + sep).encode()
