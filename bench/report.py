"""Benchmark report (``make bench-report``): JSON figures and PNG plots under ``docs/bench/``.

One run, everything on 127.0.0.1, each figure beside its floor measured in the same run:

1. ``$hold`` latency by state store: the same server (1 worker, SQLite demo legacy database) with
   ``state.url`` on SQLite, Redis and PostgreSQL; ``--holds`` sequential holds of distinct slots on
   one keep-alive connection (after 20 warm-up holds); p50 / p90. Hard target: Redis p50 at most
   2 ms above SQLite p50.
2. Throughput and latency vs uvicorn workers (1, 2, 4; SQLite state): ``$find`` (5 practitioners,
   14 days, ``_count`` 50), ``$hold`` (distinct slots) and the floor (``GET /healthz`` of the same
   server: HTTP + middleware, no work), ``--clients`` keep-alive clients for ``--duration`` s each.
3. The same vs replicas (1, 2, 3 ``serve`` processes, 1 worker each) sharing one Redis state store
   and one legacy database; clients spread round-robin over the replicas. Reported, not targeted:
   this machine kind has 2 cores, so replicas compete with each other and with the load generator.
4. ``$find`` cost vs window length (7-90 days) and number of practitioners (1, 5, 20), availability
   cache on (``find.cache_seconds`` 2, warm) and off (0): sequential p50.

``--smoke`` runs a seconds-long version of all four (tiny figures, for checking the script).
Needs Redis at ``--redis`` (default redis://127.0.0.1:6379/12, keys under a prefix of this run,
deleted afterwards) and, for the PostgreSQL store, ``--pg`` (admin URL; a database is created and
dropped). Exit status 0 once measured, 2 when it could not measure.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from book import (  # noqa: E402  # the $book benchmark's client and slot finder
    ZONE,
    BenchError,
    RawClient,
    find_slots,
    free_port,
    parameters,
    stop_server,
)

from adapter.demo.seed import ensure_demo_database  # noqa: E402

HOST = "127.0.0.1"
SECRET = "bench-report-secret-0123456789abcdef"
HOLD_TARGET_MS = 2.0


# --------------------------------------------------------------------------- servers
def _config(folder: Path, port: int, workers: int, db: Path, state_url: str, cache_seconds: float) -> Path:
    path = folder / f"bench-{port}.toml"
    path.write_text(
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
url = '{state_url}'

[find]
cache_seconds = {cache_seconds}

[security]
auth = "off"
signing_secret = "{SECRET}"
""",
        encoding="utf-8",
    )
    return path


@contextmanager
def servers(
    folder: Path, db: Path, state_url: str, *, replicas: int = 1, workers: int = 1, cache_seconds: float = 2.0
) -> Iterator[list[str]]:
    """``replicas`` ``sched-adapter serve`` processes on one legacy database and one state store."""
    procs: list[subprocess.Popen[bytes]] = []
    bases: list[str] = []
    try:
        for _ in range(replicas):
            port = free_port()
            config = _config(folder, port, workers, db, state_url, cache_seconds)
            log = open(folder / f"server-{port}.log", "wb")  # closed with the process
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "adapter.cli", "serve", "--config", str(config)],
                    cwd=folder,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env={**os.environ, "PYTHONPATH": str(REPO)},
                )
            )
            bases.append(f"http://{HOST}:{port}/fhir")
        for proc, base in zip(procs, bases, strict=True):
            deadline = time.monotonic() + 90
            last = "no answer yet"
            while True:
                if proc.poll() is not None:
                    raise BenchError(f"a server exited; see {folder}/server-*.log")
                try:
                    ready = httpx.get(base.removesuffix("/fhir") + "/readyz", timeout=5)
                    if ready.status_code == 200:
                        break
                    last = f"/readyz answered {ready.status_code}"
                except httpx.HTTPError as exc:  # still starting: not listening yet
                    last = f"{type(exc).__name__}: {exc}"
                if time.monotonic() > deadline:
                    raise BenchError(f"a server did not become ready within 90 s ({last}); see {folder}/server-*.log")
                time.sleep(0.1)
        yield bases
    finally:
        for proc in procs:
            stop_server(proc)


