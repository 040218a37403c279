"""Issue 8 item 2: the MLLP listener and client over real sockets, with python-hl7 as the independent peer."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import hl7
import hl7.mllp
import pytest

from adapter.mllp import (
    AckTimeout,
    ConnectionLost,
    MLLPClient,
    MLLPServer,
    Peer,
    build_ack,
    encode_frame,
    read_msa,
    read_msh,
)


def msg(control_id: str, trigger: str = "S12") -> bytes:
    return f"MSH|^~\\&|SND|SF|RCV|RF|20260101120000||SIU^{trigger}|{control_id}|P|2.5.1\rSCH|P1|F1\r".encode()


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


PeerHandler = Callable[[hl7.mllp.HL7StreamReader, hl7.mllp.HL7StreamWriter], Awaitable[None]]


async def _hl7_server(handler: PeerHandler) -> tuple[asyncio.Server, int]:
    async def closing(reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        try:
            await handler(reader, writer)
        finally:  # closing the server does not close the connections it accepted
            writer.close()

    server = await hl7.mllp.start_hl7_server(closing, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _ack_handler(message: bytes, peer: Peer) -> bytes:
    msh = read_msh(message)
    return build_ack(msh, "AA", control_id="ACK-" + msh.control_id)


def test_issue8_2_listener_serves_many_messages_per_connection_to_python_hl7() -> None:
    async def main() -> list[str]:
        async with MLLPServer(_ack_handler) as server:
            reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", server.port)
            seen = []
            for i in range(5):
                writer.writemessage(hl7.parse(msg(f"C{i}").decode()))
                await writer.drain()
                ack = await reader.readmessage()
                seen.append(str(ack.segment("MSA")(2)))
            writer.close()
            assert server.stats.connections == 1
            return seen

    assert run(main()) == [f"C{i}" for i in range(5)]


def test_issue8_2_client_against_python_hl7_server_out_of_order_acks() -> None:
    """Two messages in flight; the peer answers the second first; each caller gets its own ACK by MSA-2."""

    async def handler(reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        first = await reader.readmessage()
        second = await reader.readmessage()
        writer.writemessage(second.create_ack("AA"))
        writer.writemessage(first.create_ack("AE"))
        await writer.drain()
        await reader.read()

    async def main() -> tuple[str, str]:
        server, port = await _hl7_server(handler)
        async with server, MLLPClient("127.0.0.1", port, timeout=5) as client:
            r1, r2 = await asyncio.gather(client.send(msg("A1")), client.send(msg("A2")))
            assert (r1.ack.control_id, r2.ack.control_id) == ("A1", "A2")
            return r1.ack.code, r2.ack.code

    assert run(main()) == ("AE", "AA")


def test_issue8_2_late_ack_resend_keeps_msh10_and_duplicate_answer_is_stray() -> None:
    received: list[str] = []

    async def handler(reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        while True:
            try:
                m = await reader.readmessage()
            except asyncio.IncompleteReadError:
                return
            received.append(str(m.segment("MSH")(10)))
            if len(received) == 1:
                continue  # the first copy is answered only after the resend arrives
            writer.writemessage(m.create_ack("AA"))
            writer.writemessage(m.create_ack("AA"))  # the peer answers twice
            await writer.drain()

    async def main() -> None:
        server, port = await _hl7_server(handler)
        async with server, MLLPClient("127.0.0.1", port, timeout=0.3, retries=2) as client:
            reply = await client.send(msg("L1"))
            assert reply.attempts == 2 and reply.ack.code == "AA"
            for _ in range(100):
                if client.stats.stray:
                    break
                await asyncio.sleep(0.02)
            assert client.stats.stray == 1

    run(main())
    assert received == ["L1", "L1"]


def test_issue8_2_no_answer_raises_ack_timeout_after_retries() -> None:
    async def handler(reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        await reader.read()

    async def main() -> None:
        server, port = await _hl7_server(handler)
        async with server, MLLPClient("127.0.0.1", port, timeout=0.2, retries=2) as client:
            with pytest.raises(AckTimeout) as info:
                await client.send(msg("T1"))
            assert info.value.attempts == 3 and client.stats.resent == 2

    run(main())


def test_issue8_2_reconnects_after_peer_drops_connection() -> None:
    count = 0

    async def handler(reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        nonlocal count
        m = await reader.readmessage()
        count += 1
        if count == 1:
            writer.close()  # dropped mid-exchange: no ACK
            return
        writer.writemessage(m.create_ack("AA"))
        await writer.drain()
        await reader.read()

    async def main() -> None:
        server, port = await _hl7_server(handler)
        async with server, MLLPClient("127.0.0.1", port, timeout=5, backoff_initial=0.01) as client:
            reply = await client.send(msg("R1"))
            assert reply.ack.code == "AA" and reply.attempts == 2
            assert client.stats.connects == 2

    run(main())


def test_issue8_2_unreachable_peer_is_not_delivered_and_backoff_grows() -> None:
    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        client = MLLPClient("127.0.0.1", port, timeout=0.5, retries=2, backoff_initial=0.01)
        with pytest.raises(ConnectionLost) as info:
            await client.send(msg("U1"))
        assert info.value.delivered is False
        assert client.stats.connect_failures >= 2

    run(main())
    c = MLLPClient("h", 1, backoff_initial=0.1, backoff_max=1.0)
    assert [c.backoff_delay(n) for n in range(6)] == [0.0, 0.1, 0.2, 0.4, 0.8, 1.0]


def test_issue8_2_enhanced_mode_commit_then_application_ack() -> None:
    async def handler(reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        m = await reader.readmessage()
        writer.writemessage(m.create_ack("CA"))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.writemessage(m.create_ack("AA"))
        await writer.drain()
        await reader.read()

    async def main() -> None:
        server, port = await _hl7_server(handler)
        enhanced = msg("E1").replace(b"|2.5.1\r", b"|2.5.1|||AL|AL\r")
        async with server, MLLPClient("127.0.0.1", port, timeout=5) as client:
            reply = await client.send(enhanced)
            assert reply.commit is not None and reply.commit.code == "CA"
            assert reply.ack.code == "AA"
        server2, port2 = await _hl7_server(handler)
        async with server2, MLLPClient("127.0.0.1", port2, timeout=5) as client:
            commit_only = await client.send(enhanced, wait_application=False)
            assert commit_only.ack.code == "CA"

    run(main())


def test_issue8_2_handler_failure_closes_without_ack() -> None:
    async def failing(message: bytes, peer: Peer) -> bytes:
        raise RuntimeError("store unavailable")

    async def main() -> None:
        async with MLLPServer(failing) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(encode_frame(msg("F1")))
            await writer.drain()
            assert await reader.read() == b""  # closed, no ACK
            assert server.stats.handler_failures == 1
            writer.close()
            await writer.wait_closed()

    run(main())


def test_issue8_2_bad_frame_does_not_close_the_listener_connection() -> None:
    async def main() -> None:
        async with MLLPServer(_ack_handler, max_message_size=2000) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"noise" + encode_frame(b"MSH|^~\\&|" + b"x" * 5000) + encode_frame(msg("G1")))
            await writer.drain()
            data = await reader.readuntil(b"\x1c\r")
            ack = read_msa(data[1:-2])
            assert ack is not None and ack.control_id == "G1"
            assert server.stats.frame_errors == 2
            writer.close()

    run(main())


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert)]
        + ["-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    return key, cert


def test_issue8_2_tls_listener_and_client(tmp_path: Path) -> None:
    key, cert = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))

    async def main() -> str:
        async with (
            MLLPServer(_ack_handler, ssl=server_ctx) as server,
            MLLPClient("127.0.0.1", server.port, ssl=client_ctx, server_hostname="localhost") as client,
        ):
            return (await client.send(msg("S1"))).ack.code

    assert run(main()) == "AA"
