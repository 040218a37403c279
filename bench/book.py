"""Benchmark ITI-117 ``$book``: throughput without conflicts, and a conflict storm that must not double-book.

Everything on 127.0.0.1, bounded in time (about 30 s with the defaults):

1. Creates a fresh SQLite demo database in a temporary directory and starts the adapter as
   ``python -m adapter.cli serve --config <temp toml>`` with ``workers = 2`` (two uvicorn processes
   sharing the legacy file and the holds file) and ``log_level = "warning"``.
2. Non-conflicting bookings: pages through ``$find`` (all practitioners, the next ``--days`` days,
   ``_count`` 500) and keeps a set of proposed appointments that do not overlap each other. Then
   ``--clients`` (16) concurrent clients, each with its own keep-alive connection and X-Client-Id,
   book those slots one after the other (every client a different slot) for ``--duration`` seconds.
   Reports bookings/s and the latency percentiles of ``$book``; every answer must be 200.
3. Conflict storm: ``--storm-clients`` (64) clients book ``--storm-slots`` (4) fresh slots at the same
   instant (client i books slot i mod 4), ``--storms`` times. Exactly one booking per slot must win;
   every other answer must be 409.
4. Checks the legacy ``APPT`` table itself: for every slot the benchmark touched, the number of
   blocking rows overlapping it (more than one is a double booking), and no two blocking rows of one
   practitioner overlap anywhere among the rows the benchmark wrote.

Prints the figures; exit status 0 when there was no double booking and every answer was the expected
one, 1 otherwise, 2 when it could not measure (the server did not start, no free slots).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adapter.demo.seed import ensure_demo_database  # noqa: E402

HOST = "127.0.0.1"
ZONE = ZoneInfo("America/New_York")  # the demo mapping's zone
BLOCKING = ("S", "A", "D", "N")


class BenchError(Exception):
    """The benchmark could not measure (exit 2)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(workdir: Path, workers: int) -> tuple[subprocess.Popen, str, Path]:
    db = workdir / "clinicware.sqlite"
    ensure_demo_database(db, today=dt.date.today())
    port = free_port()
    config = workdir / "bench.toml"
    config.write_text(
        f"""
[server]
host = "{HOST}"
port = {port}
workers = {workers}
log_level = "warning"

[backend]
mapping = '{REPO / "mappings" / "demo.yaml"}'
database_url = 'sqlite:///{db}'
pool_size = 4

[state]
path = '{workdir / "state.sqlite"}'

[security]
auth = "off"
signing_secret = "bench-book-secret-0123456789abcdef"
""",
        encoding="utf-8",
    )
    log = open(workdir / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "adapter.cli", "serve", "--config", str(config)],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    base = f"http://{HOST}:{port}/fhir"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError("the server exited:\n" + (workdir / "server.log").read_text(errors="replace")[-3000:])
        try:
            if httpx.get(f"{base}/metadata", timeout=2).status_code == 200:
                return proc, base, db
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    stop_server(proc)
    raise BenchError("the server did not answer within 60 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --------------------------------------------------------------------------- slots


def parameters(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": list(entries)}


def practitioner(appt: dict[str, Any]) -> str:
    return next(
        p["actor"]["reference"].split("/", 1)[1]
        for p in appt["participant"]
        if p["actor"].get("reference", "").startswith("Practitioner/")
    )


def span(appt: dict[str, Any]) -> tuple[dt.datetime, dt.datetime]:
    return dt.datetime.fromisoformat(appt["start"]), dt.datetime.fromisoformat(appt["end"])


async def find_slots(
    client: httpx.AsyncClient, base: str, days: int, wanted: int, avoid: list[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """Up to ``wanted`` offered appointments that overlap neither each other nor ``avoid``, with any practitioner:
    they are all for Patient/9, who can be in one place at a time (a patient's calendar is checked too)."""
    today = dt.datetime.now(ZONE).date()
    start = dt.datetime.combine(today + dt.timedelta(days=1), dt.time(), tzinfo=ZONE)
    end = start + dt.timedelta(days=days)
    body = parameters(
        {"name": "start", "valueDateTime": start.isoformat()},
        {"name": "end", "valueDateTime": end.isoformat()},
        {"name": "patient-reference", "valueReference": {"reference": "Patient/9"}},
        {"name": "_count", "valueInteger": 500},
    )
    taken: dict[str, list[tuple[dt.datetime, dt.datetime]]] = {}
    for a in avoid:
        taken.setdefault("Patient/9", []).append(span(a))
    chosen: list[dict[str, Any]] = []
    offset = 0
    while len(chosen) < wanted:
        resp = await client.post(f"{base}/Appointment/$find?_offset={offset}", json=body)
        if resp.status_code != 200:
            raise BenchError(f"$find answered {resp.status_code}: {resp.text[:500]}")
        bundle = resp.json()
        page = [e["resource"] for e in bundle.get("entry", []) if e["resource"]["resourceType"] == "Appointment"]
        if not page:
            break
        for appt in page:
            s, e = span(appt)
            mine = taken.setdefault("Patient/9", [])
            if all(e <= s2 or e2 <= s for s2, e2 in mine):
                mine.append((s, e))
                chosen.append(appt)
                if len(chosen) == wanted:
                    break
        offset += len(page)
        if offset >= bundle["total"]:
            break
    return chosen


class RawClient:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams (TCP_NODELAY).

    httpx costs several ms of CPU per request on this 2-core machine, which the client and the two
    server workers share; this client costs a fraction of that, so the figures measure the server.
    """

    def __init__(self, base: str, client_id: str) -> None:
        url = httpx.URL(base)
        self.host, self.port, self.prefix = url.host, url.port, url.path.rstrip("/")
        self.client_id = client_id
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> RawClient:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        assert self.reader is not None and self.writer is not None
        head = (
            f"POST {self.prefix}{path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/fhir+json\r\nX-Client-Id: {self.client_id}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        payload = await self.reader.readexactly(length)
        return int(status_line.split()[1]), payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def book_body(token: str) -> dict[str, Any]:
    return parameters({"name": "appointment-reference", "valueReference": {"reference": f"Appointment/{token}"}})


# --------------------------------------------------------------------------- phases


async def throughput(base: str, slots: list[dict[str, Any]], clients: int, duration: float) -> dict[str, Any]:
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for s in slots:
        queue.put_nowait(s)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    booked: list[dict[str, Any]] = []
    stop_at = time.perf_counter() + duration

    async def client_loop(i: int) -> None:
        http = await RawClient(base, f"bench-{i}").connect()
        try:
            while time.perf_counter() < stop_at:
                try:
                    slot = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                t0 = time.perf_counter()
                status, _ = await http.post("/Appointment/$book", json.dumps(book_body(slot["id"])).encode())
                latencies.append(time.perf_counter() - t0)
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    booked.append(slot)
        finally:
            await http.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop(i) for i in range(clients)))
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return {
        "n": len(latencies),
        "elapsed": elapsed,
        "statuses": statuses,
        "booked": booked,
        "rate": len(booked) / elapsed if elapsed else 0.0,
        "p50": statistics.median(latencies) * 1000 if latencies else 0.0,
        "p99": latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else 0.0,
        "exhausted": queue.empty(),
    }


async def storm(base: str, slots: list[dict[str, Any]], clients: int) -> dict[str, Any]:
    conns = [await RawClient(base, f"storm-{i}").connect() for i in range(clients)]
    bodies = [json.dumps(book_body(slots[i % len(slots)]["id"])).encode() for i in range(clients)]
    try:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(c.post("/Appointment/$book", b) for c, b in zip(conns, bodies, strict=False)))
        elapsed = time.perf_counter() - t0
    finally:
        for c in conns:
            await c.close()
    wins = [0] * len(slots)
    statuses: dict[int, int] = {}
    for i, (status, _) in enumerate(results):
        statuses[status] = statuses.get(status, 0) + 1
        if status == 200:
            wins[i % len(slots)] += 1
    return {"elapsed": elapsed, "statuses": statuses, "wins": wins}


# --------------------------------------------------------------------------- the legacy table


def blocking_overlapping(db: Path, appt: dict[str, Any]) -> int:
    s, e = (t.astimezone(ZONE) for t in span(appt))
    day = s.year * 10000 + s.month * 100 + s.day
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            f"SELECT APPT_TM, DUR_MIN FROM APPT WHERE TRIM(PROV_ID) = ? AND APPT_DT = ? AND STATUS_CD IN {BLOCKING}",
            (practitioner(appt), day),
        ).fetchall()
    finally:
        conn.close()
    n = 0
    for hhmm, minutes in rows:
        start = dt.datetime.combine(s.date(), dt.time(hhmm // 100, hhmm % 100), tzinfo=ZONE)
        if start < e and s < start + dt.timedelta(minutes=minutes):
            n += 1
    return n


def overlapping_pairs(db: Path) -> int:
    """Pairs of overlapping blocking rows of one practitioner where at least one was booked here."""
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            f"SELECT TRIM(PROV_ID), APPT_DT, APPT_TM, DUR_MIN, BOOKED_BY FROM APPT WHERE STATUS_CD IN {BLOCKING}"
        ).fetchall()
    finally:
        conn.close()
    by_prac: dict[str, list[tuple[dt.datetime, dt.datetime, bool]]] = {}
    for prac, day, hhmm, minutes, by in rows:
        d = dt.date(day // 10000, day // 100 % 100, day % 100)
        s = dt.datetime.combine(d, dt.time(hhmm // 100, hhmm % 100))
        by_prac.setdefault(prac, []).append(
            (s, s + dt.timedelta(minutes=minutes), (by or "").startswith(("bench", "storm")))
        )
    pairs = 0
    for items in by_prac.values():
        items.sort()
        for i, (_s, e, ours) in enumerate(items):
            for s2, _e2, ours2 in items[i + 1 :]:
                if s2 >= e:
                    break
                pairs += ours or ours2
    return pairs


# --------------------------------------------------------------------------- main


async def run(args: argparse.Namespace, base: str, db: Path) -> int:
    async with httpx.AsyncClient(timeout=60) as http:
        # The storms' few slots first: the bookings are all for one patient, who can be in one place at a time,
        # and the non-conflicting phase would otherwise take every time of the window that is left.
        storm_slots = await find_slots(http, base, args.days, args.storms * args.storm_slots)
        slots = await find_slots(http, base, args.days, args.max_bookings, avoid=storm_slots)
    if len(slots) < args.clients or len(storm_slots) < args.storms * args.storm_slots:
        raise BenchError(f"not enough free slots ({len(slots)} + {len(storm_slots)})")

    tp = await throughput(base, slots, args.clients, args.duration)
    print(f"non-conflicting $book, {args.clients} clients, {args.workers} workers, SQLite demo:")
    print(
        f"  {len(tp['booked'])} bookings in {tp['elapsed']:.2f} s = {tp['rate']:.0f} bookings/s"
        f"   p50 {tp['p50']:.1f} ms  p99 {tp['p99']:.1f} ms   statuses {tp['statuses']}"
        + ("   (ran out of prepared slots)" if tp["exhausted"] else "")
    )

    storms = []
    for k in range(args.storms):
        group = storm_slots[k * args.storm_slots : (k + 1) * args.storm_slots]
        storms.append((group, await storm(base, group, args.storm_clients)))
    wins = [w for _, s in storms for w in s["wins"]]
    statuses: dict[int, int] = {}
    for _, s in storms:
        for code, n in s["statuses"].items():
            statuses[code] = statuses.get(code, 0) + n
    elapsed = [s["elapsed"] for _, s in storms]
    print(f"conflict storm, {args.storm_clients} clients on {args.storm_slots} slots, {args.storms} rounds:")
    print(
        f"  statuses {statuses}   winners per slot {sorted(set(wins))}   "
        f"storm time median {statistics.median(elapsed) * 1000:.0f} ms, max {max(elapsed) * 1000:.0f} ms"
    )

    double = 0
    for group, _ in storms:
        for slot in group:
            double += max(0, blocking_overlapping(db, slot) - 1)
    for slot in tp["booked"]:
        double += max(0, blocking_overlapping(db, slot) - 1)
    pairs = overlapping_pairs(db)
    print(f"legacy APPT table: double bookings {double}; overlapping blocking pairs involving bench rows {pairs}")

    ok = (
        double == 0
        and pairs == 0
        and set(tp["statuses"]) == {200}
        and all(w == 1 for w in wins)
        and statuses.get(409, 0) == args.storms * (args.storm_clients - args.storm_slots)
    )
    print("RESULT:", "OK" if ok else "FAILED")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients, non-conflicting phase (16)")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds of non-conflicting booking (8)")
    ap.add_argument("--max-bookings", type=int, default=4000, help="slots prepared for that phase (4000)")
    ap.add_argument("--days", type=int, default=60, help="days searched for free slots (60)")
    ap.add_argument("--storm-clients", type=int, default=64, help="clients per conflict storm (64)")
    ap.add_argument("--storm-slots", type=int, default=4, help="slots per conflict storm (4)")
    ap.add_argument("--storms", type=int, default=10, help="conflict storms (10)")
    ap.add_argument("--workers", type=int, default=2, help="uvicorn worker processes (2)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-book-") as tmp:
        try:
            proc, base, db = start_server(Path(tmp), args.workers)
        except BenchError as exc:
            print(f"bench/book.py: {exc}", file=sys.stderr)
            return 2
        try:
            return asyncio.run(run(args, base, db))
        except BenchError as exc:
            print(f"bench/book.py: {exc}", file=sys.stderr)
            return 2
        finally:
            stop_server(proc)


if __name__ == "__main__":
    sys.exit(main())
