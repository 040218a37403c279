"""Issue 14.3: rows from engines that fold column names (PostgreSQL: lower case) are renamed once to
the mapping's spelling, so expressions find their columns directly instead of scanning each row."""

from __future__ import annotations

from adapter.backends.sql.backend import _in_mapping_case


def test_issue14_3_folded_column_names_are_renamed_to_the_mappings_spelling() -> None:
    rows = [{"appt_id": 1, "prov_id": "A", "extra": 3}, {"appt_id": 2, "prov_id": "B", "extra": 4}]
    out = _in_mapping_case(rows, {"APPT_ID", "PROV_ID", "window_start"})
    assert out == [{"APPT_ID": 1, "PROV_ID": "A", "extra": 3}, {"APPT_ID": 2, "PROV_ID": "B", "extra": 4}]


def test_issue14_3_rows_already_in_the_mappings_spelling_are_returned_as_they_are() -> None:
    rows = [{"APPT_ID": 1}]
    assert _in_mapping_case(rows, {"APPT_ID", "occurrence"}) is rows
    assert _in_mapping_case([], {"APPT_ID"}) == []
