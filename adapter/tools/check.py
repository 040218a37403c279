"""The live check of a mapping against its legacy database (``sched-adapter mappings check --config``).

The structural check (``load_mapping``) proves the file is well formed. This one proves it fits the
database, before the first request would find out:

* every declared query runs and returns the columns the mapping's expressions read. Queries run
  wrapped as ``SELECT * FROM (<sql>) q WHERE 1 = 0``: nothing is read, nothing is locked, an unknown
  table or column is the database's own error message;
* every filter (``actors.*.filters``, ``appointments.filters``, identifier filters) runs the same way,
  with the bind values the engine would supply; ``appointments.order`` is tried too;
* every write statement (``writes.lock`` when it is not a SELECT, ``book``, ``reschedule``,
  ``cancel``, the key counter's ``bump_sql``) is compiled without running (SQLite: ``EXPLAIN``)
  or run inside a transaction that is rolled back (server databases) with the values the engine
  would bind. A constraint violation by those sample values is not a mapping problem and is
  ignored; anything else (unknown column, syntax, an unknown bind) is. On MariaDB/MySQL a
  rolled-back INSERT still advances an AUTO_INCREMENT counter: expect a gap of one key;
* with ``codes=True``: each ``code:`` expression over a column of a query is tried on every
  distinct value in the data; a legacy code its table does not translate is a warning with its
  row count (a read of such a row would fail). ``code?:`` (optional) lookups are not reported.

Every problem is one line ``file:line: dotted.key: what is wrong``; warnings say ``warning:``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from adapter.backends.sql.backend import apply_fold
from adapter.backends.sql.db import Database, bind
from adapter.mapping.codes import UnknownCode
from adapter.mapping.expressions import Expression, ExpressionError, attach_zone
from adapter.mapping.loader import Mapping, _construct, _line_for

Loc = tuple[Any, ...]

# Values the engine supplies to filters and statements (see mappings/README.md); lists bind as IN lists.
_FILTER_BINDS: dict[str, Any] = {
    "keys": [],
    "values": [],
    "patient_keys": [],
    "practitioner_keys": [],
    "location_keys": [],
    "status_codes": [],
    "visit_type_keys": [],
    "specialty_keys": [],
    "name_prefix": "A%",
    "name_fold_prefix": "a%",
}
_UNREACHABLE: Loc = ("backend", "database_url")
_ENGINE_INPUTS = {"occurrence", "window_start", "window_end"}
_CODE_PLACEHOLDER = re.compile(r"\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\|([^{}]*\bcode\s*:[^{}]*)\}")


@dataclass(frozen=True, slots=True)
class Finding:
    loc: Loc
    message: str
    warning: bool = False


@dataclass(frozen=True, slots=True)
class CheckResult:
    errors: list[str]
    warnings: list[str]
    unreachable: bool = False  # the database could not be reached: nothing was checked

    @property
    def lines(self) -> list[str]:
        return self.errors + self.warnings


class _Lines:
    """Line numbers of the mapping file's keys, for ``file:line:`` messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: dict[tuple[Any, ...], int] = {}
        root = yaml.compose(path.read_text(encoding="utf-8"))
        if root is not None:
            _construct(root, (), self.lines)

    def format(self, f: Finding) -> str:
        dotted = ".".join(str(p) for p in f.loc) or "(top level)"
        prefix = "warning: " if f.warning else ""
        return f"{self.path}:{_line_for(self.lines, f.loc)}: {dotted}: {prefix}{f.message}"


def _first_line(exc: BaseException) -> str:
    """The driver's message, one line: pyodbc's (state, message) loses its tuple and its [driver] prefixes."""
    args: tuple[Any, ...] = tuple(getattr(exc, "args", ()))
    text = args[1] if len(args) == 2 and isinstance(args[1], str) else str(exc)
    text = re.sub(r"^(\s*\[[^\]]*\])+\s*", "", text.strip())
    return text.splitlines()[0].strip().rstrip(";")[:400] if text else type(exc).__name__


def _is_constraint_error(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.IntegrityError):
        return True
    state = exc.args[0] if getattr(exc, "args", None) else ""
    return type(exc).__name__ == "IntegrityError" or (isinstance(state, str) and state.startswith("23"))


def _inputs(template: Any) -> Iterator[str]:
    if isinstance(template, Expression):
        yield from template.inputs
    elif isinstance(template, list):
        for item in template:
            yield from _inputs(item)
    elif isinstance(template, dict):
        for item in template.values():
            yield from _inputs(item)


