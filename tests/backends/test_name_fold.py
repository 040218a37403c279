"""Accent- and case-insensitive name search pushed into SQL: ``FOLD(col) LIKE :name_fold_prefix`` in a
mapping's name filter, folded per dialect (``system.sql_fold``, defaults in adapter/backends/sql/backend.py).

With the demo's ``UPPER(LAST_NM) LIKE :name_prefix`` SQLite cannot narrow "angstrom" to "Ångström" (its
UPPER() folds ASCII only, and the prefix keeps only its ASCII part); with FOLD() it can, on every engine.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pyodbc
import pytest
from dbutil import POSTGRESQL

from adapter.backends.protocol import ActorQuery
from adapter.backends.sql.backend import SqlBackend, apply_fold
from adapter.backends.sql.db import Database
from adapter.demo.seed import ensure_demo_database
from adapter.mapping.loader import MappingError, load_mapping

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "mappings" / "demo.yaml"
UPPER_FILTER = "name: (UPPER(LAST_NM) LIKE :name_prefix OR UPPER(FIRST_NM) LIKE :name_prefix)"
FOLD_FILTER = "name: (FOLD(LAST_NM) LIKE :name_fold_prefix OR FOLD(FIRST_NM) LIKE :name_fold_prefix)"
INSERT = (
    "INSERT INTO PATIENT (PAT_ID, MRN, LAST_NM, FIRST_NM, SEX) VALUES "
    "(90001, 'MRN90001', 'Ångström', 'Zoë', 'F'), (90002, 'MRN90002', 'Öztürk', 'Şebnem', 'F')"
)
# PostgreSQL without the unaccent extension: translate() the accented letters the data uses.
PG_FOLD = "translate(lower({}), 'åäáàâãéèêëíìîïóòôöõúùûüñçşÿý', 'aaaaaaeeeeiiiiooooouuuuncsyy')"


def mapping_copy(tmp_path: Path, name_filter: str, sql_fold: str | None = None) -> Path:
    text = DEMO.read_text(encoding="utf-8")
    patient = text.index("  Patient:")
    at = text.index(UPPER_FILTER, patient)
    text = text[:at] + name_filter + text[at + len(UPPER_FILTER) :]
    if sql_fold:
        text = text.replace(
            "  identifier_base: urn:sched-adapter:clinicware\n",
            f'  identifier_base: urn:sched-adapter:clinicware\n  sql_fold: {{postgresql: "{sql_fold}"}}\n',
        )
    path = tmp_path / "demo-fold.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def search(mapping: Path, url: str, name: str) -> list[str]:
    backend = SqlBackend(load_mapping(mapping), Database(url))

    async def go() -> list[str]:
        try:
            return sorted(a.id for a in await backend.find_actors(ActorQuery("Patient", name=name)))
        finally:
            await backend.close()

    return asyncio.run(go())


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    path = tmp_path / "demo.sqlite"
    ensure_demo_database(path, today=dt.date.today())
    with sqlite3.connect(path) as conn:
        conn.execute(INSERT)
    return f"sqlite:///{path}"


def test_issue9_5_fold_finds_accented_names_on_sqlite(sqlite_url: str, tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    plain = mapping_copy(upper, UPPER_FILTER)
    assert search(plain, sqlite_url, "angstrom") == []  # the old filter narrows the accent away
    folded = mapping_copy(tmp_path, FOLD_FILTER)
    assert search(folded, sqlite_url, "angstrom") == ["90001"]
    assert search(folded, sqlite_url, "ÅNGS") == ["90001"]
    assert search(folded, sqlite_url, "ozturk") == ["90002"]
    assert search(folded, sqlite_url, "sebnem") == ["90002"]
    assert search(folded, sqlite_url, "_") == []  # wildcards in the input match literally


def test_issue9_5_fold_declared_per_dialect_on_postgresql(tmp_path: Path, fresh_db: Callable[..., str]) -> None:
    dsn = fresh_db(POSTGRESQL, "fold", seed=True)
    with pyodbc.connect(dsn, autocommit=True) as conn:
        conn.execute(INSERT)
    default = mapping_copy(tmp_path, FOLD_FILTER)  # PostgreSQL's default fold: lower() + translate()
    assert search(default, "odbc:" + dsn, "angstrom") == ["90001"]
    assert search(default, "odbc:" + dsn, "ÅNGS") == ["90001"]
    assert search(default, "odbc:" + dsn, "OZTURK") == ["90002"]
    assert search(default, "odbc:" + dsn, "sebnem") == ["90002"]
    declared = tmp_path / "declared"
    declared.mkdir()
    case_only = mapping_copy(declared, FOLD_FILTER, "lower({})")  # a declared fold replaces the default
    assert search(case_only, "odbc:" + dsn, "angstrom") == []
    assert search(case_only, "odbc:" + dsn, "ozt") == []


def test_issue9_5_fold_rules() -> None:
    assert apply_fold("UPPER(X) LIKE :name_prefix", {}, "sqlite", "sqlite3") == "UPPER(X) LIKE :name_prefix"
    assert apply_fold("fold( A.LAST_NM ) LIKE :p", {}, "sqlite", "sqlite3") == "SCHED_FOLD(A.LAST_NM) LIKE :p"
    assert apply_fold("FOLD(N) LIKE :p", {}, "mariadb", "pyodbc") == "LOWER(N) LIKE :p"
    assert apply_fold("FOLD(N) LIKE :p", {}, "postgresql", "pyodbc").startswith("translate(lower(N), 'àáâãäå")
    assert apply_fold("FOLD(N) LIKE :p", {"postgresql": "lower(unaccent({}))"}, "postgresql", "pyodbc") == (
        "lower(unaccent(N)) LIKE :p"
    )


def test_issue9_5_sql_fold_must_hold_one_placeholder(tmp_path: Path) -> None:
    bad = mapping_copy(tmp_path, FOLD_FILTER, "lower(x)")
    with pytest.raises(MappingError) as exc:
        load_mapping(bad)
    assert any(
        "system.sql_fold.postgresql: expected an SQL expression with exactly one {}" in p for p in exc.value.problems
    )
