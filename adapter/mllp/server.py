"""``MLLPServer``: an asyncio listener serving many messages per connection.

Messages on one connection are handled strictly in order (HL7 senders rely on it: an S14 must not overtake the
S12 it modifies), connections are served concurrently. The handler returns the response frame(s) to write, or
``None`` for none. If the handler raises, the connection is closed WITHOUT a response: the sender sees no ACK and
resends, which is the only safe answer when the message could not be stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl as ssl_module
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from adapter.mllp.errors import CloseConnection, FrameError
from adapter.mllp.framing import DEFAULT_MAX_MESSAGE_SIZE, FrameDecoder, encode_frame

log = logging.getLogger("adapter.mllp.server")

READ_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class Peer:
    host: str
    port: int


Response = bytes | Sequence[bytes] | None
Handler = Callable[[bytes, Peer], Awaitable[Response]]


@dataclass(slots=True)
class ServerStats:
    connections: int = 0
    messages: int = 0
    frame_errors: int = 0
    handler_failures: int = 0
    errors: list[str] = field(default_factory=list)


class MLLPServer:
    def __init__(
        self,
        handler: Handler,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        ssl: ssl_module.SSLContext | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        self._handler = handler
        self._host = host
        self._port = port
        self._max = max_message_size
        self._ssl = ssl
        self._idle_timeout = idle_timeout
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.stats = ServerStats()

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("server not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def host(self) -> str:
        return self._host

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._host, self._port, ssl=self._ssl)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> MLLPServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # a stream callback always runs in a task
        self._connections.add(task)
        self.stats.connections += 1
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # ACKs are small and latency-bound: Nagle would hold each one for the peer's delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        addr = writer.get_extra_info("peername") or ("?", 0)
        peer = Peer(str(addr[0]), int(addr[1]))
        decoder = FrameDecoder(self._max)
        try:
            while True:
                if self._idle_timeout is None:
                    data = await reader.read(READ_CHUNK)
                else:
                    data = await asyncio.wait_for(reader.read(READ_CHUNK), self._idle_timeout)
                if not data:
                    return
                for item in decoder.feed(data):
                    if isinstance(item, FrameError):
                        self.stats.frame_errors += 1
                        self.stats.errors.append(str(item))
                        log.warning("MLLP frame error from %s:%s: %s", peer.host, peer.port, item)
                        continue
                    self.stats.messages += 1
                    try:
                        response = await self._handler(item, peer)
                    except CloseConnection:
                        return
                    except Exception:
                        self.stats.handler_failures += 1
                        log.exception("MLLP handler failed; closing the connection without a response")
                        return
                    if response is None:
                        continue
                    if isinstance(response, bytes):
                        writer.write(encode_frame(response))
                    else:
                        writer.writelines([encode_frame(r) for r in response])
                    await writer.drain()
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError, ssl_module.SSLError):
            return
        except asyncio.CancelledError:
            # Only stop() cancels these tasks; ending quietly keeps asyncio's stream callback from logging it.
            return
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, ssl_module.SSLError):
                await writer.wait_closed()
