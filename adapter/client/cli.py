"""``sched-adapter client``: the IHE Scheduling Client actor on the command line.

Exit codes: 0 the server did it; 1 the server refused (its OperationOutcome is printed on stderr);
2 the server (or the token endpoint) could not be reached, or the command line was wrong.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from adapter.client.http import (
    Exchange,
    SchedulingClient,
    TokenSource,
    Unreachable,
    actor,
    entries,
    find_parameters,
    hold_expiration,
    issues,
    next_link,
    typed,
)

EXIT_DONE, EXIT_REFUSED, EXIT_UNREACHABLE = 0, 1, 2


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """--base and the authentication options, shared by ``client`` and ``conformance``."""
    parser.add_argument("--base", required=True, help="the server's FHIR base URL, e.g. http://127.0.0.1:8080/fhir")
    parser.add_argument("--token", help="a bearer token to send as Authorization")
    parser.add_argument("--client-id", help="OAuth 2.0 client credentials: client id")
    parser.add_argument("--client-secret", help="OAuth 2.0 client credentials: client secret")
    parser.add_argument("--token-url", help="OAuth 2.0 token endpoint for client credentials")
    parser.add_argument("--scope", help="scope to ask for with client credentials")
    parser.add_argument("--x-client-id", help="X-Client-Id header (identifies this client when auth is off)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")


def connect(args: argparse.Namespace) -> SchedulingClient:
    tokens = TokenSource(
        args.token,
        client_id=args.client_id,
        client_secret=args.client_secret,
        token_url=args.token_url,
        scope=args.scope,
        timeout=args.timeout,
    )
    return SchedulingClient(args.base, tokens=tokens, client_id=args.x_client_id, timeout=args.timeout)


def register(sub: Any) -> None:
    """Add the ``client`` subcommand to ``sched-adapter``'s subparsers; it sets ``handler``."""
    parser = sub.add_parser("client", help="Scheduling Client actor: find, hold, book, cancel, search a server")
    add_connection_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the server's JSON instead of a table")
    actions = parser.add_subparsers(dest="action", required=True)

    find = actions.add_parser("find", help="ITI-115 $find: potential appointments")
    find.add_argument("--start", help="window start (date or dateTime with offset)")
    find.add_argument("--end", help="window end")
    find.add_argument("--specialty", action="append", default=[], help="system|code (repeat = OR)")
    find.add_argument("--visit-type", action="append", default=[], help="system|code (repeat = OR)")
    find.add_argument("--practitioner", action="append", default=[], help="id or Practitioner/id (repeat = OR)")
    find.add_argument("--location", action="append", default=[], help="id or Location/id (repeat = OR)")
    find.add_argument("--location-string", action="append", default=[], help="address text (starts-with)")
    find.add_argument("--patient", action="append", default=[], help="id or Patient/id")
    find.add_argument("--organization", action="append", default=[], help="id or Organization/id")
    _paging_arguments(find)

    hold = actions.add_parser("hold", help="ITI-116 $hold a proposed appointment")
    hold.add_argument("id", help="the proposed appointment id from find")
    hold.add_argument("--idempotency-key")

    book = actions.add_parser("book", help="ITI-117 $book a proposed or held appointment")
    book.add_argument("id", help="the proposed (or held) appointment id")
    book.add_argument("--comment")
    book.add_argument("--idempotency-key")

    cancel = actions.add_parser("cancel", help="ITI-117 $book with status cancelled")
    cancel.add_argument("id")
    cancel.add_argument("--reason", default="patient-cancel", help="status-reason code (default patient-cancel)")
    cancel.add_argument("--patient", help="the appointment's patient (id or Patient/id)")

    move = actions.add_parser("reschedule", help="ITI-117 $book with status booked: move an appointment")
    move.add_argument("id")
    move.add_argument("--start", required=True, help="new start (dateTime with offset)")
    move.add_argument("--end", help="new end (default: keep the duration)")
    move.add_argument("--practitioner", help="new practitioner (id or Practitioner/id)")
    move.add_argument("--comment")

    search = actions.add_parser("search", help="ITI-118 Appointment search")
    search.add_argument("--patient")
    search.add_argument("--practitioner")
    search.add_argument("--date", action="append", default=[], help="e.g. ge2026-12-01 (repeat = AND)")
    search.add_argument("--status", help="comma = OR")
    search.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="any other parameter")
    _paging_arguments(search)

    show = actions.add_parser("show", help="ITI-118 read one appointment")
    show.add_argument("id")

    parser.set_defaults(handler=run)


