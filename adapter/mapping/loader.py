"""Load a mapping file: YAML -> validated document -> compiled ``Mapping``.

Every problem is reported as ``file:line: dotted.key: what was expected`` so an IT team can fix a
mapping without reading Python. All problems found are reported at once (``MappingError.problems``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ValidationError

from adapter.mapping.codes import CodeTable, CodeTables, conceptmap_entries
from adapter.mapping.expressions import EvalContext, Expression, ExpressionError, compile_template
from adapter.mapping.model import APPOINTMENT_FILTERS, MappingDocument
from adapter.r4 import APPOINTMENT_STATUSES
from adapter.text import sql_bind_names


class MappingError(ValueError):
    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid mapping:\n  " + "\n  ".join(problems))


@dataclass(slots=True)
class Mapping:
    """A loaded mapping: the validated document plus compiled expressions and code tables."""

    path: Path
    doc: MappingDocument
    codes: CodeTables
    ctx: EvalContext
    compiled: dict[str, Any]  # dotted key -> compiled expression / template

    def expr(self, dotted: str) -> Any:
        return self.compiled[dotted]

    def has(self, dotted: str) -> bool:
        return dotted in self.compiled


# --- YAML with line numbers ---------------------------------------------------------------------

# Where a value sits in the document: mapping keys and sequence indexes from the root.
_Loc = tuple[str | int, ...]
# Reports one problem at a location.
_Fail = Callable[[_Loc, str], None]
_Doc = TypeVar("_Doc", bound=BaseModel)


def _construct(node: yaml.Node, path: _Loc, lines: dict[_Loc, int]) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            lines[path + (key,)] = key_node.start_mark.line + 1
            out[key] = _construct(value_node, path + (key,), lines)
            lines[path + (key,)] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, path + (i,), lines) for i, item in enumerate(node.value)]
    # Scalars: the safe constructor decides the type (int, bool, null, str) from the resolved tag.
    return yaml.constructor.SafeConstructor().construct_object(node)


def _line_for(lines: dict[_Loc, int], loc: _Loc) -> int:
    for n in range(len(loc), -1, -1):
        if tuple(loc[:n]) in lines:
            return lines[tuple(loc[:n])]
    return 1


def _dotted(loc: _Loc) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def read_document(path: Path, model: type[_Doc]) -> tuple[_Doc, dict[_Loc, int]]:
    """A mapping file read, parsed and validated against ``model``, with the line of every location.

    Shared by the SQL and the HL7v2 mapping loaders, so both report problems as ``file:line: key: what``.
    """
    display = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MappingError([f"{display}: cannot read mapping file: {exc.strerror}"]) from exc
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise MappingError([f"{display}:{line}: (YAML syntax): {getattr(exc, 'problem', exc)}"]) from exc
    if root is None:
        raise MappingError([f"{display}:1: (top level): expected a mapping document, the file is empty"])
    lines: dict[_Loc, int] = {}
    data = _construct(root, (), lines)

    try:
        return model.model_validate(data), lines
    except ValidationError as exc:
        invalid: list[str] = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "literal["))))
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key (not part of the mapping format; check the spelling)"
            elif err["type"] == "missing":
                msg = "required key is missing"
            invalid.append(f"{display}:{_line_for(lines, loc)}: {_dotted(loc)}: {msg}")
        raise MappingError(invalid) from None


def load_mapping(path: str | Path) -> Mapping:
    path = Path(path)
    display = str(path)
    doc, lines = read_document(path, MappingDocument)

    problems: list[str] = []

    def fail(loc: _Loc, msg: str) -> None:
        problems.append(f"{display}:{_line_for(lines, loc)}: {_dotted(loc)}: {msg}")

    for dialect, template in doc.system.sql_fold.items():
        if template.count("{}") != 1:
            fail(("system", "sql_fold", dialect), "expected an SQL expression with exactly one {} for the column")
    try:
        zone = ZoneInfo(doc.system.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        fail(
            ("system", "timezone"),
            f"expected an IANA time zone name such as America/New_York, got {doc.system.timezone!r}",
        )
        zone = ZoneInfo("UTC")

    tables: dict[str, CodeTable] = {}
    for name, spec in doc.codes.items():
        entries = dict(spec.entries or {})
        if spec.conceptmap:
            cm_path = path.parent / spec.conceptmap
            try:
                entries.update(conceptmap_entries(json.loads(cm_path.read_text(encoding="utf-8"))))
            except (OSError, ValueError, KeyError) as exc:
                fail(("codes", name, "conceptmap"), f"expected a readable FHIR ConceptMap JSON file: {exc}")
        if not entries:
            fail(("codes", name), "expected 'entries' or 'conceptmap' with at least one code")
        for legacy, target in entries.items():
            if not _valid_target(target):
                fail(
                    ("codes", name, "entries", legacy),
                    "expected a FHIR code (string), a coding {system, code[, display]} or a list of codings",
                )
        if spec.fallback is not None and not _valid_target(spec.fallback):
            fail(
                ("codes", name, "fallback"),
                "expected a FHIR code (string), a coding {system, code[, display]} or a list of codings",
            )
        tables[name] = CodeTable.build(name, entries, spec.reverse, spec.fallback)
    codes = CodeTables(tables)
    ctx = EvalContext(zone=zone, codes=codes)

    compiled: dict[str, Any] = {}

    def compile_at(loc: _Loc, value: Any) -> None:
        try:
            template = compile_template(value)
        except ExpressionError as exc:
            fail(loc, f"bad expression: {exc}")
            return
        for expr in _expressions(template):
            for table in _code_tables_used(expr.source):
                if table not in tables:
                    fail(
                        loc,
                        f"expression {expr.source!r} uses code table {table!r}, which is not declared under 'codes'",
                    )
        compiled[_dotted(loc)] = template

    def compile_mapping(loc: _Loc, values: dict[str, Any]) -> None:
        for key, value in values.items():
            compile_at(loc + (key,), value)

    for kind, actor in doc.actors.items():
        base: _Loc = ("actors", kind)
        compile_mapping(base + ("fields",), actor.fields)
        compile_at(base + ("resource",), actor.resource)
        if "display" not in actor.fields:
            fail(base + ("fields",), "expected a 'display' field (the text shown in references)")
        if actor.resource.get("resourceType") != kind:
            fail(base + ("resource", "resourceType"), f"expected resourceType {kind!r}")
        _check_binds(fail, base + ("select",), actor.select, set())
        for name, cond in actor.filters.items():
            allowed = {"keys"} if name == "key" else {"name_prefix", "name_fold_prefix"}
            _check_binds(fail, base + ("filters", name), cond, allowed)
        for system, cond in actor.identifier_filters.items():
            _check_binds(fail, base + ("identifier_filters", system), cond, {"values"})

    vt = doc.visit_types
    compile_mapping(("visit_types", "fields"), vt.fields)
    compile_at(("visit_types", "codings"), vt.codings)
    compile_at(("visit_types", "service_types"), vt.service_types)

    window_vars = {"window_start", "window_end", "practitioner_keys", "location_keys"}
    av = doc.availability
    for section in ("working_time", "absences", "busy"):
        spec = getattr(av, section)
        if spec is None:
            continue
        base = ("availability", section)
        compile_mapping(base + ("fields",), spec.fields)
        compile_mapping(base + ("binds",), spec.binds)
        if spec.repeat is not None:
            compile_at(base + ("repeat",), spec.repeat)
        _check_binds(fail, base + ("sql",), spec.sql, set(spec.binds) | {"practitioner_keys", "location_keys"})
        _check_expr_inputs(fail, base + ("binds",), compiled, spec.binds, window_vars)
    required = {
        "weekly": {"practitioner", "location", "weekday", "start_time", "end_time"},
        "free_slots": {"practitioner", "location", "start", "end"},
        "markers": {"practitioner", "location", "marker", "start"},
    }[av.working_time.kind]
    missing = required - set(av.working_time.fields)
    if missing:
        fail(
            ("availability", "working_time", "fields"),
            f"kind {av.working_time.kind!r} needs field(s) {sorted(missing)}",
        )
    for section in ("absences", "busy"):
        spec = getattr(av, section)
        if spec is not None:
            if section == "absences" and "date" in spec.fields:
                need = {"practitioner"}  # a date-only absence: the whole local day
            else:
                need = {"practitioner", "start"} | ({"end"} if "minutes" not in spec.fields else set())
            missing = need - set(spec.fields)
            if missing:
                fail(
                    ("availability", section, "fields"),
                    f"expected field(s) {sorted(missing)} (or 'minutes' instead of 'end')",
                )

    ap = doc.appointments
    base = ("appointments",)
    compile_mapping(base + ("fields",), ap.fields)
    compile_mapping(base + ("binds",), ap.binds)
    compile_at(base + ("identifier",), ap.identifier)
    _check_binds(fail, base + ("select",), ap.select, set())
    for name, cond in ap.filters.items():
        engine_binds = APPOINTMENT_FILTERS[name]
        _check_binds(fail, base + ("filters", name), cond, set(ap.binds) if engine_binds is None else engine_binds)
    _check_expr_inputs(fail, base + ("binds",), compiled, ap.binds, {"bound"})
    if "start_from" in ap.filters:
        if not ap.binds:
            fail(
                base + ("binds",),
                "start_from/start_before need 'binds' computed from the bound instant, "
                'e.g. date: "{bound|to_yyyymmdd}"',
            )
        if "start" not in ap.order:
            fail(base + ("order",), "start_from/start_before need order.start (the sort expression of the start time)")
    for system, ident in ap.identifier_filters.items():
        sql = ident if isinstance(ident, str) else ident.sql
        value = "{value}" if isinstance(ident, str) else ident.value
        loc = base + ("identifier_filters", system)
        _check_binds(fail, loc if isinstance(ident, str) else loc + ("sql",), sql, {"values"})
        compile_at(loc + ("value",), value)
        _check_expr_inputs(fail, loc, compiled, {"value": value}, {"value"})
    for purpose, table in ap.codes.items():
        if table not in tables:
            fail(base + ("codes", purpose), f"code table {table!r} is not declared under 'codes'")
    for purpose in ("status", "specialty"):
        if purpose in ap.filters and purpose not in ap.codes:
            fail(
                base + ("filters", purpose),
                f"filter {purpose!r} needs codes.{purpose}: the code table that "
                "translates FHIR search tokens to legacy codes",
            )

    if doc.writes is not None:
        w = doc.writes
        for name in ("lock", "book", "reschedule", "cancel"):
            stmt = getattr(w, name)
            compile_mapping(("writes", name, "binds"), stmt.binds)
            if stmt.allowed_statuses is not None and name not in ("reschedule", "cancel"):
                fail(("writes", name, "allowed_statuses"), "only reschedule and cancel have allowed_statuses")
            for status in stmt.allowed_statuses or ():
                if status not in APPOINTMENT_STATUSES:
                    fail(
                        ("writes", name, "allowed_statuses"),
                        f"{status!r} is not a FHIR AppointmentStatus; expected some of {sorted(APPOINTMENT_STATUSES)}",
                    )
        if w.patient_lock is not None:
            compile_mapping(("writes", "patient_lock", "binds"), w.patient_lock.binds)
            if set(sql_bind_names(w.patient_lock.sql)) != {"patient_key"}:
                fail(("writes", "patient_lock", "sql"), "expected exactly one bind, :patient_key (the patient's key)")
        if w.id_allocation.strategy == "counter" and not (w.id_allocation.next_sql and w.id_allocation.bump_sql):
            fail(("writes", "id_allocation"), "strategy 'counter' needs next_sql and bump_sql")
        if w.id_allocation.strategy == "sequence" and not w.id_allocation.next_sql:
            fail(("writes", "id_allocation"), "strategy 'sequence' needs next_sql")
        if w.id_allocation.strategy == "database" and not w.id_allocation.last_id_sql:
            fail(("writes", "id_allocation"), "strategy 'database' needs last_id_sql")
        cp = w.create_patient
        if cp.allowed and not (cp.insert and cp.id_allocation):
            fail(("writes", "create_patient"), "allowed: true needs 'insert' and 'id_allocation'")
        if cp.insert:
            compile_mapping(("writes", "create_patient", "insert", "binds"), cp.insert.binds)

    if problems:
        raise MappingError(problems)
    return Mapping(path=path, doc=doc, codes=codes, ctx=ctx, compiled=compiled)


def _valid_target(target: Any) -> bool:
    if isinstance(target, str):
        return bool(target)
    if isinstance(target, dict):
        return "code" in target and set(target) <= {"system", "code", "display", "version"}
    if isinstance(target, list):
        return bool(target) and all(isinstance(t, dict) and _valid_target(t) for t in target)
    return False


def _expressions(template: Any) -> Iterator[Expression]:
    if isinstance(template, Expression):
        yield template
    elif isinstance(template, list):
        for item in template:
            yield from _expressions(item)
    elif isinstance(template, dict):
        for item in template.values():
            yield from _expressions(item)


def _code_tables_used(source: str) -> list[str]:
    return re.findall(r"\|\s*(?:code\??|legacy_code\??)\s*:\s*([A-Za-z0-9_\-]+)", source)


def _check_binds(fail: _Fail, loc: _Loc, sql: str, allowed: set[str]) -> None:
    for name in sql_bind_names(sql):
        if name not in allowed:
            expected = ", ".join(f":{a}" for a in sorted(allowed)) or "no bind parameters"
            fail(loc, f"unknown bind parameter :{name}; expected {expected}")


def _check_expr_inputs(
    fail: _Fail, loc: _Loc, compiled: dict[str, Any], binds: dict[str, str], allowed: set[str]
) -> None:
    for name in binds:
        template = compiled.get(_dotted(loc + (name,)))
        for expr in _expressions(template):
            for inp in expr.inputs:
                if inp not in allowed:
                    fail(loc + (name,), f"unknown value {inp!r}; expected one of {sorted(allowed)}")
