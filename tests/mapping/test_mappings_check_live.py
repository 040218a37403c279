"""``sched-adapter mappings check MAPPING --config CONFIG``: the live check (adapter/tools/check.py).

Deliberately broken copies of each shipped mapping (demo.yaml on SQLite, PostgreSQL and MariaDB;
openemr.yaml on MariaDB) must be reported with the file, the line of the key and a message that
names the mistake; a broken mapping never lets the server start. Nothing is mocked.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pyodbc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dbutil
import openemrutil
from apputil import make_settings

from adapter.cli import main
from adapter.demo.seed import ensure_demo_database
from adapter.mapping.loader import MappingError, load_mapping
from adapter.server import build_app
from adapter.tools.check import live_check

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "mappings" / "demo.yaml"
OPENEMR = REPO / "mappings" / "openemr.yaml"
SCRIPT = Path(sys.executable).parent / "sched-adapter"


def line_of(path: Path, section: str, key: str) -> int:
    """The line of ``key`` (e.g. ``sql:``) that follows the line holding ``section`` (e.g. ``  busy:``)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next(i for i, text in enumerate(lines) if text.rstrip() == section)
    return next(i for i in range(start, len(lines)) if lines[i].strip().startswith(key)) + 1


def broken_copy(tmp_path: Path, source: Path, old: str, new: str, name: str = "broken.yaml") -> Path:
    text = source.read_text(encoding="utf-8")
    assert old in text, old
    path = tmp_path / name
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path


