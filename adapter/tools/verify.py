"""``sched-adapter mappings verify --config CONFIG``: the acceptance run an IT team makes before go-live.

Run it against a COPY of the legacy database: it books, moves and cancels appointments there. It
starts the real application in-process (uvicorn on a free 127.0.0.1 port, real HTTP, the holds kept
in a temporary state file) and checks, for any mapping:

1. ``live check``: the mapping fits the database (``mappings check --config``; data warnings listed);
2. ``find``: every ``$find`` answer over the next 14 days lies inside the working time and outside the
   absences and busy time that the mapping's own queries return for that practitioner;
3. ``round trip``: book -> read -> search -> reschedule -> cancel leaves exactly the expected rows:
   after the booking the busy query sees exactly that one appointment at that time and ``$find`` no
   longer offers it; after the reschedule the old time is free and the new one busy; after the
   cancellation the time is offered again and the appointment reads back ``cancelled``;
4. ``race``: N clients (default 20) book one slot at once: exactly one succeeds, the others get 409,
   and the busy query sees exactly one appointment there;
5. ``DST``: on the days around every daylight-saving change of the mapping's zone in the next year,
   each proposed time carries the zone's UTC offset for that instant and lies in working time;
6. ``conformance``: every Bundle and Appointment answered passes the FHIR R4 schema and IHE
   Scheduling profile checks (``adapter.conformance.profiles``, the checkers the conformance kit uses).

It prints one line per check (PASS/FAIL/SKIP and what was seen) and exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import secrets
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from adapter.backends.protocol import ActorQuery, AvailabilityQuery, Interval
from adapter.backends.sql.backend import SqlBackend
from adapter.backends.sql.db import Database
from adapter.conformance import profiles
from adapter.mapping.expressions import attach_zone
from adapter.mapping.loader import Mapping, MappingError, load_mapping
from adapter.settings import Settings, SettingsError, load_settings

WINDOW_DAYS = 14


# --------------------------------------------------------------------------------------------------
# The application, in-process, over real HTTP
# --------------------------------------------------------------------------------------------------
class InProcessServer:
    """uvicorn serving ``build_app(settings)`` from a thread on a free 127.0.0.1 port."""

    def __init__(self, settings_for: Callable[[str], Settings]) -> None:
        import uvicorn

        from adapter.server import build_app

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        base = f"http://127.0.0.1:{self.port}"
        settings = settings_for(base + "/fhir")
        config = uvicorn.Config(
            lambda: build_app(settings), factory=True, log_level="warning", lifespan="on", access_log=False
        )
        self.server = uvicorn.Server(config)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="verify-server", daemon=True)

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as exc:  # reported by start()
            self.error = exc

    def start(self, timeout: float = 60.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the application did not start: {self.error or 'see the log above'}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


class Http:
    """A tiny JSON client (stdlib only: verify must run where the test extras are not installed)."""

    def __init__(self, port: int) -> None:
        self.port = port

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, client: str = "verify"
    ) -> tuple[int, dict[str, Any]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            headers = {"Accept": "application/fhir+json", "X-Client-Id": client}
            data = None
            if body is not None:
                data = json.dumps(body).encode("utf-8")
                headers["Content-Type"] = "application/fhir+json"
            conn.request(method, "/fhir" + path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else {}
        finally:
            conn.close()

    def get(self, path: str, params: list[tuple[str, str]]) -> tuple[int, dict[str, Any]]:
        return self.request("GET", path + "?" + urllib.parse.urlencode(params))


def _parameters(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": list(entries)}


def _ref(token: str) -> dict[str, Any]:
    return {"name": "appointment-reference", "valueReference": {"reference": f"Appointment/{token}"}}


def _appointments(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        e["resource"] for e in bundle.get("entry", []) if e.get("resource", {}).get("resourceType") == "Appointment"
    ]


def _instant(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _interval(appt: dict[str, Any]) -> Interval:
    return Interval(_instant(appt["start"]).astimezone(dt.UTC), _instant(appt["end"]).astimezone(dt.UTC))


def _actor(appt: dict[str, Any], kind: str) -> str | None:
    for p in appt.get("participant", []):
        ref = p.get("actor", {}).get("reference", "")
        if ref.startswith(kind + "/"):
            return str(ref.split("/", 1)[1])
    return None


def _issues(bundle: dict[str, Any]) -> str:
    texts = [
        i.get("diagnostics", i.get("code", ""))
        for e in bundle.get("entry", [])
        if e.get("resource", {}).get("resourceType") == "OperationOutcome"
        for i in e["resource"].get("issue", [])
    ]
    texts += [i.get("diagnostics", "") for i in bundle.get("issue", [])]
    return "; ".join(t for t in texts if t)[:300]


# --------------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    name: str
    status: str  # PASS, FAIL, SKIP
    detail: str


class VerifyFailed(Exception):
    """A check failed; the message says what was seen."""


@dataclass
class Verifier:
    mapping: Mapping
    settings: Settings
    practitioner: str | None = None
    patient: str | None = None
    clients: int = 20
    outcomes: list[Outcome] = field(default_factory=list)
    checked_resources: int = 0
    conformance_problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.zone = ZoneInfo(self.mapping.doc.system.timezone)
        self.backend = SqlBackend(self.mapping, Database(self.settings.backend.database_url, pool_size=2))
        self.used: list[Interval] = []

    # -- plumbing ------------------------------------------------------------------------------
    def run_check(self, name: str, fn: Callable[[], str]) -> None:
        try:
            detail = fn()
            self.outcomes.append(Outcome(name, "SKIP" if detail.startswith("skipped") else "PASS", detail))
        except VerifyFailed as exc:
            self.outcomes.append(Outcome(name, "FAIL", str(exc)))
        except Exception as exc:  # an unexpected failure of one check must not hide the others
            self.outcomes.append(Outcome(name, "FAIL", f"{type(exc).__name__}: {exc}"))

    def conform(self, resource: dict[str, Any], *, bundle: bool = False, search: bool = False) -> None:
        if bundle:
            problems = profiles.avail_bundle_problems(resource, search=search)
            for appt in _appointments(resource):
                problems += profiles.appointment_problems(appt)
        else:
            problems = profiles.appointment_problems(resource)
        self.checked_resources += 1
        self.conformance_problems += problems

    def _run(self, coro: Any) -> Any:
        import asyncio

        return asyncio.run(coro)

    def local_midnight(self, day: dt.date) -> dt.datetime:
        return attach_zone(dt.datetime.combine(day, dt.time()), self.zone).astimezone(dt.UTC)

    def find(
        self, start: dt.datetime, end: dt.datetime, practitioner: str | None = None, count: int = 200
    ) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = [
            {"name": "start", "valueDateTime": start.astimezone(self.zone).isoformat()},
            {"name": "end", "valueDateTime": end.astimezone(self.zone).isoformat()},
            {"name": "_count", "valueInteger": count},
        ]
        if practitioner:
            entries.append({"name": "practitioner", "valueReference": {"reference": f"Practitioner/{practitioner}"}})
        if self.patient:
            entries.append({"name": "patient-reference", "valueReference": {"reference": f"Patient/{self.patient}"}})
        status, bundle = self.http.request("POST", "/Appointment/$find", _parameters(*entries))
        if status != 200:
            raise VerifyFailed(f"$find answered {status}: {_issues(bundle)}")
        self.conform(bundle, bundle=True)
        return _appointments(bundle)

    def availability(self, practitioner: str, window: Interval) -> tuple[list[Interval], list[Interval]]:
        """(free = working time minus absences, busy) from the mapping's own queries."""
        found = self._run(self.backend.availability(AvailabilityQuery(window, (practitioner,))))
        free = [iv for ra in found for iv in ra.free]
        busy = [iv for ra in found for iv in ra.busy]
        return free, busy

    def offered(self, slot: dict[str, Any]) -> bool:
        iv = _interval(slot)
        prac = _actor(slot, "Practitioner")
        day = iv.start.astimezone(self.zone).date()
        found = self.find(self.local_midnight(day), self.local_midnight(day + dt.timedelta(days=1)), prac, 500)
        return any(_interval(a) == iv and _actor(a, "Practitioner") == prac for a in found)

    def busy_at(self, slot_or_iv: dict[str, Any] | Interval, practitioner: str) -> list[Interval]:
        iv = slot_or_iv if isinstance(slot_or_iv, Interval) else _interval(slot_or_iv)
        _free, busy = self.availability(practitioner, iv)
        return [b for b in busy if b.start < iv.end and iv.start < b.end]

    def book(
        self, token: str | None = None, resource: dict[str, Any] | None = None, client: str = "verify"
    ) -> tuple[int, dict[str, Any]]:
        entries = [_ref(token)] if token else []
        if resource is not None:
            entries.append({"name": "appointment-resource", "resource": resource})
        return self.http.request("POST", "/Appointment/$book", _parameters(*entries), client)

    def booked_appointment(self, status: int, bundle: dict[str, Any], expected: str) -> dict[str, Any]:
        if status != 200:
            raise VerifyFailed(f"$book answered {status}: {_issues(bundle)}")
        self.conform(bundle, bundle=True)
        appts = _appointments(bundle)
        if len(appts) != 1 or appts[0].get("status") != expected:
            raise VerifyFailed(f"$book answered {[a.get('status') for a in appts]}, expected one {expected!r}")
        return appts[0]

    def fresh_slot(self, slots: list[dict[str, Any]], practitioner: str | None = None) -> dict[str, Any]:
        for slot in slots:
            iv = _interval(slot)
            if practitioner and _actor(slot, "Practitioner") != practitioner:
                continue
            if any(iv.start < u.end and u.start < iv.end for u in self.used):
                continue
            self.used.append(iv)
            return slot
        raise VerifyFailed("no further free slot offered by $find in the next 14 days")

    # -- 1. live check -------------------------------------------------------------------------
    def check_live(self) -> str:
        from adapter.tools.check import live_check

        result = live_check(self.mapping, self.settings.backend.database_url, codes=True)
        if result.errors:
            raise VerifyFailed(" | ".join(result.errors))
        if result.warnings:
            return f"{len(result.warnings)} data warning(s): " + " | ".join(result.warnings)
        return "every query, filter and write statement fits the database; every legacy code is mapped"

    # -- 2. $find inside working time, outside busy time --------------------------------------
    def check_find(self) -> str:
        today = dt.datetime.now(self.zone).date()
        start, end = (
            self.local_midnight(today + dt.timedelta(days=1)),
            self.local_midnight(today + dt.timedelta(days=1 + WINDOW_DAYS)),
        )
        self.slots = self.find(start, end, self.practitioner, 500)
        if not self.slots:
            raise VerifyFailed(f"$find offered nothing between {start.date()} and {end.date()}: no working time?")
        problems = self.slots_problems(self.slots, Interval(start, end))
        if problems:
            raise VerifyFailed(f"{len(problems)} of {len(self.slots)} proposals are wrong: " + "; ".join(problems[:5]))
        pracs = {_actor(s, "Practitioner") for s in self.slots}
        return f"{len(self.slots)} proposals of {len(pracs)} practitioner(s) in {WINDOW_DAYS} days: all in working time, none busy"

    def slots_problems(self, slots: list[dict[str, Any]], window: Interval) -> list[str]:
        problems: list[str] = []
        by_prac: dict[str, list[dict[str, Any]]] = {}
        for s in slots:
            by_prac.setdefault(_actor(s, "Practitioner") or "?", []).append(s)
        for prac, items in by_prac.items():
            free, busy = self.availability(prac, window)
            for s in items:
                iv = _interval(s)
                where = f"Practitioner/{prac} {s['start']}..{s['end']}"
                if not any(f.start <= iv.start and iv.end <= f.end for f in free):
                    problems.append(f"{where} is outside working time (or in an absence)")
                elif any(b.start < iv.end and iv.start < b.end for b in busy):
                    problems.append(f"{where} overlaps busy time")
        return problems

    # -- 3. book -> read -> search -> reschedule -> cancel ------------------------------------
    def check_round_trip(self) -> str:
        first = self.fresh_slot(self.slots, self.practitioner)
        prac = _actor(first, "Practitioner")
        assert prac is not None
        target = self.fresh_slot(self.slots, prac)
        if self.busy_at(first, prac):
            raise VerifyFailed(f"$find offered {first['start']} but the busy query already has an appointment there")
        booked = self.booked_appointment(*self.book(first["id"], client="verify-trip"), "booked")
        appt_id = booked["id"]
        if len(self.busy_at(first, prac)) != 1:
            raise VerifyFailed(
                f"after $book the busy query sees {len(self.busy_at(first, prac))} appointment(s) at {first['start']}, expected 1 (does busy list the status book writes?)"
            )
        if self.offered(first):
            raise VerifyFailed(
                f"after $book, $find still offers {first['start']}: the busy query does not see the booked row"
            )
        status, read = self.http.request("GET", f"/Appointment/{appt_id}")
        if status != 200 or (read.get("start"), read.get("end")) != (booked["start"], booked["end"]):
            raise VerifyFailed(f"read Appointment/{appt_id} answered {status} {read.get('start')}..{read.get('end')}")
        self.conform(read)
        patient = _actor(booked, "Patient")
        day = _instant(booked["start"]).astimezone(self.zone).date().isoformat()
        params = [("date", day)] + ([("patient", patient)] if patient else [("practitioner", prac)])
        status, found = self.http.get("/Appointment", params)
        hits = [a for a in _appointments(found) if a["id"] == appt_id]
        if status != 200 or len(hits) != 1:
            raise VerifyFailed(f"search {params} answered {status} with {len(hits)} match(es) of Appointment/{appt_id}")
        self.conform(found, bundle=True, search=True)
        moved_resource = {
            "resourceType": "Appointment",
            "id": appt_id,
            "status": "booked",
            "start": target["start"],
            "end": target["end"],
            "participant": booked["participant"],
        }
        moved = self.booked_appointment(*self.book(resource=moved_resource, client="verify-trip"), "booked")
        if moved["id"] != appt_id or moved["start"] != target["start"]:
            raise VerifyFailed(
                f"reschedule answered {moved['id']} at {moved['start']}, expected {appt_id} at {target['start']}"
            )
        if self.busy_at(first, prac) or len(self.busy_at(target, prac)) != 1:
            raise VerifyFailed(
                "after the reschedule the old time is still busy or the new one is not busy exactly once"
            )
        if not self.offered(first):
            raise VerifyFailed(f"after the reschedule, $find does not offer the old time {first['start']} again")
        cancel_resource = {
            "resourceType": "Appointment",
            "id": appt_id,
            "status": "cancelled",
            "participant": booked["participant"],
        }
        self.booked_appointment(*self.book(resource=cancel_resource, client="verify-trip"), "cancelled")
        if self.busy_at(target, prac):
            raise VerifyFailed(
                f"after the cancellation the busy query still sees an appointment at {target['start']}: does busy leave cancelled rows out?"
            )
        if not self.offered(target):
            raise VerifyFailed(f"after the cancellation, $find does not offer {target['start']} again")
        status, read = self.http.request("GET", f"/Appointment/{appt_id}")
        if status != 200 or read.get("status") != "cancelled":
            raise VerifyFailed(f"Appointment/{appt_id} reads {status} {read.get('status')} after the cancellation")
        return (
            f"Appointment/{appt_id}: booked {first['start']}, moved to {target['start']}, cancelled; rows as expected"
        )

    # -- 4. the race ---------------------------------------------------------------------------
    def check_race(self) -> str:
        slot = self.fresh_slot(self.slots, self.practitioner)
        prac = _actor(slot, "Practitioner")
        assert prac is not None
        barrier = threading.Barrier(self.clients)

        def one(i: int) -> tuple[int, dict[str, Any]]:
            barrier.wait(30)
            return self.book(slot["id"], client=f"verify-racer-{i}")

        with ThreadPoolExecutor(max_workers=self.clients) as pool:
            answers = list(pool.map(one, range(self.clients)))
        codes = sorted(status for status, _ in answers)
        winners = [bundle for status, bundle in answers if status == 200]
        busy = self.busy_at(slot, prac)
        for bundle in winners:  # leave the copy as it was
            appt = _appointments(bundle)[0]
            self.book(
                resource={
                    "resourceType": "Appointment",
                    "id": appt["id"],
                    "status": "cancelled",
                    "participant": appt["participant"],
                },
                client="verify-cleanup",
            )
        if len(winners) != 1 or any(c not in (200, 409) for c in codes):
            raise VerifyFailed(
                f"{self.clients} clients booking {slot['start']}: answers {codes}, expected one 200 and the rest 409"
            )
        if len(busy) != 1:
            raise VerifyFailed(f"{len(busy)} appointments at {slot['start']} after the race, expected exactly 1")
        return f"{self.clients} clients, one slot ({slot['start']}): one booking, {len(codes) - 1} x 409, one row"

    # -- 5. DST ----------------------------------------------------------------------------------
    def check_dst(self) -> str:
        today = dt.datetime.now(self.zone).date()
        changes = []
        for n in range(1, 367):
            day = today + dt.timedelta(days=n)
            noon = dt.datetime.combine(day, dt.time(12), tzinfo=self.zone)
            if noon.utcoffset() != (noon - dt.timedelta(days=1)).utcoffset():
                changes.append(day)
        if not changes:
            return f"skipped: {self.zone.key} has no daylight-saving change in the next year"
        checked = 0
        for day in changes:
            start, end = (
                self.local_midnight(day - dt.timedelta(days=1)),
                self.local_midnight(day + dt.timedelta(days=2)),
            )
            slots = self.find(start, end, self.practitioner, 500)
            for s in slots:
                for key in ("start", "end"):
                    given = _instant(s[key])
                    if given.utcoffset() != given.astimezone(self.zone).utcoffset():
                        raise VerifyFailed(
                            f"{s[key]} carries offset {given.utcoffset()}, {self.zone.key} has {given.astimezone(self.zone).utcoffset()} then"
                        )
            problems = self.slots_problems(slots, Interval(start, end))
            if problems:
                raise VerifyFailed("around the DST change: " + "; ".join(problems[:5]))
            checked += len(slots)
        days = ", ".join(d.isoformat() for d in changes)
        if not checked:
            return f"skipped: no working time around the changes on {days}"
        return f"changes on {days}: {checked} proposals with the zone's offsets, all in working time"

    # -- 6. conformance --------------------------------------------------------------------------
    def check_conformance(self) -> str:
        if self.conformance_problems:
            raise VerifyFailed(
                f"{len(self.conformance_problems)} problem(s): " + "; ".join(self.conformance_problems[:5])
            )
        return f"{self.checked_resources} answers (Bundles and Appointments) pass the R4 schema and IHE profiles"

    # -- all -------------------------------------------------------------------------------------
    def run(self) -> list[Outcome]:
        self.run_check("live check", self.check_live)
        if self.outcomes[-1].status == "FAIL":
            return self.outcomes
        with tempfile.TemporaryDirectory(prefix="sched-verify-") as tmp:
            server = InProcessServer(lambda base: server_settings(self.settings, self.mapping, base, Path(tmp)))
            server.start()
            self.http = Http(server.port)
            try:
                if self.patient is None:
                    patients = self._run(self.backend.find_actors(ActorQuery(kind="Patient", limit=1)))
                    self.patient = patients[0].id if patients else None
                self.run_check("find: working time, busy time", self.check_find)
                if self.mapping.doc.writes is None:
                    for name in ("book/read/search/reschedule/cancel", f"race: {self.clients} clients, one slot"):
                        self.outcomes.append(
                            Outcome(name, "SKIP", "skipped: the mapping declares no writes (read-only)")
                        )
                elif self.outcomes[-1].status == "PASS":
                    self.run_check("book/read/search/reschedule/cancel", self.check_round_trip)
                    self.run_check(f"race: {self.clients} clients, one slot", self.check_race)
                self.run_check("DST days", self.check_dst)
                self.run_check("conformance (R4 + IHE)", self.check_conformance)
            finally:
                server.stop()
                self._run(self.backend.close())
        return self.outcomes


