"""Benchmark ITI-118 search: one patient's appointments from a date, on 1,000,000 appointments vs the demo.

    .venv/bin/python bench/search.py [--rows 1000000] [--requests 200] [--warmup 20]

What it does, everything on 127.0.0.1 and bounded in time:

1. Databases: the demo SQLite database (~8k appointments, seeded for today) in a temporary folder, and a
   big one: the demo plus ``adapter.demo.seed.add_bulk_appointments`` up to ``--rows`` appointments,
   cached as ``var/bench/search-<rows>.sqlite`` (+ a ``.json`` note of the day it was seeded for) so
   reruns start at once. Building 1M rows takes about a minute the first time.
2. For each database, starts the adapter in a subprocess (this script with ``--serve``: uvicorn, one
   worker, log level warning, ``build_app`` with auth off) on a free loopback port.
3. Sends ``GET /fhir/Appointment?patient=<id>&date=ge<seed day>`` for ``--requests`` patients picked at
   random (fixed seed) after ``--warmup`` requests, one at a time on one keep-alive connection with
   TCP_NODELAY, and checks each answer (200, a searchset with 50 Appointments), once with
   ``_total=accurate`` (a total required) and once with the default ``_total`` (estimate: exact up to
   200 matches, else omitted). Then the same number of "next page" requests (the ``next`` link).
4. Prints p50/p99/max latency per database and query, the matches per patient, and whether the target
   (first page p50 <= 5 ms on the big database, default ``_total``) is met. Exit status 0 once measured (a missed target is reported,
   not an error), 2 when it could not measure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import http.client
import json
import os
import random
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode, urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HOST = "127.0.0.1"
MAPPING = REPO / "mappings" / "demo.yaml"
CACHE = REPO / "var" / "bench"
TARGET_P50_MS = 5.0  # issue 14: first page, default _total behaviour, 1,000,000 appointments
SECRET = "bench-search-secret-0123456789"


# --- the server subprocess ------------------------------------------------------------------------


def serve(database_url: str, port: int, state: str) -> None:
    import uvicorn

    from adapter.server import build_app
    from adapter.settings import BackendSettings, SecuritySettings, ServerSettings, Settings, StateSettings

    settings = Settings(
        server=ServerSettings(host=HOST, port=port, log_level="warning"),
        backend=BackendSettings(mapping=MAPPING, database_url=database_url),
        state=StateSettings(path=Path(state)),
        security=SecuritySettings(auth="off", signing_secret=SECRET),
    )
    uvicorn.run(build_app(settings), host=HOST, port=port, log_level="warning", access_log=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(db: Path, workdir: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", f"sqlite:///{db}", str(port), str(workdir / f"state-{port}.sqlite")],
        cwd=REPO,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the adapter exited with status {proc.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the adapter did not start listening within 60 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- databases --------------------------------------------------------------------------------------


def count_rows(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT COUNT(*) FROM APPT").fetchone()[0]
    finally:
        conn.close()


def demo_db(folder: Path, today: dt.date) -> Path:
    from adapter.demo.seed import ensure_demo_database

    path = folder / "demo.sqlite"
    ensure_demo_database(path, today=today)
    return path


def big_db(rows: int, today: dt.date) -> tuple[Path, dt.date]:
    """The cached big database and the day it was seeded for (built when missing, incomplete, or made from
    another version of the demo schema: its indexes are what the search runs on)."""
    from adapter.demo.seed import SCHEMA, add_bulk_appointments, ensure_demo_database

    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"search-{rows}.sqlite"
    note = path.with_suffix(".json")
    schema = hashlib.sha256(SCHEMA.read_bytes()).hexdigest()[:16]
    if path.exists() and note.exists():
        meta = json.loads(note.read_text())
        if meta.get("rows") == rows and meta.get("schema") == schema and count_rows(path) == rows:
            return path, dt.date.fromisoformat(meta["today"])
    print(f"building {path.relative_to(REPO)} ({rows:,} appointments; cached for the next runs) ...", flush=True)
    started = time.monotonic()
    tmp = path.with_name(path.name + ".building")
    for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm"), path, note):
        leftover.unlink(missing_ok=True)
    ensure_demo_database(tmp, today=today)
    conn = sqlite3.connect(tmp)
    try:
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        missing = rows - conn.execute("SELECT COUNT(*) FROM APPT").fetchone()[0]
        add_bulk_appointments(conn, count=max(0, missing), today=today)
        conn.execute("ANALYZE")
        conn.commit()
    finally:
        conn.close()
    os.replace(tmp, path)
    note.write_text(json.dumps({"rows": rows, "today": today.isoformat(), "schema": schema}))
    print(f"built in {time.monotonic() - started:.0f} s", flush=True)
    return path, today


# --- measuring ----------------------------------------------------------------------------------------


def patients(db: Path) -> list[int]:
    conn = sqlite3.connect(db)
    try:
        return [r[0] for r in conn.execute("SELECT PAT_ID FROM PATIENT ORDER BY PAT_ID")]
    finally:
        conn.close()


class Client:
    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection(HOST, port, timeout=30)
        self.conn.connect()
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get(self, path: str) -> tuple[float, dict]:
        t0 = time.perf_counter()
        self.conn.request("GET", path, headers={"Accept": "application/fhir+json"})
        resp = self.conn.getresponse()
        body = resp.read()
        elapsed = (time.perf_counter() - t0) * 1000
        if resp.status != 200:
            raise RuntimeError(f"GET {path} -> {resp.status}: {body[:300]!r}")
        return elapsed, json.loads(body)

    def close(self) -> None:
        self.conn.close()


def check(bundle: dict, path: str, *, full: bool = True) -> None:
    n = sum(1 for e in bundle.get("entry", []) if e["resource"]["resourceType"] == "Appointment")
    if (
        bundle.get("type") != "searchset"
        or not (n == 50 if full else 0 < n <= 50)
        or not isinstance(bundle.get("total", 0), int)
        or ("_total=accurate" in path and "total" not in bundle)
    ):
        raise RuntimeError(
            f"GET {path}: expected a searchset with 50 Appointments, got {n} (total {bundle.get('total')})"
        )


def measure(port: int, pats: list[int], since: dt.date, requests: int, warmup: int) -> dict:
    """First pages with the default ``_total`` (estimate), the same with ``_total=accurate``, then next pages."""
    rng = random.Random(118)
    client = Client(port)
    try:

        def path_for(pid: int, **extra: str) -> str:
            return "/fhir/Appointment?" + urlencode({"patient": pid, "date": f"ge{since.isoformat()}", **extra})

        for pid in rng.choices(pats, k=warmup):
            client.get(path_for(pid))
        first, accurate, nxt, totals, next_paths = [], [], [], [], []
        chosen = rng.choices(pats, k=requests)
        for pid in chosen:
            path = path_for(pid, _total="accurate")
            ms, bundle = client.get(path)
            check(bundle, path)
            accurate.append(ms)
            totals.append(bundle["total"])
        omitted = 0
        for pid in chosen:
            path = path_for(pid)
            ms, bundle = client.get(path)
            check(bundle, path)
            first.append(ms)
            omitted += "total" not in bundle
            link = next((lk["url"] for lk in bundle.get("link", []) if lk["relation"] == "next"), None)
            if link:
                parts = urlsplit(link)
                next_paths.append(parts.path + "?" + parts.query)
        for path in next_paths:
            ms, bundle = client.get(path)
            check(bundle, path, full=False)
            nxt.append(ms)
        return {"first": first, "accurate": accurate, "next": nxt, "totals": totals, "omitted": omitted}
    finally:
        client.close()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="appointments in the big database")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--serve", nargs=3, metavar=("DATABASE_URL", "PORT", "STATE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), args.serve[2])
        return 0

    today = dt.date.today()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        work = Path(tmp)
        try:
            big, big_today = big_db(args.rows, today)
            targets = [("demo", demo_db(work, today), today), (f"{args.rows // 1000}k", big, big_today)]
            for label, db, seeded in targets:
                rows = count_rows(db)
                # From 30 days before the seed day: the demo's past appointments count too, so every
                # patient has more than one page; on the big database ~1/3 of one patient's ~5,000 rows.
                since = seeded - dt.timedelta(days=30)
                proc, port = start_server(db, work)
                try:
                    pats = patients(db)
                    if label == "demo":  # only patients with at least two pages in the demo
                        conn = sqlite3.connect(db)
                        busy = {
                            r[0]
                            for r in conn.execute(
                                "SELECT PAT_ID FROM APPT WHERE APPT_DT >= ? GROUP BY PAT_ID HAVING COUNT(*) > 50",
                                (int(since.strftime("%Y%m%d")),),
                            )
                        }
                        conn.close()
                        pats = [p for p in pats if p in busy] or pats
                    r = measure(port, pats, since, args.requests, args.warmup)
                finally:
                    stop_server(proc)
                results.append((label, rows, since, r))
        except RuntimeError as exc:
            print(f"could not measure: {exc}", file=sys.stderr)
            return 2

    from _machine import python_speed_ms

    print()
    print(f"machine speed: sum(range(10**7)) {python_speed_ms():.0f} ms (see bench/_machine.py)")
    print(
        f"ITI-118 GET /fhir/Appointment?patient=<id>&date=ge<day>  ({args.requests} requests after "
        f"{args.warmup} warm-up, sequential, one keep-alive connection, _count 50; 'first page' with the default _total, 'accurate' with _total=accurate)"
    )
    print(
        f"{'database':>10} {'appointments':>13} {'query':>11} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'matches/patient (median)':>25}"
    )
    for label, rows, _since, r in results:
        for name in ("first", "accurate", "next"):
            v = r[name]
            if not v:
                continue
            query = {"first": "first page", "accurate": "accurate", "next": "next page"}[name]
            print(
                f"{label:>10} {rows:>13,} {query:>11} {statistics.median(v):8.2f} {pct(v, 0.99):8.2f} "
                f"{max(v):8.2f} {statistics.median(r['totals']):25.0f}"
            )
    for label, _rows, _since, r in results:
        print(f"{label}: total omitted by the default _total on {r['omitted']} of {len(r['first'])} first pages")
    big_p50 = statistics.median(results[-1][3]["first"])
    verdict = "met" if big_p50 <= TARGET_P50_MS else "MISSED"
    print(f"target p50 <= {TARGET_P50_MS:.0f} ms on {results[-1][1]:,} appointments: {verdict} ({big_p50:.2f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
