"""Issue 11 item 2: one AuditEvent per transaction (ITI-115..118 and reads), shaped per the IHE
Scheduling audit profiles and BALP, delivered to real sinks (a JSON-lines file, an Audit Record
Repository over HTTP, syslog over TLS) without ever losing an event."""

from __future__ import annotations

import base64
import datetime as dt
import json
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from apputil import write_server_config
from conformance import assert_r4
from securityutil import (
    JwksServer,
    Minter,
    RunningApp,
    headers,
    issue_cert,
    make_ca,
    rsa_key,
    running_app,
)
from serverutil import ThreadServer, free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from test_issue11_auth import ALL, find_body, local_day, params, ref

from adapter.audit.events import ServerIdentity
from adapter.audit.sinks import FhirSink, SyslogTlsSink
from adapter.audit.trail import AuditTrail
from adapter.demo.seed import ensure_demo_database

SCHED = "https://profiles.ihe.net/ITI/Scheduling/StructureDefinition"
BALP = "https://profiles.ihe.net/ITI/BALP/StructureDefinition"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
PATIENT = "5"
SCRIPT = Path(__import__("sys").executable).parent / "sched-adapter"


@pytest.fixture(scope="module")
def key() -> Any:
    return rsa_key("audit-key")


@pytest.fixture(scope="module")
def jwks(key: Any) -> Iterator[JwksServer]:
    server = JwksServer([key])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("audit-db") / "demo.sqlite"
    ensure_demo_database(path, today=dt.date.today())
    return path


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, db: Path, jwks: JwksServer) -> Iterator[RunningApp]:
    with running_app(tmp_path_factory.mktemp("audit"), f"sqlite:///{db}", jwks.url) as running:
        yield running


@pytest.fixture(scope="module")
def mint(srv: RunningApp, key: Any) -> Minter:
    return Minter(key, audience=srv.base)


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as client:
        yield client


class Log:
    """The JSON-lines audit file, read after the trail has caught up."""

    def __init__(self, srv: RunningApp) -> None:
        self.srv = srv
        self.path = Path(srv.holder["settings"].state.path).parent / "audit.jsonl"

    def events(self, request_id: str) -> list[dict[str, Any]]:
        self.srv.flush_audit()
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            event = json.loads(line)
            rid = [e["what"]["identifier"]["value"] for e in event["entity"] if e["type"]["code"] == "XrequestId"]
            if rid == [request_id]:
                out.append(event)
        return out

    def one(self, request_id: str) -> dict[str, Any]:
        found = self.events(request_id)
        assert len(found) == 1, found
        return found[0]


@pytest.fixture(scope="module")
def audit_log(srv: RunningApp) -> Log:
    return Log(srv)


def rid(name: str) -> str:
    return f"{name}-{time.monotonic_ns()}"


def post(http: httpx.Client, url: str, body: dict[str, Any], token: str, request_id: str) -> httpx.Response:
    return http.post(
        url, json=body, headers=headers(token, **{"Content-Type": "application/fhir+json", "X-Request-Id": request_id})
    )


# -- shape checks ---------------------------------------------------------------------------------
def agent(event: dict[str, Any], code: str) -> dict[str, Any]:
    found = [a for a in event["agent"] if a["type"].get("coding", [{}])[0].get("code") == code]
    assert len(found) == 1, event["agent"]
    return found[0]


def entities(event: dict[str, Any], type_code: str, role_code: str | None = None) -> list[dict[str, Any]]:
    return [
        e
        for e in event["entity"]
        if e["type"]["code"] == type_code and (role_code is None or e["role"]["code"] == role_code)
    ]


