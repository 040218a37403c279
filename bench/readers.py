"""Reader threads per worker (``backend.pool_size``) against the CPU an uncached ``$find`` costs under load.

    .venv/bin/python bench/readers.py [--engines sqlite,postgresql,mariadb] [--pools 4,2,1] [--rounds 3] [--duration 6]

For every engine x pool size it starts one adapter (the demo settings of ``bench/find.py``: 2 workers,
``find.cache_seconds = 0``, the ODBC databases seeded fresh on 127.0.0.1 and dropped afterwards), then loads
each in turn with ``wrk -t2 -c32`` (2 s warm-up, ``--duration`` s measured), ``--rounds`` times. Per target and
round it prints req/s, the CPU per request of the adapter's processes and of the database server, and the
adapter's voluntary and involuntary context switches per request (``/proc``, Linux), then the ODBC/SQLite req/s
ratio of each round at each pool size.

Why: with several reader threads pyodbc releases the GIL around every ``SQLGetData`` and the readers hand it to
each other; with a database on the same host that costs more CPU than the waiting it saves (bench/README.md,
"Reader threads under load"). Exit status 0 once measured, 2 when it could not measure.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parent))

import find as bench  # the bench helpers: configs, servers, wrk
from _machine import context_switches, cpu_by_process, cpu_split, python_speed_ms


def _mapping_zone() -> ZoneInfo:
    sys.path.insert(0, str(bench.REPO))
    from adapter.mapping.loader import load_mapping

    return ZoneInfo(load_mapping(bench.DEMO_MAPPING).doc.system.timezone)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", default="sqlite,postgresql,mariadb")
    ap.add_argument("--pools", default="4,2,1", help="backend.pool_size values (default 4,2,1)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=6.0, help="seconds of wrk per target and round")
    args = ap.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    pools = [int(p) for p in args.pools.split(",") if p]
    try:
        return _run(engines, pools, args.rounds, args.duration)
    except bench.BenchError as exc:
        print(f"readers bench: {exc}", file=sys.stderr)
        return 2


def _run(engines: list[str], pools: list[int], rounds: int, duration: float) -> int:
    wrk = bench.ensure_wrk()
    print(
        f"readers bench: {os.cpu_count()} CPUs, sum(range(10**7)) {python_speed_ms():.0f} ms; uncached $find "
        f"({bench.N_PRACTITIONERS} practitioners x {bench.WINDOW_DAYS} days, _count {bench.COUNT}), wrk -t2 -c32"
    )
    servers: dict[tuple[str, int], bench.Server] = {}
    drops = []
    with tempfile.TemporaryDirectory(prefix="sched-readers-") as tmp:
        workdir = Path(tmp)
        try:
            for engine in engines:
                url, drop = bench.engine_database(engine)
                drops.append(drop)
                for pool in pools:
                    name = f"{engine}-{pool}"
                    servers[(engine, pool)] = bench.start_demo_adapter(workdir, name, 0, url, pool_size=pool)
            first = next(iter(servers.values()))
            body, *_ = bench.find_body(first.port, _mapping_zone())
            body_file = workdir / "find.json"
            body_file.write_bytes(body)
            lua = bench.write_lua(workdir, body_file)
            rps: dict[tuple[str, int], list[float]] = {key: [] for key in servers}
            print(
                f"{'round':>5}  {'engine':<11}{'pool':>5}{'req/s':>8}{'adapter ms':>12}{'db ms':>8}"
                f"{'vol/req':>9}{'invol/req':>10}"
            )
            for r in range(rounds):
                for (engine, pool), server in servers.items():
                    session = os.getsid(server.proc.pid)
                    bench.run_wrk(wrk, lua, server.port, 2, 32, 2)
                    cpu0, sw0 = cpu_by_process(), context_switches(session)
                    load = bench.run_wrk(wrk, lua, server.port, duration, 32, 2)
                    cpu1, sw1 = cpu_by_process(), context_switches(session)
                    if load.non_2xx or load.socket_errors:
                        raise bench.BenchError(f"{engine} pool {pool}: {load.non_2xx} non-2xx, {load.socket_errors}")
                    adapter, database = cpu_split(cpu0, cpu1, session)
                    n = max(load.requests, 1)
                    rps[(engine, pool)].append(load.rps)
                    print(
                        f"{r:>5}  {engine:<11}{pool:>5}{load.rps:>8.0f}{adapter / n * 1e3:>12.2f}"
                        f"{database / n * 1e3:>8.2f}{(sw1[0] - sw0[0]) / n:>9.1f}{(sw1[1] - sw0[1]) / n:>10.1f}",
                        flush=True,
                    )
            if "sqlite" in engines:
                for engine in engines:
                    if engine == "sqlite":
                        continue
                    for pool in pools:
                        ratios = [e / s for e, s in zip(rps[(engine, pool)], rps[("sqlite", pool)], strict=True)]
                        print(f"{engine} / sqlite, pool {pool}: " + ", ".join(f"{x:.2f}" for x in ratios))
        finally:
            for server in servers.values():
                server.stop()
            for drop in drops:
                drop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
