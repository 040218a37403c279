"""Code translation tables: legacy code <-> FHIR coding (or plain FHIR code), both ways.

A table is declared inline in the mapping (``codes: {specialty: {FP: {system:..., code:...}}}``)
or loaded from a FHIR ConceptMap JSON file (``codes: {specialty: {conceptmap: file.json}}``):
``group.source`` is the legacy system, ``element.code`` the legacy code, ``target`` the FHIR
coding. Reverse lookups (FHIR -> legacy) take the first legacy code that maps to the coding,
unless the table names an explicit ``reverse`` entry.

A table may declare a ``fallback`` target: a legacy code missing from the table then translates
to it (``code:`` conversions only) and the substitution is reported to whoever collects
``fallback_notes()`` for the current evaluation (the SQL backend turns them into warning issues).
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

_NOTES: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("code_fallback_notes", default=None)


@contextmanager
def fallback_notes() -> Iterator[list[str]]:
    """Collect the fallback substitutions made while the block runs (one text per substitution)."""
    notes: list[str] = []
    token = _NOTES.set(notes)
    try:
        yield notes
    finally:
        _NOTES.reset(token)


class UnknownCode(LookupError):
    """A code is not in the translation table."""


@dataclass(slots=True)
class CodeTable:
    name: str
    forward: dict[str, Any]  # legacy code -> FHIR coding dict | str (plain code)
    reverse: dict[tuple[str | None, str], str] = field(default_factory=dict)
    fallback: Any = None  # target for legacy codes missing from ``forward``; None: they are an error

    @classmethod
    def build(
        cls,
        name: str,
        entries: dict[str, Any],
        explicit_reverse: dict[str, str] | None = None,
        fallback: Any = None,
    ) -> CodeTable:
        table = cls(name, {}, fallback=fallback)
        for legacy, target in entries.items():
            table.forward[str(legacy)] = target
            for coding in _codings(target):
                key = (coding.get("system"), str(coding["code"]))
                table.reverse.setdefault(key, str(legacy))
                table.reverse.setdefault((None, str(coding["code"])), str(legacy))
        for fhir_code, legacy in (explicit_reverse or {}).items():
            system, _, code = fhir_code.rpartition("|")
            table.reverse[(system or None, code)] = str(legacy)
            table.reverse[(None, code)] = str(legacy)
        return table


def _codings(target: Any) -> list[dict[str, Any]]:
    if isinstance(target, str):
        return [{"code": target}]
    if isinstance(target, dict):
        return [target]
    return list(target)


class CodeTables:
    def __init__(self, tables: dict[str, CodeTable] | None = None) -> None:
        self._tables = tables or {}

    def names(self) -> set[str]:
        return set(self._tables)

    def table(self, name: str) -> CodeTable:
        try:
            return self._tables[name]
        except KeyError:
            raise UnknownCode(f"no code table named {name!r}") from None

    def to_fhir(self, table: str, legacy: str, *, missing_ok: bool = False) -> Any:
        tab = self.table(table)
        found = tab.forward.get(legacy)
        if found is None and not missing_ok:
            if tab.fallback is None:
                raise UnknownCode(f"legacy code {legacy!r} is not in code table {table!r}")
            notes = _NOTES.get()
            if notes is not None:
                notes.append(f"legacy code {legacy!r} is not in code table {table!r}; shown as its fallback")
            return tab.fallback
        return found

    def to_legacy(self, table: str, fhir: Any) -> str:
        """FHIR code (str, 'system|code' or coding dict) -> legacy code."""
        if isinstance(fhir, dict):
            system, code = fhir.get("system"), str(fhir.get("code"))
        else:
            text = str(fhir)
            system, sep, code = text.rpartition("|")
            system = system if sep else None
        reverse = self.table(table).reverse
        found = reverse.get((system, code)) if system else reverse.get((None, code))
        if found is None:
            raise UnknownCode(f"{fhir!r} has no legacy code in table {table!r}")
        return found

    def legacy_codes(self, table: str, fhir: Any) -> list[str]:
        """Every legacy code whose FHIR side matches ``fhir``, in table order (for searching).

        ``fhir`` is a plain code, ``system|code``, ``|code`` or ``system|`` (FHIR token syntax), or a
        coding dict. A bare code matches on the code alone, whatever the system; ``|code`` only matches
        codes declared without a system (plain FHIR codes); ``system|`` matches every code of that
        system. Unlike ``to_legacy`` (which picks the one code to *write*), this returns all of them:
        AppointmentStatus ``cancelled`` is C, P and L in the demo mapping. Unknown codes give ``[]``.
        """
        if isinstance(fhir, dict):
            system: str | None = fhir.get("system")
            code: str | None = None if fhir.get("code") is None else str(fhir.get("code"))
        else:
            text = str(fhir)
            sys_part, sep, code = text.rpartition("|")
            system = sys_part if sep else None
        code = code or None
        if system is None and code is None:
            return []
        out: list[str] = []
        for legacy, target in self.table(table).forward.items():
            for coding in _codings(target):
                c_system = coding.get("system") or ""
                if system is not None and c_system != system:
                    continue
                if code is not None and str(coding.get("code")) != code:
                    continue
                out.append(legacy)
                break
        return out

    def codings(self, table: str, legacy: str) -> list[dict[str, Any]]:
        found = self.table(table).forward.get(legacy)
        return [] if found is None else [c for c in _codings(found) if "system" in c]


def conceptmap_entries(resource: dict[str, Any]) -> dict[str, Any]:
    """Legacy code -> target coding, from a FHIR ConceptMap (R4) resource."""
    if resource.get("resourceType") != "ConceptMap":
        raise ValueError(f"expected a ConceptMap, got resourceType {resource.get('resourceType')!r}")
    entries: dict[str, Any] = {}
    for group in resource.get("group", []):
        target_system = group.get("target")
        for element in group.get("element", []):
            targets = [
                {
                    k: v
                    for k, v in {"system": target_system, "code": t.get("code"), "display": t.get("display")}.items()
                    if v
                }
                for t in element.get("target", [])
                if t.get("code")
            ]
            if targets:
                entries[str(element["code"])] = targets[0] if len(targets) == 1 else targets
    return entries