def server_settings(settings: Settings, mapping: Mapping, base: str, tmp: Path) -> Settings:
    """The user's settings for an in-process run: this mapping, a throw-away state file and secret."""
    data = settings.model_dump()
    data["server"].update(host="127.0.0.1", base_url=base, workers=1)
    data["backend"]["mapping"] = str(mapping.path)
    data["state"]["path"] = str(tmp / "state.sqlite")
    data["security"].update(auth="off", signing_secret=secrets.token_urlsafe(24), signing_secret_file=None)
    data["find"]["cache_seconds"] = 0  # every $find reads the legacy calendar: verify checks it right after writes
    data["demo"] = False
    return Settings.model_validate(data)


def format_table(outcomes: list[Outcome]) -> str:
    width = max(len(o.name) for o in outcomes)
    lines = [f"{'check'.ljust(width)}  result  detail", f"{'-' * width}  ------  ------"]
    lines += [f"{o.name.ljust(width)}  {o.status.ljust(6)}  {o.detail}" for o in outcomes]
    failed = sum(o.status == "FAIL" for o in outcomes)
    lines.append(f"{failed} check(s) failed" if failed else "all checks passed")
    return "\n".join(lines)


def verify(
    mapping: Mapping,
    settings: Settings,
    *,
    practitioner: str | None = None,
    patient: str | None = None,
    clients: int = 20,
) -> list[Outcome]:
    return Verifier(mapping, settings, practitioner=practitioner, patient=patient, clients=clients).run()


def verify_command(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        print(f"sched-adapter: {exc}", file=sys.stderr)
        return 2
    try:
        mapping = load_mapping(args.mapping or settings.backend.mapping)
    except MappingError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    outcomes = verify(mapping, settings, practitioner=args.practitioner, patient=args.patient, clients=args.clients)
    print(format_table(outcomes))
    return 1 if any(o.status == "FAIL" for o in outcomes) else 0
