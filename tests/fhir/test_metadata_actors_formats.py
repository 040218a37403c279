"""CapabilityStatement, participant resources, JSON/XML negotiation, backend outages, settings."""

from __future__ import annotations

import datetime as dt
import socket
from pathlib import Path

import pytest
from apputil import appointments, local_midnight, make_app, parameters
from conformance import assert_avail_bundle, assert_operation_outcome, assert_r4
from starlette.testclient import TestClient

from adapter.demo.seed import ensure_demo_database
from adapter.fhir.xml import resource_to_xml, xml_to_resource
from adapter.settings import SettingsError, load_settings

IHE = "https://profiles.ihe.net/ITI/Scheduling"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("meta")
    path = folder / "demo.sqlite"
    ensure_demo_database(path, today=dt.date.today())
    with TestClient(make_app(folder, f"sqlite:///{path}"), raise_server_exceptions=False) as c:
        yield c


def test_req_gen_01_to_13_capability_statement(client: TestClient) -> None:
    r = client.get("/fhir/metadata")
    assert r.status_code == 200
    cs = r.json()
    assert_r4(cs)
    assert (cs["kind"], cs["fhirVersion"], cs["rest"][0]["mode"]) == ("instance", "4.0.1", "server")
    assert cs["instantiates"] == [f"{IHE}/CapabilityStatement/IHE.Scheduling.server"]
    assert set(cs["format"]) == {"application/fhir+json", "application/fhir+xml"}
    appt = next(res for res in cs["rest"][0]["resource"] if res["type"] == "Appointment")
    assert appt["profile"] == f"{IHE}/StructureDefinition/ihe-sched-appt"
    assert {i["code"] for i in appt["interaction"]} >= {"read"}
    ops = {o["name"]: o["definition"] for o in appt["operation"]}
    assert ops == {
        "find": f"{IHE}/OperationDefinition/appointment-find",
        "hold": f"{IHE}/OperationDefinition/appointment-hold",
        "book": f"{IHE}/OperationDefinition/appointment-book",
    }
    bundle = next(res for res in cs["rest"][0]["resource"] if res["type"] == "Bundle")
    assert bundle["profile"] == f"{IHE}/StructureDefinition/ihe-sched-avail-bundle"
    assert "off" in cs["rest"][0]["security"]["description"].lower()  # REQ-SEC-05: says auth is off


def test_req_gen_05_format_parameter_wins_over_accept(client: TestClient) -> None:
    r = client.get("/fhir/metadata?_format=xml", headers={"Accept": "application/fhir+json"})
    assert r.headers["content-type"].startswith("application/fhir+xml")
    assert xml_to_resource(r.content)["resourceType"] == "CapabilityStatement"
    r = client.get("/fhir/metadata", headers={"Accept": "application/fhir+xml"})
    assert r.headers["content-type"].startswith("application/fhir+xml")
    assert client.get("/fhir/metadata").headers["content-type"].startswith("application/fhir+json")