def config_for(tmp_path: Path, mapping: Path, url: str) -> Path:
    path = tmp_path / "adapter.toml"
    path.write_text(
        f"""[server]
host = "127.0.0.1"
port = 0
log_level = "warning"
[backend]
mapping = '{mapping}'
database_url = '{url}'
[state]
path = "state.sqlite"
[security]
auth = "off"
signing_secret = "check-test-secret-0123456789"
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture(params=["sqlite", dbutil.POSTGRESQL, dbutil.MARIADB])
def demo_url(request: pytest.FixtureRequest, tmp_path: Path, fresh_db: Callable[..., str]) -> Iterator[str]:
    if request.param == "sqlite":
        path = tmp_path / "demo.sqlite"
        ensure_demo_database(path, today=dt.date.today())
        yield f"sqlite:///{path}"
    else:
        yield "odbc:" + fresh_db(request.param, "check", seed=True)


@pytest.fixture
def openemr_url(fresh_db: Callable[..., str]) -> str:
    dsn = fresh_db(dbutil.MARIADB, "check_openemr")
    openemrutil.load_and_seed(dsn, dt.date.today())
    return "odbc:" + dsn


def legacy_execute(url: str, sql: str) -> None:
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url[len("sqlite:///") :])
        conn.execute(sql)
        conn.commit()
        conn.close()
        return
    conn = pyodbc.connect(url[len("odbc:") :], autocommit=True)
    conn.execute(sql)
    conn.close()


def test_issue9_2_shipped_mappings_pass_the_live_check(
    demo_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["mappings", "check", str(DEMO), "--config", str(config_for(tmp_path, DEMO, demo_url))]) == 0
    assert "OK against the live database" in capsys.readouterr().out


@pytest.mark.openemr
def test_issue9_2_openemr_mapping_passes_the_live_check(openemr_url: str, tmp_path: Path) -> None:
    result = live_check(load_mapping(OPENEMR), openemr_url, codes=True)
    assert result.lines == []


def test_issue9_2_demo_mistakes_are_reported_with_file_and_line(
    demo_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An unknown column, an unknown table, a select returning too few columns, an unmapped status code.
    path = broken_copy(tmp_path, DEMO, "APPT_TM, DUR_MIN FROM APPT", "APPT_TM, DUR_MINS FROM APPT")
    path.write_text(
        path.read_text(encoding="utf-8")
        .replace("FROM PROV_BLOCK", "FROM PROV_BLOCKS", 1)
        .replace(
            "SELECT PROV_ID, LAST_NM, FIRST_NM, TITLE, SPEC_CD, NPI, HOME_FAC",
            "SELECT PROV_ID, LAST_NM, FIRST_NM, TITLE, SPEC_CD, HOME_FAC",
            1,
        ),
        encoding="utf-8",
    )
    legacy_execute(
        demo_url,
        "INSERT INTO APPT (APPT_ID, PAT_ID, PROV_ID, FAC_ID, APPT_DT, APPT_TM, DUR_MIN, TYPE_CD, STATUS_CD, BOOKED_BY, "
        "CREATED_TS) VALUES (990001, 1, 'SPEARSB ', 1, 20240105, 900, 20, 'FOLLOW', 'Q', 'LEGACY', '20240101000000')",
    )
    code = main(["mappings", "check", str(path), "--config", str(config_for(tmp_path, path, demo_url))])
    err = capsys.readouterr().err.splitlines()
    assert code == 1
    busy = f"{path}:{line_of(path, '  busy:', 'sql:')}: availability.busy.sql: the database refused the query: "
    absences = (
        f"{path}:{line_of(path, '  absences:', 'sql:')}: availability.absences.sql: the database refused the query: "
    )
    npi_line = line_of(path, "  Practitioner:", '- {system: "http://hl7.org/fhir/sid/us-npi"')
    status_line = line_of(path, "  fields:", 'status: "{STATUS_CD')
    npi = f"{path}:{npi_line}: "
    status = f"{path}:{status_line}: appointments.fields.status: warning: "
    assert any(line.startswith(busy) and "DUR_MINS".lower() in line.lower() for line in err), err
    assert any(line.startswith(absences) and "PROV_BLOCKS".lower() in line.lower() for line in err), err
    assert any(
        line.startswith(npi)
        and "actors.Practitioner.resource.identifier.0.value: column 'NPI' is not returned by actors.Practitioner.select"
        in line
        for line in err
    ), err
    assert any(line.startswith(status) and "legacy code 'Q' of column STATUS_CD (1 row)" in line for line in err), err
    ident = f"{path}:{line_of(path, '  Practitioner:', 'identifier_filters:') + 1}: "
    assert any(line.startswith(ident) and "identifier_filters" in line and "npi" in line.lower() for line in err), err
    assert len(err) == 5, err
    # The alias and the server: the same mistakes, and no start.
    assert main(["check-mapping", str(path), "--config", str(config_for(tmp_path, path, demo_url))]) == 1
    with pytest.raises(MappingError) as refused:
        build_app(make_settings(tmp_path, demo_url, backend={"mapping": str(path)}))
    assert any("availability.busy.sql" in p for p in refused.value.problems)
    assert not any("warning" in p for p in refused.value.problems)  # data warnings do not stop a server


def test_issue9_2_write_statements_are_checked_without_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "demo.sqlite"
    ensure_demo_database(db, today=dt.date.today())
    url = f"sqlite:///{db}"
    before = sqlite3.connect(db).execute("SELECT COUNT(*), MAX(APPT_ID) FROM APPT").fetchone()
    path = broken_copy(tmp_path, DEMO, "UPDATE APPT SET STATUS_CD = :status", "UPDATE APPT SET STATUS_CODE = :status")
    path.write_text(path.read_text().replace("VALUES (:new_id, :patient_key,", "VALUES (:new_id, :patient_id,"))
    assert main(["mappings", "check", str(path), "--config", str(config_for(tmp_path, path, url))]) == 1
    err = capsys.readouterr().err.splitlines()
    cancel = f"{path}:{line_of(path, '  cancel:', 'sql:')}: writes.cancel.sql: the database refused the statement: "
    book = f"{path}:{line_of(path, '  book:', 'sql:')}: writes.book.sql: no value for bind parameter :patient_id"
    assert any(line.startswith(cancel) and "STATUS_CODE" in line for line in err), err
    assert any(line.startswith(book) for line in err), err
    assert sqlite3.connect(db).execute("SELECT COUNT(*), MAX(APPT_ID) FROM APPT").fetchone() == before


@pytest.mark.openemr
def test_issue9_2_openemr_mistakes_are_reported_with_file_and_line(openemr_url: str, tmp_path: Path) -> None:
    path = broken_copy(
        tmp_path,
        OPENEMR,
        "e.pc_startTime, e.pc_recurrtype, e.pc_recurrspec\n",
        "e.pc_startTme, e.pc_recurrtype, e.pc_recurrspec\n",
    )
    path.write_text(
        path.read_text(encoding="utf-8")
        .replace("FROM patient_data", "FROM patient_datas", 1)
        .replace("e.pc_startTime, e.pc_endTime, e.pc_duration,", "e.pc_startTime, e.pc_duration,", 1),
        encoding="utf-8",
    )
    dsn = openemr_url[len("odbc:") :]
    with pyodbc.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO openemr_postcalendar_events (pc_catid, pc_multiple, pc_aid, pc_pid, pc_eventDate, pc_startTime, "
            "pc_endTime, pc_duration, pc_apptstatus, pc_eventstatus, pc_facility) "
            "VALUES (5, 0, '5', '1', '2024-01-05', '09:00:00', '09:15:00', 900, 'ZZ', 1, 1)"
        )
        conn.execute(
            "INSERT INTO openemr_postcalendar_events (pc_catid, pc_multiple, pc_aid, pc_pid, pc_eventDate, pc_startTime, "
            "pc_endTime, pc_duration, pc_apptstatus, pc_eventstatus, pc_facility) "
            "VALUES (5, 0, '5', '2', '2024-01-06', '09:00:00', '09:15:00', 900, 'ZZ', 1, 1)"
        )
    result = live_check(load_mapping(path), openemr_url, codes=True)
    working = f"{path}:{line_of(path, '  working_time:', 'sql:')}: availability.working_time.sql: the database refused the query: "
    patients = (
        f"{path}:{line_of(path, '  Patient:', 'select:')}: actors.Patient.select: the database refused the query: "
    )
    end_line = line_of(path, "  fields:", 'end: "{pc_eventDate,pc_endTime')
    status_line = line_of(path, "  fields:", 'status: "{pc_apptstatus')
    end = f"{path}:{end_line}: appointments.fields.end: column 'pc_endTime' is not returned by appointments.select"
    status = (
        f"{path}:{status_line}: appointments.fields.status: warning: legacy code 'ZZ' of column pc_apptstatus (2 rows)"
    )
    assert any(e.startswith(working) and "pc_startTme" in e for e in result.errors), result.errors
    assert any(e.startswith(patients) and "patient_datas" in e for e in result.errors), result.errors
    assert any(e.startswith(end) for e in result.errors), result.errors
    assert any(w.startswith(status) for w in result.warnings), result.warnings


def test_issue9_2_broken_mapping_never_lets_the_server_start(tmp_path: Path) -> None:
    db = tmp_path / "demo.sqlite"
    ensure_demo_database(db, today=dt.date.today())
    path = broken_copy(tmp_path, DEMO, "SELECT FAC_ID, FAC_NAME, ADDR1", "SELECT FAC_ID, FAC_NAM, ADDR1")
    config = config_for(tmp_path, path, f"sqlite:///{db}")
    proc = subprocess.run(
        [str(SCRIPT), "serve", "--config", str(config)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode != 0
    assert (
        f"{path}:{line_of(path, '  Location:', 'select:')}: actors.Location.select: the database refused the query"
        in proc.stderr
    )


def test_issue9_5_allowed_statuses_are_fhir_statuses_on_reschedule_and_cancel_only(tmp_path: Path) -> None:
    path = broken_copy(
        tmp_path,
        OPENEMR,
        "    allowed_statuses: [booked, pending]   # not once the patient arrived or was checked out\n",
        "    allowed_statuses: [booked, checked-out]\n",
    )
    with pytest.raises(MappingError) as exc:
        load_mapping(path)
    assert any(
        p.startswith(f"{path}:")
        and "writes.reschedule.allowed_statuses: 'checked-out' is not a FHIR AppointmentStatus" in p
        for p in exc.value.problems
    ), exc.value.problems
