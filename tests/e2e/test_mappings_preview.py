"""``sched-adapter mappings preview MAPPING --config CONFIG`` (adapter/tools/preview.py): the FHIR resources a
mapping produces from the live database, each validated (R4 schema + IHE profiles), problems flagged."""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dbutil
import openemrutil

from adapter.cli import main
from adapter.demo.seed import ensure_demo_database

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "mappings" / "demo.yaml"
OPENEMR = REPO / "mappings" / "openemr.yaml"


def config_for(tmp_path: Path, mapping: Path, url: str) -> Path:
    path = tmp_path / "adapter.toml"
    path.write_text(
        f"""[backend]
mapping = '{mapping}'
database_url = '{url}'
[security]
auth = "off"
signing_secret = "preview-test-secret-0123456789"
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def demo_db(tmp_path: Path) -> str:
    path = tmp_path / "demo.sqlite"
    ensure_demo_database(path, today=dt.date.today())
    return f"sqlite:///{path}"


def test_issue9_4_preview_prints_actors_slots_and_appointments(
    demo_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = config_for(tmp_path, DEMO, demo_db)
    code = main(
        ["mappings", "preview", str(DEMO), "--config", str(config), "--practitioner", "SPEARSB", "--patient", "7"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Practitioner/SPEARSB  [OK]" in out and "Patient/7  [OK]" in out and "Location/1  [OK]" in out
    assert "name[0].family                           Spears" in out
    assert "proposed slot(s)" in out and "existing appointments:" in out
    assert out.rstrip().endswith("every resource is valid")
    # JSON: the same content, machine-readable.
    code = main(["mappings", "preview", str(DEMO), "--config", str(config), "--practitioner", "SPEARSB", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["validated"] is True
    assert doc["actors"][0]["resource"]["id"] == "SPEARSB"
    assert doc["proposals"]["appointments"] and all(
        a["resource"]["status"] == "proposed" and a["problems"] == [] for a in doc["proposals"]["appointments"]
    )
    assert dt.date.fromisoformat(doc["date"]) > dt.date.today() - dt.timedelta(days=1)


def test_issue9_4_preview_flags_invalid_elements(
    demo_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "demo-bad-gender.yaml"
    text = DEMO.read_text(encoding="utf-8")
    assert 'gender: "{SEX|trim|code?:sex}"' in text
    broken.write_text(text.replace('gender: "{SEX|trim|code?:sex}"', 'gender: "{SEX|trim}"'))  # 'M' is no FHIR gender
    code = main(
        ["mappings", "preview", str(broken), "--config", str(config_for(tmp_path, broken, demo_db)), "--patient", "7"]
    )
    out = capsys.readouterr().out
    assert code == 1, out
    patient = out[out.index("Patient/7") :]
    assert patient.startswith("Patient/7  [1 PROBLEM(S)]")
    flagged = [line for line in patient.splitlines() if line.startswith("  !! ")]
    assert flagged and "gender" in flagged[0], flagged
    assert out.rstrip().endswith("1 resource(s) flagged")


@pytest.mark.openemr
def test_issue9_4_preview_of_openemr_shows_status_symbols(
    tmp_path: Path, fresh_db: Callable[..., str], capsys: pytest.CaptureFixture[str]
) -> None:
    dsn = fresh_db(dbutil.MARIADB, "preview_openemr")
    days = openemrutil.load_and_seed(dsn, dt.date.today())
    config = config_for(tmp_path, OPENEMR, "odbc:" + dsn)
    argv = [
        "mappings",
        "preview",
        str(OPENEMR),
        "--config",
        str(config),
        "--practitioner",
        "5",
        "--date",
        days["w1"].isoformat(),
    ]
    code = main([*argv, "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0, doc
    assert doc["date"] == days["w1"].isoformat()
    statuses = sorted(a["resource"]["status"] for a in doc["appointments"])
    assert statuses == [
        "arrived",
        "booked",
        "cancelled",
        "cancelled",
        "fulfilled",
        "noshow",
        "pending",
    ]  # + patient 1's past visit
    locations = [x["resource"] for x in doc["actors"] if x["resource"]["resourceType"] == "Location"]
    assert [loc["name"] for loc in locations] == ["Main Street Clinic"]
