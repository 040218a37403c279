"""``sched-adapter``: serve, demo, check-mapping."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from adapter.mapping.loader import MappingError, load_mapping
from adapter.settings import CONFIG_FILE_VARIABLE, SettingsError, load_settings

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "samples" / "demo" / "demo.toml"


def _serve(config: Path, overrides: dict[str, str]) -> int:
    import uvicorn

    env = dict(os.environ)
    env.update(overrides)
    try:
        settings = load_settings(config, env)
    except SettingsError as exc:
        print(f"sched-adapter: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("apscheduler").setLevel(logging.WARNING)  # one line per sweep is noise
    try:
        load_mapping(settings.backend.mapping)
    except MappingError as exc:
        print(f"sched-adapter: {exc}", file=sys.stderr)
        return 2
    from adapter.scheduling.stores import state_url, topology_problem

    problem = topology_problem(
        settings.backend.database_url, state_url(settings.state.url, settings.state.path), settings.state.single_host
    )
    if problem:
        print(f"sched-adapter: {problem}", file=sys.stderr)
        return 2
    if settings.security.auth != "off":
        print(
            "sched-adapter: security.auth = 'smart' is not implemented in this release; set security.auth = \"off\" "
            "explicitly (SCHED_SECURITY__AUTH=off) and put the adapter behind an authorizing gateway.",
            file=sys.stderr,
        )
        return 2
    # Workers re-read the same settings through these variables (uvicorn's factory takes no arguments).
    os.environ[CONFIG_FILE_VARIABLE] = str(config.resolve())
    for key, value in overrides.items():
        os.environ[key] = value
    metrics_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Every worker writes its metrics here and /metrics adds them up (prometheus_client multiprocess
        # mode); a fresh folder per run, so counters start at zero with the server.
        import tempfile

        metrics_dir = tempfile.mkdtemp(prefix="sched-adapter-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    print(f"sched-adapter: serving {settings.server.public_base()} (FHIR R4, IHE ITI Scheduling)", file=sys.stderr)
    try:
        uvicorn.run(
            "adapter.asgi:app_factory",
            factory=True,
            host=settings.server.host,
            port=settings.server.port,
            workers=settings.server.workers,
            log_level=settings.server.log_level,
            lifespan="on",
            proxy_headers=False,
            access_log=False,
        )
    finally:
        if metrics_dir:
            import shutil

            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sched-adapter", description="IHE ITI Scheduling Server over a legacy scheduler"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run with a settings file (TOML)")
    serve.add_argument("--config", required=True, type=Path)
    demo = sub.add_parser("demo", help="run the embedded demo practice database (created on first start)")
    demo.add_argument("--port", type=int)
    demo.add_argument("--host")
    check = sub.add_parser("check-mapping", help="validate a mapping file and exit")
    check.add_argument("mapping", type=Path)
    args = parser.parse_args(argv)

    if args.command == "check-mapping":
        try:
            m = load_mapping(args.mapping)
        except MappingError as exc:
            print("\n".join(exc.problems), file=sys.stderr)
            return 1
        print(f"{args.mapping}: OK ({m.doc.system.name}, zone {m.doc.system.timezone})")
        return 0
    if args.command == "serve":
        return _serve(args.config, {})
    overrides = {}
    if args.port is not None:
        overrides["SCHED_SERVER__PORT"] = str(args.port)
    if args.host is not None:
        overrides["SCHED_SERVER__HOST"] = args.host
    return _serve(DEMO_CONFIG, overrides)


if __name__ == "__main__":
    sys.exit(main())