def fresh_db(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "clinicware.sqlite"
    ensure_demo_database(db, today=dt.date.today())
    return db


class Raw(RawClient):
    async def get(self, path: str) -> tuple[int, bytes]:
        assert self.reader is not None and self.writer is not None
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n\r\n".encode())
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        await self.reader.readexactly(length)
        return int(status_line.split()[1]), b""


# --------------------------------------------------------------------------- requests
def find_body(days: float, practitioners: list[str], count: int = 50) -> bytes:
    today = dt.datetime.now(ZONE).date()
    start = dt.datetime.combine(today + dt.timedelta(days=1), dt.time(), tzinfo=ZONE)
    entries: list[dict[str, Any]] = [
        {"name": "start", "valueDateTime": start.isoformat()},
        {"name": "end", "valueDateTime": (start + dt.timedelta(days=days)).isoformat()},
        {"name": "_count", "valueInteger": count},
    ]
    entries += [{"name": "practitioner", "valueReference": {"reference": f"Practitioner/{p}"}} for p in practitioners]
    return json.dumps(parameters(*entries)).encode()


def hold_body(token: str) -> bytes:
    ref = {"reference": f"Appointment/{token}"}
    return json.dumps(parameters({"name": "appointment-reference", "valueReference": ref})).encode()


def practitioner_ids(base: str, n: int) -> list[str]:
    bundle = httpx.get(f"{base}/Practitioner?_count=100", timeout=30).json()
    ids = [e["resource"]["id"] for e in bundle.get("entry", []) if e["resource"]["resourceType"] == "Practitioner"]
    if len(ids) < n:
        raise BenchError(f"only {len(ids)} practitioners")
    return ids[:n]


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000


async def slots_for(base: str, wanted: int) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=120) as client:
        return await find_slots(client, base, 60, wanted)


async def sequential(base: str, kind: str, bodies: list[bytes], warmup: int) -> list[float]:
    client = await Raw(base, f"seq-{secrets.token_hex(3)}").connect()
    out: list[float] = []
    try:
        for i, body in enumerate(bodies):
            t0 = time.perf_counter()
            status, payload = await client.post(f"/Appointment/${kind}", body)
            took = time.perf_counter() - t0
            if status != 200:
                raise BenchError(f"${kind} answered {status}: {payload[:300]!r}")
            if i >= warmup:
                out.append(took)
    finally:
        await client.close()
    return out


