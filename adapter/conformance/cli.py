"""``sched-adapter conformance``: run the kit against a server and write a report.

Exit codes: 0 every requirement passed or was skipped; 1 at least one failed; 2 the server could
not be reached (or the command line was wrong).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from adapter.client.cli import add_connection_arguments, connect
from adapter.client.http import SchedulingClient, Unreachable
from adapter.conformance.kit import FAIL, Kit, KitOptions
from adapter.conformance.report import dumps, to_html, to_json


def register(sub: Any) -> None:
    parser = sub.add_parser("conformance", help="run the IHE ITI Scheduling conformance kit against a server")
    add_connection_arguments(parser)
    parser.add_argument("--report", type=Path, help="write the report: out.json or out.html (by the suffix)")
    parser.add_argument("--patient", help="a patient the server knows (enables the booking and search checks)")
    parser.add_argument("--practitioner", help="the practitioner to work with (default: the first one proposed)")
    parser.add_argument("--days-ahead", type=int, default=1, help="the search window starts this many days ahead")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if args.report is not None and args.report.suffix.lower() not in (".json", ".html", ".htm"):
        print("sched-adapter conformance: --report must end in .json or .html", file=sys.stderr)
        return 2
    try:
        client = connect(args)
    except ValueError as exc:
        print(f"sched-adapter conformance: {exc}", file=sys.stderr)
        return 2
    own_id = args.x_client_id or "conformance-kit"
    client.client_id = own_id
    other = SchedulingClient(args.base, tokens=client.tokens, client_id=f"{own_id}-other", timeout=args.timeout)
    options = KitOptions(patient=args.patient, practitioner=args.practitioner, days_ahead=args.days_ahead)
    try:
        with client, other:
            kit = Kit(client, other, options)
            results = kit.run()
    except Unreachable as exc:
        print(f"sched-adapter conformance: cannot reach the server: {exc}", file=sys.stderr)
        return 2
    software = kit.statement.get("software") if isinstance(kit.statement, dict) else None
    report = to_json(results, base_url=args.base, software=software)
    for row in report["requirements"]:
        line = f"{row['status'].upper():5} {row['id']:12} {row['level']:6} {row['summary']}"
        print(line, file=out)
        for check in row["checks"]:
            if check["status"] != "pass" and check["message"]:
                print(f"      {check['status']}: {check['title']}: {check['message'][:400]}", file=out)
    counts = report["summary"]["requirements"]
    print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped (requirements)", file=out)
    if args.report is not None:
        text = to_html(report) if args.report.suffix.lower() in (".html", ".htm") else dumps(report)
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text, encoding="utf-8")
        print(f"report: {args.report}", file=out)
    return 1 if counts[FAIL] else 0