def test_req_gen_04_find_with_xml_body_and_xml_answer(client: TestClient) -> None:
    start = local_midnight(1)
    body = resource_to_xml(
        parameters(
            ("start", "valueDateTime", start.isoformat()),
            ("end", "valueDateTime", (start + dt.timedelta(days=3)).isoformat()),
            ("practitioner", "valueReference", {"reference": "Practitioner/SPEARSB"}),
        )
    )
    r = client.post(
        "/fhir/Appointment/$find",
        content=body,
        headers={"Content-Type": "application/fhir+xml", "Accept": "application/fhir+xml"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/fhir+xml")
    bundle = xml_to_resource(r.content)
    assert_avail_bundle(bundle)
    assert appointments(bundle)


def test_malformed_xml_is_400_structure(client: TestClient) -> None:
    r = client.post(
        "/fhir/Appointment/$find",
        content=b"<Parameters xmlns='http://hl7.org/fhir'><oops",
        headers={"Content-Type": "application/fhir+xml"},
    )
    assert r.status_code == 400
    assert r.json()["issue"][0]["code"] == "structure"


def test_xxe_is_refused(client: TestClient) -> None:
    evil = b'<?xml version="1.0"?><!DOCTYPE p [<!ENTITY x SYSTEM "file:///etc/passwd">]><Parameters xmlns="http://hl7.org/fhir"/>'
    r = client.post("/fhir/Appointment/$find", content=evil, headers={"Content-Type": "application/fhir+xml"})
    assert r.status_code == 400 and "passwd" not in r.text


@pytest.mark.parametrize("kind", ["Practitioner", "Location", "Patient"])
def test_participants_can_be_read_and_searched(client: TestClient, kind: str) -> None:
    bundle = client.get(f"/fhir/{kind}", params={"_count": "3"}).json()
    assert bundle["type"] == "searchset" and bundle["entry"]
    first = bundle["entry"][0]["resource"]
    assert_r4(first)
    read = client.get(f"/fhir/{kind}/{first['id']}")
    assert read.status_code == 200 and read.json() == first
    by_id = client.get(f"/fhir/{kind}", params={"_id": first["id"]}).json()
    assert [e["resource"]["id"] for e in by_id["entry"]] == [first["id"]]
    if first.get("identifier"):
        ident = first["identifier"][0]
        by_ident = client.get(f"/fhir/{kind}", params={"identifier": f"{ident['system']}|{ident['value']}"}).json()
        assert [e["resource"]["id"] for e in by_ident["entry"]] == [first["id"]]
    assert client.get(f"/fhir/{kind}/NOPE-404").status_code == 404


def test_name_search_and_non_ascii_names(client: TestClient) -> None:
    found = client.get("/fhir/Patient", params={"name": "muñ"}).json()
    assert any(e["resource"]["name"][0]["family"] == "Muñoz" for e in found.get("entry", []))
    spears = client.get("/fhir/Practitioner", params={"name": "spe"}).json()
    assert any(e["resource"]["id"] == "SPEARSB" for e in spears["entry"])


def test_req_gen_21_unreachable_legacy_database_is_503_transient(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    url = f"odbc:DRIVER={{PostgreSQL Unicode}};SERVER=127.0.0.1;PORT={dead_port};DATABASE=x;UID=postgres;PWD="
    app = make_app(tmp_path, url, backend={"timeout_seconds": 2})
    with TestClient(app, raise_server_exceptions=False) as c:
        start = local_midnight(1)
        r = c.post(
            "/fhir/Appointment/$find",
            json=parameters(
                ("start", "valueDateTime", start.isoformat()),
                ("end", "valueDateTime", (start + dt.timedelta(days=1)).isoformat()),
            ),
        )
    assert r.status_code == 503
    assert r.headers["retry-after"] == "5"
    oo = r.json()
    assert_operation_outcome(oo)
    assert oo["issue"][0]["code"] == "transient"
    assert "Traceback" not in r.text


def test_settings_from_file_and_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[backend]\nmapping = "m.yaml"\ndatabase_url = "sqlite:///db.sqlite"\n[security]\nauth = "off"\n'
        'signing_secret = "0123456789abcdef0"\n[hold]\nttl_seconds = 60\n'
    )
    s = load_settings(cfg, {"SCHED_HOLD__TTL_SECONDS": "90", "SCHED_SERVER__PORT": "9999"})
    assert s.hold.ttl_seconds == 90 and s.server.port == 9999 and s.find.default_window_days == 14
    assert s.backend.mapping == tmp_path / "m.yaml"
    assert s.backend.database_url == f"sqlite:///{tmp_path / 'db.sqlite'}"
    with pytest.raises(SettingsError, match=r"hold\.ttl_seconds \(SCHED_HOLD__TTL_SECONDS\)"):
        load_settings(cfg, {"SCHED_HOLD__TTL_SECONDS": "soon"})
    with pytest.raises(SettingsError, match="signing_secret"):
        load_settings(
            None,
            {
                "SCHED_BACKEND__MAPPING": "x",
                "SCHED_BACKEND__DATABASE_URL": "sqlite:///x",
                "SCHED_SECURITY__AUTH": "off",
            },
        )
