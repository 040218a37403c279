"""The inbound SIU feed as one start/stop unit: durable inbox + MLLP listener + applier, over one ``SiuStore``.

The store is a SQLite file (one host) or shared by replicas (``adapter.hl7v2.store.open_siu_store``): each
replica then runs its own listener and applier over it, and ``SiuFeed.mirror()`` reads what any of them applied.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from pathlib import Path

from adapter.hl7v2.inbox import SiuInbox, SiuListener
from adapter.hl7v2.mapping import Hl7v2Mapping
from adapter.hl7v2.mirror import InboxApplier
from adapter.hl7v2.store import SiuStore
from adapter.hl7v2.store_sqlite import SqliteSiuStore
from adapter.mllp import MLLPServer
from adapter.mllp.framing import DEFAULT_MAX_MESSAGE_SIZE


class SiuFeed:
    def __init__(
        self,
        store: SiuStore | str | Path,
        mapping: Hl7v2Mapping,
        *,
        host: str = "127.0.0.1",
        port: int = 2575,
        ssl: ssl_module.SSLContext | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        poll_seconds: float = 1.0,
        retention_days: float = 0,
    ) -> None:
        # A path: a SQLite file of the feed's own (opened, shared by inbox and applier, closed at stop).
        self._owned = isinstance(store, str | Path)
        self.store: SiuStore = SqliteSiuStore(store) if isinstance(store, str | Path) else store
        self.inbox = SiuInbox(self.store)
        self.applier = InboxApplier(self.store, mapping, retention_days=retention_days)
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
        if self._owned:
            await asyncio.to_thread(self.store.close)

    def mirror(self) -> SiuStore:
        """The store, for the mirror's reads (synchronous: use it from a worker thread)."""
        return self.store
