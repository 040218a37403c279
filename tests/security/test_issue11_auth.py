"""Issue 11 item 1: SMART on FHIR bearer tokens, end to end over real HTTP.

Real keys (generated here), real signed JWTs, the JWKS served by a real HTTP server, the adapter in
uvicorn on the seeded SQLite demo. Every refusal is checked for its status, its ``WWW-Authenticate``
challenge and its OperationOutcome; every "nothing changed" is checked in the legacy table.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl
from zoneinfo import ZoneInfo

import httpx
import pytest
from conformance import assert_operation_outcome, assert_r4
from dbutil import legacy_rows
from securityutil import ISSUER, JwksServer, Minter, RunningApp, ec_key, headers, rsa_key, running_app

from adapter.demo.seed import ensure_demo_database

ZONE = ZoneInfo("America/New_York")
ME = "5"  # the patient of the patient-context tokens
OTHER = "7"
ALL = "system/Appointment.* system/Patient.read system/Practitioner.read system/Location.read"
MINE = "patient/Appointment.* patient/Patient.read launch/patient openid"


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {"rsa": rsa_key("rsa-1"), "es256": ec_key("ec-256", "P-256"), "es384": ec_key("ec-384", "P-384")}


@pytest.fixture(scope="module")
def jwks(keys: dict[str, Any]) -> Iterator[JwksServer]:
    server = JwksServer(list(keys.values()))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth-db") / "demo.sqlite"
    ensure_demo_database(path, today=dt.date.today())
    return path


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, db: Path, jwks: JwksServer) -> Iterator[RunningApp]:
    with running_app(tmp_path_factory.mktemp("auth"), f"sqlite:///{db}", jwks.url) as running:
        yield running


@pytest.fixture(scope="module")
def mint(srv: RunningApp, keys: dict[str, Any]) -> Minter:
    return Minter(keys["rsa"], audience=srv.base)


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as client:
        yield client


# --------------------------------------------------------------------------------------------------
def local_day(days_ahead: int) -> dt.datetime:
    day = dt.datetime.now(ZONE).date() + dt.timedelta(days=days_ahead)
    return dt.datetime.combine(day, dt.time(), tzinfo=ZONE)


def params(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": list(entries)}


def ref(name: str, reference: str) -> dict[str, Any]:
    return {"name": name, "valueReference": {"reference": reference}}


def find_body(patient: str | None, days: tuple[int, int] = (1, 6)) -> dict[str, Any]:
    entries = [
        {"name": "start", "valueDateTime": local_day(days[0]).isoformat()},
        {"name": "end", "valueDateTime": local_day(days[1]).isoformat()},
        ref("practitioner", "Practitioner/SPEARSB"),
        {"name": "_count", "valueInteger": 200},
    ]
    if patient:
        entries.append(ref("patient-reference", f"Patient/{patient}"))
    return params(*entries)


def post(http: httpx.Client, url: str, body: dict[str, Any], token: str | None, **more: str) -> httpx.Response:
    return http.post(url, json=body, headers=headers(token, **{"Content-Type": "application/fhir+json", **more}))


def proposals(http: httpx.Client, srv: RunningApp, token: str, patient: str | None) -> list[dict[str, Any]]:
    resp = post(http, f"{srv.base}/Appointment/$find", find_body(patient), token)
    assert resp.status_code == 200, resp.text
    return [e["resource"] for e in resp.json()["entry"] if e["resource"]["resourceType"] == "Appointment"]


class Slots:
    """Hands out distinct proposed appointments (each test books its own)."""

    def __init__(self) -> None:
        self.pool: dict[str | None, list[dict[str, Any]]] = {}

    def take(self, http: httpx.Client, srv: RunningApp, mint: Minter, patient: str | None) -> str:
        if not self.pool.get(patient):
            found = proposals(http, srv, mint.token(ALL), patient)
            self.pool[patient] = found[::3]  # spread out: neighbours would overlap
        return str(self.pool[patient].pop()["id"])


@pytest.fixture(scope="module")
def slots() -> Slots:
    return Slots()


def assert_refused(resp: httpx.Response, status: int, code: str, error: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/fhir+json")
    oo = resp.json()
    assert oo["resourceType"] == "OperationOutcome"
    assert_operation_outcome(oo)
    assert_r4(oo)
    assert oo["issue"][0]["code"] == code
    if status == 401:
        challenge = resp.headers["www-authenticate"]
        assert challenge.startswith("Bearer ")
        if error:
            assert f'error="{error}"' in challenge
    return oo


def legacy_appt(db: Path, patient: str) -> tuple[int, tuple[Any, ...]]:
    """A booked future legacy appointment of ``patient``: (id, the full row)."""
    today = int(dt.date.today().strftime("%Y%m%d"))
    rows = legacy_rows(
        "sqlite",
        str(db),
        "SELECT APPT_ID FROM APPT WHERE PAT_ID = ? AND STATUS_CD = 'S' AND APPT_DT > ? ORDER BY APPT_ID",
        int(patient),
        today + 1,
    )
    assert rows, f"the demo has no future booking of patient {patient}"
    return int(rows[0][0]), row(db, int(rows[0][0]))


def row(db: Path, appt_id: int) -> tuple[Any, ...]:
    return tuple(legacy_rows("sqlite", str(db), "SELECT * FROM APPT WHERE APPT_ID = ?", appt_id)[0])


def count_appts(db: Path) -> int:
    return int(legacy_rows("sqlite", str(db), "SELECT COUNT(*) FROM APPT")[0][0])


def holds(srv: RunningApp) -> int:
    conn = sqlite3.connect(Path(srv.holder["settings"].state.path))
    try:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        table = next(n for n in names if "hold" in n.lower())
        return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------
def test_issue11_1_metadata_and_smart_configuration_are_public_and_describe_smart(
    http: httpx.Client, srv: RunningApp
) -> None:
    cs = http.get(f"{srv.base}/metadata", headers=headers(None)).json()
    assert_r4(cs)
    security = cs["rest"][0]["security"]
    assert security["service"][0]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
        "code": "SMART-on-FHIR",
        "display": "SMART-on-FHIR",
    }
    oauth = security["extension"][0]
    assert oauth["url"] == "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
    uris = {e["url"]: e["valueUri"] for e in oauth["extension"]}
    assert uris == {
        "token": ISSUER + "/protocol/openid-connect/token",
        "authorize": ISSUER + "/protocol/openid-connect/auth",
    }
    assert "https://profiles.ihe.net/ITI/BALP/ImplementationGuide/ihe.iti.balp" in cs["implementationGuide"]

    smart = http.get(f"{srv.base}/.well-known/smart-configuration")
    assert smart.status_code == 200
    doc = smart.json()
    assert doc["issuer"] == ISSUER
    assert doc["token_endpoint"] == uris["token"] and doc["authorization_endpoint"] == uris["authorize"]
    assert "permission-v2" in doc["capabilities"] and "context-standalone-patient" in doc["capabilities"]
    assert "patient/Appointment.rs" in doc["scopes_supported"]


# --------------------------------------------------------------------------------------------------
# Token validation
# --------------------------------------------------------------------------------------------------
def test_issue11_1_missing_token_is_401_with_bearer_challenge(http: httpx.Client, srv: RunningApp) -> None:
    for method, path in (("GET", "/Appointment?patient=5"), ("POST", "/Appointment/$hold"), ("GET", "/Patient/5")):
        resp = http.request(method, srv.base + path, headers=headers(None))
        assert_refused(resp, 401, "login")
        assert resp.headers["www-authenticate"] == 'Bearer realm="sched-adapter"'
    resp = http.get(f"{srv.base}/Patient/5", headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert_refused(resp, 401, "login", "invalid_request")


@pytest.mark.parametrize(
    "case",
    [
        "expired",
        "not_yet_valid",
        "wrong_audience",
        "wrong_issuer",
        "alg_none",
        "hs256_with_public_key",
        "tampered_signature",
        "unknown_kid",
        "no_exp",
        "garbage",
    ],
)
def test_issue11_1_invalid_tokens_are_401_invalid_token(
    http: httpx.Client, srv: RunningApp, mint: Minter, keys: dict[str, Any], case: str
) -> None:
    scope = ALL
    now = int(dt.datetime.now(dt.UTC).timestamp())
    stranger = rsa_key("rsa-1")  # same kid as the real key, different key pair
    token = {
        "expired": lambda: mint.token(scope, exp=now - 120, iat=now - 600),
        "not_yet_valid": lambda: mint.token(scope, nbf=now + 600),
        "wrong_audience": lambda: mint.token(scope, aud="https://other.example.org/fhir"),
        "wrong_issuer": lambda: mint.token(scope, iss="https://evil.example.org/realms/clinic"),
        "alg_none": lambda: mint.unsigned(scope),
        "hs256_with_public_key": lambda: mint.hs256_with_public_key(scope),
        "tampered_signature": lambda: mint.token(scope, key=stranger),
        "unknown_kid": lambda: mint.token(scope, kid="who-knows"),
        "no_exp": lambda: mint.token(scope, exp=None),
        "garbage": lambda: "not-a-jwt",
    }[case]()
    for method, path, body in (
        ("GET", "/Appointment?patient=5", None),
        ("POST", "/Appointment/$find", find_body("5")),
    ):
        resp = http.request(method, srv.base + path, json=body, headers=headers(token))
        oo = assert_refused(resp, 401, "login", "invalid_token")
        assert "invalid access token" in oo["issue"][0]["diagnostics"]


def test_issue11_1_tampered_payload_is_401(http: httpx.Client, srv: RunningApp, mint: Minter) -> None:
    header, body, sig = mint.token("user/Appointment.read").split(".")
    import base64
    import json

    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["scope"] = ALL
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    resp = http.get(f"{srv.base}/Patient/5", headers=headers(f"{header}.{forged}.{sig}"))
    assert_refused(resp, 401, "login", "invalid_token")


@pytest.mark.parametrize("alg", ["rsa", "es256", "es384"])
def test_issue11_1_rs256_es256_es384_tokens_are_accepted(
    http: httpx.Client, srv: RunningApp, mint: Minter, keys: dict[str, Any], alg: str
) -> None:
    resp = http.get(f"{srv.base}/Patient/5", headers=headers(mint.token(ALL, key=keys[alg])))
    assert resp.status_code == 200, resp.text
    assert resp.json()["id"] == "5"


def test_issue11_1_leeway_accepts_a_token_just_expired(http: httpx.Client, srv: RunningApp, mint: Minter) -> None:
    now = int(dt.datetime.now(dt.UTC).timestamp())
    resp = http.get(f"{srv.base}/Patient/5", headers=headers(mint.token(ALL, exp=now - 10)))
    assert resp.status_code == 200, resp.text


def test_issue11_1_unknown_kid_refetches_the_jwks_once_and_accepts_a_rotated_key(
    tmp_path: Path, db: Path, keys: dict[str, Any], http: httpx.Client
) -> None:
    jwks = JwksServer([keys["rsa"]])
    try:
        with running_app(tmp_path, f"sqlite:///{db}", jwks.url, security={"jwks_refresh_seconds": 0}) as app:
            mint = Minter(keys["rsa"], audience=app.base)
            assert http.get(f"{app.base}/Patient/5", headers=headers(mint.token(ALL))).status_code == 200
            assert jwks.fetches == 1
            assert http.get(f"{app.base}/Patient/5", headers=headers(mint.token(ALL))).status_code == 200
            assert jwks.fetches == 1  # cached
            rotated = rsa_key("rsa-2")
            jwks.keys.append(rotated)
            resp = http.get(f"{app.base}/Patient/5", headers=headers(mint.token(ALL, key=rotated)))
            assert resp.status_code == 200, resp.text
            assert jwks.fetches == 2
    finally:
        jwks.stop()


def test_issue11_1_unknown_kid_floods_do_not_hammer_the_authorization_server(
    tmp_path: Path, db: Path, keys: dict[str, Any], http: httpx.Client
) -> None:
    jwks = JwksServer([keys["rsa"]])
    try:
        with running_app(tmp_path, f"sqlite:///{db}", jwks.url, security={"jwks_refresh_seconds": 3600}) as app:
            mint = Minter(keys["rsa"], audience=app.base)
            for i in range(10):
                resp = http.get(f"{app.base}/Patient/5", headers=headers(mint.token(ALL, kid=f"made-up-{i}")))
                assert_refused(resp, 401, "login", "invalid_token")
            assert jwks.fetches == 1
    finally:
        jwks.stop()


# --------------------------------------------------------------------------------------------------
# Scopes per transaction
# --------------------------------------------------------------------------------------------------
FIND_OK = [
    "user/Appointment.read",
    "user/Appointment.rs",
    "system/Appointment.s",
    "user/Slot.read",
    "system/Schedule.rs",
]
FIND_NO = ["user/Appointment.write", "user/Appointment.cud", "user/Patient.read", "openid fhirUser"]
WRITE_OK = [
    "user/Appointment.write",
    "user/Appointment.c",
    "user/Appointment.u",
    "system/Appointment.*",
    "user/*.cruds",
]
WRITE_NO = ["user/Appointment.read", "user/Appointment.rs", "user/Slot.read", "user/Appointment.d"]
SEARCH_OK = ["user/Appointment.read", "user/Appointment.s", "system/Appointment.rs"]
SEARCH_NO = ["user/Appointment.r", "user/Appointment.write", "user/Appointment.rs?status=booked"]
READ_OK = ["user/Appointment.read", "user/Appointment.r", "system/*.read"]
READ_NO = ["user/Appointment.s", "user/Appointment.cu", "user/Patient.read"]


@pytest.mark.parametrize("scope", FIND_OK + FIND_NO)
def test_issue11_1_scopes_for_find(http: httpx.Client, srv: RunningApp, mint: Minter, scope: str) -> None:
    resp = post(http, f"{srv.base}/Appointment/$find", find_body("5"), mint.token(scope))
    if scope in FIND_OK:
        assert resp.status_code == 200, resp.text
    else:
        oo = assert_refused(resp, 403, "forbidden")
        assert "Appointment.r" in oo["issue"][0]["diagnostics"]


@pytest.mark.parametrize("scope", WRITE_OK + WRITE_NO)
def test_issue11_1_scopes_for_hold(http: httpx.Client, srv: RunningApp, mint: Minter, slots: Slots, scope: str) -> None:
    token = slots.take(http, srv, mint, "5")
    before = holds(srv)
    resp = post(
        http,
        f"{srv.base}/Appointment/$hold",
        params(ref("appointment-reference", f"Appointment/{token}")),
        mint.token(scope),
    )
    if scope in WRITE_OK:
        assert resp.status_code == 200, resp.text
    else:
        assert_refused(resp, 403, "forbidden")
        assert holds(srv) == before


@pytest.mark.parametrize("scope", WRITE_OK + WRITE_NO)
def test_issue11_1_scopes_for_book(
    http: httpx.Client, srv: RunningApp, db: Path, mint: Minter, slots: Slots, scope: str
) -> None:
    token = slots.take(http, srv, mint, "5")
    before = count_appts(db)
    resp = post(
        http,
        f"{srv.base}/Appointment/$book",
        params(ref("appointment-reference", f"Appointment/{token}")),
        mint.token(scope),
    )
    if scope in WRITE_OK:
        assert resp.status_code == 200, resp.text
        assert count_appts(db) == before + 1
    else:
        assert_refused(resp, 403, "forbidden")
        assert count_appts(db) == before


@pytest.mark.parametrize("scope", SEARCH_OK + SEARCH_NO)
def test_issue11_1_scopes_for_search(http: httpx.Client, srv: RunningApp, mint: Minter, scope: str) -> None:
    resp = http.get(f"{srv.base}/Appointment", params={"patient": "5"}, headers=headers(mint.token(scope)))
    post_resp = http.post(
        f"{srv.base}/Appointment/_search",
        content=b"patient=5",
        headers=headers(mint.token(scope), **{"Content-Type": "application/x-www-form-urlencoded"}),
    )
    for r in (resp, post_resp):
        if scope in SEARCH_OK:
            assert r.status_code == 200, r.text
            assert r.json()["total"] > 0
        else:
            assert_refused(r, 403, "forbidden")


@pytest.mark.parametrize("scope", READ_OK + READ_NO)
def test_issue11_1_scopes_for_read(http: httpx.Client, srv: RunningApp, db: Path, mint: Minter, scope: str) -> None:
    appt_id, _ = legacy_appt(db, "5")
    resp = http.get(f"{srv.base}/Appointment/{appt_id}", headers=headers(mint.token(scope)))
    if scope in READ_OK:
        assert resp.status_code == 200, resp.text
    else:
        assert_refused(resp, 403, "forbidden")


def test_issue11_1_actor_reads_need_their_own_scope(http: httpx.Client, srv: RunningApp, mint: Minter) -> None:
    assert (
        http.get(f"{srv.base}/Practitioner/SPEARSB", headers=headers(mint.token("user/Practitioner.read"))).status_code
        == 200
    )
    assert_refused(
        http.get(f"{srv.base}/Practitioner/SPEARSB", headers=headers(mint.token("user/Location.read"))),
        403,
        "forbidden",
    )
    assert http.get(f"{srv.base}/Location", headers=headers(mint.token("user/Location.rs"))).status_code == 200
    assert_refused(http.get(f"{srv.base}/Location", headers=headers(mint.token("user/Location.r"))), 403, "forbidden")


# --------------------------------------------------------------------------------------------------
# Patient context
# --------------------------------------------------------------------------------------------------
def mine(mint: Minter, patient: str = ME, **extra: Any) -> str:
    return mint.token(MINE, patient=patient, azp="patient-app", sub=f"patient-user-{patient}", **extra)


def test_issue11_1_patient_token_works_for_its_own_patient(
    http: httpx.Client, srv: RunningApp, db: Path, mint: Minter
) -> None:
    token = mine(mint)
    found = proposals(http, srv, token, ME)
    assert found
    first = found[0]["id"]
    resp = post(
        http, f"{srv.base}/Appointment/$hold", params(ref("appointment-reference", f"Appointment/{first}")), token
    )
    assert resp.status_code == 200, resp.text
    resp = post(
        http, f"{srv.base}/Appointment/$book", params(ref("appointment-reference", f"Appointment/{first}")), token
    )
    assert resp.status_code == 200, resp.text
    booked = next(e["resource"] for e in resp.json()["entry"] if e["resource"]["resourceType"] == "Appointment")
    assert row(db, int(booked["id"]))[1] == int(ME)
    assert http.get(f"{srv.base}/Appointment/{booked['id']}", headers=headers(token)).status_code == 200
    search = http.get(f"{srv.base}/Appointment", params={"patient": f"Patient/{ME}"}, headers=headers(token))
    assert search.status_code == 200 and search.json()["total"] > 0
    assert http.get(f"{srv.base}/Patient/{ME}", headers=headers(token)).status_code == 200
    cancel = {
        "resourceType": "Appointment",
        "id": booked["id"],
        "status": "cancelled",
        "participant": booked["participant"],
    }
    resp = post(
        http, f"{srv.base}/Appointment/$book", params({"name": "appointment-resource", "resource": cancel}), token
    )
    assert resp.status_code == 200, resp.text
    assert row(db, int(booked["id"]))[8] == "C"


def test_issue11_1_patient_token_find_for_another_patient_is_403(
    http: httpx.Client, srv: RunningApp, mint: Minter
) -> None:
    resp = post(http, f"{srv.base}/Appointment/$find", find_body(OTHER), mine(mint))
    assert_refused(resp, 403, "forbidden")
    body = find_body(None)
    body["parameter"].append({"name": "patient-resource", "resource": {"resourceType": "Patient", "id": OTHER}})
    assert_refused(post(http, f"{srv.base}/Appointment/$find", body, mine(mint)), 403, "forbidden")
    get = http.get(
        f"{srv.base}/Appointment/$find", params={"patient-reference": f"Patient/{OTHER}"}, headers=headers(mine(mint))
    )
    assert_refused(get, 403, "forbidden")


def test_issue11_1_patient_token_cannot_hold_or_book_another_patients_proposal(
    http: httpx.Client, srv: RunningApp, db: Path, mint: Minter, slots: Slots
) -> None:
    theirs = slots.take(http, srv, mint, OTHER)
    before_holds, before_appts = holds(srv), count_appts(db)
    token = mine(mint)
    hold = post(
        http, f"{srv.base}/Appointment/$hold", params(ref("appointment-reference", f"Appointment/{theirs}")), token
    )
    book = post(
        http, f"{srv.base}/Appointment/$book", params(ref("appointment-reference", f"Appointment/{theirs}")), token
    )
    a = assert_refused(hold, 403, "forbidden")
    b = assert_refused(book, 403, "forbidden")
    assert a["issue"][0]["diagnostics"] == b["issue"][0]["diagnostics"]
    # Booking an unrestricted proposal for somebody else, by naming them, is refused too.
    free = slots.take(http, srv, mint, None)
    other_patient = {"name": "patient-resource", "resource": {"resourceType": "Patient", "id": OTHER}}
    resp = post(
        http,
        f"{srv.base}/Appointment/$book",
        params(ref("appointment-reference", f"Appointment/{free}"), other_patient),
        token,
    )
    assert_refused(resp, 403, "forbidden")
    assert holds(srv) == before_holds and count_appts(db) == before_appts


def test_issue11_1_patient_token_cannot_cancel_or_reschedule_another_patients_appointment(
    http: httpx.Client, srv: RunningApp, db: Path, mint: Minter
) -> None:
    appt_id, before = legacy_appt(db, OTHER)
    token = mine(mint)
    cancel = {"resourceType": "Appointment", "id": str(appt_id), "status": "cancelled"}
    resp = post(
        http, f"{srv.base}/Appointment/$book", params({"name": "appointment-resource", "resource": cancel}), token
    )
    not_yours = assert_refused(resp, 403, "forbidden")["issue"][0]["diagnostics"]
    start = local_day(20).replace(hour=10)
    move = {
        "resourceType": "Appointment",
        "id": str(appt_id),
        "status": "booked",
        "start": start.isoformat(),
        "end": (start + dt.timedelta(minutes=30)).isoformat(),
        "participant": [{"actor": {"reference": "Practitioner/SPEARSB"}, "status": "accepted"}],
    }
    resp = post(
        http, f"{srv.base}/Appointment/$book", params({"name": "appointment-resource", "resource": move}), token
    )
    assert assert_refused(resp, 403, "forbidden")["issue"][0]["diagnostics"] == not_yours
    by_ref = post(
        http,
        f"{srv.base}/Appointment/$book",
        params(
            ref("appointment-reference", f"Appointment/{appt_id}"),
            {"name": "appointment-resource", "resource": {"resourceType": "Appointment", "status": "cancelled"}},
        ),
        token,
    )
    assert_refused(by_ref, 403, "forbidden")
    assert row(db, appt_id) == before  # nothing changed
    # An appointment that does not exist gets the very same answer: no probing.
    missing = {"resourceType": "Appointment", "id": "987654321", "status": "cancelled"}
    resp = post(
        http, f"{srv.base}/Appointment/$book", params({"name": "appointment-resource", "resource": missing}), token
    )
    assert assert_refused(resp, 403, "forbidden")["issue"][0]["diagnostics"] == not_yours


def test_issue11_1_patient_token_cannot_search_or_read_another_patient(
    http: httpx.Client, srv: RunningApp, db: Path, mint: Minter
) -> None:
    token = mine(mint)
    appt_id, _ = legacy_appt(db, OTHER)
    answers = [
        http.get(f"{srv.base}/Appointment", params={"patient": OTHER}, headers=headers(token)),
        http.get(f"{srv.base}/Appointment", params={"patient": f"{ME},{OTHER}"}, headers=headers(token)),
        http.get(f"{srv.base}/Appointment", params={"date": "ge2020-01-01"}, headers=headers(token)),
        http.get(f"{srv.base}/Appointment", params={"_id": str(appt_id)}, headers=headers(token)),
        http.post(
            f"{srv.base}/Appointment/_search",
            content=f"patient=Patient/{OTHER}".encode(),
            headers=headers(token, **{"Content-Type": "application/x-www-form-urlencoded"}),
        ),
        http.get(f"{srv.base}/Appointment/{appt_id}", headers=headers(token)),
        http.get(f"{srv.base}/Appointment/987654321", headers=headers(token)),
        http.get(f"{srv.base}/Patient/{OTHER}", headers=headers(token)),
        http.get(f"{srv.base}/Patient", params={"name": "a"}, headers=headers(token)),
    ]
    texts = set()
    for resp in answers:
        texts.add(assert_refused(resp, 403, "forbidden")["issue"][0]["diagnostics"])
    assert len(texts) == 1  # "not yours" and "does not exist" read the same


def test_issue11_1_patient_scopes_without_patient_claim_are_403(
    http: httpx.Client, srv: RunningApp, mint: Minter
) -> None:
    resp = http.get(f"{srv.base}/Appointment", params={"patient": ME}, headers=headers(mint.token(MINE)))
    assert_refused(resp, 403, "forbidden")


def test_issue11_1_user_scope_is_not_limited_by_a_patient_claim(
    http: httpx.Client, srv: RunningApp, mint: Minter
) -> None:
    token = mint.token("user/Appointment.read", patient=ME)
    resp = http.get(f"{srv.base}/Appointment", params={"patient": OTHER}, headers=headers(token))
    assert resp.status_code == 200 and resp.json()["total"] > 0


# --------------------------------------------------------------------------------------------------
# Hold ownership and idempotency follow the token, not a header
# --------------------------------------------------------------------------------------------------
def test_issue11_1_hold_ownership_uses_the_token_client_not_x_client_id(
    http: httpx.Client, srv: RunningApp, db: Path, mint: Minter, slots: Slots
) -> None:
    token = slots.take(http, srv, mint, "5")
    alice = mint.token("user/Appointment.write", azp="app-a", sub="alice")
    mallory = mint.token("user/Appointment.write", azp="app-m", sub="mallory")
    body = params(ref("appointment-reference", f"Appointment/{token}"))
    assert post(http, f"{srv.base}/Appointment/$hold", body, alice, **{"X-Client-Id": "shared"}).status_code == 200
    before = count_appts(db)
    stolen = post(http, f"{srv.base}/Appointment/$book", body, mallory, **{"X-Client-Id": "shared"})
    assert stolen.status_code == 409, stolen.text
    assert count_appts(db) == before
    own = post(http, f"{srv.base}/Appointment/$book", body, alice)
    assert own.status_code == 200, own.text


def test_issue11_1_idempotency_keys_are_scoped_to_the_token_principal(
    http: httpx.Client, srv: RunningApp, mint: Minter, slots: Slots
) -> None:
    first, second = slots.take(http, srv, mint, "5"), slots.take(http, srv, mint, "5")
    a = mint.token("user/Appointment.write", azp="app-a", sub="alice")
    b = mint.token("user/Appointment.write", azp="app-b", sub="bob")
    key = {"Idempotency-Key": "same-key", "X-Client-Id": "shared"}
    r1 = post(
        http, f"{srv.base}/Appointment/$hold", params(ref("appointment-reference", f"Appointment/{first}")), a, **key
    )
    r2 = post(
        http, f"{srv.base}/Appointment/$hold", params(ref("appointment-reference", f"Appointment/{second}")), b, **key
    )
    assert r1.status_code == 200 and r2.status_code == 200, (r1.text, r2.text)
    assert "idempotent-replayed" not in r2.headers


# --------------------------------------------------------------------------------------------------
# Opaque tokens: RFC 7662 introspection
# --------------------------------------------------------------------------------------------------
class IntrospectionServer:
    """The authorization server's introspection endpoint over real HTTP (HTTP Basic client auth)."""

    def __init__(self) -> None:
        from serverutil import ThreadServer
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        self.tokens: dict[str, dict[str, Any]] = {}
        self.calls = 0
        self.auth: list[str | None] = []

        async def introspect(request: Request) -> JSONResponse:
            self.calls += 1
            self.auth.append(request.headers.get("authorization"))
            form = dict(parse_qsl((await request.body()).decode()))  # python-multipart is no dependency
            answer = self.tokens.get(form.get("token", ""))
            return JSONResponse({"active": True, **answer} if answer else {"active": False})

        self.server = ThreadServer(
            Starlette(routes=[Route("/introspect", introspect, methods=["POST"])]), factory=False
        )
        self.url = self.server.start() + "/introspect"

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def opaque(tmp_path: Path, db: Path, jwks: JwksServer) -> Iterator[tuple[RunningApp, IntrospectionServer]]:
    introspection = IntrospectionServer()
    security = {
        "introspection_url": introspection.url,
        "introspection_client_id": "sched-adapter",
        "introspection_client_secret": "s3cret:with/odd chars",
    }
    try:
        with running_app(tmp_path, f"sqlite:///{db}", jwks.url, security=security) as app:
            yield app, introspection
    finally:
        introspection.stop()


