"""``sched-adapter``: serve, demo, mappings (check, preview, verify), check-mapping, client, conformance."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import ssl
import sys
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from adapter.mapping.loader import MappingError, load_mapping
from adapter.settings import CONFIG_FILE_VARIABLE, Settings, SettingsError, load_settings
from adapter.tools.commands import add_mappings_parser, check_command, run_mappings

# package data: config.toml, mapping.yaml (= mappings/demo.yaml), schema.sql, hl7v2-mapping.yaml (= mappings/hl7v2-demo.yaml)
DEMO_PACKAGE = "adapter.demo"
DEFAULT_DEMO_DIR = Path("var") / "demo"


def demo_paths(data_dir: Path, mapping: Path, env: Mapping[str, str]) -> dict[str, str]:
    """The demo's file locations as ``SCHED_*`` variables, unless the environment sets them already.

    They stand in for the paths a settings file would hold (the packaged demo config has none, since it is
    read from the installed package), so the usual rule "environment wins over the file" still holds.
    """
    data_dir = data_dir.resolve()
    paths = {
        "SCHED_BACKEND__MAPPING": str(mapping),
        "SCHED_BACKEND__DATABASE_URL": f"sqlite:///{data_dir / 'clinicware.sqlite'}",
        "SCHED_STATE__PATH": str(data_dir / "adapter-state.sqlite"),
        "SCHED_SECURITY__SIGNING_SECRET_FILE": str(data_dir / "signing-secret"),
    }
    return {name: value for name, value in paths.items() if name not in env}


def tls_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's HTTPS options from ``server.tls_*``; a client CA makes client certificates mandatory."""
    server = settings.server
    if not server.tls_cert:
        return {}
    options: dict[str, Any] = {"ssl_certfile": str(server.tls_cert), "ssl_keyfile": str(server.tls_key)}
    if server.tls_client_ca:
        options["ssl_ca_certs"] = str(server.tls_client_ca)
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    return options


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
        if settings.backend.kind == "hl7v2":
            from adapter.hl7v2.mapping import load_hl7v2_mapping

            load_hl7v2_mapping(settings.backend.mapping)
        else:
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
    if settings.security.auth == "off":
        print(
            "sched-adapter: WARNING: authorization is OFF (security.auth = off): anyone who can reach the server "
            "can read and change every appointment. For demonstrations only.",
            file=sys.stderr,
        )
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
            http="adapter.fhir.http_protocol:PROTOCOL",  # unparseable requests get an OperationOutcome too
            **tls_options(settings),
        )
    finally:
        if metrics_dir:
            import shutil

            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _demo_hl7v2(args: argparse.Namespace) -> int:
    import asyncio

    from adapter.testing.hl7_demo import run_demo

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    print(
        "sched-adapter: WARNING: authorization is OFF (demo): anyone who can reach the server can read and change "
        "every appointment.",
        file=sys.stderr,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            run_demo(
                port=args.port if args.port is not None else 8080,
                mllp_port=args.mllp_port,
                data_dir=args.data_dir if args.data_dir != DEFAULT_DEMO_DIR else Path("var") / "demo-hl7v2",
                host=args.host or "127.0.0.1",
            )
        )
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
    demo.add_argument(
        "--backend",
        choices=("sql", "hl7v2"),
        default="sql",
        help="sql: the demo practice database; hl7v2: a simulated HL7v2 scheduler behind MLLP",
    )
    demo.add_argument("--mllp-port", type=int, default=2575, help="hl7v2: the adapter's SIU listener port")
    demo.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DEMO_DIR,
        help="where the demo database, the state store and the signing secret live (default: ./var/demo)",
    )
    check = sub.add_parser("check-mapping", help="validate a mapping file and exit (alias of `mappings check`)")
    check.add_argument("mapping", type=Path)
    check.add_argument("--config", type=Path, help="settings file: check against the live database too")
    add_mappings_parser(sub)
    from adapter.client.cli import register as register_client
    from adapter.conformance.cli import register as register_conformance

    register_client(sub)
    register_conformance(sub)
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is not None:
        return int(args.handler(args))

    if args.command == "check-mapping":
        return check_command(args.mapping, args.config)
    if args.command == "mappings":
        return run_mappings(args)
    if args.command == "serve":
        return _serve(args.config, {})
    if args.backend == "hl7v2":
        return _demo_hl7v2(args)
    demo_data = resources.files(DEMO_PACKAGE)
    with contextlib.ExitStack() as files:
        # Real paths for the whole run (uvicorn workers re-read both); as_file copies only out of a zipped package.
        config = files.enter_context(resources.as_file(demo_data / "config.toml"))
        mapping = files.enter_context(resources.as_file(demo_data / "mapping.yaml"))
        overrides = demo_paths(args.data_dir, mapping, os.environ)
        if args.port is not None:
            overrides["SCHED_SERVER__PORT"] = str(args.port)
        if args.host is not None:
            overrides["SCHED_SERVER__HOST"] = args.host
        return _serve(config, overrides)


if __name__ == "__main__":
    sys.exit(main())
