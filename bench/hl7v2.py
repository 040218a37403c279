"""Benchmark the HL7v2 SIU path: ACKs per second (durable store + de-duplication included) and SIU applied to the
mirror per second, next to a raw MLLP echo measured in the same run, plus the per-message cost of three parsers.

All in one asyncio process on 127.0.0.1 (client and listener share the loop, as an adapter worker would share it
with its HTTP traffic), one connection, each message waiting for its ACK:

1. parsers: the tolerant split-based reader (``parse_siu``), python-hl7 ``hl7.parse``, hl7apy TOLERANT, on the
   27-segment v2.8 sample ``tests/data/hl7v2/SIU-S12-02.hl7``.
2. echo:    ``MLLPServer`` returning each frame unchanged (the transport floor).
3. ack:     ``SiuListener`` (read MSH, ``INSERT OR IGNORE`` + commit with ``synchronous=FULL`` in WAL, ACK); the
            applier is not running.
4. floor:   bare SQLite ``INSERT OR IGNORE`` + commit of the same bytes with the same settings, no network: the
            fsync-bound ceiling of any store-before-ACK design on this disk at this moment.
5. apply:   ``InboxApplier.drain`` over ``--apply-messages`` stored messages (parse + versioned upsert, batches).
6. sustained: the same ACK load with the ``InboxApplier`` running concurrently for ``--seconds``; reports ACK/s,
            applied/s and the backlog left (a growing backlog means the applier does not keep up).

7. book:    ``$book`` round trips through MLLP: the HL7v2 backend's ``book`` (SRM^S01 built and validated with
            hl7apy, sent to the legacy scheduler simulator, SRR parsed, mirror written), one at a time, for
            ``--book-seconds``; the echo rate above is the transport floor for the same loop.

Every message gets a unique MSH-10 and filler id (SCH-2). Targets (one worker): >= 2,000 SIU/s acknowledged,
>= 1,200 SIU/s applied sustained. Exit 0 once measured.

``--state-url`` runs phases 3-6 on a shared ``SiuStore`` instead of a SQLite file: ``redis://...`` under a key
prefix of its own (deleted after the run; the floor of phase 4 is then ``store_message`` in a loop, without MLLP),
``postgresql://.../db`` in a scratch database made (and dropped) on that server (phases 3, 5, 6).

Usage: ``.venv/bin/python bench/hl7v2.py [--seconds 30] [--phase-seconds 5] [--book-seconds 5] [--only echo,book]
[--state-url redis://127.0.0.1:6379/0 | postgresql://postgres@127.0.0.1:5432/postgres]``
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapter.hl7v2.inbound import parse_siu  # noqa: E402
from adapter.hl7v2.inbox import SiuInbox, SiuListener  # noqa: E402
from adapter.hl7v2.mapping import load_hl7v2_mapping  # noqa: E402
from adapter.hl7v2.mirror import InboxApplier  # noqa: E402
from adapter.hl7v2.store import SiuStore, open_siu_store  # noqa: E402
from adapter.mllp import FrameDecoder, MLLPServer, Peer, encode_frame  # noqa: E402

SAMPLE = ROOT / "tests" / "data" / "hl7v2" / "SIU-S12-02.hl7"
MAPPING = ROOT / "mappings" / "hl7v2-demo.yaml"


def messages() -> Callable[[], bytes]:
    template = SAMPLE.read_bytes()
    counter = iter(range(1, 1 << 62))

    def nxt() -> bytes:
        n = next(counter)
        return template.replace(b"|MSG00012|", b"|B%012d|" % n, 1).replace(
            b"SCH|12345|36996|", b"SCH|P%d|F%d|" % (n, n), 1
        )

    return nxt


def parser_costs(raw: bytes) -> dict[str, float]:
    import hl7
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    mapping = load_hl7v2_mapping(MAPPING)
    text = raw.decode().replace("\n", "\r")
    out: dict[str, float] = {}
    for name, fn, n in (
        ("parse_siu (split-based)", lambda: parse_siu(raw, mapping), 2000),
        ("python-hl7 hl7.parse", lambda: hl7.parse(text), 200),
        ("hl7apy TOLERANT", lambda: parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT), 20),
    ):
        fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out[name] = (time.perf_counter() - t0) / n * 1000
    return out


def commit_floor(path: Path, seconds: float, nxt: Callable[[], bytes]) -> float:
    from adapter.hl7v2.inbox import SCHEMA, connect

    conn = connect(path)
    conn.executescript(SCHEMA)
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        raw = nxt()
        conn.execute(
            "INSERT OR IGNORE INTO hl7_inbox (sender, control_id, message_type, received_at, raw) VALUES (?,?,?,?,?)",
            ("S|F", str(n), "SIU", "now", raw),
        )
        n += 1
    rate = n / (time.perf_counter() - t0)
    conn.close()
    return rate


def store_floor(store: SiuStore, seconds: float, nxt: Callable[[], bytes]) -> float:
    """``store_message`` in a loop, no network between sender and adapter: the ceiling of a shared store."""
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        store.store_message("FLOOR|F", str(n), "SIU", nxt())
        n += 1
    return n / (time.perf_counter() - t0)


def prefill(inbox: SiuInbox, count: int, nxt: Callable[[], bytes]) -> None:
    """Store ``count`` messages in one transaction (setup for the apply phase, not measured)."""
    from adapter.hl7v2.inbox import connect

    if inbox.path is None:  # a shared store: one message at a time
        for i in range(count):
            inbox.store_sync("PREFILL|F", str(i), "SIU", nxt())
        return

    conn = connect(inbox.path)
    conn.execute("BEGIN")
    for i in range(count):
        conn.execute(
            "INSERT INTO hl7_inbox (sender, control_id, message_type, received_at, raw) VALUES (?,?,?,?,?)",
            ("PREFILL|F", str(i), "SIU", "now", nxt()),
        )
    conn.execute("COMMIT")
    conn.close()


def bench_url(url: str) -> str:
    """A Redis URL gets a key prefix of its own, so the run neither meets old keys nor leaves any."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return url
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}key_prefix=bench-hl7v2:{secrets.token_hex(4)}:"