def check_common(event: dict[str, Any], request_id: str, *, ok: bool, srv: RunningApp) -> None:
    """What every event has: R4-valid, rest type, both agents, source = server, the request id."""
    assert_r4(event)
    assert "modifierExtension" not in event
    assert event["type"] == {
        "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
        "code": "rest",
        "display": "Restful Operation",
    }
    assert dt.datetime.fromisoformat(event["recorded"].replace("Z", "+00:00")) <= dt.datetime.now(dt.UTC)
    client = agent(event, "110153")
    assert client["type"]["coding"][0]["system"] == DCM
    assert client["who"] and client["network"] == {"address": "127.0.0.1", "type": "2"} and "media" not in client
    server = agent(event, "110152")
    assert server["who"] == event["source"]["observer"]  # val-audit-source
    assert server["network"] == {"address": srv.base, "type": "5"} and server["requestor"] is False
    assert event["source"]["type"][0]["code"] == "4"
    assert event["source"]["site"]
    assert [e["what"]["identifier"]["value"] for e in entities(event, "XrequestId")] == [request_id]
    if ok:
        assert event["outcome"] == "0" and "outcomeDesc" not in event
    else:
        assert event["outcome"] in ("4", "8", "12") and event["outcomeDesc"]
        assert "meta" not in event  # failures do not claim a profile that fixes outcome 0


def check_create(event: dict[str, Any], iti: str, display: str) -> None:
    assert event["action"] == "C"
    assert {"system": "http://hl7.org/fhir/restful-interaction", "code": "create", "display": "create"} in event[
        "subtype"
    ]
    assert {"system": "urn:ihe:event-type-code", "code": iti, "display": display} in event["subtype"]
    assert len(event["subtype"]) >= 2


def patient_entity(event: dict[str, Any]) -> str:
    found = entities(event, "1", "1")
    assert len(found) == 1, event["entity"]
    assert found[0]["type"]["system"] == "http://terminology.hl7.org/CodeSystem/audit-entity-type"
    assert found[0]["role"]["system"] == "http://terminology.hl7.org/CodeSystem/object-role"
    return str(found[0]["what"]["reference"])


def data_entity(event: dict[str, Any]) -> dict[str, Any]:
    found = entities(event, "2", "4")
    assert len(found) == 1, event["entity"]
    return found[0]


def user_agent(event: dict[str, Any], code: str, sub: str) -> None:
    users = [a for a in event["agent"] if a["type"]["coding"][0]["system"].endswith("v3-ParticipationType")]
    assert len(users) == 1
    assert users[0]["type"]["coding"][0]["code"] == code
    assert users[0]["requestor"] is True and users[0]["who"]["identifier"]["value"] == sub
    assert "network" not in users[0]


# -- one test per transaction, success and failure ----------------------------------------------------
def test_issue11_2_find_with_patient_is_audited_per_the_iti115_profile(
    http: httpx.Client, srv: RunningApp, mint: Minter, audit_log: Log
) -> None:
    r = rid("find")
    body = find_body(PATIENT)
    resp = post(http, f"{srv.base}/Appointment/$find", body, mint.token(ALL, sub="dr-who"), r)
    assert resp.status_code == 200
    event = audit_log.one(r)
    check_common(event, r, ok=True, srv=srv)
    assert event["meta"]["profile"] == [f"{SCHED}/IHE.Scheduling.FindPotential.Audit.Recipient"]
    check_create(event, "ITI-115", "Find Potential Appointments")
    assert patient_entity(event) == f"Patient/{PATIENT}"
    data = data_entity(event)
    assert json.loads(base64.b64decode(data["query"])) == body  # the request as sent
    user_agent(event, "AUT", "dr-who")
    assert agent(event, "110153")["who"]["identifier"]["value"] == "app-1"


def test_issue11_2_find_failure_is_audited_without_profile(
    http: httpx.Client, srv: RunningApp, mint: Minter, audit_log: Log
) -> None:
    r = rid("find-bad")
    body = params({"name": "start", "valueDateTime": "not a date"}, ref("patient-reference", f"Patient/{PATIENT}"))
    resp = post(http, f"{srv.base}/Appointment/$find", body, mint.token(ALL), r)
    assert resp.status_code == 400
    event = audit_log.one(r)
    check_common(event, r, ok=False, srv=srv)
    assert event["outcome"] == "4" and "start" in event["outcomeDesc"]
    assert patient_entity(event) == f"Patient/{PATIENT}"