def _paging_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", type=int, help="_count: entries per page")
    pages = parser.add_mutually_exclusive_group()
    pages.add_argument("--pages", type=int, default=1, help="follow 'next' links for up to N pages (default 1)")
    pages.add_argument("--all", action="store_true", help="follow every 'next' link")


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        client = connect(args)
    except ValueError as exc:
        print(f"sched-adapter client: {exc}", file=err)
        return EXIT_UNREACHABLE
    try:
        with client:
            return _ACTIONS[args.action](client, args, out, err)
    except Unreachable as exc:
        print(f"sched-adapter client: cannot reach the server: {exc}", file=err)
        return EXIT_UNREACHABLE
    except PermissionError as exc:
        print(f"sched-adapter client: {exc}", file=err)
        return EXIT_REFUSED


# --------------------------------------------------------------------------------------------------
# Actions
# --------------------------------------------------------------------------------------------------
def _find(client: SchedulingClient, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    params = find_parameters(
        start=args.start,
        end=args.end,
        specialty=args.specialty,
        visit_type=args.visit_type,
        practitioner=args.practitioner,
        location=args.location,
        location_string=args.location_string,
        patient=args.patient,
        organization=args.organization,
        count=args.count,
    )
    return _paged(client, client.find(params), args, out, err)


def _search(client: SchedulingClient, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    query: list[tuple[str, str]] = []
    if args.patient:
        query.append(("patient", typed("Patient", args.patient)))
    if args.practitioner:
        query.append(("practitioner", typed("Practitioner", args.practitioner)))
    query += [("date", d) for d in args.date]
    if args.status:
        query.append(("status", args.status))
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep:
            print(f"sched-adapter client: --param {item!r} is not NAME=VALUE", file=err)
            return EXIT_UNREACHABLE
        query.append((name, value))
    if args.count is not None:
        query.append(("_count", str(args.count)))
    return _paged(client, client.search(query), args, out, err)


def _paged(client: SchedulingClient, first: Exchange, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    limit = 10_000 if args.all else max(args.pages, 1)
    bundles: list[Any] = []
    for page in client.pages(first, limit):
        if not page.ok:
            return _refused(page, err)
        bundles.append(page.body)
    if args.json:
        _print_json(bundles[0] if len(bundles) == 1 else bundles, out)
        return EXIT_DONE
    rows = [a for b in bundles for a in entries(b, "Appointment", "match")]
    total = bundles[0].get("total") if isinstance(bundles[0], dict) else None
    _print_table(rows, out, with_expiry=False)
    shown = f"{len(rows)} shown" + (f" of {total}" if isinstance(total, int) else "")
    more = " (more: --pages N or --all)" if next_link(bundles[-1]) else ""
    print(f"{shown}, {len(bundles)} page(s){more}", file=out)
    _print_issues(bundles, out, ("warning", "information"))
    return EXIT_DONE


def _one(exchange: Exchange, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if not exchange.ok:
        return _refused(exchange, err)
    body = exchange.body
    if args.json:
        _print_json(body, out)
        return EXIT_DONE
    found = (
        [body] if isinstance(body, dict) and body.get("resourceType") == "Appointment" else entries(body, "Appointment")
    )
    _print_table(found, out, with_expiry=True)
    _print_issues([body], out, ("warning", "information"))
    return EXIT_DONE


def _hold(client: SchedulingClient, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    return _one(client.hold(args.id, idempotency_key=args.idempotency_key), args, out, err)


def _book(client: SchedulingClient, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    return _one(client.book(args.id, comment=args.comment, idempotency_key=args.idempotency_key), args, out, err)


def _cancel(client: SchedulingClient, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    patient = args.patient
    if not patient:
        # The cancel request names the appointment's patient (a participant is required): read it.
        current = client.read(args.id)
        if not current.ok:
            return _refused(current, err)
        patient = (actor(current.body, "Patient") or {}).get("reference")
    return _one(client.cancel(args.id, args.reason, patient=patient), args, out, err)


def _show(client: SchedulingClient, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    return _one(client.read(args.id), args, out, err)


def _reschedule(client: SchedulingClient, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    current = client.read(args.id)
    if not current.ok:
        return _refused(current, err)
    appt = dict(current.body)
    try:
        new_start = dt.datetime.fromisoformat(args.start)
        old_start = dt.datetime.fromisoformat(appt["start"])
        old_end = dt.datetime.fromisoformat(appt["end"])
        new_end = dt.datetime.fromisoformat(args.end) if args.end else new_start + (old_end - old_start)
    except (KeyError, ValueError) as exc:
        print(f"sched-adapter client: cannot compute the new time: {exc}", file=err)
        return EXIT_UNREACHABLE
    if new_start.tzinfo is None:
        print("sched-adapter client: --start needs a timezone offset", file=err)
        return EXIT_UNREACHABLE
    participants = [p for p in appt.get("participant") or [] if isinstance(p, dict)]
    if args.practitioner:
        participants = [p for p in participants if actor(dict(participant=[p]), "Practitioner") is None]
        participants.insert(0, {"actor": {"reference": typed("Practitioner", args.practitioner)}, "status": "accepted"})
    resource: dict[str, Any] = {
        "resourceType": "Appointment",
        "id": appt.get("id", args.id),
        "status": "booked",
        "start": new_start.isoformat(),
        "end": new_end.isoformat(),
        "participant": participants,
    }
    for keep in ("serviceType", "specialty", "appointmentType", "comment"):
        if keep in appt:
            resource[keep] = appt[keep]
    if args.comment:
        resource["comment"] = args.comment
    return _one(client.book(resource=resource), args, out, err)


_ACTIONS: dict[str, Callable[[SchedulingClient, argparse.Namespace, TextIO, TextIO], int]] = {
    "find": _find,
    "hold": _hold,
    "book": _book,
    "cancel": _cancel,
    "reschedule": _reschedule,
    "search": _search,
    "show": _show,
}


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------
def _refused(exchange: Exchange, err: TextIO) -> int:
    print(f"refused: HTTP {exchange.status} ({exchange.method} {exchange.url})", file=err)
    found = issues(exchange.body)
    if not found:
        print(exchange.response_text[:2000] or "(no body)", file=err)
    for issue in found:
        print(f"  {_issue_line(issue)}", file=err)
    return EXIT_REFUSED


def _issue_line(issue: dict[str, Any]) -> str:
    text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or ""
    where = issue.get("expression") or []
    suffix = f" [{', '.join(where)}]" if where else ""
    return f"{issue.get('severity', '?')} {issue.get('code', '?')}: {text}{suffix}"


def _print_issues(bodies: Sequence[Any], out: TextIO, severities: tuple[str, ...]) -> None:
    for body in bodies:
        for issue in issues(body):
            if issue.get("severity") in severities:
                print(f"note: {_issue_line(issue)}", file=out)


def _print_json(value: Any, out: TextIO) -> None:
    out.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def local_start(value: object) -> str:
    """``2026-12-01T09:00:00-05:00`` -> ``Tue 2026-12-01 09:00 -05:00`` (the practice's own clock)."""
    if not isinstance(value, str):
        return ""
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        return value
    offset = when.strftime("%z")
    offset = f"{offset[:3]}:{offset[3:]}" if offset else ""
    return f"{when:%a %Y-%m-%d %H:%M} {offset}".rstrip()


def _who(appt: dict[str, Any], kind: str) -> str:
    ref = actor(appt, kind)
    if ref is None:
        return ""
    reference = str(ref.get("reference", "")).rsplit("/", 1)[-1]
    display = ref.get("display")
    return f"{display} ({reference})" if display else reference


def _print_table(appointments: Sequence[dict[str, Any]], out: TextIO, *, with_expiry: bool) -> None:
    header = ["id", "practitioner", "location", "local start", "status"]
    rows = []
    for appt in appointments:
        status = str(appt.get("status", ""))
        expiry = hold_expiration(appt) if with_expiry else None
        if expiry:
            status += f" (hold until {local_start(expiry)})"
        rows.append(
            [
                str(appt.get("id", "")),
                _who(appt, "Practitioner"),
                _who(appt, "Location"),
                local_start(appt.get("start")),
                status,
            ]
        )
    if not rows:
        print("(no appointments)", file=out)
        return
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip(), file=out)