async def load(
    bases: list[str],
    what: str,
    clients: int,
    duration: float,
    body: bytes | None = None,
    slots: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``clients`` keep-alive clients (round-robin over ``bases``) for ``duration`` s: ``find``
    (the same body), ``hold`` (one distinct slot each time, until they run out) or ``floor``."""
    queue = list(reversed(slots or []))
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + duration

    async def run(i: int) -> None:
        nonlocal errors
        client = await Raw(bases[i % len(bases)], f"load-{i}").connect()
        try:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                if what == "floor":
                    status, _ = await client.get("/healthz")
                elif what == "find":
                    assert body is not None
                    status, _ = await client.post("/Appointment/$find", body)
                else:
                    if not queue:
                        return
                    status, _ = await client.post("/Appointment/$hold", hold_body(queue.pop()["id"]))
                latencies.append(time.perf_counter() - t0)
                errors += status not in (200, 409)
        finally:
            await client.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(run(i) for i in range(clients)))
    elapsed = time.perf_counter() - t0
    return {
        "requests": len(latencies),
        "rate": len(latencies) / elapsed if elapsed else 0.0,
        "p50_ms": pct(latencies, 0.5),
        "p99_ms": pct(latencies, 0.99),
        "errors": errors,
    }


# --------------------------------------------------------------------------- state stores
@contextmanager
def state_urls(args: argparse.Namespace, work: Path) -> Iterator[dict[str, str]]:
    urls = {"sqlite": f"sqlite:///{work / 'state.sqlite'}"}
    prefix = f"sched-bench:{os.getpid()}:{secrets.token_hex(3)}:"
    urls["redis"] = f"{args.redis}?key_prefix={prefix}"
    pg_db = None
    if args.pg:
        import psycopg

        pg_db = f"sched_bench_{os.getpid()}"
        with psycopg.connect(args.pg, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {pg_db}")
        urls["postgresql"] = args.pg.rsplit("/", 1)[0] + "/" + pg_db
    try:
        yield urls
    finally:
        import redis

        client = redis.Redis.from_url(args.redis)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
        if pg_db:
            import psycopg

            with psycopg.connect(args.pg, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {pg_db} WITH (FORCE)")


def scoped(url: str, tag: str) -> str:
    """A fresh key space / file for one measurement on a shared store."""
    if url.startswith("redis"):
        return url + tag + ":"
    if url.startswith("sqlite:///"):
        return url.removesuffix(".sqlite") + f"-{tag}.sqlite"
    return url


# --------------------------------------------------------------------------- the four parts
async def part_hold_by_store(args: argparse.Namespace, work: Path, urls: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, url in urls.items():
        db = fresh_db(work / f"hold-{kind}")
        with servers(db.parent, db, scoped(url, f"hold-{kind}")) as [base]:
            slots = await slots_for(base, args.holds + 20)
            if len(slots) < args.holds + 20:
                raise BenchError(f"only {len(slots)} free slots")
            took = await sequential(base, "hold", [hold_body(s["id"]) for s in slots], warmup=20)
        out[kind] = {"n": len(took), "p50_ms": pct(took, 0.5), "p90_ms": pct(took, 0.9)}
        print(f"$hold on {kind:10s} p50 {out[kind]['p50_ms']:.2f} ms  p90 {out[kind]['p90_ms']:.2f} ms", flush=True)
    diff = out["redis"]["p50_ms"] - out["sqlite"]["p50_ms"]
    out["redis_minus_sqlite_p50_ms"] = diff
    out["target_met"] = diff < HOLD_TARGET_MS
    print(f"Redis - SQLite $hold p50: {diff:+.2f} ms (target < {HOLD_TARGET_MS} ms)", flush=True)
    return out


async def _throughput_point(args: argparse.Namespace, bases: list[str]) -> dict[str, Any]:
    pracs = practitioner_ids(bases[0], 5)
    slots = await slots_for(bases[0], args.hold_pool)
    point = {
        "floor": await load(bases, "floor", args.clients, args.duration),
        "find": await load(bases, "find", args.clients, args.duration, body=find_body(14, pracs)),
        "hold": await load(bases, "hold", args.clients, args.duration, slots=slots),
    }
    print("  " + "  ".join(f"{k} {v['rate']:.0f}/s p50 {v['p50_ms']:.1f} ms" for k, v in point.items()), flush=True)
    return point


async def part_workers(args: argparse.Namespace, work: Path, urls: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in args.workers:
        db = fresh_db(work / f"workers-{n}")
        print(f"workers {n}:", flush=True)
        with servers(db.parent, db, scoped(urls["sqlite"], f"w{n}"), workers=n) as bases:
            out[str(n)] = await _throughput_point(args, bases)
    return out


async def part_replicas(args: argparse.Namespace, work: Path, urls: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in args.replicas:
        db = fresh_db(work / f"replicas-{n}")
        print(f"replicas {n} (Redis):", flush=True)
        with servers(db.parent, db, scoped(urls["redis"], f"r{n}"), replicas=n) as bases:
            out[str(n)] = await _throughput_point(args, bases)
    return out


async def part_find_cost(args: argparse.Namespace, work: Path, urls: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    db = fresh_db(work / "find-cost")
    for cache in (2.0, 0.0):
        label = "cache_on" if cache else "cache_off"
        out[label] = {}
        with servers(db.parent, db, scoped(urls["sqlite"], label), cache_seconds=cache) as [base]:
            for n in args.practitioners:
                pracs = practitioner_ids(base, n)
                for days in args.windows:
                    body = find_body(days, pracs)
                    took = await sequential(base, "find", [body] * (args.sequential + 5), warmup=5)
                    out[label][f"{n}x{days}"] = {"practitioners": n, "days": days, "p50_ms": pct(took, 0.5)}
            print(f"$find cost ({label}): " + ", ".join(f"{k} {v['p50_ms']:.1f} ms" for k, v in out[label].items()))
    return out


# --------------------------------------------------------------------------- plots
def plot(report: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[Path] = []

    def save(fig: Any, name: str) -> None:
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)

    hold = report["hold_by_store"]
    kinds = [k for k in ("sqlite", "redis", "postgresql") if k in hold]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar([f"{k}\np50" for k in kinds], [hold[k]["p50_ms"] for k in kinds], color="#4477aa", label="p50")
    ax.bar([f"{k}\np90" for k in kinds], [hold[k]["p90_ms"] for k in kinds], color="#aabbdd", label="p90")
    ax.set_ylabel("ms")
    ax.set_title("$hold latency by state store (1 worker, sequential)")
    save(fig, "hold_by_state_store.png")

    for part, xlabel, name in (
        ("workers", "uvicorn workers", "throughput_vs_workers.png"),
        ("replicas", "replicas sharing Redis", "throughput_vs_replicas.png"),
    ):
        data = report[part]
        xs = sorted(int(k) for k in data)
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
        for what, style in (("floor", "k--"), ("find", "o-"), ("hold", "s-")):
            left.plot(xs, [data[str(x)][what]["rate"] for x in xs], style, label=what)
            right.plot(xs, [data[str(x)][what]["p50_ms"] for x in xs], style, label=what)
        left.set(xlabel=xlabel, ylabel="requests/s", title="throughput", yscale="log", xticks=xs)
        right.set(xlabel=xlabel, ylabel="p50 ms", title="latency under load", xticks=xs)
        left.legend()
        save(fig, name)

    cost = report["find_cost"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, style in (("cache_on", "-"), ("cache_off", "--")):
        by_n: dict[int, list[tuple[float, float]]] = {}
        for point in cost[label].values():
            by_n.setdefault(point["practitioners"], []).append((point["days"], point["p50_ms"]))
        for n, pts in sorted(by_n.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f"{n} pract., {label}")
    ax.set(xlabel="window (days)", ylabel="$find p50 ms (sequential)", title="$find cost", yscale="log")
    ax.legend(fontsize=7)
    save(fig, "find_cost.png")
    return made


# --------------------------------------------------------------------------- main
async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sched-bench-report-") as tmp:
        work = Path(tmp)
        with state_urls(args, work) as urls:
            report: dict[str, Any] = {
                "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "machine": {"cpus": os.cpu_count()},
                "smoke": args.smoke,
                "settings": {
                    k: getattr(args, k)
                    for k in ("clients", "duration", "holds", "workers", "replicas", "windows", "practitioners")
                },
            }
            report["hold_by_store"] = await part_hold_by_store(args, work, urls)
            report["workers"] = await part_workers(args, work, urls)
            report["replicas"] = await part_replicas(args, work, urls)
            report["find_cost"] = await part_find_cost(args, work, urls)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "bench", help="where JSON and PNGs go (docs/bench)")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/12")
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres", help="admin URL; '' = skip")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--holds", type=int, default=300, help="sequential $hold calls per state store")
    ap.add_argument("--hold-pool", type=int, default=2000, help="slots prepared per $hold load phase")
    ap.add_argument("--sequential", type=int, default=40, help="sequential $find calls per cost point")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--windows", type=int, nargs="+", default=[7, 14, 30, 60, 90])
    ap.add_argument("--practitioners", type=int, nargs="+", default=[1, 5, 20])
    ap.add_argument("--smoke", action="store_true", help="a seconds-long run of every part (checks the script)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.clients, args.duration, args.holds, args.hold_pool, args.sequential = 4, 1.0, 30, 100, 5
        args.workers, args.replicas, args.windows, args.practitioners = [1, 2], [1, 2], [7, 30], [1, 5]
    try:
        report = asyncio.run(run(args))
    except BenchError as exc:
        print(f"bench-report: could not measure: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    name = "report-smoke.json" if args.smoke else "report.json"
    (args.out / name).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if not args.smoke:
        for path in plot(report, args.out):
            print(f"wrote {path}")
    else:
        with tempfile.TemporaryDirectory() as tmp:  # smoke plots prove the plotting works; not committed
            for path in plot(report, Path(tmp)):
                print(f"plotted {path.name} (smoke, discarded)")
    print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
