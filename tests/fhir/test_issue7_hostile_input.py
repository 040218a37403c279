"""Issue 7, items 4, 7 and 8 (FHIR side): hostile input never gets a 500, connections survive
errors, and the smaller wire defects found by a hostile client are gone.

Everything runs over real HTTP (uvicorn in a thread, with the HTTP protocol ``sched-adapter serve``
uses) against the seeded demo database; what reaches the database (long numeric ids, long strings)
also runs against PostgreSQL and MariaDB over ODBC.
"""

from __future__ import annotations

import datetime as dt
import http.client
import socket
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit
from xml.etree import ElementTree as ET
from zoneinfo import ZoneInfo

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dbutil
from apputil import appointments, issues, make_settings, write_server_config
from conformance import assert_avail_bundle, assert_operation_outcome
from serverutil import ThreadServer, free_port

from adapter.demo.seed import ensure_demo_database
from adapter.fhir.app import create_app
from adapter.fhir.http_protocol import PROTOCOL
from adapter.fhir.limits import MAX_STRING
from adapter.server import build_app

NY = ZoneInfo("America/New_York")
FIND = "/Appointment/$find"
FHIR_NS = "{http://hl7.org/fhir}"
BIG = "1234567890123456789012345"  # 25 digits: beyond any SQL integer
INT32_MAX = str(2**31 - 1)  # the largest INTEGER key: reaches the database and matches nothing
WIDE = str(2**40)  # a BIGINT, not an INTEGER: PostgreSQL fails a query comparing it with an INTEGER column
MRN = "urn:sched-adapter:clinicware:mrn"
NPI = "http://hl7.org/fhir/sid/us-npi"
FACILITY = "urn:sched-adapter:clinicware:facility"
PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")


# --------------------------------------------------------------------------------------------------
# servers
# --------------------------------------------------------------------------------------------------


class Server:
    def __init__(self, base: str, target: str, kind: str) -> None:
        self.root = base
        self.base = base + "/fhir"
        self.http = httpx.Client(base_url=self.base, timeout=60)
        self.target = target
        self.kind = kind

    def find(self, *entries: dict[str, Any], **headers: str) -> httpx.Response:
        body = {"resourceType": "Parameters", "parameter": list(entries)}
        return self.http.post(FIND, json=body, headers={"Content-Type": "application/fhir+json", **headers})

    def rows(self, sql: str, *params: Any) -> list[tuple]:
        return dbutil.legacy_rows(self.kind, self.target, sql, *params)


def _start(tmp: Path, kind: str, target: str) -> Iterator[Server]:
    url = f"sqlite:///{target}" if kind == "sqlite" else f"odbc:{target}"
    holder: dict[str, Any] = {}
    server = ThreadServer(lambda: build_app(holder["settings"]), factory=True, http=PROTOCOL)
    holder["settings"] = make_settings(tmp, url, server={"base_url": server.base_url + "/fhir"})
    server.start()
    s = Server(server.base_url, target, kind)
    try:
        yield s
    finally:
        s.http.close()
        server.stop()


def _sqlite_demo(tmp: Path) -> str:
    path = tmp / "demo.sqlite"
    ensure_demo_database(path, today=dt.date.today())
    return str(path)


@pytest.fixture(scope="module")
def sq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("issue7-sq")
    yield from _start(tmp, "sqlite", _sqlite_demo(tmp))


