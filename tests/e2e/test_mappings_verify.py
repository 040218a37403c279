"""``sched-adapter mappings verify --config CONFIG`` (adapter/tools/verify.py): the acceptance run of a mapping.

It must pass for the shipped mappings on every engine (demo.yaml on SQLite, PostgreSQL and MariaDB;
openemr.yaml on MariaDB) and fail, naming the mistake, for a copy of the demo mapping whose busy
query does not see booked rows. Each run starts the real application and writes to the database
given (a fresh copy per test).
"""

from __future__ import annotations

import datetime as dt
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
[state]
path = "state.sqlite"
[security]
auth = "off"
signing_secret = "verify-test-secret-0123456789"
""",
        encoding="utf-8",
    )
    return path


def demo_url(kind: str, tmp_path: Path, fresh_db: Callable[..., str]) -> str:
    if kind == "sqlite":
        path = tmp_path / "demo.sqlite"
        ensure_demo_database(path, today=dt.date.today())
        return f"sqlite:///{path}"
    return "odbc:" + fresh_db(kind, "verify", seed=True)


def rows_of(out: str) -> dict[str, str]:
    """check name -> result, from the printed table."""
    table: dict[str, str] = {}
    for line in out.splitlines()[2:]:
        parts = line.split("  ")
        cells = [p.strip() for p in parts if p.strip()]
        if len(cells) >= 2 and cells[1] in ("PASS", "FAIL", "SKIP"):
            table[cells[0]] = cells[1]
    return table


@pytest.mark.parametrize("kind", ["sqlite", dbutil.POSTGRESQL, dbutil.MARIADB])
def test_issue9_3_verify_passes_for_the_demo_mapping(
    kind: str, tmp_path: Path, fresh_db: Callable[..., str], capsys: pytest.CaptureFixture[str]
) -> None:
    url = demo_url(kind, tmp_path, fresh_db)
    code = main(["mappings", "verify", "--config", str(config_for(tmp_path, DEMO, url))])
    out = capsys.readouterr().out
    assert code == 0, out
    table = rows_of(out)
    assert table == {
        "live check": "PASS",
        "find: working time, busy time": "PASS",
        "book/read/search/reschedule/cancel": "PASS",
        "race: 20 clients, one slot": "PASS",
        "DST days": "PASS",
        "conformance (R4 + IHE)": "PASS",
    }, out
    assert out.rstrip().endswith("all checks passed")


@pytest.mark.openemr
def test_issue9_3_verify_passes_for_the_openemr_mapping(
    tmp_path: Path, fresh_db: Callable[..., str], capsys: pytest.CaptureFixture[str]
) -> None:
    dsn = fresh_db(dbutil.MARIADB, "verify_openemr")
    openemrutil.load_and_seed(dsn, dt.date.today())
    code = main(["mappings", "verify", "--config", str(config_for(tmp_path, OPENEMR, "odbc:" + dsn))])
    out = capsys.readouterr().out
    assert code == 0, out
    assert set(rows_of(out).values()) == {"PASS"}, out
    # The race and the round trip left OpenEMR's table as they found it: every row they wrote is cancelled.
    written = dbutil.legacy_rows(
        "odbc", dsn, "SELECT pc_apptstatus FROM openemr_postcalendar_events WHERE pc_informant LIKE 'verify%'"
    )
    assert written and {r[0] for r in written} == {"x"}


def test_issue9_3_verify_fails_clearly_when_busy_ignores_booked_rows(
    tmp_path: Path, fresh_db: Callable[..., str], capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "demo-busy-ignores-booked.yaml"
    text = DEMO.read_text(encoding="utf-8")
    assert "AND STATUS_CD IN ('S', 'A', 'D', 'N')" in text
    broken.write_text(text.replace("AND STATUS_CD IN ('S', 'A', 'D', 'N')", "AND STATUS_CD IN ('A', 'D', 'N')"))
    url = demo_url("sqlite", tmp_path, fresh_db)
    code = main(["mappings", "verify", "--config", str(config_for(tmp_path, broken, url))])
    out = capsys.readouterr().out
    assert code == 1, out
    table = rows_of(out)
    assert table["live check"] == "PASS"  # structurally fine: only an acceptance run can see this mistake
    assert table["book/read/search/reschedule/cancel"] == "FAIL"
    trip = next(line for line in out.splitlines() if line.startswith("book/read/search/reschedule/cancel"))
    assert (
        "after $book the busy query sees 0 appointment(s)" in trip and "does busy list the status book writes?" in trip
    )
    assert table["race: 20 clients, one slot"] == "FAIL"  # and the race double-books
    assert out.rstrip().endswith("check(s) failed")


def test_issue9_3_verify_of_a_read_only_mapping_skips_the_writes(
    tmp_path: Path, fresh_db: Callable[..., str], capsys: pytest.CaptureFixture[str]
) -> None:
    text = DEMO.read_text(encoding="utf-8")
    read_only = tmp_path / "demo-read-only.yaml"
    read_only.write_text(text[: text.index("\nwrites:")] + "\n", encoding="utf-8")
    url = demo_url("sqlite", tmp_path, fresh_db)
    code = main(["mappings", "verify", "--config", str(config_for(tmp_path, read_only, url))])
    out = capsys.readouterr().out
    assert code == 0, out
    table = rows_of(out)
    assert table["book/read/search/reschedule/cancel"] == "SKIP" and table["race: 20 clients, one slot"] == "SKIP"
    assert table["find: working time, busy time"] == "PASS"
