"""The durable SIU inbox: store first, acknowledge second, parse and apply later.

``SiuListener.handle`` is the ``MLLPServer`` handler. For each inbound message it reads only MSH (sender, MSH-10,
type, ack mode: microseconds), stores the raw message in the ``SiuStore`` (committed before it returns,
de-duplicated on (sender, MSH-10) across every replica sharing the store) and only then returns the ACK. If the
store fails, the handler raises, the listener closes the connection without an ACK and the sender resends: no
message is acknowledged that is not stored. A duplicate (same sender and MSH-10) is acknowledged again and not
stored twice.

Parsing and applying to the mirror happens after the ACK (``adapter.hl7v2.mirror.InboxApplier``).
All store calls run on one dedicated thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from adapter.hl7v2.store import APPLIED, FAILED, WAITING, SiuStore, SiuStoreUnavailable
from adapter.hl7v2.store_sqlite import INBOX_SCHEMA as SCHEMA, SqliteSiuStore, connect
from adapter.mllp.ack import build_ack, read_msh
from adapter.mllp.server import Peer

__all__ = ["APPLIED", "FAILED", "SCHEMA", "WAITING", "SiuInbox", "SiuListener", "connect"]

T = TypeVar("T")
log = logging.getLogger("adapter.hl7v2.inbox")


class SiuInbox:
    """Durable store of raw inbound messages, de-duplicated by (sender, MSH-10).

    ``store`` is the feed's ``SiuStore``, or the path of a SQLite file (then the inbox opens, owns and closes
    its own ``SqliteSiuStore``)."""

    def __init__(self, store: SiuStore | str | Path) -> None:
        self._owned = isinstance(store, str | Path)
        if isinstance(store, str | Path):
            self.path: Path | None = Path(store)
            self.siu_store: SiuStore = SqliteSiuStore(store)
        else:
            self.path = getattr(store, "path", None)
            self.siu_store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hl7-inbox")
        self.stored = 0
        self.duplicates = 0

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def open(self) -> None:
        """Connect (and create the tables) now rather than on the first message. A shared store that cannot be
        reached yet is not fatal: until it is back, messages are not acknowledged and the sender resends them."""
        try:
            await self._run(lambda: self.siu_store.count_messages(WAITING))
        except SiuStoreUnavailable as exc:
            log.warning("SIU inbox: the store is not available yet (%s); no ACK until it is", exc)

    def store_sync(self, sender: str, control_id: str, message_type: str, raw: bytes) -> bool:
        """Store and commit; True if new, False for a duplicate (sender, MSH-10)."""
        return self.siu_store.store_message(sender, control_id, message_type, raw)

    async def store(self, sender: str, control_id: str, message_type: str, raw: bytes) -> bool:
        new = await self._run(lambda: self.store_sync(sender, control_id, message_type, raw))
        if new:
            self.stored += 1
        else:
            self.duplicates += 1
        return new

    def count_sync(self, state: int | None = None) -> int:
        return self.siu_store.count_messages(state)

    async def count(self, state: int | None = None) -> int:
        return await self._run(lambda: self.count_sync(state))

    async def close(self) -> None:
        if self._owned:
            await self._run(self.siu_store.close)
        self._executor.shutdown(wait=True)


class SiuListener:
    """The MLLP handler of the adapter's SIU listener.

    Original mode: ACK with MSA-1 AA once stored (AA again for a duplicate). Enhanced mode (MSH-15 set): a commit
    ACK (CA) once stored; the application acknowledgement is not sent because processing happens later, from the
    inbox (interface agreements should set MSH-16 to NE). Messages other than SIU are refused with AR and not stored.
    ``on_stored`` is called after each new message (e.g. to wake the applier).
    """

    def __init__(
        self,
        inbox: SiuInbox,
        *,
        accepted_types: frozenset[str] = frozenset({"SIU"}),
        on_stored: Callable[[], None] | None = None,
        ack_application: str = "",
        ack_facility: str = "",
    ) -> None:
        self.inbox = inbox
        self.accepted_types = accepted_types
        self.on_stored = on_stored
        self._app = ack_application
        self._fac = ack_facility
        self._ack_seq = 0

    def _ack_id(self) -> str:
        self._ack_seq += 1
        return f"A{datetime.now(UTC).strftime('%Y%m%d%H%M%S')}{self._ack_seq}"

    async def handle(self, message: bytes, peer: Peer) -> bytes:
        try:
            msh = read_msh(message)
        except ValueError:
            # Nothing to correlate an ACK with; the frame is dropped and the sender times out.
            raise ValueError("inbound frame without MSH") from None
        commit = msh.enhanced_mode
        if msh.message_type not in self.accepted_types or not msh.control_id:
            code = "CR" if commit else "AR"
            reason = f"message type {msh.message_type!r} not accepted" if msh.control_id else "MSH-10 is empty"
            return build_ack(msh, code, control_id=self._ack_id(), text=reason, error="200")
        new = await self.inbox.store(msh.sender, msh.control_id, msh.message_type, message)
        if new and self.on_stored is not None:
            self.on_stored()
        return build_ack(msh, "CA" if commit else "AA", control_id=self._ack_id())