def test_issue11_2_hold_and_book_are_audited_per_the_iti116_iti117_profiles(
    http: httpx.Client, srv: RunningApp, mint: Minter, audit_log: Log
) -> None:
    token = mint.token(ALL)
    found = post(http, f"{srv.base}/Appointment/$find", find_body(PATIENT), token, rid("f"))
    proposed = [e["resource"] for e in found.json()["entry"] if e["resource"]["resourceType"] == "Appointment"][0]
    r_hold, r_book = rid("hold"), rid("book")
    body = params(ref("appointment-reference", f"Appointment/{proposed['id']}"))
    assert post(http, f"{srv.base}/Appointment/$hold", body, token, r_hold).status_code == 200
    booked = post(http, f"{srv.base}/Appointment/$book", body, token, r_book)
    assert booked.status_code == 200
    new_appt = [e["resource"] for e in booked.json()["entry"] if e["resource"]["resourceType"] == "Appointment"][0]
    new_id = new_appt["id"]

    hold = audit_log.one(r_hold)
    check_common(hold, r_hold, ok=True, srv=srv)
    assert hold["meta"]["profile"] == [f"{SCHED}/IHE.Scheduling.Hold.Audit.Recipient"]
    check_create(hold, "ITI-116", "Hold Appointment")
    assert patient_entity(hold) == f"Patient/{PATIENT}"
    assert data_entity(hold)["what"] == {"reference": f"Appointment/{proposed['id']}"}

    book = audit_log.one(r_book)
    check_common(book, r_book, ok=True, srv=srv)
    assert book["meta"]["profile"] == [f"{SCHED}/IHE.Scheduling.Book.Audit.Recipient"]
    check_create(book, "ITI-117", "Book Appointment")
    assert patient_entity(book) == f"Patient/{PATIENT}"
    assert data_entity(book)["what"] == {"reference": f"Appointment/{new_id}"}

    r_cancel = rid("cancel")
    cancel = {
        "resourceType": "Appointment",
        "id": new_id,
        "status": "cancelled",
        "participant": new_appt["participant"],
    }
    resp = post(
        http,
        f"{srv.base}/Appointment/$book",
        params({"name": "appointment-resource", "resource": cancel}),
        token,
        r_cancel,
    )
    assert resp.status_code == 200
    event = audit_log.one(r_cancel)
    check_common(event, r_cancel, ok=True, srv=srv)
    check_create(event, "ITI-117", "Book Appointment")
    assert data_entity(event)["what"] == {"reference": f"Appointment/{new_id}"}


def test_issue11_2_failed_hold_and_book_are_audited_with_outcome_4(
    http: httpx.Client, srv: RunningApp, mint: Minter, audit_log: Log
) -> None:
    for op, iti in (("$hold", "ITI-116"), ("$book", "ITI-117")):
        r = rid(op)
        resp = post(
            http,
            f"{srv.base}/Appointment/{op}",
            params(ref("appointment-reference", "Appointment/nope")),
            mint.token(ALL),
            r,
        )
        assert resp.status_code == 404
        event = audit_log.one(r)
        check_common(event, r, ok=False, srv=srv)
        assert {c["code"] for c in event["subtype"]} >= {"create", iti}
        assert event["outcome"] == "4" and "HTTP 404" in event["outcomeDesc"]
        assert data_entity(event)["what"] == {"reference": "Appointment/nope"}  # what the request was about