@pytest.fixture(scope="module", params=["sqlite", dbutil.POSTGRESQL, dbutil.MARIADB])
def any_db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The same server on each legacy database kind (the shared demo databases: read-only use)."""
    kind = request.param
    tmp = tmp_path_factory.mktemp(f"issue7-{kind}")
    if kind == "sqlite":
        target = _sqlite_demo(tmp)
    else:
        target = request.getfixturevalue("pg_demo_dsn" if kind == dbutil.POSTGRESQL else "mariadb_demo_dsn")
    yield from _start(tmp, kind, target)


def local_day(days_ahead: int) -> dt.datetime:
    day = dt.datetime.now(NY).date() + dt.timedelta(days=days_ahead)
    return dt.datetime.combine(day, dt.time(), tzinfo=NY)


def window(days_from: int = 1, days: int = 7) -> list[dict[str, Any]]:
    return [
        {"name": "start", "valueDateTime": local_day(days_from).isoformat()},
        {"name": "end", "valueDateTime": local_day(days_from + days).isoformat()},
    ]


def ref(name: str, reference: str) -> dict[str, Any]:
    return {"name": name, "valueReference": {"reference": reference}}


def assert_refused(resp: httpx.Response, status: int, expression: str | None, *fragments: str) -> dict[str, Any]:
    """A 4xx OperationOutcome (bare or in a searchset) naming ``expression``."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/fhir+json")
    body = resp.json()
    if body["resourceType"] == "OperationOutcome":
        assert_operation_outcome(body)
    found = issues(body)
    assert found and found[0]["severity"] in ("error", "fatal"), found
    if expression is not None:
        assert found[0].get("expression") == [expression], found
    text = " ".join(i.get("diagnostics", "") for i in found)
    for fragment in fragments:
        assert fragment in text, text
    for internal in ("Traceback", "timedelta", "OverflowError", "ValueError", "incident"):
        assert internal not in text, text
    return body


# --------------------------------------------------------------------------------------------------
# item 4: no 500 from anything a client sends
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "end", "expression", "fragment"),
    [
        ("0001-01-01", "0001-01-05", "start", "supported years"),
        ("9999-12-25", "9999-12-31", "start", "supported years"),
        ("2026-12-30T00:00:00Z", "9999-12-31T23:59:59-12:00", "end", "supported years"),
        ("9999-12-31T00:00:00+14:00", "9999-12-31T23:00:00+14:00", "start", "supported years"),
        ("2026-12-01T00:00:00+25:00", "2026-12-03", "start", "timezone offset +25:00"),
        ("2026-12-01T00:00:00+14:30", "2026-12-03", "start", "timezone offset +14:30"),
        ("2026-12-01T00:00:00-12:60", "2026-12-03", "start", "timezone offset -12:60"),
        ("2026-02-30", "2026-03-03", "start", "no valid day"),
        ("2026-12-01T24:00:00Z", "2026-12-03", "start", "no valid time"),
        ("\u0662\u0660\u0662\u0666-12-01", "2026-12-03", "start", "ASCII digits"),
        ("2026-12-01", "\uff12\uff10\uff12\uff16-12-03", "end", "ASCII digits"),
    ],
)
def test_issue7_4_find_dates_at_the_calendar_edges_are_400(
    sq: Server, start: str, end: str, expression: str, fragment: str
) -> None:
    post = sq.find({"name": "start", "valueDateTime": start}, {"name": "end", "valueDateTime": end})
    assert_refused(post, 400, expression, fragment)
    get = sq.http.get(FIND, params={"start": start, "end": end})
    assert_refused(get, 400, expression, fragment)


@pytest.mark.parametrize("offset", ["+14:00", "-12:00", "-14:00", "+05:45"])
def test_issue7_4_find_accepts_every_real_offset(sq: Server, offset: str) -> None:
    day = local_day(2).date()
    resp = sq.find(
        {"name": "start", "valueDateTime": f"{day}T00:00:00{offset}"},
        {"name": "end", "valueDateTime": f"{day + dt.timedelta(days=2)}T00:00:00{offset}"},
        {"name": "_count", "valueInteger": 1},
    )
    assert resp.status_code == 200, resp.text
    assert_avail_bundle(resp.json())