def test_issue11_1_opaque_tokens_are_introspected(
    http: httpx.Client, opaque: tuple[RunningApp, IntrospectionServer], keys: dict[str, Any]
) -> None:
    import base64
    import time

    app, introspection = opaque
    exp = int(time.time()) + 300
    introspection.tokens["opaque-system"] = {
        "scope": ALL,
        "client_id": "backend",
        "iss": ISSUER,
        "aud": app.base,
        "exp": exp,
    }
    introspection.tokens["opaque-patient"] = {
        "scope": MINE,
        "client_id": "portal",
        "sub": "p5",
        "patient": ME,
        "exp": exp,
    }
    introspection.tokens["opaque-elsewhere"] = {"scope": ALL, "client_id": "x", "aud": "https://other/fhir", "exp": exp}
    introspection.tokens["opaque-expired"] = {"scope": ALL, "client_id": "x", "exp": int(time.time()) - 600}

    ok = http.get(f"{app.base}/Appointment", params={"patient": OTHER}, headers=headers("opaque-system"))
    assert ok.status_code == 200 and ok.json()["total"] > 0
    assert introspection.auth[0] == "Basic " + base64.b64encode(b"sched-adapter:s3cret%3Awith%2Fodd%20chars").decode()
    calls = introspection.calls
    assert http.get(f"{app.base}/Patient/5", headers=headers("opaque-system")).status_code == 200
    assert introspection.calls == calls  # an active answer is reused for a while

    mine_resp = http.get(f"{app.base}/Appointment", params={"patient": ME}, headers=headers("opaque-patient"))
    assert mine_resp.status_code == 200
    theirs = http.get(f"{app.base}/Appointment", params={"patient": OTHER}, headers=headers("opaque-patient"))
    assert_refused(theirs, 403, "forbidden")

    for token in ("unknown-token", "opaque-elsewhere", "opaque-expired"):
        assert_refused(http.get(f"{app.base}/Patient/5", headers=headers(token)), 401, "login", "invalid_token")
    # JWTs are still checked locally against the JWKS.
    jwt_ok = http.get(f"{app.base}/Patient/5", headers=headers(Minter(keys["rsa"], audience=app.base).token(ALL)))
    assert jwt_ok.status_code == 200
    smart = http.get(f"{app.base}/.well-known/smart-configuration").json()
    assert smart["introspection_endpoint"] == introspection.url


