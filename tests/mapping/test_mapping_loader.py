"""Mapping files: a bad mapping gets `file:line: key: what was expected`, all problems at once."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from adapter.mapping.codes import CodeTables, conceptmap_entries
from adapter.mapping.expressions import EvalContext, Expression, ExpressionError, render_template
from adapter.mapping.ids import InvalidKey, to_fhir_id, to_legacy_key
from adapter.mapping.loader import MappingError, load_mapping
from adapter.mapping.model import IdRule
from adapter.text import sql_bind_names

DEMO = Path(__file__).resolve().parents[2] / "mappings" / "demo.yaml"


def _broken(tmp_path: Path, old: str, new: str) -> Path:
    text = DEMO.read_text()
    assert old in text, old
    path = tmp_path / "broken.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


def _line_of(path: Path, needle: str) -> int:
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if needle in line:
            return n
    raise AssertionError(needle)


def test_demo_mapping_loads() -> None:
    m = load_mapping(DEMO)
    assert m.doc.system.timezone == "America/New_York"


def test_unknown_key_is_reported_with_file_line_and_key(tmp_path: Path) -> None:
    path = _broken(tmp_path, "  identifier_base:", "  identifer_base: x\n  identifier_base:")
    with pytest.raises(MappingError) as exc:
        load_mapping(path)
    assert f"{path}:{_line_of(path, 'identifer_base')}: system.identifer_base: unknown key" in exc.value.problems[0]


def test_missing_required_key_is_reported(tmp_path: Path) -> None:
    path = _broken(tmp_path, "    key: PROV_ID\n", "")
    with pytest.raises(MappingError) as exc:
        load_mapping(path)
    problem = exc.value.problems[0]
    assert re.match(rf"{re.escape(str(path))}:\d+: actors\.Practitioner\.key: required key is missing", problem), (
        problem
    )


def test_unknown_converter_is_reported(tmp_path: Path) -> None:
    path = _broken(tmp_path, 'weekday: "{DAY_OF_WEEK|int}"', 'weekday: "{DAY_OF_WEEK|integer}"')
    with pytest.raises(MappingError) as exc:
        load_mapping(path)
    problem = exc.value.problems[0]
    assert problem.startswith(
        f"{path}:{_line_of(path, 'DAY_OF_WEEK|integer')}: availability.working_time.fields.weekday:"
    )
    assert "unknown converter 'integer'" in problem and "expected one of" in problem


def test_unknown_code_table_is_reported(tmp_path: Path) -> None:
    path = _broken(tmp_path, "code?:sex}", "code?:gender}")
    with pytest.raises(MappingError) as exc:
        load_mapping(path)
    assert any("code table 'gender', which is not declared under 'codes'" in p for p in exc.value.problems)


def test_bad_time_zone_and_bad_bind_are_both_reported(tmp_path: Path) -> None:
    path = _broken(tmp_path, "timezone: America/New_York", "timezone: America/Nowhere")
    path.write_text(path.read_text().replace("EFF_FROM <= :to_date", "EFF_FROM <= :too_date", 1))
    with pytest.raises(MappingError) as exc:
        load_mapping(path)
    joined = "\n".join(exc.value.problems)
    assert f"{path}:{_line_of(path, 'America/Nowhere')}: system.timezone: expected an IANA time zone" in joined
    assert "availability.working_time.sql: unknown bind parameter :too_date" in joined


def test_wrong_type_is_reported(tmp_path: Path) -> None:
    path = _broken(tmp_path, "slot_step_minutes: 10", "slot_step_minutes: ten")
    with pytest.raises(MappingError) as exc:
        load_mapping(path)
    assert f"{path}:{_line_of(path, 'slot_step_minutes')}: visit_types.slot_step_minutes:" in exc.value.problems[0]


def test_yaml_syntax_error_is_reported_with_line(tmp_path: Path) -> None:
    path = _broken(tmp_path, "codes:\n", "codes:\n  bad: [unclosed\n")
    with pytest.raises(MappingError) as exc:
        load_mapping(path)
    assert exc.value.problems[0].startswith(f"{path}:")


def test_expressions_convert_legacy_shapes() -> None:
    ctx = EvalContext(ZoneInfo("America/New_York"), CodeTables())
    start = Expression("{D,T|local_datetime:yyyymmdd,hhmm}").evaluate({"D": 20270115, "T": 930}, ctx)
    ny = ZoneInfo("America/New_York")
    assert start.tzinfo == dt.UTC
    assert start.astimezone(ny).isoformat() == "2027-01-15T09:30:00-05:00"
    end_of_day = Expression("{D,T|local_datetime:yyyymmdd,hhmm}").evaluate({"D": "20270115", "T": 2400}, ctx)
    assert end_of_day.astimezone(ny).isoformat() == "2027-01-16T00:00:00-05:00"
    iso = Expression("{D,T|local_datetime:date,time}").evaluate({"D": "2027-07-01", "T": dt.timedelta(hours=8)}, ctx)
    assert iso.astimezone(ny).isoformat() == "2027-07-01T08:00:00-04:00"
    assert Expression("{W|to_yyyymmdd}").evaluate({"W": start}, ctx) == 20270115
    assert Expression("{W|to_hhmm}").evaluate({"W": start}, ctx) == 930
    assert Expression("{A|trim} {B|trim}").evaluate({"A": " Beth ", "B": None}, ctx) == "Beth"
    assert Expression("{A|default:x}").evaluate({"A": None}, ctx) == "x"
    assert Expression("{S|seconds}").evaluate({"S": 900}, ctx) == dt.timedelta(minutes=15)


def test_expression_errors_are_clear() -> None:
    with pytest.raises(ExpressionError, match="unknown converter"):
        Expression("{A|nope}")
    with pytest.raises(ExpressionError, match="no column or value named 'B'"):
        Expression("{B}").evaluate({"A": 1}, EvalContext(ZoneInfo("UTC"), CodeTables()))


def test_templates_drop_null_elements() -> None:
    from adapter.mapping.expressions import compile_template

    t = compile_template({"name": [{"family": "{L}", "given": ["{F}"]}], "gender": "{G}"})
    out = render_template(t, {"L": "Spears", "F": None, "G": None}, EvalContext(ZoneInfo("UTC"), CodeTables()))
    assert out == {"name": [{"family": "Spears"}]}


@pytest.mark.parametrize(
    ("rule", "key", "fhir_id"),
    [
        (IdRule(trim=True, pad_right=8), "SPEARSB ", "SPEARSB"),
        (IdRule(key_type="int"), 42, "42"),
        (IdRule(encode="hex"), "A/B 1", "x412f422031"),
    ],
)
def test_req_115_28_legacy_keys_map_reversibly_to_fhir_ids(rule: IdRule, key: object, fhir_id: str) -> None:
    assert to_fhir_id(rule, key) == fhir_id
    assert to_legacy_key(rule, fhir_id) == key


def test_keys_that_cannot_be_fhir_ids_are_refused() -> None:
    with pytest.raises(InvalidKey):
        to_fhir_id(IdRule(), "has space")
    with pytest.raises(InvalidKey):
        to_legacy_key(IdRule(trim=True, pad_right=4), "TOOLONG")


def test_code_tables_from_a_conceptmap() -> None:
    cm = {
        "resourceType": "ConceptMap",
        "group": [
            {
                "source": "urn:legacy",
                "target": "http://snomed.info/sct",
                "element": [{"code": "CARD", "target": [{"code": "394579002", "display": "Cardiology"}]}],
            }
        ],
    }
    entries = conceptmap_entries(cm)
    assert entries == {"CARD": {"system": "http://snomed.info/sct", "code": "394579002", "display": "Cardiology"}}


def test_sql_bind_names_ignore_literals() -> None:
    assert sql_bind_names("SELECT ':x' FROM T WHERE A = :a AND B::text = :b") == ["a", "b"]


def test_issue7_8_code_table_fallback_is_validated_with_file_line(tmp_path: Path) -> None:
    marker = "    reverse: {booked: S, cancelled: C, arrived: A, fulfilled: D, noshow: N}\n"
    path = _broken(tmp_path, marker, marker + "    fallback: {display: no code}\n")
    with pytest.raises(MappingError) as exc:
        load_mapping(path)
    line = _line_of(path, "fallback: {display")
    assert any(
        p.startswith(f"{path}:{line}: codes.appointment_status.fallback: expected a FHIR code")
        for p in exc.value.problems
    ), exc.value.problems


def test_issue7_8_code_table_fallback_translates_missing_codes(tmp_path: Path) -> None:
    marker = "    reverse: {booked: S, cancelled: C, arrived: A, fulfilled: D, noshow: N}\n"
    mapping = load_mapping(_broken(tmp_path, marker, marker + "    fallback: entered-in-error\n"))
    from adapter.mapping.codes import fallback_notes

    with fallback_notes() as notes:
        assert mapping.codes.to_fhir("appointment_status", "Z") == "entered-in-error"
        assert mapping.codes.to_fhir("appointment_status", "S") == "booked"
    assert len(notes) == 1 and "'Z'" in notes[0]


def test_issue7_1_patient_lock_needs_exactly_the_patient_key_bind(tmp_path: Path) -> None:
    old = "    sql: SELECT PAT_ID FROM PATIENT WHERE PAT_ID = :patient_key\n"
    path = _broken(tmp_path, old, "    sql: SELECT PAT_ID FROM PATIENT WHERE PAT_ID = :patient\n")
    with pytest.raises(MappingError) as exc:
        load_mapping(path)
    assert any("writes.patient_lock.sql: expected exactly one bind, :patient_key" in p for p in exc.value.problems)
