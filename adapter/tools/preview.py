"""``sched-adapter mappings preview MAPPING --config CONFIG``: what the mapping makes of the live database.

Starts the application in-process (read-only use: it only reads) and prints, exactly as clients
receive them: a practitioner, the locations of its proposals and a patient (``GET /Practitioner/{id}``
...), one day of proposed slots (``$find``), and existing appointments (``GET /Appointment`` of the
patient, and of the practitioner on that day). Each resource is checked against the FHIR R4 schema
and the IHE Scheduling profiles (``adapter.conformance.profiles``, the checkers the conformance kit uses)
and every problem is flagged under the resource. Tables by default, one JSON document with
``--json``. Exit 0 when everything is valid, 1 when a resource is flagged, 2 for unusable settings.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from adapter.conformance import profiles
from adapter.mapping.loader import MappingError, load_mapping
from adapter.settings import Settings, SettingsError, load_settings
from adapter.tools.verify import Http, InProcessServer, server_settings

SEARCH_DAYS = 14


def _entries(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", []) if e.get("resource", {}).get("resourceType") == kind]


def _actor(appt: dict[str, Any], kind: str) -> str | None:
    for p in appt.get("participant", []):
        ref = p.get("actor", {}).get("reference", "")
        if ref.startswith(kind + "/"):
            return str(ref.split("/", 1)[1])
    return None


def _flatten(value: Any, path: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _flatten(v, f"{path}.{k}" if path else k)]
    if isinstance(value, list):
        return [item for i, v in enumerate(value) for item in _flatten(v, f"{path}[{i}]")]
    return [(path, str(value))]


class Preview:
    def __init__(self, settings: Settings, mapping_path: Path, args: argparse.Namespace) -> None:
        self.settings = settings
        self.mapping_path = mapping_path
        self.args = args
        self.zone = ZoneInfo(load_mapping(mapping_path).doc.system.timezone)

    def problems(self, resource: dict[str, Any], *, bundle: bool = False, search: bool = False) -> list[str]:
        if bundle:
            return list(profiles.avail_bundle_problems(resource, search=search))
        if resource.get("resourceType") == "Appointment":
            return list(profiles.appointment_problems(resource))
        return list(profiles.r4_problems(resource))

    def collect(self, http: Http) -> dict[str, Any]:
        out: dict[str, Any] = {"mapping": str(self.mapping_path), "validated": True}
        prac_id = self.args.practitioner
        if prac_id is None:
            status, bundle = http.get("/Practitioner", [("_count", "1")])
            found = _entries(bundle, "Practitioner")
            if status != 200 or not found:
                raise SystemExit(f"sched-adapter: the mapping finds no practitioner (GET /Practitioner: {status})")
            prac_id = found[0]["id"]
        actors: list[dict[str, Any]] = []
        status, practitioner = http.request("GET", f"/Practitioner/{prac_id}")
        if status != 200:
            raise SystemExit(f"sched-adapter: Practitioner/{prac_id}: {status} {json.dumps(practitioner)[:300]}")
        actors.append(practitioner)
        patient_id = self.args.patient
        if patient_id is None:
            status, bundle = http.get("/Patient", [("_count", "1")])
            found = _entries(bundle, "Patient")
            patient_id = found[0]["id"] if found else None
        day, bundle = self.proposals(http, prac_id, patient_id)
        out["date"] = day.isoformat()
        out["proposals"] = {
            "problems": self.problems(bundle, bundle=True),
            "appointments": [{"resource": a, "problems": self.problems(a)} for a in _entries(bundle, "Appointment")],
        }
        locations = sorted({loc for a in _entries(bundle, "Appointment") if (loc := _actor(a, "Location"))})
        if not locations:
            status, found_locs = http.get("/Location", [("_count", "1")])
            locations = [r["id"] for r in _entries(found_locs, "Location")]
        for loc in locations:
            status, resource = http.request("GET", f"/Location/{loc}")
            if status == 200:
                actors.append(resource)
        if patient_id is not None:
            status, resource = http.request("GET", f"/Patient/{patient_id}")
            if status == 200:
                actors.append(resource)
        out["actors"] = [{"resource": r, "problems": self.problems(r)} for r in actors]
        searches = [[("practitioner", prac_id), ("date", day.isoformat())]]
        if patient_id is not None:
            searches.append([("patient", patient_id), ("_count", "20")])
        seen: set[str] = set()
        existing: list[dict[str, Any]] = []
        for params in searches:
            status, result = http.get("/Appointment", params)
            if status != 200:
                existing.append({"resource": result, "problems": [f"search {params} answered {status}"]})
                continue
            for a in _entries(result, "Appointment"):
                if a["id"] not in seen:
                    seen.add(a["id"])
                    existing.append({"resource": a, "problems": self.problems(a)})
        out["appointments"] = existing
        return out

    def proposals(self, http: Http, prac_id: str, patient_id: str | None) -> tuple[dt.date, dict[str, Any]]:
        if self.args.date:
            days = [dt.date.fromisoformat(self.args.date)]
        else:
            today = dt.datetime.now(self.zone).date()
            days = [today + dt.timedelta(days=n) for n in range(1, SEARCH_DAYS + 1)]
        bundle: dict[str, Any] = {}
        for day in days:
            start = dt.datetime.combine(day, dt.time(), tzinfo=self.zone)
            entries: list[dict[str, Any]] = [
                {"name": "start", "valueDateTime": start.isoformat()},
                {"name": "end", "valueDateTime": (start + dt.timedelta(days=1)).isoformat()},
                {"name": "practitioner", "valueReference": {"reference": f"Practitioner/{prac_id}"}},
                {"name": "_count", "valueInteger": 100},
            ]
            if patient_id is not None:
                entries.append({"name": "patient-reference", "valueReference": {"reference": f"Patient/{patient_id}"}})
            _status, bundle = http.request(
                "POST", "/Appointment/$find", {"resourceType": "Parameters", "parameter": entries}, "preview"
            )
            if _entries(bundle, "Appointment"):
                return day, bundle
        return days[-1], bundle

    def run(self) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="sched-preview-") as tmp:
            mapping = load_mapping(self.mapping_path)
            server = InProcessServer(lambda base: server_settings(self.settings, mapping, base, Path(tmp)))
            server.start()
            try:
                return self.collect(Http(server.port))
            finally:
                server.stop()


def flagged(doc: dict[str, Any]) -> int:
    items = doc["actors"] + doc["proposals"]["appointments"] + doc["appointments"]
    return sum(bool(i["problems"]) for i in items) + bool(doc["proposals"]["problems"])


def render_table(doc: dict[str, Any]) -> str:
    lines = [f"mapping {doc['mapping']}"]
    for item in doc["actors"]:
        r = item["resource"]
        verdict = "OK" if not item["problems"] else f"{len(item['problems'])} PROBLEM(S)"
        lines += ["", f"{r['resourceType']}/{r.get('id')}  [{verdict}]"]
        lines += [f"  {path:<40} {value}" for path, value in _flatten(r) if path not in ("resourceType", "id")]
        lines += [f"  !! {p}" for p in item["problems"]]
    props = doc["proposals"]["appointments"]
    lines += ["", f"$find {doc['date']}: {len(props)} proposed slot(s)"]
    lines += [f"  !! {p}" for p in doc["proposals"]["problems"]]
    lines.append(f"  {'start':<26} {'end':<26} {'practitioner':<16} {'location':<12} {'visit type':<24} check")
    for item in props:
        a = item["resource"]
        vt = ((a.get("appointmentType") or {}).get("coding") or [{}])[0]
        lines.append(
            f"  {a.get('start', ''):<26} {a.get('end', ''):<26} {_actor(a, 'Practitioner') or '':<16} "
            f"{_actor(a, 'Location') or '':<12} {str(vt.get('display') or vt.get('code') or ''):<24} "
            f"{'OK' if not item['problems'] else 'PROBLEM'}"
        )
        lines += [f"    !! {p}" for p in item["problems"]]
    lines += ["", f"existing appointments: {len(doc['appointments'])}"]
    lines.append(f"  {'id':<10} {'status':<10} {'start':<26} {'patient':<10} {'practitioner':<14} {'reason':<20} check")
    for item in doc["appointments"]:
        a = item["resource"]
        reason = ""
        for ext in a.get("extension", []):
            if ext.get("url", "").endswith("extension-status-reason"):
                reason = ext.get("valueCodeableConcept", {}).get("coding", [{}])[0].get("code", "")
        lines.append(
            f"  {a.get('id', ''):<10} {a.get('status', ''):<10} {a.get('start', ''):<26} {_actor(a, 'Patient') or '':<10} "
            f"{_actor(a, 'Practitioner') or '':<14} {reason:<20} {'OK' if not item['problems'] else 'PROBLEM'}"
        )
        lines += [f"    !! {p}" for p in item["problems"]]
    count = flagged(doc)
    lines += ["", f"{count} resource(s) flagged" if count else "every resource is valid"]
    return "\n".join(lines)


def preview_command(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
        mapping = load_mapping(args.mapping)
    except SettingsError as exc:
        print(f"sched-adapter: {exc}", file=sys.stderr)
        return 2
    except MappingError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    from adapter.tools.check import live_check

    result = live_check(mapping, settings.backend.database_url, timeout_s=settings.backend.timeout_seconds)
    if result.errors:
        print("\n".join(result.errors), file=sys.stderr)
        return 1
    doc = Preview(settings, args.mapping, args).run()
    print(json.dumps(doc, indent=2, ensure_ascii=False) if args.json else render_table(doc))
    return 1 if flagged(doc) else 0
