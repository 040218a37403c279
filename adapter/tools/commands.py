"""``sched-adapter mappings check|preview|verify``: argument parsing and exit codes (registered by adapter.cli)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from adapter.mapping.loader import MappingError, load_mapping
from adapter.settings import SettingsError, load_settings


def add_mappings_parser(sub: Any) -> None:
    """Register ``mappings`` (check, preview, verify) on the CLI's subparsers."""
    parser = sub.add_parser("mappings", help="check, preview and verify a mapping against its legacy database")
    cmds = parser.add_subparsers(dest="mappings_command", required=True)
    check = cmds.add_parser(
        "check", help="validate a mapping file; with --config also against the live database (nothing is written)"
    )
    check.add_argument("mapping", type=Path)
    check.add_argument("--config", type=Path, help="settings file (TOML) naming the legacy database")
    preview = cmds.add_parser("preview", help="print the FHIR resources the mapping produces from the database")
    preview.add_argument("mapping", type=Path)
    preview.add_argument("--config", type=Path, required=True, help="settings file (TOML) naming the database")
    preview.add_argument("--practitioner", help="FHIR id of the practitioner (default: the first one)")
    preview.add_argument("--patient", help="FHIR id of a patient whose appointments to show")
    preview.add_argument("--date", help="local day of proposed slots (YYYY-MM-DD; default: the next day with slots)")
    preview.add_argument("--json", action="store_true", help="print a JSON document instead of tables")
    verify = cmds.add_parser(
        "verify", help="acceptance run against a COPY of the legacy database (it books, moves and cancels)"
    )
    verify.add_argument("--config", type=Path, required=True, help="settings file (TOML) naming the database copy")
    verify.add_argument("--mapping", type=Path, help="mapping file (default: backend.mapping of the settings)")
    verify.add_argument("--practitioner", help="FHIR id of the practitioner to book with (default: found by $find)")
    verify.add_argument("--patient", help="FHIR id of the patient to book for (default: the first patient)")
    verify.add_argument("--clients", type=int, default=20, help="concurrent clients of the race (default 20)")


def run_mappings(args: argparse.Namespace) -> int:
    if args.mappings_command == "check":
        return check_command(args.mapping, args.config)
    if args.mappings_command == "preview":
        from adapter.tools.preview import preview_command

        return preview_command(args)
    from adapter.tools.verify import verify_command

    return verify_command(args)


def check_command(mapping_path: Path, config: Path | None) -> int:
    """Exit 0 when fine; 1 with one line per problem (``file:line: key: problem``); 2 for unusable settings."""
    try:
        mapping = load_mapping(mapping_path)
    except MappingError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    if config is None:
        print(f"{mapping_path}: OK ({mapping.doc.system.name}, zone {mapping.doc.system.timezone})")
        return 0
    try:
        settings = load_settings(config)
    except SettingsError as exc:
        print(f"sched-adapter: {exc}", file=sys.stderr)
        return 2
    from adapter.tools.check import live_check

    result = live_check(mapping, settings.backend.database_url, codes=True, timeout_s=settings.backend.timeout_seconds)
    if result.lines:
        print("\n".join(result.lines), file=sys.stderr)
        return 1
    print(
        f"{mapping_path}: OK against the live database ({mapping.doc.system.name}, zone "
        f"{mapping.doc.system.timezone}): every query, filter and write statement fits, every legacy code is mapped"
    )
    return 0