@pytest.mark.parametrize("prefix", ["", *PREFIXES])
@pytest.mark.parametrize(
    "value",
    [
        "0001",
        "0001-01-01",
        "9999",
        "9999-12-31",
        "9999-12-31T23:59:59-12:00",
        "0001-01-01T00:00:00+14:00",
        "9999-12-31T23:59:59.999999999Z",
        "2026-01-01T00:00+25:00",
        "\u0662\u0660\u0662\u0666-01-01",
    ],
)
def test_issue7_4_every_date_prefix_refuses_calendar_edges(sq: Server, prefix: str, value: str) -> None:
    resp = sq.http.get("/Appointment", params={"patient": "1", "date": prefix + value})
    assert_refused(resp, 400, "date")


@pytest.mark.parametrize("prefix", PREFIXES)
def test_issue7_4_every_date_prefix_works_with_extreme_offsets(sq: Server, prefix: str) -> None:
    for value in ("2026-06-01T00:00:00+14:00", "2026-06-01T00:00:00-12:00", "1900-01-01", "2999-12-31"):
        resp = sq.http.get("/Appointment", params={"patient": "1", "date": prefix + value})
        assert resp.status_code == 200, (value, resp.text)


def test_issue7_4_long_numeric_ids_are_404_or_empty(any_db: Server) -> None:
    s = any_db
    for path in (
        f"/Appointment/{BIG}",
        f"/Patient/{BIG}",
        f"/Location/{BIG}",
        f"/Practitioner/{BIG}",
        f"/Appointment/{WIDE}",
    ):
        assert_refused(s.http.get(path), 404, None)
    # In range for a 64-bit key: the query reaches the database and finds nothing.
    for path in (f"/Appointment/{INT32_MAX}", f"/Patient/{INT32_MAX}", f"/Location/-{INT32_MAX}"):
        assert_refused(s.http.get(path), 404, None)
    for params in (
        {"_id": BIG},
        {"_id": INT32_MAX},
        {"patient": BIG},
        {"patient": f"Patient/{INT32_MAX}"},
        {"location": BIG},
        {"identifier": f"urn:sched-adapter:clinicware:appt|{BIG}"},
        {"identifier": f"urn:sched-adapter:clinicware:appt|{INT32_MAX}"},
        {"identifier": f"urn:sched-adapter:clinicware:appt|{WIDE}"},
        {"_id": WIDE},
        {"patient.identifier": f"{MRN}|{BIG * 4}"},
        {"actor": f"Patient/{BIG}"},
    ):
        resp = s.http.get("/Appointment", params=params)
        assert resp.status_code == 200, (params, resp.text)
        assert resp.json()["total"] == 0
    for kind in ("Patient", "Location", "Practitioner"):
        for params in ({"_id": BIG}, {"_id": INT32_MAX}, {"identifier": f"{MRN}|{BIG}"}):
            resp = s.http.get(f"/{kind}", params=params)
            assert resp.status_code == 200, resp.text
            assert resp.json()["total"] == 0
    for name, reference in (("patient-reference", f"Patient/{BIG}"), ("location-reference", f"Location/{BIG}")):
        resp = s.find(*window(), ref(name, reference))
        assert resp.status_code == 200, resp.text
        assert resp.json()["total"] == 0


def test_issue7_4_ids_are_found_only_in_canonical_form(sq: Server) -> None:
    assert sq.http.get("/Patient/7").status_code == 200
    for path in ("/Patient/007", "/Patient/+7", "/Patient/7.0", "/Location/01", "/Practitioner/spearsb"):
        assert_refused(sq.http.get(path), 404, None)
    appt_id = sq.rows("SELECT MIN(APPT_ID) FROM APPT")[0][0]
    assert sq.http.get(f"/Appointment/{appt_id}").status_code == 200
    assert_refused(sq.http.get(f"/Appointment/00{appt_id}"), 404, None)
    total = sq.http.get("/Appointment", params={"patient": "007"}).json()["total"]
    assert total == 0 and sq.http.get("/Appointment", params={"patient": "7"}).json()["total"] > 0
    assert sq.http.get("/Patient", params={"_id": "007"}).json()["total"] == 0