def test_issue11_2_refused_requests_are_audited(
    http: httpx.Client, srv: RunningApp, mint: Minter, audit_log: Log
) -> None:
    r1, r2 = rid("no-token"), rid("no-scope")
    http.get(f"{srv.base}/Appointment", params={"patient": PATIENT}, headers={"X-Request-Id": r1})
    http.get(
        f"{srv.base}/Appointment",
        params={"patient": PATIENT},
        headers=headers(mint.token("user/Slot.read"), **{"X-Request-Id": r2}),
    )
    unauthenticated = audit_log.one(r1)
    check_common(unauthenticated, r1, ok=False, srv=srv)
    assert "HTTP 401" in unauthenticated["outcomeDesc"]
    assert agent(unauthenticated, "110153")["who"]["display"].startswith("anonymous client at 127.0.0.1")
    forbidden = audit_log.one(r2)
    check_common(forbidden, r2, ok=False, srv=srv)
    assert "HTTP 403" in forbidden["outcomeDesc"]


def test_issue11_2_search_is_audited_per_patient_query_one_event_per_patient(
    http: httpx.Client, srv: RunningApp, mint: Minter, audit_log: Log
) -> None:
    r = rid("search")
    query = {"patient": PATIENT, "date": f"ge{local_day(-400).date().isoformat()}"}
    resp = http.get(
        f"{srv.base}/Appointment", params=query, headers=headers(mint.token(ALL, sub="nurse"), **{"X-Request-Id": r})
    )
    assert resp.status_code == 200 and resp.json()["total"] > 0
    event = audit_log.one(r)
    check_common(event, r, ok=True, srv=srv)
    assert event["meta"]["profile"] == [f"{BALP}/IHE.BasicAudit.PatientQuery"]
    assert event["action"] == "E"
    codes = {(s["system"], s["code"]) for s in event["subtype"]}
    assert ("http://hl7.org/fhir/restful-interaction", "search-type") in codes
    assert ("urn:ihe:event-type-code", "ITI-118") in codes
    assert patient_entity(event) == f"Patient/{PATIENT}"
    q = entities(event, "2", "24")
    assert len(q) == 1 and "what" not in q[0]
    assert base64.b64decode(q[0]["query"]).decode() == urlencode(query)
    user_agent(event, "IRCP", "nurse")

    r_many = rid("search-many")
    resp = http.get(
        f"{srv.base}/Appointment",
        params={"practitioner": "SPEARSB", "_count": "50"},
        headers=headers(mint.token(ALL), **{"X-Request-Id": r_many}),
    )
    patients = {
        p["actor"]["reference"]
        for e in resp.json()["entry"]
        if e["resource"]["resourceType"] == "Appointment"
        for p in e["resource"]["participant"]
        if p["actor"].get("reference", "").startswith("Patient/")
    }
    assert len(patients) > 1
    events = audit_log.events(r_many)
    assert sorted(patient_entity(e) for e in events) == sorted(patients)
    for e in events:
        check_common(e, r_many, ok=True, srv=srv)

    r_post = rid("search-post")
    resp = http.post(
        f"{srv.base}/Appointment/_search",
        content=b"patient=5",
        headers=headers(
            mint.token(ALL), **{"Content-Type": "application/x-www-form-urlencoded", "X-Request-Id": r_post}
        ),
    )
    assert resp.status_code == 200
    event = audit_log.one(r_post)
    assert base64.b64decode(entities(event, "2", "24")[0]["query"]) == b"patient=5"


