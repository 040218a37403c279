"""Retention of the SIU inbox: the applier purges applied messages older than ``hl7v2.inbox_retention_days``,
in batches, once at start and then periodically, on a worker thread; a failing purge is logged, never fatal.
(What ``purge_applied`` deletes, on every store, is in ``test_siu_store_contract.py``.)"""

from __future__ import annotations

import asyncio
import logging
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hl7v2util import demo_mapping, run, siu

from adapter.backends.hl7v2.backend import Hl7v2Backend
from adapter.hl7v2.mirror import InboxApplier
from adapter.hl7v2.store import APPLIED, WAITING, SiuStoreUnavailable
from adapter.hl7v2.store_sqlite import SqliteSiuStore
from adapter.settings import Hl7v2Settings


class CountingStore(SqliteSiuStore):
    """A SQLite store that records each purge call (its thread and arguments) and can fail the first ones."""

    def __init__(self, path: Path, *, failures: int = 0) -> None:
        super().__init__(path)
        self.calls: list[tuple[datetime, int]] = []
        self.threads: list[threading.Thread] = []
        self.failures = failures

    def purge_applied(self, before: datetime, limit: int) -> int:
        self.calls.append((before, limit))
        self.threads.append(threading.current_thread())
        if self.failures:
            self.failures -= 1
            raise SiuStoreUnavailable("the SIU store is down for now")
        return super().purge_applied(before, limit)


def stored_and_applied(store: SqliteSiuStore, count: int) -> None:
    for n in range(count):
        store.store_message("LEGACY|FAC", f"C{n}", "SIU", siu(f"C{n}", "S12", filler=f"F{n}"))
    InboxApplier(store, demo_mapping()).drain()
    assert store.count_messages(APPLIED) == count


def test_retention_applier_purges_in_batches_until_one_comes_back_short(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "inbox.sqlite")
    stored_and_applied(store, 5)
    applier = InboxApplier(store, demo_mapping(), retention_days=30, purge_limit=2)
    now = datetime.now(UTC)
    assert applier.purge(now) == 0  # nothing is 30 days old
    assert store.calls == [(now - timedelta(days=30), 2)]
    assert applier.purge(now + timedelta(days=31)) == 5
    assert [limit for _, limit in store.calls[1:]] == [2, 2, 2]  # 2, 2, then 1 < 2: done
    assert (store.count_messages(), store.count()) == (0, 5)  # the mirror is kept
    store.close()


def test_retention_zero_keeps_every_message(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "inbox.sqlite")
    stored_and_applied(store, 2)
    applier = InboxApplier(store, demo_mapping(), retention_days=0)
    assert applier.retention is None and applier.purge(datetime.now(UTC) + timedelta(days=3650)) == 0
    assert store.calls == [] and store.count_messages() == 2

    async def main() -> None:
        applier.start(0.05)
        await asyncio.sleep(0.2)
        await applier.stop()

    run(main())
    assert store.calls == []
    store.close()


def test_retention_purge_runs_at_start_on_a_worker_thread_and_a_failure_is_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CountingStore(tmp_path / "inbox.sqlite", failures=1)
    stored_and_applied(store, 3)
    # 0.01 days = 14.4 minutes: the messages become old only for a clock 15 minutes ahead.
    ahead = datetime.now(UTC) + timedelta(minutes=15)
    applier = InboxApplier(store, demo_mapping(), retention_days=0.01, purge_every_seconds=0.05, clock=lambda: ahead)

    async def main() -> None:
        loop_thread = threading.current_thread()
        with caplog.at_level(logging.INFO, logger="adapter.hl7v2.mirror"):
            applier.start(0.05)
            for _ in range(200):
                if store.count_messages() == 0:
                    break
                await asyncio.sleep(0.02)
            await applier.stop()
        assert store.threads and all(t is not loop_thread for t in store.threads)

    run(main())
    assert store.count_messages() == 0 and store.count() == 3
    assert "purging applied messages failed" in caplog.text  # the first attempt, logged ...
    assert "purged 3 applied message(s)" in caplog.text  # ... and the next one did it
    store.close()


def test_retention_stop_ends_a_long_purge_after_its_current_batch(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "inbox.sqlite")
    stored_and_applied(store, 4)
    applier = InboxApplier(store, demo_mapping(), retention_days=1, purge_limit=1)
    applier._stopping.set()  # as ``stop`` leaves it
    assert applier.purge(datetime.now(UTC) + timedelta(days=2)) == 0
    assert store.count_messages(APPLIED) == 4 and store.count_messages(WAITING) == 0
    store.close()


def test_retention_setting_reaches_the_applier(tmp_path: Path) -> None:
    assert Hl7v2Settings().inbox_retention_days == 30
    store = SqliteSiuStore(tmp_path / "inbox.sqlite")
    options: dict[str, Any] = {"peer_host": "127.0.0.1", "peer_port": 1, "store": store}
    assert Hl7v2Backend(demo_mapping(), **options).feed.applier.retention == timedelta(days=30)
    backend = Hl7v2Backend(demo_mapping(), **options, inbox_retention_days=7.5)
    assert backend.feed.applier.retention == timedelta(days=7.5)
    assert Hl7v2Backend(demo_mapping(), **options, inbox_retention_days=0).feed.applier.retention is None
    store.close()