def test_issue7_4_long_strings_are_400_naming_the_parameter(any_db: Server) -> None:
    s = any_db
    assert_refused(s.http.get("/Patient", params={"name": "a" * 50_000}), 400, "name", "limit is 1024")
    assert_refused(s.http.get("/Practitioner", params={"name": "é" * 2_000}), 400, "name")
    # At the limit the value reaches the database (a LIKE of 1,024 characters) and matches nothing.
    at_limit = s.http.get("/Patient", params={"name": "a" * MAX_STRING})
    assert at_limit.status_code == 200 and at_limit.json()["total"] == 0
    assert_refused(
        s.http.get("/Appointment", params={"patient.identifier": f"{MRN}|" + "9" * 5_000}), 400, "patient.identifier"
    )
    assert_refused(s.http.get("/Appointment", params={"x" * 100: "1"}), 400, "x" * 64)
    assert_refused(s.http.get("/Appointment", params=[("status", "booked")] * 101), 400, None, "limit is 100")
    many = [(f"p{i}", "v" * 1_000) for i in range(20)]
    assert_refused(s.http.get("/Appointment", params=many), 400, "p0", "query string")
    body = window() + [{"name": "location-string", "valueString": "x" * 5_000}]
    assert_refused(s.find(*body), 400, "location-string", "limit is 1024")
    form = s.http.post(
        "/Appointment/_search",
        content=b"patient=1&status=" + b"b" * 3_000,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert_refused(form, 400, "status")


def test_issue7_4_header_limits(sq: Server) -> None:
    assert_refused(sq.http.get("/metadata", headers={"X-Client-Id": "c" * 129}), 400, "X-Client-Id", "limit is 128")
    assert_refused(sq.http.get("/metadata", headers={"Prefer": "handling=strict, " + "x" * 1100}), 400, "Prefer")
    assert_refused(sq.http.get("/metadata", headers={"X-Padding": "p" * 40_000}), 431, "x-padding")
    assert sq.http.get("/metadata", headers={"X-Client-Id": "c" * 128}).status_code == 200


def test_issue7_4_control_characters_are_refused_before_the_legacy_system(sq: Server) -> None:
    before = sq.rows("SELECT COUNT(*) FROM APPT")[0][0]
    for params in ({"patient": "1", "foo\x01": "1"}, {"patient": "1\x01"}, {"_id": "1\ufffe"}):
        for fmt in ("json", "xml"):
            resp = sq.http.get("/Appointment", params={**params, "_format": fmt})
            assert resp.status_code == 400, resp.text
            if fmt == "xml":
                root = ET.fromstring(resp.content)  # well-formed although the input was not XML-safe
                assert root.tag == f"{FHIR_NS}OperationOutcome"
    found = appointments(sq.find(*window(), ref("practitioner", "Practitioner/SPEARSB")).json())
    book = {
        "resourceType": "Parameters",
        "parameter": [
            ref("appointment-reference", f"Appointment/{found[0]['id']}"),
            ref("patient-reference", "Patient/5"),
            {"name": "comment", "valueString": "bell\x07"},
        ],
    }
    resp = sq.http.post("/Appointment/$book", json=book, headers={"Content-Type": "application/fhir+json"})
    assert_refused(resp, 400, "comment", "control character")
    assert sq.rows("SELECT COUNT(*) FROM APPT")[0][0] == before
    xml_404 = sq.http.get("/Patient/%01", params={"_format": "xml"})
    assert xml_404.status_code == 404
    ET.fromstring(xml_404.content)


def test_issue7_4_a_stored_control_character_does_not_break_xml_reads(tmp_path: Path) -> None:
    target = _sqlite_demo(tmp_path)
    conn = sqlite3.connect(target)
    appt_id, pat_id = conn.execute("SELECT APPT_ID, PAT_ID FROM APPT ORDER BY APPT_ID LIMIT 1").fetchone()
    conn.execute("UPDATE APPT SET NOTE_TXT = ? WHERE APPT_ID = ?", ("bad\x01note\ufffe", appt_id))
    conn.commit()
    conn.close()
    server = _start(tmp_path, "sqlite", target)
    s = next(server)
    try:
        as_json = s.http.get(f"/Appointment/{appt_id}")
        assert as_json.status_code == 200 and as_json.json()["comment"] == "bad\x01note\ufffe"
        as_xml = s.http.get(f"/Appointment/{appt_id}", params={"_format": "xml"})
        assert as_xml.status_code == 200, as_xml.text
        comment = ET.fromstring(as_xml.content).find(f"{FHIR_NS}comment")
        assert comment is not None and comment.get("value") == "bad\ufffdnote\ufffd"
        search = s.http.get("/Appointment", params={"patient": str(pat_id), "_format": "xml", "_count": "500"})
        assert search.status_code == 200
        ET.fromstring(search.content)
    finally:
        next(server, None)


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk


def test_issue7_4_raw_non_ascii_request_line_gets_an_operation_outcome(
    live_server_process: Any, tmp_path: Path
) -> None:
    """Through ``sched-adapter serve``, so the HTTP protocol wiring of the CLI is what is tested."""
    port = free_port()
    config = write_server_config(tmp_path, port)
    script = Path(sys.executable).parent / "sched-adapter"
    proc = live_server_process.start([str(script), "serve", "--config", str(config)], port=port, timeout=60)
    for request in (
        b"GET /fhir/Patient/\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /fhir/Appointment?patient=\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    ):
        raw = _raw(proc.port, request)
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), raw
        assert b"content-type: application/fhir+json" in head.lower()
        assert b"connection: close" in head.lower()
        oo = httpx.Response(400, content=body).json()
        assert_operation_outcome(oo)
        assert oo["issue"][0]["code"] == "structure"


def test_issue7_4_numbers_take_ascii_digits_only(sq: Server) -> None:
    for value in ("\u0663", "\uff15", "1e2", "-1", "99999999999999999999"):
        assert_refused(sq.http.get("/Appointment", params={"patient": "1", "_count": value}), 400, "_count")
        assert_refused(sq.http.get("/Patient", params={"_count": value}), 400, "_count")
        assert_refused(sq.http.get(FIND, params={"_count": value}), 400, "_count")
    assert_refused(sq.http.get(FIND, params={"_offset": "\u0663"}), 400, "_offset")
    assert_refused(sq.http.get("/Patient", params={"_offset": "\u0663"}), 400, "_offset")


# --------------------------------------------------------------------------------------------------
# item 7: connections survive errors
# --------------------------------------------------------------------------------------------------


def test_issue7_7_keep_alive_connection_survives_every_error(tmp_path: Path) -> None:
    target = _sqlite_demo(tmp_path)
    holder: dict[str, Any] = {}

    async def boom(request: Any) -> Any:
        raise RuntimeError("an unexpected failure inside a handler")

    def factory() -> Any:
        # The real application's context with a search endpoint that fails unexpectedly: the only way
        # to get a 500 once client input no longer causes any.
        real = build_app(holder["settings"])
        return create_app(real.state.fhir, search_endpoint=boom)

    server = ThreadServer(factory, factory=True, http=PROTOCOL)
    holder["settings"] = make_settings(
        tmp_path, f"sqlite:///{target}", server={"base_url": server.base_url + "/fhir", "max_body_bytes": 65536}
    )
    server.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        json_type = {"Content-Type": "application/fhir+json"}
        errors = [
            ("POST", "/fhir/Appointment/$find", b'{"resourceType":"Parameters"}' + b" " * 300_000, json_type, 413),
            ("POST", "/fhir/Appointment/$find", b'{"resourceType":"Parameters"}', {"Content-Type": "text/csv"}, 415),
            ("POST", "/fhir/Appointment/$book", b'{"resourceType":"Param', json_type, 400),
            ("POST", "/fhir/Appointment/$hold", b"x" * 100_000, json_type, 413),
            ("POST", "/fhir/metadata", b"x" * 5_000, json_type, 405),
            ("GET", "/fhir/Nothing/here", b"", {}, 404),
            ("GET", "/fhir/Appointment?patient=1", b"", {}, 500),
            ("GET", "/fhir/Patient?name=" + "a" * 5_000, b"", {}, 400),
        ]
        for method, path, body, headers, status in errors:
            conn.request(method, path, body=body or None, headers=headers)
            sock_before = conn.sock
            resp = conn.getresponse()
            payload = resp.read()
            assert resp.status == status, (path, payload[:200])
            assert resp.getheader("content-type", "").startswith("application/fhir+json")
            closing = (resp.getheader("connection") or "").lower() == "close"
            # The next request on the same connection succeeds; if the server said it closes, the
            # client reconnects cleanly (http.client does so because of that header).
            conn.request("GET", "/fhir/metadata")
            ok = conn.getresponse()
            ok.read()
            assert ok.status == 200, path
            if not closing:
                assert conn.sock is sock_before, f"{path}: the connection was replaced without Connection: close"
            assert status != 500 or closing, "a 500 that drops the connection must say Connection: close"
        conn.close()
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------------
# item 8 (FHIR side)
# --------------------------------------------------------------------------------------------------


def _book_body(token: str) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": [ref("appointment-reference", f"Appointment/{token}")]}


def test_issue7_8_idempotency_key_limit_and_anonymous_scope(sq: Server) -> None:
    found = appointments(
        sq.find(
            *window(3, 2), ref("practitioner", "Practitioner/SPEARSB"), ref("patient-reference", "Patient/9")
        ).json()
    )
    apart = [a for a in found if a["start"] >= found[0]["end"]]
    first, second = found[0], apart[0]
    before = sq.rows("SELECT COUNT(*) FROM APPT")[0][0]
    headers = {"Content-Type": "application/fhir+json"}
    too_long = sq.http.post(
        "/Appointment/$book", json=_book_body(first["id"]), headers={**headers, "Idempotency-Key": "k" * 256}
    )
    assert_refused(too_long, 400, "Idempotency-Key", "limit is 255")
    assert sq.rows("SELECT COUNT(*) FROM APPT")[0][0] == before
    key = "k" * 255
    a = sq.http.post("/Appointment/$book", json=_book_body(first["id"]), headers={**headers, "Idempotency-Key": key})
    assert a.status_code == 200, a.text
    # Another anonymous client that happens to use the same key for another request: its own answer.
    b = sq.http.post("/Appointment/$book", json=_book_body(second["id"]), headers={**headers, "Idempotency-Key": key})
    assert b.status_code == 200, b.text
    assert "Idempotent-Replayed" not in b.headers
    assert appointments(a.json())[0]["id"] != appointments(b.json())[0]["id"]
    assert sq.rows("SELECT COUNT(*) FROM APPT")[0][0] == before + 2
    # The anonymous retry of the very same request is still answered from the key.
    retry = sq.http.post(
        "/Appointment/$book", json=_book_body(first["id"]), headers={**headers, "Idempotency-Key": key}
    )
    assert retry.headers.get("Idempotent-Replayed") == "true" and retry.content == a.content
    assert sq.rows("SELECT COUNT(*) FROM APPT")[0][0] == before + 2


def _links(bundle: dict[str, Any]) -> dict[str, str]:
    return {link["relation"]: link["url"] for link in bundle.get("link", [])}


def _local(url: str, s: Server) -> str:
    parts = urlsplit(url)
    assert parts.path.startswith("/fhir/")
    return parts.path[len("/fhir") :] + ("?" + parts.query if parts.query else "")


def test_issue7_8_count_zero_gives_the_total_and_no_next_link(sq: Server) -> None:
    full = sq.find(*window(), ref("practitioner", "Practitioner/SPEARSB"), {"name": "_count", "valueInteger": 500})
    zero = sq.find(*window(), ref("practitioner", "Practitioner/SPEARSB"), {"name": "_count", "valueInteger": 0})
    assert zero.status_code == 200
    assert zero.json()["total"] == full.json()["total"] > 0
    assert appointments(zero.json()) == [] and "next" not in _links(zero.json())
    assert_avail_bundle(zero.json())
    for params in ({"patient": "1", "_count": "0"}, {"patient": "1", "_summary": "count"}):
        b = sq.http.get("/Appointment", params=params).json()
        assert b["total"] > 0 and appointments(b) == [] and "next" not in _links(b)
    for params in ({"_count": "0"}, {"_summary": "count"}):
        b = sq.http.get("/Patient", params=params).json()
        assert b["total"] == 200 and "entry" not in b and "next" not in _links(b)


def test_issue7_8_find_links_keep_every_criterion(sq: Server) -> None:
    npi = next(i["value"] for i in sq.http.get("/Practitioner/SPEARSB").json()["identifier"] if i["system"] == NPI)
    mrn = next(i["value"] for i in sq.http.get("/Patient/5").json()["identifier"] if i["system"] == MRN)
    criteria = [
        *window(1, 5),
        {"name": "practitioner", "valueReference": {"identifier": {"system": NPI, "value": npi}}},
        {"name": "location-reference", "valueReference": {"identifier": {"system": FACILITY, "value": "1"}}},
        {
            "name": "patient-resource",
            "resource": {"resourceType": "Patient", "identifier": [{"system": MRN, "value": mrn}]},
        },
    ]

    def key(a: dict[str, Any]) -> tuple[str, ...]:
        refs = sorted(p["actor"]["reference"] for p in a["participant"])
        return (a["start"], a["end"], *refs)

    whole = sq.find(*criteria, {"name": "_count", "valueInteger": 500}).json()
    expected = [key(a) for a in appointments(whole)]
    assert len(expected) > 12
    assert all("Patient/5" in k and "Practitioner/SPEARSB" in k and "Location/1" in k for k in expected)
    page = sq.find(*criteria, {"name": "_count", "valueInteger": 5}).json()
    assert "self" in _links(page)
    got, pages = [key(a) for a in appointments(page)], 1
    while "next" in _links(page):
        nxt = _links(page)["next"]
        assert dict(parse_qsl(urlsplit(nxt).query))["patient-reference"] == "Patient/5"
        resp = sq.http.get(_local(nxt, sq))
        assert resp.status_code == 200, resp.text
        page = resp.json()
        assert_avail_bundle(page)
        assert _links(page)["self"] == nxt
        got += [key(a) for a in appointments(page)]
        pages += 1
    assert pages > 2 and got == expected and page["total"] == whole["total"]


def test_issue7_8_actor_searches_report_the_total_and_page(sq: Server) -> None:
    page = sq.http.get("/Patient", params={"_count": "7"}).json()
    assert page["total"] == 200 and len(page["entry"]) == 7
    ids = [e["resource"]["id"] for e in page["entry"]]
    while "next" in _links(page):
        page = sq.http.get(_local(_links(page)["next"], sq)).json()
        assert page["total"] == 200
        ids += [e["resource"]["id"] for e in page.get("entry", []) if e["resource"]["resourceType"] == "Patient"]
    assert len(ids) == len(set(ids)) == 200
    for kind in ("Practitioner", "Location"):
        everything = sq.http.get(f"/{kind}", params={"_count": "500"}).json()
        first = sq.http.get(f"/{kind}", params={"_count": "2"}).json()
        assert first["total"] == everything["total"] == len(everything["entry"]) > 2
        assert "next" in _links(first)
    named = sq.http.get("/Patient", params={"name": "a", "_count": "1"}).json()
    assert named["total"] > 1 and "next" in _links(named)
    strict = sq.http.get("/Patient", params={"birthdate": "2000"}, headers={"Prefer": "handling=strict"})
    assert_refused(strict, 400, "birthdate")


def test_issue7_8_full_urls_resolve(sq: Server) -> None:
    bundle = sq.find(
        *window(2, 3), ref("practitioner", "Practitioner/SPEARSB"), ref("patient-reference", "Patient/11")
    ).json()
    entry = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Appointment")
    got = sq.http.get(_local(entry["fullUrl"], sq))
    assert got.status_code == 200, got.text
    read = got.json()
    assert read["status"] == "proposed" and read["id"] == entry["resource"]["id"]
    assert (read["start"], read["end"]) == (entry["resource"]["start"], entry["resource"]["end"])
    assert read["participant"] == entry["resource"]["participant"]
    outcome = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "OperationOutcome"]
    for e in outcome:
        assert e["fullUrl"].startswith("urn:uuid:")
    booked = sq.http.post(
        "/Appointment/$book", json=_book_body(read["id"]), headers={"Content-Type": "application/fhir+json"}
    )
    assert booked.status_code == 200, booked.text
    gone = sq.http.get(_local(entry["fullUrl"], sq))
    assert_refused(gone, 404, None, "booked as Appointment/")
    failure = sq.http.post(
        "/Appointment/$hold", json=_book_body(read["id"]), headers={"Content-Type": "application/fhir+json"}
    ).json()
    assert all(e["fullUrl"].startswith("urn:uuid:") for e in failure["entry"])