def _expressions(template: Any, loc: Loc) -> Iterator[tuple[Loc, Expression]]:
    if isinstance(template, Expression):
        yield loc, template
    elif isinstance(template, list):
        for i, item in enumerate(template):
            yield from _expressions(item, loc + (i,))
    elif isinstance(template, dict):
        for key, item in template.items():
            yield from _expressions(item, loc + (key,))


class LiveChecker:
    """Runs the checks on one connection of ``db`` (in the calling thread)."""

    def __init__(self, mapping: Mapping, db: Database) -> None:
        self.m = mapping
        self.doc = mapping.doc
        self.db = db
        self.conn: Any = None
        self.findings: list[Finding] = []

    # -- running SQL ---------------------------------------------------------------------------
    def _cursor(self) -> Any:
        return self.conn.cursor()

    def _end(self) -> None:
        """End the unit of work: roll back whatever a statement did or started."""
        try:
            if self.db.kind == "pyodbc":
                self.conn.rollback()
            elif self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        except Exception as exc:  # a broken connection: the next statement reports it
            self.findings.append(Finding((), f"cannot roll back on the legacy database: {_first_line(exc)}"))

    def _columns(self, loc: Loc, sql: str, values: dict[str, Any]) -> set[str] | None:
        """Run ``sql`` (a SELECT returning no row) and return its column names, lower-cased."""
        try:
            text, params = bind(sql, values)
        except KeyError as exc:
            self.findings.append(Finding(loc, f"{exc.args[0]}; the engine does not supply it here"))
            return None
        cur = self._cursor()
        try:
            cur.execute(text, params)
            names = {str(d[0]).lower() for d in cur.description or ()}
            cur.fetchall()
            return names
        except Exception as exc:
            self.findings.append(Finding(loc, f"the database refused the query: {_first_line(exc)}"))
            return None
        finally:
            self._end()

    def _empty(self, sql: str, condition: str = "") -> str:
        where = f"({condition}) AND 1 = 0" if condition else "1 = 0"
        return f"SELECT * FROM ({sql}) q WHERE {where}"

    def _need(self, loc: Loc, columns: set[str] | None, needed: dict[str, Loc], what: str) -> None:
        if columns is None:
            return
        for name, where in needed.items():
            if name.lower() not in columns and name not in _ENGINE_INPUTS:
                self.findings.append(
                    Finding(
                        where,
                        f"column {name!r} is not returned by {'.'.join(str(p) for p in loc)} "
                        f"({what} returns: {', '.join(sorted(columns)) or 'no columns'})",
                    )
                )

    def _needed(self, base: Loc, template: Any) -> dict[str, Loc]:
        out: dict[str, Loc] = {}
        for loc, expr in _expressions(template, base):
            for name in expr.inputs:
                out.setdefault(name, loc)
        return out

    def _try_write(self, loc: Loc, sql: str, values: dict[str, Any]) -> None:
        """Compile (SQLite) or run-and-roll-back (server databases) one write statement."""
        try:
            text, params = bind(sql, values)
        except KeyError as exc:
            self.findings.append(Finding(loc, f"{exc.args[0]}; the engine does not supply it to this statement"))
            return
        cur = self._cursor()
        try:
            if self.db.kind == "sqlite3":
                cur.execute("EXPLAIN " + text, params)  # compiles the statement, changes nothing
                cur.fetchall()
            else:
                cur.execute(text, params)  # pyodbc: inside the unit of work that _end() rolls back
        except Exception as exc:
            if not _is_constraint_error(exc):
                self.findings.append(Finding(loc, f"the database refused the statement: {_first_line(exc)}"))
        finally:
            self._end()

    # -- the checks ----------------------------------------------------------------------------
    def run(self, *, codes: bool) -> list[Finding]:
        try:
            self.conn = self.db.connection()
        except Exception as exc:
            return [Finding(_UNREACHABLE, f"cannot connect to the legacy database: {_first_line(exc)}")]
        samples = self._actors()
        visit_key = self._visit_types()
        self._availability()
        self._appointments()
        if self.doc.writes is not None:
            self._writes(samples, visit_key)
        if codes:
            self._codes()
        return self.findings

    def _actors(self) -> dict[str, Any]:
        samples: dict[str, Any] = {}
        for kind, spec in self.doc.actors.items():
            base: Loc = ("actors", kind)
            needed = {
                n: base + ("fields", f)
                for f in spec.fields
                for n in _inputs(self.m.compiled.get(f"actors.{kind}.fields.{f}"))
            }
            needed |= self._needed(base + ("resource",), self.m.compiled.get(f"actors.{kind}.resource"))
            needed.setdefault(spec.key, base + ("key",))
            cols = self._columns(base + ("select",), self._empty(spec.select), {})
            self._need(base + ("select",), cols, needed, "the select")
            for name, cond in spec.filters.items():
                folded = apply_fold(cond, self.doc.system.sql_fold, self.db.dialect, self.db.kind)
                self._columns(base + ("filters", name), self._empty(spec.select, folded), dict(_FILTER_BINDS))
            for system, cond in spec.identifier_filters.items():
                self._columns(base + ("identifier_filters", system), self._empty(spec.select, cond), {"values": []})
            samples[kind] = self._sample_key(spec.select, spec.key)
        return samples

    def _sample_key(self, select: str, key: str) -> Any:
        """One real legacy key (for the sample values of write statements), or NULL."""
        cur = self._cursor()
        try:
            # One row only: psqlODBC would otherwise fetch a whole patient table into memory at server start.
            limit = " LIMIT 1" if self.db.dialect in ("sqlite", "postgresql", "mariadb") else ""
            cur.execute(f"SELECT * FROM ({select}) q{limit}")
            names = [str(d[0]).lower() for d in cur.description or ()]
            row = cur.fetchone()
            return row[names.index(key.lower())] if row is not None and key.lower() in names else None
        except Exception:  # already reported by the checks of this select
            return None
        finally:
            self._end()

    def _first_value(self, sql: str) -> Any:
        cur = self._cursor()
        try:
            cur.execute(sql)
            row = cur.fetchone()
            return row[0] if row is not None else None
        except Exception:  # reported by the check of that query
            return None
        finally:
            self._end()

    def _visit_types(self) -> Any:
        vt = self.doc.visit_types
        base: Loc = ("visit_types",)
        needed: dict[str, Loc] = {}
        for name in vt.fields:
            needed |= {n: base + ("fields", name) for n in _inputs(self.m.compiled.get(f"visit_types.fields.{name}"))}
        needed |= self._needed(base + ("codings",), self.m.compiled.get("visit_types.codings"))
        needed |= self._needed(base + ("service_types",), self.m.compiled.get("visit_types.service_types"))
        cols = self._columns(base + ("sql",), self._empty(vt.sql), {})
        self._need(base + ("sql",), cols, needed, "the query")
        cur = self._cursor()
        try:
            cur.execute(vt.sql)
            names = [str(d[0]) for d in cur.description or ()]
            row = cur.fetchone()
            if row is None:
                return None
            return self.m.expr("visit_types.fields.key").evaluate(dict(zip(names, row, strict=False)), self.m.ctx)
        except Exception:  # reported above
            return None
        finally:
            self._end()

    def _window(self) -> tuple[dt.datetime, dt.datetime]:
        zone = self.m.ctx.zone
        day = dt.datetime.now(zone).date() + dt.timedelta(days=1)
        start = attach_zone(dt.datetime.combine(day, dt.time()), zone).astimezone(dt.UTC)
        return start, start + dt.timedelta(days=1)

    def _availability(self) -> None:
        start, end = self._window()
        env = {"window_start": start, "window_end": end}
        for section in ("working_time", "absences", "busy"):
            spec = getattr(self.doc.availability, section)
            if spec is None:
                continue
            base: Loc = ("availability", section)
            values: dict[str, Any] = {"practitioner_keys": [], "location_keys": []}
            for name in spec.binds:
                try:
                    values[name] = self.m.expr(f"availability.{section}.binds.{name}").evaluate(env, self.m.ctx)
                except (ExpressionError, LookupError, TypeError, ValueError) as exc:
                    self.findings.append(Finding(base + ("binds", name), f"cannot compute the bind: {exc}"))
                    values[name] = None
            needed: dict[str, Loc] = {}
            for name in spec.fields:
                needed |= {
                    n: base + ("fields", name)
                    for n in _inputs(self.m.compiled.get(f"availability.{section}.fields.{name}"))
                }
            if spec.repeat is not None:
                needed |= {
                    n: base + ("repeat",) for n in _inputs(self.m.compiled.get(f"availability.{section}.repeat"))
                }
            cols = self._columns(base + ("sql",), self._empty(spec.sql), values)
            self._need(base + ("sql",), cols, needed, "the query")

    def _appointments(self) -> None:
        ap = self.doc.appointments
        base: Loc = ("appointments",)
        needed: dict[str, Loc] = {}
        for name in ap.fields:
            needed |= {n: base + ("fields", name) for n in _inputs(self.m.compiled.get(f"appointments.fields.{name}"))}
        needed |= self._needed(base + ("identifier",), self.m.compiled.get("appointments.identifier"))
        needed.setdefault(ap.key, base + ("key",))
        cols = self._columns(base + ("select",), self._empty(ap.select), {})
        self._need(base + ("select",), cols, needed, "the select")
        values = dict(_FILTER_BINDS)
        bound = dt.datetime.now(dt.UTC).replace(microsecond=0)
        for name in ap.binds:
            try:
                values[name] = self.m.expr(f"appointments.binds.{name}").evaluate({"bound": bound}, self.m.ctx)
            except (ExpressionError, LookupError, TypeError, ValueError) as exc:
                self.findings.append(Finding(base + ("binds", name), f"cannot compute the bind: {exc}"))
                values[name] = None
        for name, cond in ap.filters.items():
            self._columns(base + ("filters", name), self._empty(ap.select, cond), values)
        for system, spec in ap.identifier_filters.items():
            cond = spec if isinstance(spec, str) else spec.sql
            self._columns(base + ("identifier_filters", system), self._empty(ap.select, cond), {"values": []})
        if ap.order:
            order = ", ".join(p for p in (ap.order.get("start"), ap.order.get("key", ap.key)) if p)
            self._columns(base + ("order",), self._empty(ap.select) + f" ORDER BY {order}", {})

    def _writes(self, samples: dict[str, Any], visit_key: Any) -> None:
        w = self.doc.writes
        assert w is not None
        zone = self.m.ctx.zone
        day = dt.datetime.now(zone).date() + dt.timedelta(days=1)
        start = attach_zone(dt.datetime.combine(day, dt.time(3, 17)), zone).astimezone(dt.UTC)
        now = dt.datetime.now(dt.UTC)
        slot = {
            "practitioner_key": samples.get("Practitioner"),
            "location_key": samples.get("Location"),
            "start": start,
            "end": start + dt.timedelta(minutes=15),
            "minutes": 15,
            "visit_type_key": visit_key,
            "now": now,
        }
        lock = w.lock.sql
        if self.db.dialect != "sqlite":  # SQLite needs no lock statement: BEGIN IMMEDIATE locks the file
            upper = " ".join(lock.upper().split())
            if upper.startswith("SELECT") and "FOR UPDATE" not in upper:
                self._columns(
                    ("writes", "lock", "sql"), self._empty(lock), {"practitioner_key": slot["practitioner_key"]}
                )
            else:
                self._try_write(("writes", "lock", "sql"), lock, {"practitioner_key": slot["practitioner_key"]})
        alloc = w.id_allocation
        new_id: Any = None
        if alloc.strategy == "uuid":
            new_id = str(uuid.uuid4())
        for key in ("next_sql", "last_id_sql"):
            sql = getattr(alloc, key)
            if sql and not (alloc.strategy == "sequence" and key == "next_sql"):
                self._columns(("writes", "id_allocation", key), self._empty(sql), {})
        if alloc.strategy == "counter" and alloc.bump_sql:
            self._try_write(("writes", "id_allocation", "bump_sql"), alloc.bump_sql, {})
        if alloc.strategy == "counter" and alloc.next_sql:
            new_id = self._first_value(alloc.next_sql)  # a realistic key, so the INSERT gets past NOT NULL
        envs: dict[str, dict[str, Any]] = {
            "book": slot
            | {
                "patient_key": samples.get("Patient"),
                "comment": "sched-adapter mappings check",
                "booked_by": "mappings-check",
                "new_id": new_id,
            },
            "reschedule": slot | {"appointment_key": None, "comment": None, "booked_by": "mappings-check"},
            "cancel": {
                "appointment_key": None,
                "reason": None,
                "reason_text": None,
                "now": now,
                "booked_by": "mappings-check",
            },
        }
        for name, env in envs.items():
            stmt = getattr(w, name)
            values = dict(env)
            ok = True
            for bind_name in stmt.binds:
                try:
                    values[bind_name] = self.m.expr(f"writes.{name}.binds.{bind_name}").evaluate(env, self.m.ctx)
                except (ExpressionError, LookupError, TypeError, ValueError) as exc:
                    self.findings.append(
                        Finding(("writes", name, "binds", bind_name), f"cannot compute the bind: {exc}")
                    )
                    ok = False
            if ok:
                self._try_write(("writes", name, "sql"), stmt.sql, values)

    # -- code coverage -------------------------------------------------------------------------
    def _codes(self) -> None:
        tables_with_fallback = {
            name for name, spec in self.doc.codes.items() if getattr(spec, "fallback", None) is not None
        }
        sources: list[tuple[Loc, str, Any]] = []
        for kind, spec in self.doc.actors.items():
            for name in spec.fields:
                sources.append(
                    (("actors", kind, "fields", name), spec.select, self.m.compiled.get(f"actors.{kind}.fields.{name}"))
                )
            sources.append((("actors", kind, "resource"), spec.select, self.m.compiled.get(f"actors.{kind}.resource")))
        vt = self.doc.visit_types
        for name in vt.fields:
            sources.append((("visit_types", "fields", name), vt.sql, self.m.compiled.get(f"visit_types.fields.{name}")))
        sources.append((("visit_types", "codings"), vt.sql, self.m.compiled.get("visit_types.codings")))
        sources.append((("visit_types", "service_types"), vt.sql, self.m.compiled.get("visit_types.service_types")))
        ap = self.doc.appointments
        for name in ap.fields:
            sources.append(
                (("appointments", "fields", name), ap.select, self.m.compiled.get(f"appointments.fields.{name}"))
            )
        seen: set[tuple[str, str, str]] = set()
        for base, sql, template in sources:
            for loc, expr in _expressions(template, base):
                for match in _CODE_PLACEHOLDER.finditer(expr.source):
                    column, pipes = match.group(1), match.group(2)
                    table = re.search(r"\bcode\s*:\s*([A-Za-z0-9_\-]+)", pipes)
                    if table is None or table.group(1) in tables_with_fallback:
                        continue
                    if (sql, column, match.group(0)) in seen:
                        continue
                    seen.add((sql, column, match.group(0)))
                    self._code_coverage(loc, sql, column, Expression(match.group(0)), table.group(1))

    def _code_coverage(self, loc: Loc, sql: str, column: str, expr: Expression, table: str) -> None:
        cur = self._cursor()
        try:
            cur.execute(f"SELECT q.{column}, COUNT(*) FROM ({sql}) q GROUP BY q.{column}")
            counts = cur.fetchall()
        except Exception as exc:
            self.findings.append(Finding(loc, f"cannot count the legacy codes of {column}: {_first_line(exc)}"))
            return
        finally:
            self._end()
        for value, count in counts:
            if value is None:
                continue
            try:
                expr.evaluate({column: value}, self.m.ctx)
            except (UnknownCode, LookupError) as exc:
                self.findings.append(
                    Finding(
                        loc,
                        f"legacy code {str(value).strip()!r} of column {column} ({count} row{'s' if count != 1 else ''}) "
                        f"is not in code table {table!r}: {exc}",
                        warning=True,
                    )
                )
            except (ExpressionError, TypeError, ValueError):
                continue  # a converter before the lookup refused the value: not a code table matter


def live_check(mapping: Mapping, database_url: str, *, codes: bool = False, timeout_s: float = 10.0) -> CheckResult:
    """Check ``mapping`` against the database at ``database_url``; nothing is written or locked.

    Runs in a thread of its own, so it can be called from a starting server's event loop too.
    """
    found: list[list[Finding]] = []
    failure: list[BaseException] = []

    def work() -> None:
        db = Database(database_url, pool_size=1, timeout_s=timeout_s)
        try:
            found.append(LiveChecker(mapping, db).run(codes=codes))
        except BaseException as exc:  # handed to the calling thread below
            failure.append(exc)
        finally:
            asyncio.run(db.close())

    thread = threading.Thread(target=work, name="mapping-live-check")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    lines = _Lines(mapping.path)
    findings = found[0]
    return CheckResult(
        errors=[lines.format(f) if f.loc != _UNREACHABLE else f.message for f in findings if not f.warning],
        warnings=[lines.format(f) for f in findings if f.warning],
        unreachable=any(f.loc == _UNREACHABLE for f in findings),
    )
