"""The same mapping serves SQLite and the production databases: $find over real PostgreSQL and MariaDB
(ODBC) gives exactly the answer the embedded SQLite gives for the same seeded data."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from apputil import appointments, local_midnight, make_app, parameters
from conformance import assert_avail_bundle
from starlette.testclient import TestClient

from adapter.demo.seed import ensure_demo_database


def _find(app) -> dict:
    start = local_midnight(1)
    body = parameters(
        ("start", "valueDateTime", start.isoformat()),
        ("end", "valueDateTime", (start + dt.timedelta(days=14)).isoformat()),
        ("practitioner", "valueReference", {"reference": "Practitioner/SPEARSB"}),
        ("practitioner", "valueReference", {"reference": "Practitioner/OKAFORC"}),
        ("_count", "valueInteger", 500),
    )
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/fhir/Appointment/$find", json=body)
        assert r.status_code == 200, r.text
        assert c.get("/fhir/Practitioner/SPEARSB").json()["id"] == "SPEARSB"
        assert c.get("/fhir/Patient/2").json()["name"][0]["family"] == "Muñoz"
    assert_avail_bundle(r.json())
    return r.json()


def _shape(bundle: dict) -> list[tuple]:
    return [
        (a["start"], a["end"], tuple(p["actor"]["reference"] for p in a["participant"])) for a in appointments(bundle)
    ]


@pytest.fixture(scope="module")
def sqlite_answer(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("parity")
    path = folder / "demo.sqlite"
    ensure_demo_database(path, today=dt.date.today())
    return _find(make_app(folder, f"sqlite:///{path}"))


@pytest.mark.parametrize("kind", ["postgresql", "mariadb"])
def test_find_over_odbc_matches_sqlite(
    kind: str, sqlite_answer: dict, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    dsn = request.getfixturevalue("pg_demo_dsn" if kind == "postgresql" else "mariadb_demo_dsn")
    bundle = _find(make_app(tmp_path, "odbc:" + dsn))
    assert bundle["total"] == sqlite_answer["total"] > 0
    assert _shape(bundle) == _shape(sqlite_answer)