def drop_bench_state(store: SiuStore) -> None:
    client, prefix = getattr(store, "r", None), getattr(store, "prefix", "")
    if client is not None and prefix.startswith("bench-hl7v2:"):
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    store.close()


async def load(port: int, seconds: float, next_message: Callable[[], bytes]) -> int:
    """One connection, send a frame, wait for the response frame, repeat; returns the count done."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    decoder = FrameDecoder()
    done = 0
    deadline = time.perf_counter() + seconds
    try:
        while time.perf_counter() < deadline:
            writer.write(encode_frame(next_message()))
            await writer.drain()
            got: list[object] = []
            while not got:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("server closed the connection")
                got = [f for f in decoder.feed(data) if isinstance(f, bytes)]
            done += 1
    finally:
        writer.close()
    return done


async def measure(
    handler: Callable[[bytes, Peer], Awaitable[bytes]], seconds: float, nxt: Callable[[], bytes]
) -> float:
    async with MLLPServer(handler) as server:
        await load(server.port, 0.3, nxt)  # warm-up
        t0 = time.perf_counter()
        n = await load(server.port, seconds, nxt)
        return n / (time.perf_counter() - t0)


async def book_rate(seconds: float, tmp: Path) -> tuple[float, int]:
    """``$book`` round trips per second through the HL7v2 backend and MLLP against the simulator."""
    from datetime import UTC, datetime, time as wall, timedelta

    from adapter.backends.hl7v2.backend import Hl7v2Backend
    from adapter.backends.protocol import Confirmed, Interval, NewBooking, SlotRequest
    from adapter.testing.hl7_simulator import LegacySchedulerSimulator, SessionTemplate

    resources = 50
    every_day = frozenset(range(7))
    templates = [
        SessionTemplate(f"B{i}", f"R{i}", "CHECKUP", every_day, wall(0), wall(23, 55), 5) for i in range(resources)
    ]
    simulator = LegacySchedulerSimulator(templates, zone="UTC")
    await simulator.start()
    backend = Hl7v2Backend(
        load_hl7v2_mapping(MAPPING),
        peer_host="127.0.0.1",
        peer_port=simulator.port,
        store=open_siu_store(f"sqlite:///{tmp / 'book.sqlite'}"),
        listen_port=0,
    )

    async def publish(changes: object) -> None:
        del changes

    await backend.start(publish)
    day = datetime.combine(datetime.now(UTC).date() + timedelta(days=1), wall(0), UTC)
    done = 0

    def no_gate(slots: object) -> None:
        del slots

    async def one(n: int) -> None:
        start = day + timedelta(minutes=5 * (n // resources))
        who = n % resources
        slot = SlotRequest(f"B{who}", f"R{who}", Interval(start, start + timedelta(minutes=5)), "CHECKUP", (f"P{n}",))
        outcome = await backend.book(NewBooking(slot, f"P{n}", placer_id=f"BENCH{n}"), no_gate)
        if not isinstance(outcome, Confirmed):
            raise RuntimeError(f"booking {n} not confirmed: {outcome}")

    try:
        await one(0)  # warm-up (connect, hl7apy's first validation)
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            done += 1
            await one(done)
        rate = done / (time.perf_counter() - t0)
    finally:
        await backend.stop()
        await simulator.stop()
    return rate, done


async def shared_store_phases(args: argparse.Namespace, nxt: Callable[[], bytes]) -> None:
    """Phases 3, 5 and 6 on a ``PostgresSiuStore`` in a scratch database made on the server of ``--state-url``
    (dropped at the end): what acknowledging costs when the inbox is shared by replicas."""
    import secrets

    import psycopg

    base, _, _ = args.state_url.rpartition("/")
    name = f"sched_bench_hl7_{secrets.token_hex(4)}"
    with psycopg.connect(args.state_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        store = open_siu_store(f"{base}/{name}")
        inbox = SiuInbox(store)
        await inbox.open()
        listener = SiuListener(inbox)
        ack_rate = await measure(listener.handle, args.phase_seconds, nxt)
        print(f"SIU acknowledged (PostgreSQL)  {ack_rate:10,.0f} msg/s")
        applier = InboxApplier(store, load_hl7v2_mapping(MAPPING))
        t0 = time.perf_counter()
        applied_n = await asyncio.to_thread(applier.drain)
        print(
            f"SIU applied (PostgreSQL)       {applied_n / (time.perf_counter() - t0):10,.0f} msg/s   ({applied_n} msgs)"
        )
        listener.on_stored = applier.wake
        applier.start(poll_seconds=0.2)
        t0 = time.perf_counter()
        async with MLLPServer(listener.handle) as server:
            acked = await load(server.port, args.seconds, nxt)
        elapsed = time.perf_counter() - t0
        applied = applier.stats.applied - applied_n
        await applier.stop()
        backlog = await inbox.count(0)
        await inbox.close()
        await asyncio.to_thread(store.close)
        print(
            f"sustained {args.seconds:.0f} s (PostgreSQL): acknowledged {acked / elapsed:,.0f} msg/s, "
            f"applied {applied / elapsed:,.0f} msg/s (backlog {backlog} at end)"
        )
    finally:
        with psycopg.connect(args.state_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def main_async(args: argparse.Namespace) -> None:
    nxt = messages()
    only = set(args.only.split(",")) if args.only else set()
    if args.state_url.startswith(("postgresql://", "postgres://")):
        await shared_store_phases(args, nxt)
        return

    async def echo(message: bytes, peer: Peer) -> bytes:
        return message

    if only:
        echo_rate = await measure(echo, args.phase_seconds, nxt)
        print(f"raw MLLP echo                  {echo_rate:10,.0f} msg/s")
        if "book" in only:
            with tempfile.TemporaryDirectory() as tmp:
                rate, n = await book_rate(args.book_seconds, Path(tmp))
            print(f"$book round trips via MLLP     {rate:10,.1f} /s   ({n} bookings, SRM built+validated, SRR, mirror)")
        return
    print("parser cost per 27-segment SIU (ms):")
    for name, ms in parser_costs(SAMPLE.read_bytes()).items():
        print(f"  {name:28s} {ms:8.3f}")

    echo_rate = await measure(echo, args.phase_seconds, nxt)
    print(f"raw MLLP echo                  {echo_rate:10,.0f} msg/s")

    mapping = load_hl7v2_mapping(MAPPING)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "hl7.sqlite"
        shared = open_siu_store(bench_url(args.state_url)) if args.state_url else None
        inbox = SiuInbox(shared or db)
        await inbox.open()
        listener = SiuListener(inbox)
        ack_rate = await measure(listener.handle, args.phase_seconds, nxt)
        print(f"SIU acknowledged (store+dedup) {ack_rate:10,.0f} msg/s   ({ack_rate / echo_rate:.2f} of echo)")

        if shared is None:
            floor = await asyncio.to_thread(commit_floor, Path(tmp) / "floor.sqlite", args.phase_seconds, nxt)
            print(f"durable commit floor (no net)  {floor:10,.0f} commits/s")
        else:
            floor = await asyncio.to_thread(store_floor, shared, args.phase_seconds, nxt)
            print(f"store_message floor (no MLLP)  {floor:10,.0f} msg/s   ({args.state_url.split('://')[0]})")

        applier = InboxApplier(shared or db, mapping)
        await asyncio.to_thread(prefill, inbox, args.apply_messages, nxt)
        t0 = time.perf_counter()
        applied_n = await asyncio.to_thread(applier.drain)
        print(
            f"SIU applied (inbox -> mirror)  {applied_n / (time.perf_counter() - t0):10,.0f} msg/s   ({applied_n} msgs)"
        )
        backlog_start = await inbox.count(0)
        listener.on_stored = applier.wake
        applier.start(poll_seconds=0.2)
        t0 = time.perf_counter()
        applied0 = applier.stats.applied
        async with MLLPServer(listener.handle) as server:
            acked = await load(server.port, args.seconds, nxt)
        elapsed = time.perf_counter() - t0
        applied = applier.stats.applied - applied0
        await applier.stop()
        backlog = await inbox.count(0)
        await inbox.close()
        if shared is not None:
            await asyncio.to_thread(drop_bench_state, shared)
        print(
            f"sustained {args.seconds:.0f} s: acknowledged {acked / elapsed:,.0f} msg/s, "
            f"applied {applied / elapsed:,.0f} msg/s (backlog {backlog_start} at start, {backlog} at end)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        rate, n = await book_rate(args.book_seconds, Path(tmp))
    print(f"$book round trips via MLLP     {rate:10,.1f} /s   ({n} bookings, SRM built+validated, SRR, mirror)")
    print("targets: >= 2,000 SIU/s acknowledged, >= 1,200 SIU/s applied (one worker)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="duration of the sustained ACK+apply phase")
    parser.add_argument("--phase-seconds", type=float, default=5.0, help="duration of the echo and ACK phases")
    parser.add_argument("--apply-messages", type=int, default=20000, help="messages drained in the apply phase")
    parser.add_argument("--book-seconds", type=float, default=5.0, help="duration of the $book round-trip phase")
    parser.add_argument("--only", default="", help="comma list of phases to run alone: echo,book")
    parser.add_argument(
        "--state-url",
        default="",
        help="redis://... (a key prefix of its own) or postgresql://.../db (a scratch database made and dropped on "
        "that server): run the ack, apply and sustained phases on that shared SIU store instead",
    )
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