def test_issue7_8_summary_elements_and_actor(sq: Server) -> None:
    plain = sq.http.get("/Appointment", params={"patient": "1", "_count": "500"}).json()
    assert plain["total"] > 0
    subset = sq.http.get("/Appointment", params={"patient": "1", "_count": "500", "_elements": "start,end"}).json()
    assert subset["total"] == plain["total"]
    for a in appointments(subset):
        assert set(a) == {"resourceType", "id", "meta", "status", "participant", "start", "end"}
        assert {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"} in a[
            "meta"
        ]["tag"]
    ids = [a["id"] for a in appointments(plain)]
    for params in ({"actor": "Patient/1"}, {"actor:Patient": "1"}, {"actor": f"{sq.base}/Patient/1"}):
        b = sq.http.get("/Appointment", params={**params, "_count": "500"}).json()
        assert [a["id"] for a in appointments(b)] == ids, params
    # _total=accurate: a practitioner has more matches than the default _total counts (issue 14.5)
    by_prac = sq.http.get(
        "/Appointment", params={"practitioner": "SPEARSB", "_count": "50", "_total": "accurate"}
    ).json()
    by_actor = sq.http.get(
        "/Appointment", params={"actor:Practitioner": "SPEARSB", "_count": "50", "_total": "accurate"}
    ).json()
    assert by_actor["total"] == by_prac["total"] > 0
    mrn = next(i["value"] for i in sq.http.get("/Patient/1").json()["identifier"] if i["system"] == MRN)
    by_ident = sq.http.get("/Appointment", params={"actor.identifier": f"{MRN}|{mrn}", "_count": "500"}).json()
    assert [a["id"] for a in appointments(by_ident)] == ids
    assert sq.http.get("/Appointment", params={"actor": "Device/1"}).json()["total"] == 0
    assert_refused(sq.http.get("/Appointment", params={"actor": "1"}), 400, "actor", "needs a type")
    assert_refused(sq.http.get("/Appointment", params={"actor": "Patient/1,Location/1"}), 400, "actor")
    strict = sq.http.get(
        "/Appointment", params={"patient": "1", "_summary": "data"}, headers={"Prefer": "handling=strict"}
    )
    assert_refused(strict, 400, "_summary")
    metadata = sq.http.get("/metadata").json()
    appointment = next(r for r in metadata["rest"][0]["resource"] if r["type"] == "Appointment")
    names = {p["name"] for p in appointment["searchParam"]}
    assert {"actor", "_summary", "_elements", "_count", "_sort"} <= names
