"""The SQL backend: a practice-management database read and written through a declarative mapping.

Every SQL statement comes from the mapping file; this module only binds values, runs statements
and turns rows into neutral ``protocol`` objects through the mapping's expressions.

Locking strategy for writes (``secure`` for $hold, ``book``, ``reschedule``), all in ONE transaction
(``Database.write``):

1. take the booking lock. SQLite: writers queue on a per-process lock and a per-host ``flock`` file
   (SQLite's own busy handler polls with sleeps and starved one worker for seconds under load),
   then ``BEGIN IMMEDIATE`` makes this the only writer of the file. Server databases: the
   mapping's ``writes.lock`` statement, with ``FOR UPDATE`` appended unless it locks by itself,
   once per practitioner involved, in sorted key order so two reschedules cannot deadlock. A
   locking SELECT that returns no row is refused (422): a misdeclared lock must never silently
   leave bookings unserialised;
2. re-check the slot against the legacy calendar: inside working time and not overlapping any
   blocking appointment or absence (the same ``availability`` queries ``$find`` uses), under
   READ COMMITTED on the servers so the re-check sees the previous lock holder's committed row;
3. call the domain's conflict gate while the lock is still held: foreign holds are checked (and a
   hold is recorded, for $hold; a booking intent is journalled, for $book) in the adapter's state
   store, so "legacy calendar free + no foreign hold + write" is one atomic step;
4. allocate the key and write. A ``counter`` row is read with its own row lock (``FOR UPDATE``)
   and bumped in the same transaction: the practitioner lock does not cover it, and without the
   row lock two practitioners' bookings drew the same key on PostgreSQL/MariaDB;
5. commit. Any error rolls everything back: nothing half-written stays behind. A COMMIT whose
   connection breaks raises ``CommitOutcomeUnknown`` (503): the service then settles the
   booking from the legacy system (``find_booked``) before anyone books that id again.

Two bookings for one practitioner are therefore serialised by step 1, and the loser sees the
winner's row in step 2 (409). A cancellation takes no booking lock: it only frees time.
Failures: lost connections, lock and busy timeouts are ``BackendUnavailable`` (503, retry);
anything else the database refuses (too long, constraint) is ``BusinessRuleViolation`` (422).

A mapping author must make ``writes.lock`` lock the row(s) that every booking of a practitioner
touches, and make the ``busy`` query see every blocking row the write statements produce (see
mappings/README.md, "Writes").
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import logging
import math
import re
import sqlite3
import time
import unicodedata
from collections.abc import Iterable, Mapping as ReadOnlyMap, Sequence
from operator import itemgetter
from typing import Any, Literal

from adapter.backends.protocol import (
    Actor,
    ActorKind,
    ActorQuery,
    Appointment,
    AppointmentPage,
    AppointmentQuery,
    AvailabilityQuery,
    BackendError,
    BookingOutcome,
    BusinessRuleViolation,
    Capabilities,
    ChangePublisher,
    Coding,
    Confirmed,
    ConflictGate,
    Identifier,
    Interval,
    InvalidRequest,
    NewBooking,
    NotFound,
    ResourceAvailability,
    SlotConflict,
    SlotRequest,
    VisitType,
)
from adapter.backends.sql.db import (
    CommitOutcomeUnknown,
    Database,
    LockNotTaken,
    _first_line,
    dict_rows,
    execute,
    query,
)
from adapter.intervals import merge_spans, subtract_spans
from adapter.mapping.codes import UnknownCode, fallback_notes
from adapter.mapping.expressions import ExpressionError, attach_zone, render_template
from adapter.mapping.ids import InvalidKey, to_fhir_id, to_legacy_key
from adapter.mapping.loader import Mapping
from adapter.mapping.model import IdRule, WritesSpec
from adapter.scheduling.domain import Span
from adapter.text import fold

log = logging.getLogger("adapter.backends.sql")

_CACHE_SECONDS = 60.0
# Bound on each memo of the availability read (entries; cleared when full). The busy memo holds one entry per
# distinct appointment time (~300 bytes each): at most ~15 MB per worker, enough for 90 days of 20 busy diaries.
_MEMO_LIMIT = 50_000


def _latin_accents() -> tuple[str, str]:
    """Lower-case Latin letters with diacritics (U+00C0..U+024F) and their base letters, for translate()."""
    accented, plain = [], []
    for code in range(0xC0, 0x250):
        ch = chr(code)
        base = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
        if ch.islower() and len(base) == 1 and base.isascii() and base != ch:
            accented.append(ch)
            plain.append(base)
    return "".join(accented), "".join(plain)


# FOLD(col) in a name filter, per dialect, unless the mapping declares system.sql_fold. The bind
# :name_fold_prefix is folded the same way (lower case, diacritics removed), so both sides must be.
# SQLite (stdlib driver): a Python function registered on every connection, exact. PostgreSQL:
# lower() + translate() of the Latin letters with diacritics (no extension needed; declare
# "lower(unaccent({}))" where the unaccent extension is installed). MariaDB/MySQL and others:
# LOWER(); MariaDB's *_general_ci / *_unicode_ci collations compare accented letters as equal
# (SQL Server: declare e.g. "LOWER({}) COLLATE Latin1_General_CI_AI").
_DEFAULT_FOLD = {
    "sqlite3": "SCHED_FOLD({})",
    "postgresql": "translate(lower({{}}), '{}', '{}')".format(*_latin_accents()),
}
_FOLD_CALL = re.compile(r"\bFOLD\(\s*([^()]*?)\s*\)", re.IGNORECASE)
_FINAL_STATUSES = ("cancelled", "noshow", "fulfilled", "entered-in-error")
# A patient's appointments in these statuses take the patient's time (as in $find, REQ-115-14).
_PATIENT_BLOCKING = ("booked", "arrived", "checked-in", "pending")
# What has a legacy key: the actors, and appointments.
KeyKind = ActorKind | Literal["Appointment"]


class SqlBackend:
    name = "sql"
    # Writes run under database locks and call the gate inside them; availability is computed per query.
    capabilities = Capabilities(can_lock=True, answers_availability_queries=True, pushes_changes=False)

    def __init__(self, mapping: Mapping, database: Database) -> None:
        self.mapping = mapping
        self.db = database
        self.doc = mapping.doc
        self._ctx = mapping.ctx
        self.zone: dt.tzinfo = mapping.ctx.zone
        if self.doc.writes is not None and self.doc.writes.patient_lock is None and database.dialect != "sqlite":
            log.warning(
                "mapping %s declares no writes.patient_lock: one patient's bookings with different practitioners "
                "are serialised through the Patient select, which not every database locks (mappings/README.md)",
                mapping.path.name,
            )
        self._actor_cache: dict[str, tuple[float, dict[str, Actor]]] = {}
        self._visit_types: tuple[float, list[VisitType]] | None = None
        # $find's hot path (see _busy_spans, _anchor_seconds): per column layout of the busy query, its
        # converter (None: the general path); grid anchors by period start.
        self._busy_rows: dict[tuple[str, ...], _BusyRows | None] = {}
        self._anchors: dict[int, int] = {}
        self._field_memos: dict[str, dict[str, dict[Any, Any]]] = {}  # per availability section (_map_rows)

    # -- actors ------------------------------------------------------------------------------
    def _actor_from_row(self, kind: ActorKind, row: dict[str, Any]) -> Actor:
        spec = self.doc.actors[kind]
        m, ctx = self.mapping, self._ctx
        key = _column(row, spec.key)
        fhir_id = to_fhir_id(spec.id, key)
        base = f"actors.{kind}.fields"
        fields = {name: _eval(m.expr(f"{base}.{name}"), row, ctx) for name in spec.fields}
        resource = render_template(m.expr(f"actors.{kind}.resource"), row, ctx) or {}
        resource["id"] = fhir_id
        identifiers = tuple(
            Identifier(i["system"], i["value"])
            for i in resource.get("identifier", [])
            if "system" in i and "value" in i
        )
        specialties: tuple[Coding, ...] = ()
        spec_key = fields.get("specialty")
        if spec_key:
            specialties = (
                tuple(Coding(c["system"], c["code"], c.get("display")) for c in m.codes.codings("specialty", spec_key))
                if "specialty" in m.codes.names()
                else ()
            )
        return Actor(
            kind=kind,
            id=fhir_id,
            key=str(key),
            display=fields.get("display") or fhir_id,
            resource=resource,
            identifiers=identifiers,
            specialties=specialties,
            specialty_keys=(str(spec_key),) if spec_key else (),
            zone=fields.get("zone"),
        )

    def _id_rule(self, kind: KeyKind) -> IdRule:
        return self.doc.appointments.id if kind == "Appointment" else self.doc.actors[kind].id

    def legacy_key(self, kind: KeyKind, fhir_id: str) -> Any:
        """The legacy key of a FHIR id; raises ``InvalidKey`` for an id this system cannot have."""
        return to_legacy_key(self._id_rule(kind), fhir_id)

    async def all_actors(self, kind: ActorKind) -> dict[str, Actor]:
        """Small reference tables (practitioners, locations) are cached briefly: $find is hot."""
        cached = self._actor_cache.get(kind)
        now = time.monotonic()
        if cached and now - cached[0] < _CACHE_SECONDS:
            return cached[1]
        spec = self.doc.actors[kind]

        def load(conn: Any) -> dict[str, Actor]:
            rows = query(conn, spec.select, {})
            return {a.id: a for a in (self._actor_from_row(kind, r) for r in rows)}

        actors = await self.db.run(load)
        self._actor_cache[kind] = (now, actors)
        return actors

    def identifier_systems(self, kind: ActorKind) -> set[str]:
        return set(self.doc.actors[kind].identifier_filters)

    async def find_actors(self, q: ActorQuery) -> list[Actor]:
        if q.kind in ("Practitioner", "Location") and not q.identifiers and not q.name:
            actors = await self.all_actors(q.kind)
            if q.ids:
                return [actors[i] for i in q.ids if i in actors]
            return list(actors.values())[: q.limit]
        spec = self.doc.actors[q.kind]
        conditions: list[str] = []
        values: dict[str, Any] = {}
        if q.ids:
            keys = []
            for fhir_id in q.ids:
                try:
                    keys.append(to_legacy_key(spec.id, fhir_id))
                except InvalidKey:
                    continue
            conditions.append(spec.filters["key"])
            values["keys"] = keys
        if q.identifiers:
            ors: list[str] = []
            for ident in q.identifiers:
                cond = spec.identifier_filters.get(ident.system)
                if cond is None:
                    return []  # an identifier system this legacy system does not know: no match
                ors.append(cond.replace(":values", f":values_{len(ors)}"))
                values[f"values_{len(ors) - 1}"] = [ident.value]
            conditions.append("(" + " OR ".join(ors) + ")")
        if q.name:
            if "name" not in spec.filters:
                return []
            conditions.append(self._fold_sql(spec.filters["name"]))
            # SQL narrows by the ASCII part of the prefix (SQLite's UPPER() folds ASCII only), or by the
            # folded prefix through FOLD(); Python then applies FHIR string semantics (case- and
            # accent-insensitive starts-with), so a LIKE wildcard in the input can only widen the SQL.
            ascii_prefix = "".join(itertools.takewhile(lambda ch: ch.isascii(), q.name))
            values["name_prefix"] = ascii_prefix.upper() + "%"
            values["name_fold_prefix"] = fold(q.name) + "%"
        sql = f"SELECT * FROM ({spec.select}) q" + (" WHERE " + " AND ".join(conditions) if conditions else "")

        def load(conn: Any) -> list[Actor]:
            actors = [self._actor_from_row(q.kind, r) for r in query(conn, sql, values)]
            if q.name:
                actors = [a for a in actors if _name_matches(a, q.name)]
            return actors[: q.limit]

        return await self.db.run(load)

    def _fold_sql(self, condition: str) -> str:
        return apply_fold(condition, self.doc.system.sql_fold, self.db.dialect, self.db.kind)

    # -- visit types -------------------------------------------------------------------------
    async def visit_types(self) -> list[VisitType]:
        now = time.monotonic()
        if self._visit_types and now - self._visit_types[0] < _CACHE_SECONDS:
            return self._visit_types[1]
        vt = self.doc.visit_types
        m, ctx = self.mapping, self._ctx

        def load(conn: Any) -> list[VisitType]:
            out = []
            for row in query(conn, vt.sql, {}):
                f = {name: m.expr(f"visit_types.fields.{name}").evaluate(row, ctx) for name in vt.fields}
                codings = render_template(m.expr("visit_types.codings"), row, ctx) or []
                services = render_template(m.expr("visit_types.service_types"), row, ctx) or []
                out.append(
                    VisitType(
                        key=str(f["key"]),
                        display=str(f["display"]),
                        minutes=int(f["minutes"]),
                        codings=tuple(_to_codings(codings)),
                        service_types=tuple(_to_codings(services)),
                        specialty_codes=(str(f["specialty"]),) if f.get("specialty") else (),
                    )
                )
            return out

        types = await self.db.run(load)
        self._visit_types = (now, types)
        return types

    # -- availability ------------------------------------------------------------------------
    async def availability(self, q: AvailabilityQuery) -> list[ResourceAvailability]:
        prac_keys = [to_legacy_key(self.doc.actors["Practitioner"].id, p) for p in q.practitioner_ids]
        return await self.db.run(lambda conn: self._availability(conn, q.window, prac_keys, set(q.location_ids)))

    def _section_values(self, section: str, window: Interval, prac_keys: list[Any]) -> dict[str, Any]:
        spec = getattr(self.doc.availability, section)
        m, ctx = self.mapping, self._ctx
        env = {"window_start": window.start, "window_end": window.end, "practitioner_keys": prac_keys}
        values = {name: m.expr(f"availability.{section}.binds.{name}").evaluate(env, ctx) for name in spec.binds}
        values["practitioner_keys"] = prac_keys
        return values

    def _run_section(self, conn: Any, section: str, window: Interval, prac_keys: list[Any]) -> list[dict[str, Any]]:
        spec = getattr(self.doc.availability, section)
        rows = dict_rows(self.db.select(conn, spec.sql, self._section_values(section, window, prac_keys)))
        return self._map_section(section, rows, window)

    def _map_section(self, section: str, rows: list[dict[str, Any]], window: Interval) -> list[dict[str, Any]]:
        """Query rows -> one dict of the section's fields per row (per occurrence, for a ``repeat``)."""
        spec = getattr(self.doc.availability, section)
        m, ctx = self.mapping, self._ctx
        base = f"availability.{section}.fields"
        exprs = [m.expr(f"{base}.{name}") for name in spec.fields]
        if spec.repeat is not None:
            exprs.append(m.expr(f"availability.{section}.repeat"))
        rows = _in_mapping_case(rows, {name for e in exprs for name in e.inputs})
        fields = [(name, e.evaluate) for name, e in zip(spec.fields, exprs, strict=False)]
        if spec.repeat is None:
            memos = self._field_memos.setdefault(section, {})
            return _map_rows(rows, list(zip(spec.fields, exprs, strict=False)), ctx, memos)
        # A recurring legacy row stands for one occurrence per date the mapping's `repeat` expression
        # yields inside the window; each occurrence is evaluated with its date as input `occurrence`.
        repeat = m.expr(f"availability.{section}.repeat")
        out: list[dict[str, Any]] = []
        for row in rows:
            for day in repeat.evaluate({**row, "window_start": window.start, "window_end": window.end}, ctx) or ():
                occurrence = {**row, "occurrence": day}
                out.append({name: evaluate(occurrence, ctx) for name, evaluate in fields})
        return out

    def _availability(
        self, conn: Any, window: Interval, prac_keys: list[Any], location_ids: set[str]
    ) -> list[ResourceAvailability]:
        """Working time minus absences, and busy time, per (practitioner, location), as epoch-second spans.

        Seconds, not datetimes: ``$find`` computes on them, and a long window has thousands of busy rows
        (see ``_busy_spans``). The answer is what the datetime arithmetic gave (``adapter.intervals``), with
        legacy times cut to whole seconds before the arithmetic instead of after it.
        """
        if not prac_keys:
            return []
        av = self.doc.availability
        zone = self._ctx.zone
        free: dict[tuple[str, str], list[Span]] = {}
        anchors: dict[tuple[str, str], list[int]] = {}
        rows = self._run_section(conn, "working_time", window, prac_keys)
        if av.working_time.kind == "weekly":
            self._weekly_periods(rows, window, location_ids, free, anchors)
        else:
            periods: Iterable[tuple[tuple[str, str], Interval]]
            if av.working_time.kind == "markers":
                periods = _marker_periods(rows, zone)  # anchored where the office opens
            else:  # free_slots: the legacy system lists bookable slots itself
                periods = (((str(r["practitioner"]), str(r["location"])), Interval(r["start"], r["end"])) for r in rows)
            for key, iv in periods:
                if location_ids and key[1] not in location_ids:
                    continue
                start, end = max(iv.start, window.start), min(iv.end, window.end)
                if start < end:
                    free.setdefault(key, []).append((int(start.timestamp()), int(end.timestamp())))
                    anchors.setdefault(key, []).append(self._anchor_seconds(int(iv.start.timestamp())))

        absences: dict[str, list[Span]] = {}
        if av.absences is not None:
            for r in self._run_section(conn, "absences", window, prac_keys):
                if r.get("start") is None and r.get("date") is not None:
                    iv = _whole_days(r, zone)
                elif r.get("start") is not None:
                    iv = Interval(r["start"], r.get("end") or r["start"] + dt.timedelta(minutes=int(r["minutes"])))
                else:
                    continue
                absences.setdefault(str(r["practitioner"]), []).append(
                    (int(iv.start.timestamp()), int(iv.end.timestamp()))
                )
        busy = self._busy_spans(conn, window, prac_keys)

        result = []
        for (prac, loc), spans in sorted(free.items()):
            bookable = subtract_spans(merge_spans(spans), absences.get(prac, ()))
            if bookable:
                result.append(
                    ResourceAvailability.in_seconds(
                        prac, loc, bookable, busy.get(prac, []), sorted(anchors.get((prac, loc), []))
                    )
                )
        return result

    def _weekly_periods(
        self,
        rows: list[dict[str, Any]],
        window: Interval,
        location_ids: set[str],
        free: dict[tuple[str, str], list[Span]],
        anchors: dict[tuple[str, str], list[int]],
    ) -> None:
        """Weekly template rows -> the window's working-time periods (``working_time.kind: weekly``).

        A 90-day window of 20 practitioners has ~1,500 periods: each local day is turned into an instant
        once (``_local_day``), and a period's bounds are that plus the time of day, in integers. Only a day
        on which the zone changes its offset (or a time of day that is not a whole second in 0..24 h) takes
        the zone arithmetic per period (``_wall_clock``), which handles skipped and repeated hours.
        """
        zone = self._ctx.zone
        first = window.start.astimezone(zone).date()
        last = window.end.astimezone(zone).date()
        w_start_s, w_end_s = int(window.start.timestamp()), int(window.end.timestamp())
        by_weekday: dict[Any, list[tuple[Any, Any, tuple[str, str], Any, Any, int | None, int | None]]] = {}
        for r in rows:
            loc = str(r["location"])
            if location_ids and loc not in location_ids:
                continue
            start_time, end_time = r["start_time"], r["end_time"]
            by_weekday.setdefault(r["weekday"], []).append(
                (
                    r.get("valid_from"),
                    r.get("valid_to"),
                    (str(r["practitioner"]), loc),
                    start_time,
                    end_time,
                    _seconds_in_day(start_time),
                    _seconds_in_day(end_time),
                )
            )
        by_midnight = self.doc.visit_types.slot_alignment != "period"
        day = first
        one_day = dt.timedelta(days=1)
        while day <= last:
            periods = by_weekday.get(day.isoweekday())
            if periods:
                midnight_s, uniform = _local_day(day, zone)
                for valid_from, valid_to, key, start_time, end_time, start_off, end_off in periods:
                    if (valid_from is not None and day < valid_from) or (valid_to is not None and valid_to < day):
                        continue
                    if uniform and start_off is not None and end_off is not None:
                        period_s, end_s = midnight_s + start_off, midnight_s + end_off
                    else:
                        period_s, end_s = _wall_clock(day, start_time, zone), _wall_clock(day, end_time, zone)
                    start_s = period_s if period_s >= w_start_s else w_start_s
                    if end_s > w_end_s:
                        end_s = w_end_s
                    if start_s < end_s:
                        free.setdefault(key, []).append((start_s, end_s))
                        if not by_midnight:
                            anchor = period_s
                        elif uniform and start_off is not None and start_off < 86400:
                            anchor = midnight_s
                        else:
                            anchor = self._anchor_seconds(period_s)
                        anchors.setdefault(key, []).append(anchor)
            day += one_day

    def _busy(self, conn: Any, window: Interval, prac_keys: list[Any]) -> dict[str, list[tuple[str | None, Interval]]]:
        """Blocking appointments with their ids (the re-check of a write)."""
        out: dict[str, list[tuple[str | None, Interval]]] = {}
        w_start, w_end = window.start, window.end
        for r in self._run_section(conn, "busy", window, prac_keys):
            start = r["start"]
            end = r.get("end") or start + dt.timedelta(minutes=r["minutes"])
            if start < w_end and w_start < end:
                out.setdefault(str(r["practitioner"]), []).append((r.get("appointment"), Interval(start, end)))
        return out

    def _busy_spans(self, conn: Any, window: Interval, prac_keys: list[Any]) -> dict[str, list[Span]]:
        """Busy time per practitioner, as sorted epoch-second spans: the read behind every ``$find``.

        A long window returns thousands of rows; the general path (a dict per row, every field of the
        mapping evaluated, an Interval of two datetimes) cost ~5 us per row, several times the query.
        Here each row goes from the driver's tuple to ``(practitioner, start, end)`` through a converter
        made once per column layout (``_BusyRows``): the mapping's expressions are pure functions of
        their input columns, so each distinct set of input values is converted once and remembered,
        across requests (legacy calendars repeat the same few thousand dates, times and durations).
        Mappings the converter cannot take (``repeat``, ``python:`` converters, inputs that are not
        columns) go the general way; the answer is the same.
        """
        spec = self.doc.availability.busy
        w_start_s = int(window.start.timestamp())
        w_end_s = math.ceil(window.end.timestamp())  # so the overlap test below is exact for whole seconds
        out: dict[str, list[Span]] = {}
        if spec.repeat is None:
            cur = self.db.select(conn, spec.sql, self._section_values("busy", window, prac_keys))
            names = tuple(d[0] for d in cur.description)
            converter = self._busy_rows.get(names)
            if converter is None:
                converter = self._busy_rows[names] = _BusyRows.build(self.mapping, names)
            rows = cur.fetchall()
            if converter is not None:
                return converter.by_practitioner(rows, self._ctx, w_start_s, w_end_s)
            mapped = self._map_section("busy", [dict(zip(names, row, strict=False)) for row in rows], window)
        else:
            mapped = self._run_section(conn, "busy", window, prac_keys)
        for r in mapped:
            start_s, end_s = _busy_span(r)
            if start_s < w_end_s and w_start_s < end_s:
                out.setdefault(str(r["practitioner"]), []).append((start_s, end_s))
        for spans in out.values():
            spans.sort()
        return out

    # -- writes ------------------------------------------------------------------------------
    def _check_slot(self, conn: Any, slot: SlotRequest, ignore_appointment: str | None = None) -> None:
        """Inside the write unit: the slot lies in working time and overlaps no blocking appointment."""
        prac_key = self._key("Practitioner", slot.practitioner_id)
        iv = slot.interval
        offered = self._availability(conn, iv, [prac_key], {slot.location_id})
        covered = any(f.start <= iv.start and iv.end <= f.end for ra in offered for f in ra.free)
        if not covered:
            raise InvalidRequest(
                f"Practitioner/{slot.practitioner_id} does not work at Location/{slot.location_id} from "
                f"{self._local(iv.start)} to {self._local(iv.end)} (outside working hours or absent)"
            )
        ignore: set[str] = set()
        if ignore_appointment is not None:
            ignore = {ignore_appointment, str(self._key("Appointment", ignore_appointment))}
        for appt_id, busy in self._busy(conn, iv, [prac_key]).get(slot.practitioner_id, []):
            if busy.overlaps(iv) and (appt_id is None or str(appt_id).strip() not in ignore):
                raise SlotConflict(
                    f"Practitioner/{slot.practitioner_id} is already booked from "
                    f"{self._local(busy.start)} to {self._local(busy.end)}"
                    + (f" (Appointment/{str(appt_id).strip()})" if appt_id is not None else "")
                )
        self._check_patients(conn, slot, ignore_appointment)

    def _local(self, instant: dt.datetime) -> str:
        """An instant as the resources state it: wall-clock time in the mapping's zone, with offset."""
        return instant.astimezone(self.zone).isoformat()

    def _lock_patients(self, conn: Any, patient_ids: Iterable[str]) -> None:
        """Inside the write unit, after the practitioner lock(s): lock the patients' rows too, so two
        bookings of one patient with different practitioners are serialised (issue 7.1).

        Lock order is always practitioners (sorted), then patients (sorted): no two units wait on
        each other in opposite order. ``writes.patient_lock`` names the statement; without it the
        Patient actor's select filtered by key is used. A patient that does not exist is 422.
        """
        writes = self._require_writes()
        if writes.patient_lock is not None:
            sql, bind_name = writes.patient_lock.sql, "patient_key"
        else:
            spec = self.doc.actors["Patient"]
            sql, bind_name = f"SELECT * FROM ({spec.select}) q WHERE {spec.filters['key']}", "keys"
        locking = self.db.lockable(sql)
        for pid in sorted(set(patient_ids)):
            key = self._key("Patient", pid)
            if not query(conn, locking, {bind_name: [key] if bind_name == "keys" else key}):
                raise BusinessRuleViolation(f"Patient/{pid} does not exist in the legacy system")

    def _check_patients(self, conn: Any, slot: SlotRequest, ignore_appointment: str | None = None) -> None:
        """Inside the write unit (patients locked): no active appointment of the slot's patients, with
        any practitioner, overlaps the slot (issue 7.1)."""
        if not slot.patient_ids:
            return
        from adapter.backends.sql.search import _Plan

        ap = self.doc.appointments
        if "patient" not in ap.filters or "start_from" not in ap.filters or "start_before" not in ap.filters:
            return  # the loader warns: this mapping cannot tell a patient's appointments by time
        iv = slot.interval
        plan = _Plan(self)
        keys = [self._key("Patient", p) for p in slot.patient_ids]
        plan.where.add(ap.filters["patient"], {"patient_keys": keys})
        table = ap.codes.get("status")
        if table is not None and "status" in ap.filters:
            legacy = sorted({c for s in _PATIENT_BLOCKING for c in self.mapping.codes.legacy_codes(table, s)})
            if legacy:
                plan.where.add(ap.filters["status"], {"status_codes": legacy})
        # One day earlier: an appointment that starts the day before may still run into the slot.
        plan.where.conditions.append(plan.start_cond("ge", iv.start - dt.timedelta(days=1)))
        plan.where.conditions.append(plan.start_cond("lt", iv.end))
        rows = query(conn, f"SELECT * FROM ({ap.select}) q{plan.where.text()}", dict(plan.where.values))
        for appt in self.appointments_from_rows(rows, []):
            if appt.status in _PATIENT_BLOCKING and appt.interval.overlaps(iv) and appt.id != ignore_appointment:
                raise SlotConflict(
                    f"Patient/{appt.patient_id} already has Appointment/{appt.id}"
                    + (f" with Practitioner/{appt.practitioner_id}" if appt.practitioner_id else "")
                    + f" from {self._local(appt.interval.start)} to {self._local(appt.interval.end)}"
                )

    def _require_storable(self, start: dt.datetime) -> None:
        """The legacy columns keep start times to ``appointments.start_resolution_seconds``: a start
        between two such points is refused, never truncated into another time (issue 7.3)."""
        resolution = self.doc.appointments.start_resolution_seconds
        local = start.astimezone(self.zone)
        if local.microsecond or (local.hour * 3600 + local.minute * 60 + local.second) % resolution:
            raise BusinessRuleViolation(
                f"the legacy system stores start times to {resolution} s; {self._local(start)} cannot be "
                "stored exactly and is not booked"
            )

    def _key(self, kind: KeyKind, fhir_id: str) -> Any:
        """The legacy key of a FHIR id; an id that cannot be one of ours is a bad request."""
        try:
            return self.legacy_key(kind, fhir_id)
        except InvalidKey as exc:
            raise InvalidRequest(f"{kind}/{fhir_id} cannot exist in this legacy system: {exc}") from None

    def _lock_binds(self, practitioner_ids: Iterable[str]) -> list[dict[str, Any]]:
        # Sorted: two units that lock the same practitioners always lock them in the same order,
        # so a reschedule between two practitioners cannot deadlock with another one.
        keys = sorted({self._key("Practitioner", p) for p in practitioner_ids}, key=str)
        return [{"practitioner_key": k} for k in keys]

    def _require_writes(self) -> WritesSpec:
        if self.doc.writes is None:
            raise BusinessRuleViolation(
                f"mapping {self.mapping.path.name} declares no 'writes': this backend is read-only"
            )
        return self.doc.writes

    async def _write(self, work: Any) -> Any:
        """Run one write unit in a DB thread; driver refusals become BusinessRuleViolation (422)."""
        try:
            return await self.db.run(work, write=True)
        except (BackendError, InvalidKey):
            raise
        except LockNotTaken as exc:
            raise BusinessRuleViolation(
                f"the legacy system refused the write: {exc} (the practitioner may no "
                "longer exist, or the mapping's writes.lock is wrong)"
            ) from exc
        except Exception as exc:
            if isinstance(exc, sqlite3.Error) or type(exc).__module__ == "pyodbc":
                raise BusinessRuleViolation(f"the legacy database refused the write: {_first_line(exc)}") from exc
            raise

    async def secure(self, slots: Sequence[SlotRequest], gate: ConflictGate) -> None:
        writes = self._require_writes()
        lock_binds = self._lock_binds(s.practitioner_id for s in slots)

        gated: list[bool] = []

        def work(conn: Any) -> None:
            patients = [p for s in slots for p in s.patient_ids]
            with self.db.write(conn, writes.lock.sql, lock_binds, also_locks=_patient_locks(patients)):
                self._lock_patients(conn, patients)
                for slot in slots:
                    self._check_slot(conn, slot)
                gate(slots)
                gated.append(True)

        try:
            await self._write(work)
        except CommitOutcomeUnknown:
            # Nothing was written to the legacy system; the check and the gate ran under the lock,
            # so what the gate recorded stands even though the read-only COMMIT did not answer.
            if not gated:
                raise

    def _statement_values(self, stmt_name: str, env: dict[str, Any]) -> dict[str, Any]:
        writes = self._require_writes()
        stmt = getattr(writes, stmt_name)
        m, ctx = self.mapping, self._ctx
        values = dict(env)
        for name in stmt.binds:
            values[name] = m.expr(f"writes.{stmt_name}.binds.{name}").evaluate(env, ctx)
        return values

    def _grid_anchor(self, period_start: dt.datetime) -> dt.datetime:
        """Where the slot grid of a working-time period begins (``visit_types.slot_alignment``): the period's own
        start, or local midnight of its day, so that starts fall on the clock (:00, :15, ...) whatever the
        session's opening time."""
        if self.doc.visit_types.slot_alignment == "period":
            return period_start
        zone = self._ctx.zone
        midnight = dt.datetime.combine(period_start.astimezone(zone).date(), dt.time())
        return attach_zone(midnight, zone).astimezone(dt.UTC)

    def _anchor_seconds(self, period_start: int) -> int:
        """``_grid_anchor`` in epoch seconds, remembered by period start (a window has hundreds of periods
        on a few dozen distinct days and times; the zone arithmetic costs microseconds each)."""
        anchor = self._anchors.get(period_start)
        if anchor is None:
            if len(self._anchors) >= _MEMO_LIMIT:
                self._anchors.clear()
            instant = dt.datetime.fromtimestamp(period_start, dt.UTC)
            anchor = self._anchors[period_start] = int(self._grid_anchor(instant).timestamp())
        return anchor

    def _slot_env(self, slot: SlotRequest) -> dict[str, Any]:
        return {
            "practitioner_key": self._key("Practitioner", slot.practitioner_id),
            "location_key": self._key("Location", slot.location_id),
            "start": slot.interval.start,
            "end": slot.interval.end,
            "minutes": int((slot.interval.end - slot.interval.start).total_seconds() // 60),
            "visit_type_key": slot.visit_type_key,
            "now": dt.datetime.now(dt.UTC),
        }

    def _allocate_id(self, cur: Any) -> Any:
        """The new appointment's key, inside the write unit.

        ``counter``: the counter row is read *with a row lock* (``FOR UPDATE`` on server
        databases) and bumped in the same transaction. The booking lock alone is per practitioner,
        so without it two bookings for different practitioners read the same value and the second
        insert fails on the primary key (seen on PostgreSQL and MariaDB under READ COMMITTED).
        ``sequence``: the database hands out values atomically. ``uuid``: generated here.
        ``database``: read back after the insert (``last_id_sql``, same connection).
        """
        alloc = self._require_writes().id_allocation
        if alloc.strategy == "uuid":
            import uuid

            return str(uuid.uuid4())
        if alloc.strategy in ("counter", "sequence"):
            assert alloc.next_sql is not None  # the loader requires it for these strategies
            sql = self.db.lockable(alloc.next_sql) if alloc.strategy == "counter" else alloc.next_sql
            rows = query(cur, sql, {})
            if not rows:
                raise BusinessRuleViolation("the id counter row declared by writes.id_allocation.next_sql is missing")
            value = next(iter(rows[0].values()))
            if alloc.strategy == "counter":
                assert alloc.bump_sql is not None  # the loader requires it for this strategy
                execute(cur, alloc.bump_sql, {})
            return value
        return None  # database-generated: read back after insert

    def _read_appointment(self, cur: Any, key: Any) -> Appointment | None:
        ap = self.doc.appointments
        rows = query(cur, f"SELECT * FROM ({ap.select}) q WHERE {ap.filters['key']}", {"keys": [key]})
        return self.appointment_from_row(rows[0]) if rows else None

    async def book(self, booking: NewBooking, gate: ConflictGate) -> BookingOutcome:
        writes = self._require_writes()
        slot = booking.slot
        patient_key = self._key("Patient", booking.patient_id)
        lock_binds = self._lock_binds([slot.practitioner_id])
        env = self._slot_env(slot) | {
            "patient_key": patient_key,
            "comment": booking.comment,
            "booked_by": booking.booked_by,
        }

        self._require_storable(slot.interval.start)
        if booking.patient_id not in slot.patient_ids:
            slot = SlotRequest(
                slot.practitioner_id,
                slot.location_id,
                slot.interval,
                slot.visit_type_key,
                (*slot.patient_ids, booking.patient_id),
            )

        def work(conn: Any) -> str:
            # The counter row (strategy counter) is locked by every booking: its waiters queue too.
            counter = ["id-counter"] if writes.id_allocation.strategy == "counter" else []
            with self.db.write(
                conn, writes.lock.sql, lock_binds, also_locks=_patient_locks(slot.patient_ids) + counter
            ) as cur:
                self._lock_patients(cur, slot.patient_ids)  # also proves the patient exists
                self._check_slot(conn, slot)
                gate([slot])
                new_id = self._allocate_id(cur)
                execute(cur, writes.book.sql, self._statement_values("book", env | {"new_id": new_id}))
                if new_id is None:
                    last_id_sql = writes.id_allocation.last_id_sql
                    assert last_id_sql is not None  # the loader requires it for strategy "database"
                    new_id = next(iter(query(cur, last_id_sql, {})[0].values()))
                return to_fhir_id(self.doc.appointments.id, new_id)

        appt_id = await self._write(work)
        appt = await self.get_appointment(appt_id)
        if appt is None:  # pragma: no cover - would mean the mapping's read query cannot see its own insert
            raise BusinessRuleViolation(
                f"Appointment/{appt_id} was written but cannot be read back; check appointments.select"
            )
        return Confirmed(appt)

    async def find_booked(self, slot: SlotRequest, patient_id: str | None, placer_id: str = "") -> Appointment | None:
        """The blocking appointment that a booking of ``slot`` for ``patient_id`` wrote, if any.

        Used to settle a booking whose outcome is unknown (the process died or the connection broke
        between the legacy COMMIT and recording it): the same mapping queries $find uses.
        """
        prac_key = self._key("Practitioner", slot.practitioner_id)

        def load(conn: Any) -> list[str]:
            return [
                str(a)
                for a, iv in self._busy(conn, slot.interval, [prac_key]).get(slot.practitioner_id, [])
                if a is not None and iv.start == slot.interval.start and iv.end == slot.interval.end
            ]

        for legacy_id in await self.db.run(load):
            try:
                appt = await self.get_appointment(to_fhir_id(self.doc.appointments.id, legacy_id))
            except InvalidKey:
                continue
            if appt is not None and (patient_id is None or appt.patient_id == patient_id):
                return appt
        return None

    async def reschedule(
        self,
        appointment_id: str,
        new_slot: SlotRequest,
        gate: ConflictGate,
        comment: str | None = None,
        booked_by: str | None = None,
    ) -> BookingOutcome:
        writes = self._require_writes()
        current = await self.get_appointment(appointment_id)
        if current is None:
            raise NotFound(f"Appointment/{appointment_id} is not known")
        key = self._key("Appointment", appointment_id)
        self._require_storable(new_slot.interval.start)
        involved = [new_slot.practitioner_id] + ([current.practitioner_id] if current.practitioner_id else [])
        env = self._slot_env(new_slot) | {
            "appointment_key": key,
            "comment": comment,
            "booked_by": booked_by or "sched-adapter",
        }

        def work(conn: Any) -> None:
            with self.db.write(
                conn, writes.lock.sql, self._lock_binds(involved), also_locks=_patient_locks(new_slot.patient_ids)
            ) as cur:
                self._lock_patients(cur, new_slot.patient_ids)
                # Re-read under the lock: a concurrent change must not be overwritten blindly.
                now_row = self._read_appointment(cur, key)
                if now_row is None:
                    raise NotFound(f"Appointment/{appointment_id} is not known")
                _refuse_status(appointment_id, now_row.status, writes.reschedule.allowed_statuses, "rescheduled")
                if now_row.status in _FINAL_STATUSES:
                    raise BusinessRuleViolation(
                        f"Appointment/{appointment_id} is {now_row.status} and cannot be modified"
                    )
                if now_row.practitioner_id != current.practitioner_id:
                    raise SlotConflict(
                        f"Appointment/{appointment_id} was changed by someone else meanwhile; read it again"
                    )
                # The new time is checked and written in the same transaction that frees the old one,
                # so a failure leaves the original booking exactly as it was.
                self._check_slot(conn, new_slot, ignore_appointment=appointment_id)
                gate([new_slot])
                if execute(cur, writes.reschedule.sql, self._statement_values("reschedule", env)) == 0:
                    raise NotFound(f"Appointment/{appointment_id} is not known")

        await self._write(work)
        return await self._confirmed(appointment_id)

    async def _confirmed(self, appointment_id: str) -> Confirmed:
        """The appointment a committed reschedule or cancellation left behind, as the legacy system reads it."""
        appt = await self.get_appointment(appointment_id)
        if appt is None:  # pragma: no cover - deleted right after our commit
            raise NotFound(f"Appointment/{appointment_id} is not known")
        return Confirmed(appt)

    async def cancel(
        self, appointment_id: str, reason: Coding | None, reason_text: str | None, booked_by: str | None = None
    ) -> BookingOutcome:
        writes = self._require_writes()
        key = self._key("Appointment", appointment_id)
        reason_dict = {"system": reason.system, "code": reason.code} if reason else None
        env = {
            "appointment_key": key,
            "reason": reason_dict,
            "reason_text": reason_text,
            "now": dt.datetime.now(dt.UTC),
            "booked_by": booked_by or "sched-adapter",  # who changes it: the client, as for a booking
        }

        def work(conn: Any) -> None:
            # No booking lock: a cancellation only frees time, it cannot create a conflict.
            with self.db.write(conn, None, []) as cur:
                if writes.cancel.allowed_statuses is not None:
                    current = self._read_appointment(cur, key)
                    if current is not None and current.status != "cancelled":
                        _refuse_status(appointment_id, current.status, writes.cancel.allowed_statuses, "cancelled")
                if execute(cur, writes.cancel.sql, self._statement_values("cancel", env)) == 0:
                    raise NotFound(f"Appointment/{appointment_id} is not known")

        await self._write(work)
        return await self._confirmed(appointment_id)

    # -- existing appointments ---------------------------------------------------------------
    def appointments_from_rows(self, rows: Iterable[dict[str, Any]], warnings: list[str]) -> list[Appointment]:
        """Rows -> appointments; a row the mapping cannot render (e.g. a legacy code missing from a
        code table that declares no fallback) is skipped with a warning instead of failing the whole
        answer. Fallback substitutions are reported in ``warnings`` as well."""
        out: list[Appointment] = []
        ap = self.doc.appointments
        names = {n for name in ap.fields for n in self.mapping.expr(f"appointments.fields.{name}").inputs}
        names.add(ap.key)
        for row in _in_mapping_case(list(rows), names):
            try:
                appt = self.appointment_from_row(row)
            except (UnknownCode, ExpressionError, ValueError, TypeError, KeyError) as exc:
                try:
                    key = str(_column(row, self.doc.appointments.key)).strip()
                except KeyError:
                    key = "?"
                warnings.append(f"legacy appointment {key} cannot be shown and was left out: {exc}")
                continue
            warnings.extend(f"Appointment/{appt.id}: {w}" for w in appt.warnings)
            out.append(appt)
        return out

    def appointment_from_row(self, row: dict[str, Any]) -> Appointment:
        ap = self.doc.appointments
        m, ctx = self.mapping, self._ctx
        with fallback_notes() as notes:
            f = {name: m.expr(f"appointments.fields.{name}").evaluate(row, ctx) for name in ap.fields}
        start = f["start"]
        end = f.get("end") or start + dt.timedelta(minutes=int(f["minutes"]))
        idents = render_template(m.expr("appointments.identifier"), row, ctx) or []
        reason = f.get("status_reason")
        status = f["status"]
        return Appointment(
            id=to_fhir_id(ap.id, _column(row, ap.key)),
            status=str(status if isinstance(status, str) else status.get("code")),
            interval=Interval(start, end),
            practitioner_id=_opt_str(f.get("practitioner")),
            location_id=_opt_str(f.get("location")),
            patient_id=_opt_str(f.get("patient")),
            visit_type_key=_opt_str(f.get("visit_type")),
            identifiers=tuple(Identifier(i["system"], i["value"]) for i in idents),
            comment=f.get("comment"),
            status_reason=Coding(reason["system"], reason["code"], reason.get("display"))
            if isinstance(reason, dict)
            else None,
            cancel_text=f.get("cancel_text"),
            warnings=tuple(notes),
        )

    async def get_appointment(self, appointment_id: str) -> Appointment | None:
        ap = self.doc.appointments
        try:
            key = to_legacy_key(ap.id, appointment_id)
        except InvalidKey:
            return None
        sql = f"SELECT * FROM ({ap.select}) q WHERE {ap.filters['key']}"

        def load(conn: Any) -> Appointment | None:
            rows = query(conn, sql, {"keys": [key]})
            return self.appointment_from_row(rows[0]) if rows else None

        return await self.db.run(load)

    async def search_appointments(self, q: AppointmentQuery) -> AppointmentPage:
        from adapter.backends.sql.search import search_appointments

        return await search_appointments(self, q)

    async def start(self, publish: ChangePublisher) -> None:
        """Nothing to start: the pool connects on first use, and a database pushes no changes."""

    async def stop(self) -> None:
        await self.db.close()

    async def ping(self) -> None:
        def select_one(conn: Any) -> None:
            cur = conn.cursor()
            cur.execute("SELECT 1")
            cur.fetchall()

        await self.db.run(select_one)

    async def close(self) -> None:
        await self.db.close()


def _patient_locks(patient_ids: Iterable[str]) -> list[str]:
    """Names of the patient rows a write unit locks after the booking lock (``Database.write(also_locks=)``)."""
    return [f"Patient/{p}" for p in sorted(set(patient_ids))]


def _refuse_status(appointment_id: str, status: str, allowed: list[str] | None, change: str) -> None:
    """``writes.<change>.allowed_statuses``: a state the legacy system does not allow is a conflict (409)."""
    if allowed is not None and status not in allowed:
        raise SlotConflict(
            f"Appointment/{appointment_id} is {status}; this system lets only {', '.join(allowed)} "
            f"appointments be {change}"
        )


def apply_fold(condition: str, declared: ReadOnlyMap[Any, str], dialect: str, kind: str) -> str:
    """``FOLD(col)`` in a filter -> the folding SQL: ``system.sql_fold[dialect]``, else the default."""
    if "FOLD(" not in condition.upper():
        return condition
    template = declared.get(dialect) or _DEFAULT_FOLD.get(kind) or _DEFAULT_FOLD.get(dialect) or "LOWER({})"
    return _FOLD_CALL.sub(lambda m: template.replace("{}", m.group(1)), condition)


def _map_rows(
    rows: list[dict[str, Any]],
    fields: list[tuple[str, Any]],
    ctx: Any,
    memos: dict[str, dict[Any, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate each field of each row, once per distinct input: availability rows repeat the same
    practitioner, duration, time of day and date over and over (hundreds of rows, a few dozen
    distinct values), and a mapping expression is a pure function of its input columns (``python:``
    converters excepted: those are evaluated for every row). ``memos`` (by field name) keeps what
    was evaluated for the next call with the same fields and context (bounded by ``_MEMO_LIMIT``)."""
    if not rows:
        return []
    first = rows[0]
    plans: list[tuple[str, Any, tuple[str, ...] | None, dict[Any, Any]]] = []
    for name, expr in fields:
        inputs = expr.inputs
        pure = "python" not in expr.source and inputs and all(i in first for i in inputs)
        memo: dict[Any, Any] = {} if memos is None else memos.setdefault(name, {})
        if len(memo) >= _MEMO_LIMIT:
            memo.clear()
        plans.append((name, expr.evaluate, inputs if pure else None, memo))
    out: list[dict[str, Any]] = []
    for row in rows:
        mapped: dict[str, Any] = {}
        for name, evaluate, inputs, memo in plans:
            if inputs is None:
                mapped[name] = evaluate(row, ctx)
                continue
            key = row[inputs[0]] if len(inputs) == 1 else tuple(row[i] for i in inputs)
            try:
                value = memo[key]
            except KeyError:
                value = memo[key] = evaluate(row, ctx)
            except TypeError:  # an unhashable driver value
                value = evaluate(row, ctx)
            mapped[name] = value
        out.append(mapped)
    return out


def _in_mapping_case(rows: list[dict[str, Any]], names: set[str]) -> list[dict[str, Any]]:
    """Rows whose column names are spelled as the mapping spells them.

    Engines disagree on the case of unquoted names (PostgreSQL folds to lower case); expressions
    then find each column by a case-insensitive scan of the row, which cost more than the rest of
    the row mapping together on PostgreSQL. Renaming once per row is far cheaper. Names the first
    row has no column for (binds, ``occurrence``) are left to the expressions."""
    if not rows:
        return rows
    first = rows[0]
    by_lower = {key.lower(): key for key in first}
    rename = {
        actual: name
        for name in names
        if name not in first and (actual := by_lower.get(name.lower())) is not None and actual != name
    }
    if not rename:
        return rows
    return [{rename.get(key, key): value for key, value in row.items()} for row in rows]


def _busy_span(r: dict[str, Any]) -> Span:
    """A mapped busy row's time: ``start`` .. ``end``, or ``start`` + ``minutes``."""
    start = r["start"]
    end = r.get("end") or start + dt.timedelta(minutes=r["minutes"])
    return int(start.timestamp()), int(end.timestamp())


class _BusyRows:
    """The busy query's rows -> (practitioner, start, end, (start, end)), for one column layout.

    Made once from the mapping (which expressions, which columns feed them, at which positions); each
    distinct tuple of input values is converted by the mapping's own expressions exactly once and
    remembered (``memo``), so a row costs one tuple and one dict lookup.
    """

    __slots__ = ("fields", "inputs", "key_of", "single", "memo")

    def __init__(self, fields: dict[str, Any], inputs: tuple[str, ...], positions: list[int]) -> None:
        self.fields = fields
        self.inputs = inputs
        self.key_of = itemgetter(*positions)
        self.single = len(positions) == 1
        self.memo: dict[Any, tuple[str, int, int, Span]] = {}

    @classmethod
    def build(cls, mapping: Mapping, names: tuple[str, ...]) -> _BusyRows | None:
        """The converter for rows with columns ``names``; None when only the general path can map them."""
        spec = mapping.doc.availability.busy
        fields = {
            name: mapping.expr(f"availability.busy.fields.{name}")
            for name in spec.fields
            if name in ("practitioner", "start", "end", "minutes")
        }
        if "practitioner" not in fields or "start" not in fields:
            return None
        if any("python" in e.source for e in fields.values()):
            return None  # a python: converter need not be a pure function of its inputs: evaluated per row
        inputs = tuple(dict.fromkeys(name for e in fields.values() for name in e.inputs))
        by_lower = {n.lower(): i for i, n in reversed(list(enumerate(names)))}
        positions = []
        for name in inputs:
            position = names.index(name) if name in names else by_lower.get(name.lower())
            if position is None:
                return None  # not a column of the query (the general path reports it)
            positions.append(position)
        return cls(fields, inputs, positions) if positions else None

    def by_practitioner(
        self, rows: Iterable[Sequence[Any]], ctx: Any, window_start: int, window_end: int
    ) -> dict[str, list[Span]]:
        """The rows' busy spans that overlap [window_start, window_end), per practitioner, sorted."""
        memo, key_of = self.memo, self.key_of
        out: dict[str, list[Span]] = {}
        for row in rows:
            key = key_of(row)
            try:
                prac, start, end, span = memo[key]
            except KeyError:
                prac, start, end, span = value = self._convert(key, ctx)
                if len(memo) >= _MEMO_LIMIT:
                    memo.clear()
                memo[key] = value
            except TypeError:  # an unhashable driver value: converted every time
                prac, start, end, span = self._convert(key, ctx)
            if start < window_end and window_start < end:
                spans = out.get(prac)
                if spans is None:
                    out[prac] = [span]
                else:
                    spans.append(span)
        for spans in out.values():
            spans.sort()
        return out

    def _convert(self, key: Any, ctx: Any) -> tuple[str, int, int, Span]:
        row = dict(zip(self.inputs, (key,) if self.single else key, strict=True))
        mapped = {name: expr.evaluate(row, ctx) for name, expr in self.fields.items()}
        span = _busy_span(mapped)
        return str(mapped["practitioner"]), span[0], span[1], span


@functools.lru_cache(maxsize=8192)
def _wall_clock(day: dt.date, offset: dt.timedelta, zone: dt.tzinfo) -> int:
    """Local ``day`` + ``offset`` (a time of day; 24:00 is the next midnight) as an epoch second."""
    return int(attach_zone(dt.datetime.combine(day, dt.time()) + offset, zone).timestamp())


@functools.lru_cache(maxsize=4096)
def _local_day(day: dt.date, zone: dt.tzinfo) -> tuple[int, bool]:
    """The epoch second of local midnight starting ``day``, and whether the day is 24 hours long, i.e.
    the zone keeps one offset from this midnight to the next (then local ``day`` + ``t`` is that
    second + ``t`` for every ``t`` in 0..24 h; zones change their offset at most once a day)."""
    midnight = _wall_clock(day, dt.timedelta(0), zone)
    return midnight, _wall_clock(day, dt.timedelta(days=1), zone) - midnight == 86400


def _seconds_in_day(offset: Any) -> int | None:
    """A time of day (timedelta) as whole seconds in 0..86400, else None (then it takes the zone arithmetic)."""
    if not isinstance(offset, dt.timedelta) or offset.microseconds or not dt.timedelta(0) <= offset <= _ONE_DAY:
        return None
    return offset.days * 86400 + offset.seconds


_ONE_DAY = dt.timedelta(days=1)


def _whole_days(row: dict[str, Any], zone: Any) -> Interval:
    """A date-only absence: from local midnight of ``date`` to local midnight after ``end_date`` (or ``date``)."""
    first: dt.date = row["date"]
    last: dt.date = row.get("end_date") or first
    start = attach_zone(dt.datetime.combine(first, dt.time()), zone).astimezone(dt.UTC)
    end = attach_zone(dt.datetime.combine(last + dt.timedelta(days=1), dt.time()), zone).astimezone(dt.UTC)
    return Interval(start, end)


def _marker_periods(rows: list[dict[str, Any]], zone: Any) -> list[tuple[tuple[str, str], Interval]]:
    """Working time from "in"/"out" marker events (working-time kind ``markers``).

    Per practitioner and local day, in time order: an ``in`` marker opens a period at its location
    (unless one is open), the next ``out`` marker closes it; a period still open at the end of the
    day closes at local midnight. Markers with another value are ignored.
    """
    by_day: dict[tuple[str, dt.date], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("start") is None or r.get("marker") not in ("in", "out"):
            continue
        by_day.setdefault((str(r["practitioner"]), r["start"].astimezone(zone).date()), []).append(r)
    out: list[tuple[tuple[str, str], Interval]] = []
    for (prac, day), markers in by_day.items():
        markers.sort(key=lambda r: (r["start"], r["marker"] == "in"))
        open_at: tuple[dt.datetime, str] | None = None
        for r in markers:
            if r["marker"] == "in" and open_at is None:
                open_at = (r["start"], str(r["location"]))
            elif r["marker"] == "out" and open_at is not None:
                if open_at[0] < r["start"]:
                    out.append(((prac, open_at[1]), Interval(open_at[0], r["start"])))
                open_at = None
        if open_at is not None:
            midnight = attach_zone(dt.datetime.combine(day + dt.timedelta(days=1), dt.time()), zone)
            out.append(((prac, open_at[1]), Interval(open_at[0], midnight.astimezone(dt.UTC))))
    return out


def _name_matches(actor: Actor, prefix: str) -> bool:
    """FHIR string search on names: any name part starts with the prefix, ignoring case and accents."""
    parts = actor.display.split()
    names = actor.resource.get("name")
    if isinstance(names, str):
        parts += names.split()
    elif isinstance(names, list):
        for n in names:
            parts += [n.get("family", "")] + list(n.get("given", [])) + ([n["text"]] if n.get("text") else [])
    wanted = fold(prefix)
    return any(fold(p).startswith(wanted) for p in parts if p)


def _eval(expr: Any, row: dict[str, Any], ctx: Any) -> Any:
    return expr.evaluate(row, ctx) if hasattr(expr, "evaluate") else expr


def _column(row: dict[str, Any], name: str) -> Any:
    if name in row:
        return row[name]
    lowered = name.lower()
    for key, value in row.items():
        if key.lower() == lowered:
            return value
    raise KeyError(f"query result has no column {name!r}")


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)


def _to_codings(items: Any) -> list[Coding]:
    out = []
    for item in items if isinstance(items, list) else [items]:
        if isinstance(item, list):
            out.extend(_to_codings(item))
        elif isinstance(item, dict) and "code" in item and "system" in item:
            out.append(Coding(item["system"], str(item["code"]), item.get("display")))
    return out