def test_issue11_2_reads_are_audited_per_patient_read(
    http: httpx.Client, srv: RunningApp, mint: Minter, audit_log: Log
) -> None:
    search = http.get(f"{srv.base}/Appointment", params={"patient": PATIENT}, headers=headers(mint.token(ALL)))
    appt = next(e["resource"] for e in search.json()["entry"] if e["resource"]["resourceType"] == "Appointment")
    r = rid("read")
    assert (
        http.get(
            f"{srv.base}/Appointment/{appt['id']}", headers=headers(mint.token(ALL), **{"X-Request-Id": r})
        ).status_code
        == 200
    )
    event = audit_log.one(r)
    check_common(event, r, ok=True, srv=srv)
    assert event["meta"]["profile"] == [f"{BALP}/IHE.BasicAudit.PatientRead"]
    assert event["action"] == "R" and event["subtype"][0]["code"] == "read"
    assert patient_entity(event) == f"Patient/{PATIENT}"
    assert data_entity(event)["what"] == {"reference": f"Appointment/{appt['id']}"}

    r_missing = rid("read-missing")
    assert (
        http.get(
            f"{srv.base}/Appointment/424242424", headers=headers(mint.token(ALL), **{"X-Request-Id": r_missing})
        ).status_code
        == 404
    )
    check_common(audit_log.one(r_missing), r_missing, ok=False, srv=srv)

    r_patient = rid("read-patient")
    assert (
        http.get(
            f"{srv.base}/Patient/{PATIENT}", headers=headers(mint.token(ALL), **{"X-Request-Id": r_patient})
        ).status_code
        == 200
    )
    event = audit_log.one(r_patient)
    check_common(event, r_patient, ok=True, srv=srv)
    assert patient_entity(event) == f"Patient/{PATIENT}"


def test_issue11_2_the_request_id_is_returned_or_made_up(
    http: httpx.Client, srv: RunningApp, mint: Minter, audit_log: Log
) -> None:
    resp = http.get(f"{srv.base}/Patient/{PATIENT}", headers=headers(mint.token(ALL)))
    made_up = resp.headers["x-request-id"]
    assert len(made_up) == 32
    assert audit_log.one(made_up)["outcome"] == "0"
    resp = http.get(f"{srv.base}/Patient/{PATIENT}", headers=headers(mint.token(ALL), **{"X-Request-Id": "mine-1"}))
    assert resp.headers["x-request-id"] == "mine-1"


