"""The inbound SIU feed as one start/stop unit: durable inbox + MLLP listener + applier, over one SQLite file.

``SiuFeed.mirror()`` opens a separate read connection for queries (one per caller thread; SQLite WAL lets readers
run beside the applier).
"""

from __future__ import annotations

import ssl as ssl_module
from pathlib import Path

from adapter.hl7v2.inbox import SiuInbox, SiuListener
from adapter.hl7v2.mapping import Hl7v2Mapping
from adapter.hl7v2.mirror import AppointmentMirror, InboxApplier
from adapter.mllp import MLLPServer
from adapter.mllp.framing import DEFAULT_MAX_MESSAGE_SIZE


class SiuFeed:
    def __init__(
        self,
        path: str | Path,
        mapping: Hl7v2Mapping,
        *,
        host: str = "127.0.0.1",
        port: int = 2575,
        ssl: ssl_module.SSLContext | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        poll_seconds: float = 1.0,
    ) -> None:
        self.path = Path(path)
        self.inbox = SiuInbox(self.path)
        self.applier = InboxApplier(self.path, mapping)
        self.listener = SiuListener(self.inbox, on_stored=self.applier.wake)
        self.server = MLLPServer(self.listener.handle, host=host, port=port, ssl=ssl, max_message_size=max_message_size)
        self._poll = poll_seconds

    @property
    def port(self) -> int:
        return self.server.port

    async def start(self) -> None:
        await self.inbox.open()
        self.applier.start(self._poll)
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()
        await self.applier.stop()
        await self.inbox.close()

    def mirror(self) -> AppointmentMirror:
        """A new read connection to the mirror (synchronous: use it from a worker thread)."""
        return AppointmentMirror(self.path)
