"""ITI-118 search over legacy appointments: an ``AppointmentQuery`` -> one SQL page query (+ a count).

Everything legacy-specific comes from the mapping's ``appointments`` section (mappings/README.md):

* ``filters``: one SQL condition per criterion, over the columns of ``appointments.select``; the engine
  ANDs the ones a query needs and supplies their binds (``:patient_keys``, ``:status_codes`` ...).
  Values are always bound, never spliced into the SQL text.
* ``filters.start_from`` / ``filters.start_before``: "Appointment.start >= bound" and "< bound", whatever
  the legacy shape of the start (YYYYMMDD + HHMM integers, one DATETIME column, a DATE + TIME pair).
  Their binds are the mapping's ``binds`` expressions evaluated on ``bound``: the instant already turned
  into a legacy wall-clock time (see ``legacy_bound``). Each use gets its own bind names, so one query
  can hold several bounds (a range, ``ne`` exclusions, the paging cursor).
* ``order.start`` (+ ``order.key``): the sort. Pages are a keyset on (start, key): the cursor is the
  (start, id) of the row a page ended at, and the next page asks for rows strictly after it, so pages
  stay correct while rows are inserted or deleted. ``descending`` walks the same keyset backwards
  (``_sort=-date`` and ``previous`` links).

``end_bounds`` (conditions on Appointment.end, which the demo schema only has as start + minutes) are
checked in Python on the rows the SQL conditions already narrowed; a query whose narrowed set is larger
than ``PYTHON_FILTER_CAP`` rows is refused rather than scanned.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from adapter.backends.protocol import ActorKind, Appointment, AppointmentPage, AppointmentQuery, InvalidRequest
from adapter.backends.sql.db import query
from adapter.mapping.expressions import ExpressionError
from adapter.mapping.ids import InvalidKey, to_legacy_key
from adapter.text import SQL_NAMED_BIND

if TYPE_CHECKING:
    from adapter.backends.sql.backend import SqlBackend

PYTHON_FILTER_CAP = 10_000
_MICRO = dt.timedelta(microseconds=1)
_LIMIT_DIALECTS = ("sqlite", "postgresql", "mariadb")


# --- legacy wall-clock bounds -------------------------------------------------------------------


def _ambiguous(naive: dt.datetime, zone: ZoneInfo) -> bool:
    return naive.replace(tzinfo=zone, fold=0).utcoffset() != naive.replace(tzinfo=zone, fold=1).utcoffset()


def _overlap_end(naive: dt.datetime, zone: ZoneInfo) -> dt.datetime:
    """First wall-clock second after the repeated (autumn) hour that ``naive`` lies in."""
    base = naive.replace(microsecond=0)
    off0 = base.replace(tzinfo=zone, fold=0).utcoffset()
    off1 = base.replace(tzinfo=zone, fold=1).utcoffset()
    assert off0 is not None and off1 is not None  # a ZoneInfo always knows the offset
    lo, hi = 0, int(abs(off0 - off1).total_seconds())
    # invariant: base + lo s is ambiguous, base + hi s is not (the overlap lasts off0 - off1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _ambiguous(base + dt.timedelta(seconds=mid), zone):
            lo = mid
        else:
            hi = mid
    return base + dt.timedelta(seconds=hi)


def _ceil(naive: dt.datetime, seconds: int) -> dt.datetime:
    midnight = naive.replace(hour=0, minute=0, second=0, microsecond=0)
    micros = (naive - midnight) // _MICRO
    step = seconds * 1_000_000
    return midnight + dt.timedelta(microseconds=-(-micros // step) * step)


def legacy_bound(instant: dt.datetime, zone: ZoneInfo, resolution_seconds: int = 1) -> dt.datetime:
    """The smallest legacy wall-clock time ``w`` (on the columns' grid) whose instant is >= ``instant``.

    Legacy starts are zone-less wall-clock times read with ``attach_zone`` (a time in the repeated
    autumn hour means its first occurrence; a time in the skipped spring hour is moved forward). That
    reading is monotonic in ``w``, so for every legacy row: ``start >= instant`` exactly when
    ``w_row >= w`` and ``start < instant`` exactly when ``w_row < w``. An instant in the *second* pass
    of the repeated hour maps to the end of that hour (no legacy value denotes it). The result carries
    ``tzinfo=zone`` so converters such as ``to_yyyymmdd``/``to_hhmm``/``local`` see ``w`` unchanged
    (``astimezone`` into the same zone object is the identity, even for a wall time in a DST gap).

    Limitation: a legacy row whose wall time lies *inside* the skipped spring hour (02:30 on a
    spring-forward day: a time that never existed) is compared by its wall-clock value, so it sorts and
    filters as 02:30 although ``attach_zone`` renders it as 03:30. No correct legacy system stores one.
    """
    local = instant.astimezone(zone)
    naive = local.replace(tzinfo=None, fold=0)
    if local.fold == 1 and _ambiguous(naive, zone):
        naive = _overlap_end(naive, zone)
    return _ceil(naive, resolution_seconds).replace(tzinfo=zone)


# --- building the SQL ---------------------------------------------------------------------------


def split_top_level(text: str) -> list[str]:
    """``"APPT_DT, COALESCE(A, B)"`` -> ``["APPT_DT", "COALESCE(A, B)"]`` (commas outside parentheses/quotes)."""
    parts: list[str] = []
    current: list[str] = []
    depth, quote = 0, False
    for ch in text:
        if ch == "'":
            quote = not quote
        elif not quote and ch == "(":
            depth += 1
        elif not quote and ch == ")":
            depth -= 1
        if ch == "," and depth == 0 and not quote:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    parts.append("".join(current).strip())
    return [p for p in parts if p]


class _Where:
    """Conditions and their bind values; every use of a mapping condition gets fresh bind names."""

    def __init__(self) -> None:
        self.conditions: list[str] = []
        self.values: dict[str, Any] = {}
        self._n = 0

    def use(self, sql: str, values: dict[str, Any]) -> str:
        self._n += 1
        suffix = f"__{self._n}"

        def rename(m: re.Match[str]) -> str:
            name: str | None = m.group(1)
            if name is None:
                return m.group(0)
            self.values[name + suffix] = values[name]
            return ":" + name + suffix

        return "(" + SQL_NAMED_BIND.sub(rename, sql) + ")"

    def add(self, sql: str, values: dict[str, Any]) -> None:
        self.conditions.append(self.use(sql, values))

    def text(self, extra: list[str] | None = None) -> str:
        conds = self.conditions + (extra or [])
        return " WHERE " + " AND ".join(conds) if conds else ""


class _Plan:
    def __init__(self, backend: SqlBackend) -> None:
        self.backend = backend
        self.ap = backend.doc.appointments
        self.mapping = backend.mapping
        self.ctx = backend.mapping.ctx
        self.where = _Where()

    def filter(self, name: str, what: str) -> str:
        sql = self.ap.filters.get(name)
        if sql is None:
            raise InvalidRequest(
                f"this legacy system's mapping ({self.mapping.path.name}) declares no "
                f"appointments.filters.{name}: cannot search appointments by {what}"
            )
        return sql

    def start_values(self, instant: dt.datetime) -> dict[str, Any]:
        bound = legacy_bound(instant, self.ctx.zone, self.ap.start_resolution_seconds)
        env = {"bound": bound}
        return {name: self.mapping.expr(f"appointments.binds.{name}").evaluate(env, self.ctx) for name in self.ap.binds}

    def start_cond(self, op: str, instant: dt.datetime) -> str:
        """SQL for ``start >= instant`` (op ``ge``) or ``start < instant`` (op ``lt``)."""
        name = "start_from" if op == "ge" else "start_before"
        return self.where.use(self.filter(name, "date"), self.start_values(instant))

    def keys(self, rule: Any, ids: tuple[str, ...]) -> list[Any]:
        out = []
        for fhir_id in ids:
            try:
                out.append(to_legacy_key(rule, fhir_id))
            except InvalidKey:
                continue  # an id this legacy system cannot have matches nothing
        return out


def _normalise_bounds(bounds: tuple[tuple[str, dt.datetime], ...]) -> tuple[dt.datetime | None, dt.datetime | None]:
    """(op, instant) bounds -> one inclusive lower and one exclusive upper bound."""
    lower: dt.datetime | None = None
    upper: dt.datetime | None = None
    for op, t in bounds:
        if t.tzinfo is None:
            raise InvalidRequest("search bounds must be timezone-aware instants")
        if op in ("ge", "gt"):
            t = t + _MICRO if op == "gt" else t
            lower = t if lower is None else max(lower, t)
        elif op in ("lt", "le"):
            t = t + _MICRO if op == "le" else t
            upper = t if upper is None else min(upper, t)
        else:
            raise InvalidRequest(f"unknown bound operator {op!r}; expected lt, le, gt or ge")
    return lower, upper


def _end_ok(appt: Appointment, bounds: tuple[tuple[str, dt.datetime], ...]) -> bool:
    end = appt.interval.end
    checks = {"lt": end.__lt__, "le": end.__le__, "gt": end.__gt__, "ge": end.__ge__}
    return all(checks[op](t) for op, t in bounds)


def _empty(q: AppointmentQuery) -> AppointmentPage:
    return AppointmentPage([], 0 if q.want_total else None, False)


async def search_appointments(backend: SqlBackend, q: AppointmentQuery) -> AppointmentPage:
    plan = _Plan(backend)
    ap, doc, codes, w = plan.ap, backend.doc, backend.mapping.codes, plan.where

    # -- criteria that translate to key lists; an empty translation means nothing can match ------
    if q.ids:
        keys = plan.keys(ap.id, q.ids)
        if not keys:
            return _empty(q)
        w.add(plan.filter("key", "_id"), {"keys": keys})
    by_actor: tuple[tuple[tuple[str, ...], ActorKind, str, str], ...] = (
        (q.patient_ids, "Patient", "patient", "patient_keys"),
        (q.practitioner_ids, "Practitioner", "practitioner", "practitioner_keys"),
        (q.location_ids, "Location", "location", "location_keys"),
    )
    for ids, kind, name, bind in by_actor:
        if ids:
            keys = plan.keys(doc.actors[kind].id, ids)
            if not keys:
                return _empty(q)
            w.add(plan.filter(name, name), {bind: keys})
    if q.identifiers:
        ors = _identifier_conditions(plan, q)
        if not ors:
            return _empty(q)
        w.conditions.append("(" + " OR ".join(ors) + ")")
    if q.statuses:
        sql = plan.filter("status", "status")
        table = ap.codes.get("status")
        legacy = sorted({c for s in q.statuses for c in codes.legacy_codes(table, s)}) if table else []
        if not legacy:
            return _empty(q)
        w.add(sql, {"status_codes": legacy})
    if q.visit_type_keys:
        w.add(
            plan.filter("visit_type", "appointment-type or service-type"), {"visit_type_keys": list(q.visit_type_keys)}
        )
    if q.specialty_keys or q.specialty_codes:
        sql = plan.filter("specialty", "specialty")
        wanted: set[str] | None = set(q.specialty_keys) if q.specialty_keys else None
        if q.specialty_codes:
            table = ap.codes.get("specialty")
            if table is None:
                raise InvalidRequest("the mapping declares no appointments.codes.specialty: cannot search by specialty")
            for group in q.specialty_codes:
                keys_of_group = {c for token in group for c in codes.legacy_codes(table, token)}
                wanted = keys_of_group if wanted is None else wanted & keys_of_group
        if not wanted:
            return _empty(q)
        w.add(sql, {"specialty_keys": sorted(wanted)})

    # -- start bounds, `ne` exclusions and end bounds ------------------------------------------
    lower, upper = _normalise_bounds(q.start_bounds)
    for op, t in q.end_bounds:
        if op in ("lt", "le"):  # end <= t implies start < t (appointments last > 0 s)
            t = t + _MICRO if op == "le" else t
            upper = t if upper is None else min(upper, t)
    if lower is not None and upper is not None and lower >= upper:
        return _empty(q)
    if lower is not None:
        w.conditions.append(plan.start_cond("ge", lower))
    if upper is not None:
        w.conditions.append(plan.start_cond("lt", upper))
    for iv in q.exclude_start_ranges:
        w.conditions.append(f"NOT ({plan.start_cond('ge', iv.start)} AND {plan.start_cond('lt', iv.end)})")

    # -- order and keyset ----------------------------------------------------------------------
    if "start" not in ap.order or "start_from" not in ap.filters:
        raise InvalidRequest(
            f"the mapping ({backend.mapping.path.name}) declares no appointments.order.start "
            "and filters.start_from/start_before: appointments cannot be searched page by page"
        )
    key_col = ap.order.get("key", ap.key)
    direction = "DESC" if q.descending else "ASC"
    order_by = ", ".join(f"{expr} {direction}" for expr in split_top_level(ap.order["start"]) + [key_col])
    cursor: list[str] = []
    if q.after is not None:
        start, last_id = q.after
        try:
            last_key = to_legacy_key(ap.id, last_id)
        except InvalidKey:
            raise InvalidRequest(f"paging cursor names an id ({last_id!r}) this legacy system cannot have") from None
        # (start, key) strictly after the cursor in the sort direction; the first conjunct keeps the
        # start index usable.
        if q.descending:  # start <= s AND (start < s OR key < k)
            key_cmp = w.use(f"{key_col} < :cursor_key", {"cursor_key": last_key})
            cursor.append(f"{plan.start_cond('lt', start + _MICRO)} AND ({plan.start_cond('lt', start)} OR {key_cmp})")
        else:  # start >= s AND (start > s OR key > k)
            key_cmp = w.use(f"{key_col} > :cursor_key", {"cursor_key": last_key})
            cursor.append(f"{plan.start_cond('ge', start)} AND ({plan.start_cond('ge', start + _MICRO)} OR {key_cmp})")

    base = f"SELECT * FROM ({ap.select}) q"
    filter_where = w.text()
    page_where = w.text(cursor)
    python_filter = bool(q.end_bounds)
    limit = PYTHON_FILTER_CAP + 1 if python_filter else q.limit + 1
    dialect = backend.db.dialect
    # The row limit is an engine-computed integer, not a client value: written as a literal because
    # LIMIT ? is not portable across ODBC drivers (MariaDB's client-side prepare quotes it).
    if dialect in _LIMIT_DIALECTS:
        limit_sql = f" LIMIT {int(limit)}"
    else:  # SQL Server 2012+, Oracle 12c+, DB2: the ANSI form
        limit_sql = f" OFFSET 0 ROWS FETCH NEXT {int(limit)} ROWS ONLY"
    page_sql = f"{base}{page_where} ORDER BY {order_by}{limit_sql}"
    # A capped count reads at most cap + 1 matches however many there are; where LIMIT is not known to
    # work without an ORDER BY (other ODBC engines) the count stays exact instead.
    cap = q.total_cap if dialect in _LIMIT_DIALECTS else None
    if cap is None:
        count_sql = f"SELECT COUNT(*) AS N FROM ({ap.select}) q{filter_where}"
    else:
        count_sql = (
            f"SELECT COUNT(*) AS N FROM (SELECT 1 AS X FROM ({ap.select}) q{filter_where} LIMIT {int(cap) + 1}) c"
        )
    values = dict(w.values)

    def run(conn: Any) -> AppointmentPage:
        if python_filter:
            return _python_filtered(
                backend, conn, q, f"{base}{filter_where} ORDER BY {order_by}{limit_sql}", page_sql, values
            )
        rows = query(conn, page_sql, values) if q.limit > 0 else []
        warnings: list[str] = []
        appts = backend.appointments_from_rows(rows[: q.limit], warnings)
        total = None
        if q.want_total and q.after is None and len(rows) <= q.limit and q.limit > 0:
            total = len(rows)  # the first page is the last: known without a count query
        elif q.want_total:
            total = int(next(iter(query(conn, count_sql, values)[0].values())))
            if cap is not None and total > cap:
                total = None
        return AppointmentPage(appts, total, len(rows) > q.limit, warnings)

    return await backend.db.run(run)


def _python_filtered(
    backend: SqlBackend, conn: Any, q: AppointmentQuery, all_sql: str, page_sql: str, values: dict[str, Any]
) -> AppointmentPage:
    warnings: list[str] = []

    def narrowed(sql: str, notes: list[str]) -> list[Appointment]:
        rows = query(conn, sql, values)
        if len(rows) > PYTHON_FILTER_CAP:
            raise InvalidRequest(
                f"more than {PYTHON_FILTER_CAP} appointments match before the end-time condition; "
                "narrow the search (patient, practitioner, or a start range)"
            )
        return [a for a in backend.appointments_from_rows(rows, notes) if _end_ok(a, q.end_bounds)]

    page = narrowed(page_sql, warnings)
    total = len(narrowed(all_sql, [])) if q.want_total else None
    return AppointmentPage(page[: q.limit], total, len(page) > q.limit, warnings)


def _identifier_conditions(plan: _Plan, q: AppointmentQuery) -> list[str]:
    ap, m, ctx = plan.ap, plan.mapping, plan.ctx
    ors: list[str] = []
    for ident in q.identifiers:
        systems = list(ap.identifier_filters) if not ident.system else [ident.system]
        for system in systems:
            spec = ap.identifier_filters.get(system)
            if spec is None:
                continue  # a system this legacy system does not know: that identifier matches nothing
            sql = spec if isinstance(spec, str) else spec.sql
            try:
                value = m.expr(f"appointments.identifier_filters.{system}.value").evaluate({"value": ident.value}, ctx)
            except (ExpressionError, ValueError, TypeError):
                continue  # e.g. "abc" for a numeric key: cannot match
            ors.append(plan.where.use(sql, {"values": [value]}))
    return ors


__all__ = ["legacy_bound", "search_appointments", "split_top_level", "PYTHON_FILTER_CAP"]
