"""Issue 13 item 5: the rules several layers need exist once (adapter/text.py, adapter/r4.py)."""

from __future__ import annotations

import sqlite3

from adapter.backends.sql import db as sql_db, search as sql_search
from adapter.backends.sql.db import sql_fold_function
from adapter.fhir import read as fhir_read
from adapter.hl7v2 import mapping as hl7v2_mapping
from adapter.mapping import ids, loader
from adapter.mapping.expressions import EvalContext, compile_template
from adapter.r4 import APPOINTMENT_STATUSES, FHIR_ID
from adapter.text import SQL_NAMED_BIND, fold, sql_bind_names


def test_issue13_5_fold_is_accent_and_case_insensitive() -> None:
    assert fold("Ångström ÉCOLE straße") == "angstrom ecole strasse"
    assert fold("Ｆｕｌｌ") == "full"  # NFKD: compatibility forms too


def test_issue13_5_mapping_fold_converter_and_sqlite_function_agree_with_fold() -> None:
    from zoneinfo import ZoneInfo

    from adapter.mapping.codes import CodeTables

    ctx = EvalContext(ZoneInfo("UTC"), CodeTables({}))
    template = compile_template("{name|fold}")
    for text in ("Zoë Ölund", "JOSÉ", "naïve café"):
        assert template.evaluate({"name": text}, ctx) == fold(text)
        assert sql_fold_function(text) == fold(text)
    conn = sqlite3.connect(":memory:")
    try:
        conn.create_function("SCHED_FOLD", 1, sql_fold_function, deterministic=True)
        assert conn.execute("SELECT SCHED_FOLD(?)", ("Zoë",)).fetchone() == (fold("Zoë"),)
    finally:
        conn.close()


def test_issue13_5_sql_bind_names_skip_literals_and_casts() -> None:
    assert sql_bind_names("SELECT ':x', a::text FROM T WHERE A = :a AND B = 'it''s :y' AND C = :c_1") == ["a", "c_1"]


def test_issue13_5_sql_backend_binds_with_the_shared_pattern() -> None:
    assert sql_db.SQL_NAMED_BIND is SQL_NAMED_BIND and sql_search.SQL_NAMED_BIND is SQL_NAMED_BIND
    compiled = sql_db.compile_sql("SELECT ':x', a::text FROM T WHERE A = :a AND B = 'it''s :y' AND C IN (:c_1)")
    assert compiled.order == ("a", "c_1")


def test_issue13_5_one_fhir_id_pattern_and_one_status_value_set() -> None:
    assert ids.FHIR_ID is FHIR_ID and fhir_read.FHIR_ID is FHIR_ID
    assert loader.APPOINTMENT_STATUSES is APPOINTMENT_STATUSES
    assert hl7v2_mapping.APPOINTMENT_STATUSES is APPOINTMENT_STATUSES
    assert FHIR_ID.match("a-B.9" * 12 + "abcd") and not FHIR_ID.match("a" * 65) and not FHIR_ID.match("a_b")