def test_issue11_1_patient_token_by_identifier(http: httpx.Client, srv: RunningApp, db: Path, mint: Minter) -> None:
    """Patients named by identifier (MRN) are resolved before the patient-context check."""
    system = "urn:sched-adapter:clinicware:mrn"
    mrn = {
        str(pid): str(m).strip()
        for pid, m in legacy_rows("sqlite", str(db), "SELECT PAT_ID, MRN FROM PATIENT WHERE PAT_ID IN (5, 7)")
    }
    token = mine(mint)

    def find_for(pid: str) -> httpx.Response:
        body = find_body(None)
        patient = {"resourceType": "Patient", "identifier": [{"system": system, "value": mrn[pid]}]}
        body["parameter"].append({"name": "patient-resource", "resource": patient})
        return post(http, f"{srv.base}/Appointment/$find", body, token)

    assert find_for(ME).status_code == 200
    assert_refused(find_for(OTHER), 403, "forbidden")
    own = http.get(
        f"{srv.base}/Appointment", params={"patient.identifier": f"{system}|{mrn[ME]}"}, headers=headers(token)
    )
    assert own.status_code == 200 and own.json()["total"] > 0
    theirs = http.get(
        f"{srv.base}/Appointment", params={"patient.identifier": f"{system}|{mrn[OTHER]}"}, headers=headers(token)
    )
    assert_refused(theirs, 403, "forbidden")
