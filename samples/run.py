"""Walk the demo through find -> hold -> book -> reschedule -> cancel, then the deliberate bad requests.

Posts the files in samples/fhir/ (placeholders such as {{TOMORROW}} or {{PROPOSED_ID}} filled in here), prints
each answer's status and a one-line summary, and exits 1 if any answer's status is not the one expected.
Standard library only:

    make demo                                        # in one terminal
    .venv/bin/python samples/run.py --base http://127.0.0.1:8080/fhir
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

FHIR = Path(__file__).resolve().parent / "fhir"
CLIENT = "samples-walkthrough"  # X-Client-Id: a hold belongs to the client that placed it


def post(base: str, operation: str, sample: str, fill: dict[str, str], client: str = CLIENT) -> tuple[int, Any]:
    """POST samples/fhir/<sample>.json, its {{NAME}} placeholders replaced, to <base>/Appointment/$<operation>."""
    body = (FHIR / f"{sample}.json").read_text(encoding="utf-8")
    for name, value in fill.items():
        body = body.replace("{{" + name + "}}", value)
    request = urllib.request.Request(
        f"{base}/Appointment/${operation}",
        data=body.encode("utf-8"),
        method="POST",
        headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json", "X-Client-Id": client},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as refused:
        try:
            return refused.code, json.load(refused)
        except ValueError:  # not FHIR (a proxy's error page, say)
            return refused.code, {}


def instant(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def appointments(bundle: Any) -> list[dict[str, Any]]:
    entries = bundle.get("entry", []) if bundle.get("resourceType") == "Bundle" else []
    return [e["resource"] for e in entries if e["resource"]["resourceType"] == "Appointment"]


def summary(body: Any) -> str:
    """One line: the Appointments' status and time, else the first issue's diagnostics."""
    found = appointments(body)
    if found:
        first = found[0]
        more = f" (+{len(found) - 1} more)" if len(found) > 1 else ""
        return f"{first['status']} {first['start']} - {first['end']}{more}"
    outcomes = [body] if body.get("resourceType") == "OperationOutcome" else []
    outcomes += [e["resource"] for e in body.get("entry", []) if e["resource"]["resourceType"] == "OperationOutcome"]
    issues = [i for oo in outcomes for i in oo.get("issue", [])]
    return f"{issues[0]['severity']} {issues[0]['code']}: {issues[0].get('diagnostics', '')}" if issues else "(empty)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="http://127.0.0.1:8080/fhir", help="the FHIR base URL of the demo")
    base = parser.parse_args(argv).base.rstrip("/")
    try:
        return walk(base)
    except urllib.error.URLError as exc:
        print(f"cannot reach {base}: {exc.reason}", file=sys.stderr)
        return 2


def walk(base: str) -> int:
    """The walkthrough itself: 0 when every answer had the expected status, else 1."""
    today = dt.date.today()
    fill = {"TOMORROW": str(today + dt.timedelta(days=1)), "IN_8_DAYS": str(today + dt.timedelta(days=8))}
    failures = 0

    def step(label: str, operation: str, sample: str, expected: int, client: str = CLIENT) -> Any:
        nonlocal failures
        status, body = post(base, operation, sample, fill, client)
        verdict = "ok" if status == expected else f"UNEXPECTED (wanted {expected})"
        failures += status != expected
        print(f"{label:<40} {status} {verdict:<6} {summary(body)}")
        return body

    found = appointments(step("ITI-115 $find", "find", "find", 200))
    if not found:
        print("no proposed appointment to go on with", file=sys.stderr)
        return 1
    first = found[0]
    # The new time for the reschedule: a later option of the same answer that does not overlap the first.
    later = next((a for a in found if instant(a["start"]) >= instant(first["end"])), None)
    fill["PROPOSED_ID"] = first["id"]
    step("ITI-116 $hold", "hold", "hold", 200)
    booked = appointments(step("ITI-117 $book (new)", "book", "book-new", 200))
    step("bad: hold the booked time (other client)", "hold", "hold", 409, client="someone-else")
    if booked and later:
        fill.update(APPOINTMENT_ID=booked[0]["id"], NEW_START=later["start"], NEW_END=later["end"])
        step("ITI-117 $book (reschedule)", "book", "book-reschedule", 200)
        step("ITI-117 $book (cancel)", "book", "book-cancel", 200)
    else:
        print("nothing booked, or no later option: reschedule and cancel skipped", file=sys.stderr)
        failures += 1
    step("bad: wrong resource type to $find", "find", "bad-wrong-resource-type", 400)
    step("bad: $hold without a parameter", "hold", "bad-missing-parameter", 400)
    print("all answers as expected" if not failures else f"{failures} answer(s) not as expected")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
