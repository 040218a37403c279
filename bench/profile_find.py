"""Profile the server-side ``$find`` path in-process (no HTTP): direct ASGI calls into the real app.

    .venv/bin/python bench/profile_find.py [-n 200] [--breakdown] [--pyinstrument] [--sort tottime] [--top 40]

Builds the demo app the way ``sched-adapter serve`` does (a temp copy of adapter/demo/config.toml with
its own var dir, so the demo database is seeded fresh), sends the same POST bench/find.py sends
(5 practitioners x 14 days, ``_count`` 50), prints the mean time per call, then a cProfile table
(or a pyinstrument tree with ``--pyinstrument`` when it is installed) over ``n`` calls.
``--breakdown`` instead wraps the main steps of the path (in this process only; the adapter's code
is not changed) and prints the mean wall time per request of each, without profiler overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import inspect
import io
import json
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import find as bench


async def asgi_call(
    app, method: str, path: str, body: bytes = b"", query: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None
) -> tuple[int, bytes]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), (b"content-length", str(len(body)).encode())] + (headers or []),
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    sent = False
    status = 0
    chunks: list[bytes] = []

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


def install_timers(app) -> dict[str, list[float]]:
    """Wrap the steps of the $find path with timers (monkeypatching this process only)."""
    import adapter.fhir.find as find_mod
    import adapter.scheduling.service as service_mod

    ctx = app.state.fhir
    service = ctx.service
    backend = service.backend
    acc: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])

    def wrap(owner, attr: str, label, is_method_of_instance: bool = False) -> None:
        fn = getattr(owner, attr, None)
        if fn is None:  # the adapter changed; time what still exists
            print(f"note: {type(owner).__name__}.{attr} does not exist; not timed")
            return

        def name_of(args, kwargs) -> str:
            return label(args, kwargs) if callable(label) else label

        if inspect.iscoroutinefunction(fn):

            async def timed(*args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return await fn(*args, **kwargs)
                finally:
                    cell = acc[name_of(args, kwargs)]
                    cell[0] += time.perf_counter() - t0
                    cell[1] += 1
        else:

            def timed(*args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    cell = acc[name_of(args, kwargs)]
                    cell[0] += time.perf_counter() - t0
                    cell[1] += 1

        setattr(owner, attr, timed)

    wrap(find_mod, "parse_body", "find.parse_body (orjson.loads)")
    wrap(find_mod, "_find_request", "find._find_request (Parameters -> FindRequest)")
    wrap(service, "find", "service.find (all)")
    wrap(backend, "find_actors", lambda a, k: f"  backend.find_actors({a[0].kind})")
    wrap(backend, "visit_types", "  backend.visit_types")
    wrap(backend, "availability", "  backend.availability (all)")
    wrap(backend, "_run_section", lambda a, k: f"    _run_section {a[1]} (SQL + row mapping)")
    wrap(backend, "_busy", "    _busy (busy section + Interval building)")
    wrap(service.state, "holds_by_practitioner", "  state.holds_by_practitioner")
    wrap(service_mod, "find_candidates", "  find_candidates (bookable minus busy, count, page)")
    wrap(service.availability, "free_time", "  availability cache (bookable spans; legacy reads on a miss)")
    wrap(service.proposals, "issuer", "  proposals.issuer (signed ids are issued after find_candidates)")
    wrap(find_mod, "_bundle", "find._bundle (Appointment dicts + Bundle)")
    wrap(find_mod, "render", "find.render (orjson.dumps + Response)")
    return acc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=200, help="profiled calls (default 200)")
    ap.add_argument("--pyinstrument", action="store_true", help="use pyinstrument instead of cProfile")
    ap.add_argument("--breakdown", action="store_true", help="mean time per request of each step, no profiler")
    ap.add_argument("--sort", default="cumulative", help="cProfile sort key (default cumulative; try tottime)")
    ap.add_argument("--top", type=int, default=45)
    ap.add_argument(
        "--uncached", action="store_true", help="find.cache_seconds = 0: every call reads the legacy system"
    )
    ap.add_argument(
        "--no-memo",
        action="store_true",
        help="keep nothing in the $find response memo: every call computes its answer (the memo's miss path)",
    )
    ap.add_argument(
        "--engine",
        default="sqlite",
        choices=("sqlite", "postgresql", "mariadb"),
        help="legacy database engine (ODBC ones are seeded like bench/find.py's and dropped afterwards)",
    )
    ap.add_argument("--practitioners", type=int, default=5, help="practitioners in the request (default 5)")
    ap.add_argument("--days", type=int, default=None, help="window length in days (default: bench/find.py's)")
    args = ap.parse_args(argv)

    from adapter.mapping.loader import load_mapping
    from adapter.server import build_app
    from adapter.settings import load_settings

    database_url, drop_database = bench.engine_database(args.engine)
    with tempfile.TemporaryDirectory(prefix="sched-prof-") as tmp:
        config, data = bench.demo_config(
            Path(tmp), 8080, cache_seconds=0 if args.uncached else None, database_url=database_url
        )
        env = bench.clean_env()
        app = build_app(load_settings(config, env))
        if args.no_memo:
            from adapter.fhir.context import ResponseMemo

            app.state.fhir.find_memo = ResponseMemo(max_entries=0)
        gc.freeze()  # what serve's startup does (adapter/server.py): the startup heap stays out of full GC passes
        zone = ZoneInfo(load_mapping(Path(data["backend"]["mapping"])).doc.system.timezone)
        json_h = [(b"content-type", bench.CONTENT_TYPE.encode()), (b"accept", bench.CONTENT_TYPE.encode())]

        async def run() -> None:
            status, raw = await asgi_call(
                app, "GET", "/fhir/Practitioner", query=f"_count={args.practitioners}".encode(), headers=json_h
            )
            ids = [e["resource"]["id"] for e in json.loads(raw)["entry"]][: args.practitioners]
            body, *_ = _body(ids, zone)
            status, raw = await asgi_call(app, "POST", bench.FIND_PATH, body, headers=json_h)
            n_appt = sum(1 for e in json.loads(raw).get("entry", []) if e["resource"]["resourceType"] == "Appointment")
            print(f"$find: {status}, {n_appt} Appointment entries, {len(raw)} bytes")
            for _ in range(20):
                await asgi_call(app, "POST", bench.FIND_PATH, body, headers=json_h)
            t0, cpu0 = time.perf_counter(), time.process_time()
            for _ in range(args.n):
                await asgi_call(app, "POST", bench.FIND_PATH, body, headers=json_h)
            per = (time.perf_counter() - t0) / args.n * 1e3
            cpu = (time.process_time() - cpu0) / args.n * 1e3
            print(
                f"unprofiled: {per:.2f} ms per $find call, {cpu:.2f} ms of this process's CPU (all threads, the "
                f"ODBC driver's included) ({args.n} calls, in-process, no HTTP, {args.engine})"
            )

            if args.breakdown:
                acc = install_timers(app)
                t0 = time.perf_counter()
                for _ in range(args.n):
                    await asgi_call(app, "POST", bench.FIND_PATH, body, headers=json_h)
                per = (time.perf_counter() - t0) / args.n * 1e3
                print(
                    f"\nbreakdown over {args.n} calls: {per:.2f} ms per request with timers "
                    "(inclusive times; indented steps are inside the one above)"
                )
                print(f"{'step':<58}{'ms/request':>11}{'calls/request':>15}")
                for label, (total, calls) in acc.items():
                    print(f"{label:<58}{total / args.n * 1e3:>11.3f}{calls / args.n:>15.1f}")
            elif args.pyinstrument:
                from pyinstrument import Profiler

                prof = Profiler(interval=0.0002, async_mode="disabled")
                prof.start()
                for _ in range(args.n):
                    await asgi_call(app, "POST", bench.FIND_PATH, body, headers=json_h)
                prof.stop()
                print(prof.output_text(unicode=False, color=False, show_all=False))
            else:
                pr = cProfile.Profile()
                pr.enable()
                for _ in range(args.n):
                    await asgi_call(app, "POST", bench.FIND_PATH, body, headers=json_h)
                pr.disable()
                out = io.StringIO()
                stats = pstats.Stats(pr, stream=out)
                stats.sort_stats(args.sort).print_stats(args.top)
                print(f"cProfile over {args.n} calls (divide times by {args.n} for per-call cost):")
                print(out.getvalue())

        def _body(ids, zone):
            import datetime as dt

            tomorrow = dt.datetime.now(zone).date() + dt.timedelta(days=1)
            start = dt.datetime.combine(tomorrow, dt.time(0), tzinfo=zone)
            end = dt.datetime.combine(
                tomorrow + dt.timedelta(days=args.days or bench.WINDOW_DAYS), dt.time(0), tzinfo=zone
            )
            params = [
                {"name": "start", "valueDateTime": start.isoformat()},
                {"name": "end", "valueDateTime": end.isoformat()},
            ]
            params += [{"name": "practitioner", "valueReference": {"reference": f"Practitioner/{i}"}} for i in ids]
            params.append({"name": "_count", "valueInteger": bench.COUNT})
            return json.dumps({"resourceType": "Parameters", "parameter": params}).encode(), start, end

        try:
            asyncio.run(run())
        finally:
            drop_database()
    return 0


if __name__ == "__main__":
    sys.exit(main())
