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


_CALLS: list[object] = []


def counting_converter(value: object, ctx: object) -> object:
    _CALLS.append(value)
    return value


def test_issue14_3_rows_are_mapped_once_per_distinct_input_and_equal_per_row_evaluation() -> None:
    import datetime as dt
    from zoneinfo import ZoneInfo

    from adapter.backends.sql.backend import _map_rows
    from adapter.mapping.codes import CodeTables
    from adapter.mapping.expressions import EvalContext, Expression

    ctx = EvalContext(ZoneInfo("America/New_York"), CodeTables())
    fields = [
        ("practitioner", Expression("{PROV_ID|trim}")),
        ("start", Expression("{APPT_DT,APPT_TM|local_datetime:yyyymmdd,hhmm}")),
        ("minutes", Expression("{DUR_MIN|int}")),
        ("tagged", Expression(f"{{DUR_MIN|python:{__name__}.counting_converter}}")),
    ]
    rows = [{"PROV_ID": "A  ", "APPT_DT": 20261101, "APPT_TM": 130 + 100 * (i % 2), "DUR_MIN": "15"} for i in range(6)]
    _CALLS.clear()
    mapped = _map_rows(rows, fields, ctx)
    assert mapped == [{name: e.evaluate(r, ctx) for name, e in fields} for r in rows]
    assert mapped[0]["start"] != mapped[1]["start"] == mapped[3]["start"]  # across the fall-back night
    assert mapped[0]["start"].tzinfo is not None and isinstance(mapped[0]["start"], dt.datetime)
    assert len(_CALLS) == 6 + 6  # python: converters run for every row (here and in the comparison above)
