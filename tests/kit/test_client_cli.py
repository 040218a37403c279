"""Issue 12 item 1: ``sched-adapter client`` against a live server, output and exit codes included."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys

import pytest
from serverutil import free_port

from adapter.cli import main

PATIENT = "7"
SPEARS = "SPEARSB"
#: Windows start tomorrow: a window starting "now" may propose a time that is already past when held.
START = (dt.date.today() + dt.timedelta(days=1)).isoformat()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def first_id(out: str) -> str:
    rows = [line.split()[0] for line in out.splitlines()[2:] if line.startswith("p")]
    assert rows, out
    return rows[0]


def test_issue12_1_find_prints_a_table_and_pages_through_next(
    demo_base: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "client", "--base", demo_base, "find", "--practitioner", SPEARS, "--count", "2")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["id", "practitioner", "location", "local", "start", "status"]
    assert "Beth Spears MD (SPEARSB)" in lines[2] and lines[2].rstrip().endswith("proposed")
    assert re.search(r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun) \d{4}-\d\d-\d\d \d\d:\d\d -0[45]:00", lines[2])
    assert re.search(r"^2 shown of \d+, 1 page\(s\) \(more: --pages N or --all\)$", out, re.M)
    code, out3, _ = run(
        capsys, "client", "--base", demo_base, "find", "--practitioner", SPEARS, "--count", "2", "--pages", "3"
    )
    assert code == 0 and re.search(r"^6 shown of \d+, 3 page\(s\)", out3, re.M)
    ids = [line.split()[0] for line in out3.splitlines() if re.match(r"p\d+\.", line)]
    assert len(set(ids)) == 6  # three distinct pages followed through the next links


def test_issue12_1_find_json_is_the_servers_bundle(demo_base: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "client", "--base", demo_base, "--json", "find", "--count", "1")
    assert code == 0
    bundle = json.loads(out)
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"


def test_issue12_1_hold_book_show_search_reschedule_cancel(demo_base: str, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["client", "--base", demo_base, "--x-client-id", "cli-test"]
    code, out, _ = run(
        capsys, *base, "find", "--practitioner", SPEARS, "--patient", PATIENT, "--start", START, "--count", "5"
    )
    token = first_id(out)
    code, out, err = run(capsys, *base, "hold", token)
    assert code == 0 and "pending (hold until " in out and token in out, err
    code, out, _ = run(capsys, *base, "--json", "book", token, "--comment", "from the CLI")
    assert code == 0
    booked = json.loads(out)["entry"][0]["resource"]
    assert booked["status"] == "booked" and booked["comment"] == "from the CLI"
    code, out, _ = run(capsys, *base, "show", booked["id"])
    assert code == 0 and booked["id"] in out and "booked" in out
    code, out, _ = run(capsys, *base, "search", "--patient", PATIENT, "--date", f"ge{booked['start'][:10]}")
    assert code == 0 and booked["id"] in out
    # One --json find picks the new time: proposed ids carry their issue second, so two finds a moment apart
    # can name the same slot with different ids when a second boundary falls between them.
    code, out, _ = run(
        capsys,
        *base,
        "--json",
        "find",
        "--practitioner",
        SPEARS,
        "--patient",
        PATIENT,
        "--start",
        booked["end"],
        "--count",
        "3",
    )
    assert code == 0
    target = json.loads(out)["entry"][0]["resource"]
    assert target["status"] == "proposed"
    code, out, _ = run(capsys, *base, "--json", "reschedule", booked["id"], "--start", target["start"])
    assert code == 0, out
    moved = json.loads(out)["entry"][0]["resource"]
    assert moved["id"] == booked["id"] and moved["start"] == target["start"] and moved["end"] == target["end"]
    code, out, _ = run(capsys, *base, "cancel", booked["id"], "--reason", "patient-cancel")
    assert code == 0 and "cancelled" in out


def test_issue12_1_refusal_exits_1_with_the_operation_outcome(
    demo_base: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = run(
        capsys, "client", "--base", demo_base, "find", "--practitioner", SPEARS, "--patient", PATIENT, "--start", START
    )
    token = first_id(out)
    assert run(capsys, "client", "--base", demo_base, "--x-client-id", "a", "hold", token)[0] == 0
    code, out, err = run(capsys, "client", "--base", demo_base, "--x-client-id", "b", "hold", token)
    assert code == 1 and out == ""
    assert err.startswith("refused: HTTP 409")
    assert re.search(r"^  fatal conflict: .+", err, re.M)
    code, _, err = run(capsys, "client", "--base", demo_base, "show", "no-such-appointment")
    assert code == 1 and "refused: HTTP 404" in err and "not-found" in err


def test_issue12_1_unreachable_server_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    dead = f"http://127.0.0.1:{free_port()}/fhir"
    code, out, err = run(capsys, "client", "--base", dead, "find")
    assert code == 2 and out == "" and "cannot reach the server" in err


def test_issue12_1_bearer_token_is_sent(capsys: pytest.CaptureFixture[str]) -> None:
    """--token goes out as Authorization: Bearer; client credentials are fetched from --token-url."""
    from urllib.parse import parse_qsl

    from serverutil import ThreadServer
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    seen: list[str] = []

    async def token(request: Request) -> JSONResponse:
        form = dict(parse_qsl((await request.body()).decode()))  # python-multipart is no dependency
        assert form["grant_type"] == "client_credentials"
        return JSONResponse({"access_token": "from-cc", "token_type": "bearer", "expires_in": 300})

    async def appointment(request: Request) -> JSONResponse:
        seen.append(request.headers.get("authorization", ""))
        return JSONResponse(
            {
                "resourceType": "Appointment",
                "id": "x",
                "status": "booked",
                "start": "2026-12-01T09:00:00-05:00",
                "end": "2026-12-01T09:20:00-05:00",
                "participant": [],
            }
        )

    app = Starlette(routes=[Route("/token", token, methods=["POST"]), Route("/fhir/Appointment/x", appointment)])
    server = ThreadServer(app)
    base = server.start()
    try:
        assert run(capsys, "client", "--base", f"{base}/fhir", "--token", "abc", "show", "x")[0] == 0
        assert (
            run(
                capsys,
                "client",
                "--base",
                f"{base}/fhir",
                "--client-id",
                "c",
                "--client-secret",
                "s",
                "--token-url",
                f"{base}/token",
                "show",
                "x",
            )[0]
            == 0
        )
    finally:
        server.stop()
    assert seen == ["Bearer abc", "Bearer from-cc"]


def test_issue12_1_console_script_runs(demo_base: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "adapter.cli", "client", "--base", demo_base, "find", "--count", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "1 shown of" in result.stdout