# -- sinks and the spool --------------------------------------------------------------------------------
class Arr:
    """An Audit Record Repository over real HTTP that can be switched "down" (503)."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.down = True

        async def audit_event(request: Request) -> Response:
            if self.down:
                return Response(status_code=503)
            self.received.append(json.loads(await request.body()))
            return JSONResponse({}, status_code=201)

        self.server = ThreadServer(
            Starlette(routes=[Route("/fhir/AuditEvent", audit_event, methods=["POST"])]), factory=False
        )
        self.base = self.server.start() + "/fhir"

    def request_ids(self) -> set[str]:
        return {
            e["what"]["identifier"]["value"]
            for ev in self.received
            for e in ev["entity"]
            if e["type"]["code"] == "XrequestId"
        }


def spooled(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM spool").fetchone()[0])
    finally:
        conn.close()


def test_issue11_2_an_arr_that_is_down_loses_no_event_across_a_restart(
    tmp_path: Path, live_server_process: Any
) -> None:
    arr = Arr()
    try:
        port = free_port()
        extra = f'[audit]\nsinks = ["fhir", "file"]\nfhir_url = "{arr.base}"\nretry_seconds = 0.5\n'
        config = write_server_config(tmp_path, port, extra=extra)
        p = live_server_process.start([str(SCRIPT), "serve", "--config", str(config)], port=port)
        base = f"http://127.0.0.1:{port}/fhir"
        ids = [f"spool-{i}" for i in range(5)]
        with httpx.Client(timeout=60) as http:
            for r in ids:
                assert (
                    http.get(
                        f"{base}/Appointment", params={"patient": PATIENT}, headers={"X-Request-Id": r}
                    ).status_code
                    == 200
                )
        live_server_process.stop(p)  # graceful: what was queued is spooled
        assert spooled(tmp_path / "audit-spool.sqlite") >= len(ids)
        assert arr.received == []
        file_ids = (tmp_path / "audit.jsonl").read_text()
        assert all(r in file_ids for r in ids)  # the file sink was not held up by the failing one

        arr.down = False
        live_server_process.start([str(SCRIPT), "serve", "--config", str(config)], port=port)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not set(ids) <= arr.request_ids():
            time.sleep(0.1)
        assert set(ids) <= arr.request_ids()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and spooled(tmp_path / "audit-spool.sqlite"):
            time.sleep(0.1)
        assert spooled(tmp_path / "audit-spool.sqlite") == 0
        received = [e for e in arr.received]
        assert len(received) == len({e["id"] for e in received})  # each event once
        for event in received:
            assert_r4(event)
    finally:
        arr.server.stop()


def test_issue11_2_refused_connections_are_spooled_and_retried_in_order(tmp_path: Path) -> None:
    from adapter.audit.events import AuditRecord

    port = free_port()  # nothing listens here yet
    trail = AuditTrail(
        [FhirSink(f"http://127.0.0.1:{port}/fhir", timeout_seconds=2)],
        ServerIdentity("https://adapter.example.org/fhir"),
        tmp_path / "spool.sqlite",
        retry_seconds=0.2,
    )
    trail.start()
    try:
        for i in range(3):
            trail.submit(
                AuditRecord(
                    transaction="read-actor",
                    kind="Patient",
                    resource_id="5",
                    method="GET",
                    path="/fhir/Patient/5",
                    query=b"",
                    request_body=b"",
                    request_type=None,
                    status=200,
                    response_type=None,
                    response_body=None,
                    client_id="c",
                    subject=None,
                    user_name=None,
                    issuer=None,
                    token_patient=None,
                    address="10.0.0.1",
                    request_id=f"order-{i}",
                    recorded=dt.datetime.now(dt.UTC),
                )
            )
        assert trail.flush(30)
        assert spooled(tmp_path / "spool.sqlite") == 3
        received: list[str] = []

        async def audit_event(request: Request) -> Response:
            event = json.loads(await request.body())
            received.extend(
                e["what"]["identifier"]["value"] for e in event["entity"] if e["type"]["code"] == "XrequestId"
            )
            return Response(status_code=201)

        import uvicorn

        config = uvicorn.Config(
            Starlette(routes=[Route("/fhir/AuditEvent", audit_event, methods=["POST"])]),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(received) < 3:
                time.sleep(0.05)
            assert received == ["order-0", "order-1", "order-2"]
        finally:
            server.should_exit = True
            thread.join(10)
    finally:
        trail.stop()


class SyslogListener:
    """A TCP+TLS syslog collector (RFC 5425 framing) in a thread."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.frames: list[bytes] = []
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(str(cert), str(key))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(raw,), daemon=True).start()

    def _read(self, raw: socket.socket) -> None:
        try:
            conn = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        buf = b""
        with conn:
            while True:
                try:
                    chunk = conn.recv(65536)
                except (ssl.SSLError, OSError):
                    return
                if not chunk:
                    return
                buf += chunk
                while b" " in buf:
                    length_text, rest = buf.split(b" ", 1)
                    length = int(length_text)
                    if len(rest) < length:
                        break
                    self.frames.append(rest[:length])
                    buf = rest[length:]

    def close(self) -> None:
        self.sock.close()


def test_issue11_2_syslog_sink_sends_rfc5424_over_tls_with_octet_counting(tmp_path: Path, db: Path) -> None:
    ca, ca_key, ca_cert = make_ca(tmp_path)
    server_cert = issue_cert(tmp_path, ca_key, ca_cert, "syslog-server")
    listener = SyslogListener(server_cert.cert, server_cert.key)
    try:
        audit = {
            "sinks": ["syslog"],
            "syslog_host": "127.0.0.1",
            "syslog_port": listener.port,
            "syslog_ca_file": str(ca.cert),
        }
        with running_app(tmp_path, f"sqlite:///{db}", None, audit=audit) as app, httpx.Client(timeout=60) as http:
            for i in range(2):
                assert (
                    http.get(f"{app.base}/Patient/{PATIENT}", headers={"X-Request-Id": f"syslog-{i}"}).status_code
                    == 200
                )
            app.flush_audit()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(listener.frames) < 2:
                time.sleep(0.05)
        assert len(listener.frames) == 2
        for i, frame in enumerate(listener.frames):
            header, _, body = frame.partition(b" - ")
            parts = header.decode().split(" ")
            assert parts[0] == "<85>1"  # authpriv.notice, syslog version 1
            assert dt.datetime.fromisoformat(parts[1].replace("Z", "+00:00"))
            assert parts[3] == "sched-adapter" and parts[5] == "IHE+FHIR"
            event = json.loads(body)
            assert_r4(event)
            assert f"syslog-{i}" in json.dumps(event)
    finally:
        listener.close()


