"""``MLLPClient``: one persistent connection to one peer, responses correlated by MSA-2 = MSH-10.

* The connection is opened lazily and reopened after a loss, with exponential backoff between failed connects.
* A reader task reads every frame and resolves the waiter whose MSH-10 equals the frame's MSA-2; responses nobody
  waits for (late, duplicated, unknown) are counted in ``stats.stray`` and dropped.
* ``send`` waits ``timeout`` seconds for the response and then resends the SAME bytes (same MSH-10, so the peer can
  de-duplicate) up to ``retries`` times. After the last attempt it raises ``AckTimeout``: the outcome at the peer is
  unknown. If the message could never be written (peer unreachable), it raises ``ConnectionLost`` with
  ``delivered = False``: the peer certainly did not receive it.
* Enhanced acknowledgement mode: a commit ACK (MSA-1 CA/CE/CR) arrives first; with ``wait_application`` the call
  keeps waiting for the application response (AA/AE/AR). CE/CR end the exchange.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl as ssl_module
import time
from dataclasses import dataclass, field

from adapter.mllp.ack import AckInfo, read_msa, read_msh
from adapter.mllp.errors import AckTimeout, ConnectionLost, FrameError
from adapter.mllp.framing import DEFAULT_MAX_MESSAGE_SIZE, FrameDecoder, encode_frame
from adapter.mllp.server import READ_CHUNK

log = logging.getLogger("adapter.mllp.client")


@dataclass(frozen=True, slots=True)
class Reply:
    """The response correlated with a sent message.

    ``message``/``ack``: the application response (original mode: the only response). ``commit``: the enhanced-mode
    commit acknowledgement, if one arrived. ``attempts``: how many times the message was written.
    """

    message: bytes
    ack: AckInfo
    commit: AckInfo | None
    attempts: int


@dataclass(slots=True)
class ClientStats:
    connects: int = 0
    connect_failures: int = 0
    sent: int = 0
    resent: int = 0
    stray: int = 0
    frame_errors: int = 0


@dataclass(slots=True)
class _Waiter:
    wait_application: bool
    final: asyncio.Future[tuple[bytes, AckInfo]]
    commit: AckInfo | None = None


@dataclass(slots=True)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    task: asyncio.Task[None] | None = None
    closed: bool = False
    waiters: dict[str, _Waiter] = field(default_factory=dict)


class MLLPClient:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl: ssl_module.SSLContext | None = None,
        server_hostname: str | None = None,
        timeout: float = 10.0,
        retries: int = 2,
        connect_timeout: float = 5.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 30.0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self.host = host
        self.port = port
        self._ssl = ssl
        self._server_hostname = server_hostname
        self.timeout = timeout
        self.retries = retries
        self._connect_timeout = connect_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._max = max_message_size
        self._conn: _Connection | None = None
        self._connect_lock = asyncio.Lock()
        self._failures = 0
        self._not_before = 0.0
        self.stats = ClientStats()

    # --- connection ---------------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    def backoff_delay(self, failures: int) -> float:
        """Delay before the next connect after ``failures`` consecutive failed connects (exponential, capped)."""
        if failures <= 0:
            return 0.0
        return float(min(self._backoff_max, self._backoff_initial * 2 ** (failures - 1)))

    async def connect(self) -> None:
        await self._connection()

    async def _connection(self) -> _Connection:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        async with self._connect_lock:
            if self._conn is not None and not self._conn.closed:
                return self._conn
            wait = self._not_before - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        self.host,
                        self.port,
                        ssl=self._ssl,
                        server_hostname=self._server_hostname if self._ssl else None,
                    ),
                    self._connect_timeout,
                )
            except (OSError, TimeoutError, ssl_module.SSLError) as exc:
                self._failures += 1
                self.stats.connect_failures += 1
                self._not_before = time.monotonic() + self.backoff_delay(self._failures)
                err = ConnectionLost(f"cannot connect to {self.host}:{self.port}: {exc}")
                raise err from exc
            self._failures = 0
            self._not_before = 0.0
            self.stats.connects += 1
            sock = writer.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(reader, writer)
            conn.task = asyncio.create_task(self._read_loop(conn), name=f"mllp-reader-{self.host}:{self.port}")
            self._conn = conn
            return conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        self._drop(conn, ConnectionLost("client closed"))
        if conn.task is not None:
            conn.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await conn.task

    async def __aenter__(self) -> MLLPClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _drop(self, conn: _Connection, exc: Exception) -> None:
        if conn.closed:
            return
        conn.closed = True
        conn.writer.close()
        for waiter in conn.waiters.values():
            if not waiter.final.done():
                waiter.final.set_exception(exc)
        conn.waiters.clear()

    async def _read_loop(self, conn: _Connection) -> None:
        decoder = FrameDecoder(self._max)
        try:
            while True:
                data = await conn.reader.read(READ_CHUNK)
                if not data:
                    break
                for item in decoder.feed(data):
                    if isinstance(item, FrameError):
                        self.stats.frame_errors += 1
                        log.warning("MLLP frame error from %s:%s: %s", self.host, self.port, item)
                    else:
                        self._dispatch(conn, item)
        except (ConnectionError, ssl_module.SSLError) as exc:
            log.info("MLLP connection to %s:%s lost: %s", self.host, self.port, exc)
        finally:
            self._drop(conn, ConnectionLost(f"connection to {self.host}:{self.port} lost"))

    def _dispatch(self, conn: _Connection, frame: bytes) -> None:
        ack = read_msa(frame)
        waiter = conn.waiters.get(ack.control_id) if ack is not None else None
        if ack is None or waiter is None or waiter.final.done():
            self.stats.stray += 1
            log.info("MLLP response from %s:%s matches no waiting message; dropped", self.host, self.port)
            return
        if ack.is_commit:
            waiter.commit = ack
            if waiter.wait_application and ack.code == "CA":
                return
        conn.waiters.pop(ack.control_id, None)
        waiter.final.set_result((frame, ack))

    # --- exchange -----------------------------------------------------------------------------------------------

    async def send(
        self,
        message: bytes,
        *,
        timeout: float | None = None,
        retries: int | None = None,
        wait_application: bool = True,
    ) -> Reply:
        """Send ``message`` and return its correlated response (see the module docstring for the failure modes)."""
        control_id = read_msh(message).control_id
        if not control_id:
            raise ValueError("MSH-10 (message control id) is empty: the response could not be correlated")
        frame = encode_frame(message)
        timeout = self.timeout if timeout is None else timeout
        attempts_allowed = 1 + (self.retries if retries is None else retries)
        written = 0
        last_error: Exception | None = None
        loop = asyncio.get_running_loop()
        for attempt in range(attempts_allowed):
            deadline = loop.time() + timeout
            try:
                conn = await asyncio.wait_for(self._connection(), timeout)
            except (ConnectionLost, TimeoutError) as exc:
                # The next attempt's connect waits out the backoff delay itself.
                last_error = exc
                continue
            if control_id in conn.waiters:
                raise ValueError(f"a message with MSH-10 {control_id!r} is already waiting for its response")
            waiter = _Waiter(wait_application, loop.create_future())
            conn.waiters[control_id] = waiter
            conn.writer.write(frame)
            written += 1
            self.stats.sent += 1
            if attempt:
                self.stats.resent += 1
            try:
                await conn.writer.drain()
                remaining = max(0.0, deadline - loop.time())
                response, ack = await asyncio.wait_for(asyncio.shield(waiter.final), remaining)
                return Reply(response, ack, waiter.commit, written)
            except TimeoutError as exc:
                last_error = exc
                conn.waiters.pop(control_id, None)
            except (ConnectionLost, ConnectionError) as exc:
                last_error = exc
                conn.waiters.pop(control_id, None)
                self._drop(conn, ConnectionLost("connection lost"))
            except asyncio.CancelledError:
                conn.waiters.pop(control_id, None)
                waiter.final.cancel()
                raise
        if written == 0:
            raise ConnectionLost(
                f"message {control_id!r} could not be delivered to {self.host}:{self.port}", delivered=False
            ) from last_error
        raise AckTimeout(control_id, written) from last_error
