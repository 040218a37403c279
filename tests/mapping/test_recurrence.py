"""OpenEMR recurrence as a mapping function (adapter/mapping/recurrence.py): pure, so tested without a database."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from adapter.mapping.codes import CodeTables
from adapter.mapping.expressions import EvalContext, Expression, ExpressionError
from adapter.mapping.recurrence import openemr_dates, php_unserialize

D = dt.date


def spec(**values: str) -> str:
    keys = {
        "event_repeat_freq": "0",
        "event_repeat_freq_type": "0",
        "event_repeat_on_num": "1",
        "event_repeat_on_day": "0",
        "event_repeat_on_freq": "0",
    } | values
    body = "".join(f's:{len(k)}:"{k}";s:{len(v)}:"{v}";' for k, v in keys.items())
    return f"a:{len(keys)}:{{{body}}}"


def test_issue9_1_php_unserialize_reads_openemr_recurrspec() -> None:
    text = (
        'a:6:{s:17:"event_repeat_freq";s:1:"1";s:22:"event_repeat_freq_type";s:1:"4";s:19:"event_repeat_on_num";'
        's:1:"1";s:19:"event_repeat_on_day";s:1:"0";s:20:"event_repeat_on_freq";s:1:"0";s:6:"exdate";s:0:"";}'
    )
    assert php_unserialize(text) == {
        "event_repeat_freq": "1",
        "event_repeat_freq_type": "4",
        "event_repeat_on_num": "1",
        "event_repeat_on_day": "0",
        "event_repeat_on_freq": "0",
        "exdate": "",
    }
    assert php_unserialize('a:2:{i:0;i:5;s:1:"x";N;}') == {0: 5, "x": None}
    assert php_unserialize('s:5:"Müll";') == "Müll"  # lengths count UTF-8 bytes
    with pytest.raises(ExpressionError):
        php_unserialize('a:1:{s:3:"abc"')


def test_issue9_1_no_repeat_is_the_event_date_only() -> None:
    assert openemr_dates(D(2026, 12, 2), None, 0, None, D(2026, 12, 1), D(2026, 12, 31)) == [D(2026, 12, 2)]
    assert openemr_dates(D(2026, 11, 2), None, 0, None, D(2026, 12, 1), D(2026, 12, 31)) == []


def test_issue9_1_repeat_every_n_days_weeks_months_years() -> None:
    every_2_days = spec(event_repeat_freq="2", event_repeat_freq_type="0")
    assert openemr_dates(D(2026, 12, 1), None, 1, every_2_days, D(2026, 12, 4), D(2026, 12, 9)) == [
        D(2026, 12, 5),
        D(2026, 12, 7),
        D(2026, 12, 9),
    ]
    weekly = spec(event_repeat_freq="1", event_repeat_freq_type="1")
    assert openemr_dates(D(2026, 11, 2), D(2026, 11, 23), 1, weekly, D(2026, 11, 1), D(2026, 12, 31)) == [
        D(2026, 11, 2),
        D(2026, 11, 9),
        D(2026, 11, 16),
        D(2026, 11, 23),
    ]
    monthly = spec(event_repeat_freq="1", event_repeat_freq_type="2")
    assert openemr_dates(D(2026, 1, 31), None, 1, monthly, D(2026, 1, 1), D(2026, 5, 31)) == [
        D(2026, 1, 31),
        D(2026, 3, 31),
        D(2026, 5, 31),
    ]
    yearly = spec(event_repeat_freq="1", event_repeat_freq_type="3")
    assert openemr_dates(D(2024, 3, 1), None, 1, yearly, D(2025, 1, 1), D(2026, 12, 31)) == [
        D(2025, 3, 1),
        D(2026, 3, 1),
    ]


def test_issue9_1_repeat_every_work_day_with_exdate() -> None:
    rule = spec(event_repeat_freq="1", event_repeat_freq_type="4", exdate="20261202,20261207")
    got = openemr_dates(D(2026, 11, 2), None, 1, rule, D(2026, 11, 30), D(2026, 12, 8))
    assert got == [D(2026, 11, 30), D(2026, 12, 1), D(2026, 12, 3), D(2026, 12, 4), D(2026, 12, 8)]


def test_issue9_1_repeat_on_nth_weekday_of_month() -> None:
    second_tuesday = spec(event_repeat_on_num="2", event_repeat_on_day="2", event_repeat_on_freq="1")
    assert openemr_dates(D(2026, 10, 13), None, 2, second_tuesday, D(2026, 10, 1), D(2026, 12, 31)) == [
        D(2026, 10, 13),
        D(2026, 11, 10),
        D(2026, 12, 8),
    ]
    last_friday_quarterly = spec(event_repeat_on_num="5", event_repeat_on_day="5", event_repeat_on_freq="3")
    assert openemr_dates(D(2026, 1, 30), None, 2, last_friday_quarterly, D(2026, 1, 1), D(2026, 12, 31)) == [
        D(2026, 1, 30),
        D(2026, 4, 24),
        D(2026, 7, 31),
        D(2026, 10, 30),
    ]


def test_issue9_1_repeat_on_days_of_the_week() -> None:
    mon_wed_fri = spec(event_repeat_freq="2,4,6", event_repeat_freq_type="6")  # 1 = Sunday
    got = openemr_dates(D(2026, 11, 1), D(2026, 12, 4), 3, mon_wed_fri, D(2026, 11, 30), D(2026, 12, 10))
    assert got == [D(2026, 11, 30), D(2026, 12, 2), D(2026, 12, 4)]  # ends on pc_endDate


def test_issue9_1_unsupported_recurrence_is_an_error_not_silence() -> None:
    with pytest.raises(ExpressionError, match="pc_recurrtype 7"):
        openemr_dates(D(2026, 1, 1), None, 7, spec(), D(2026, 1, 1), D(2026, 1, 31))
    with pytest.raises(ExpressionError, match="event_repeat_freq_type 9"):
        openemr_dates(D(2026, 1, 1), None, 1, spec(event_repeat_freq_type="9"), D(2026, 1, 1), D(2026, 1, 31))


def test_issue9_1_repeat_expression_from_a_mapping_uses_the_window_in_the_zone() -> None:
    zone = ZoneInfo("America/New_York")
    ctx = EvalContext(zone=zone, codes=CodeTables())
    expr = Expression(
        "{pc_eventDate,END_DATE,pc_recurrtype,pc_recurrspec,window_start,window_end"
        "|python:adapter.mapping.recurrence.openemr_occurrences}"
    )
    row = {
        "pc_eventDate": D(2026, 11, 2),
        "END_DATE": None,
        "pc_recurrtype": 1,
        "pc_recurrspec": spec(event_repeat_freq="1", event_repeat_freq_type="0"),
        # 2026-12-03 00:30 UTC is still 2 December in New York: the day before that is included too.
        "window_start": dt.datetime(2026, 12, 3, 0, 30, tzinfo=dt.UTC),
        "window_end": dt.datetime(2026, 12, 3, 23, 0, tzinfo=dt.UTC),
    }
    assert expr.evaluate(row, ctx) == [D(2026, 12, 1), D(2026, 12, 2), D(2026, 12, 3)]