def test_issue11_2_the_spool_is_bounded_and_says_when_it_grows(tmp_path: Path, caplog: Any) -> None:
    from adapter.audit.trail import Spool

    spool = Spool(tmp_path / "spool.sqlite", max_events=100)
    try:
        with caplog.at_level("WARNING", logger="adapter.audit"):
            for i in range(150):
                spool.add("fhir", json.dumps({"n": i}).encode())
        assert spool.count("fhir") == 100
        kept = [json.loads(blob)["n"] for _, blob in spool.claim("fhir", "me")]
        assert kept == list(range(50, 150))  # the oldest were dropped, the newest kept, in order
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert any("holds 10 undelivered" in w for w in warnings)
        assert any("holds 100 undelivered" in w for w in warnings)
        assert any("spool is full" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    finally:
        spool.close()


def test_issue11_2_syslog_sink_refuses_an_untrusted_collector(tmp_path: Path) -> None:
    ca, ca_key, ca_cert = make_ca(tmp_path, "Trusted CA")
    _, rogue_key, rogue_cert = make_ca(tmp_path, "Rogue CA")
    rogue = issue_cert(tmp_path, rogue_key, rogue_cert, "rogue-server")
    listener = SyslogListener(rogue.cert, rogue.key)
    try:
        sink = SyslogTlsSink("127.0.0.1", listener.port, ca_file=ca.cert, timeout_seconds=5)
        with pytest.raises(ssl.SSLError):
            sink.send({"resourceType": "AuditEvent"})
        assert listener.frames == []
    finally:
        listener.close()


def test_issue11_2_xml_answers_and_patient_reads_are_audited_in_full(
    http: httpx.Client, srv: RunningApp, mint: Minter, audit_log: Log
) -> None:
    search = http.get(f"{srv.base}/Appointment", params={"patient": PATIENT}, headers=headers(mint.token(ALL)))
    appt = next(e["resource"] for e in search.json()["entry"] if e["resource"]["resourceType"] == "Appointment")
    r = rid("read-xml")
    resp = http.get(
        f"{srv.base}/Appointment/{appt['id']}",
        headers={**headers(mint.token(ALL)), "Accept": "application/fhir+xml", "X-Request-Id": r},
    )
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/fhir+xml")
    event = audit_log.one(r)
    check_common(event, r, ok=True, srv=srv)
    assert patient_entity(event) == f"Patient/{PATIENT}"  # read from the XML answer
    assert event["meta"]["profile"] == [f"{BALP}/IHE.BasicAudit.PatientRead"]

    r_patient = rid("read-patient-profile")
    http.get(f"{srv.base}/Patient/{PATIENT}", headers=headers(mint.token(ALL), **{"X-Request-Id": r_patient}))
    event = audit_log.one(r_patient)
    assert event["meta"]["profile"] == [f"{BALP}/IHE.BasicAudit.PatientRead"]
    assert data_entity(event)["what"] == {"reference": f"Patient/{PATIENT}"}


def test_issue11_2_find_without_patient_is_audited_without_claiming_the_profile(
    http: httpx.Client, srv: RunningApp, mint: Minter, audit_log: Log
) -> None:
    r = rid("find-anon")
    assert post(http, f"{srv.base}/Appointment/$find", find_body(None), mint.token(ALL), r).status_code == 200
    event = audit_log.one(r)
    check_common(event, r, ok=True, srv=srv)
    assert "meta" not in event  # the ITI-115 profile needs a patient entity (REQ-AUD-01: optional here)
    assert entities(event, "1", "1") == []
