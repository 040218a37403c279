"""Issue 14.4: $find entries come from templates kept per (practitioner, location, visit type,
patients, window); every entry is byte for byte what the plain renderer (``render.appointment`` +
``render.entry``) writes for it, across requests, DST nights and actors with and without displays."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import orjson

from adapter.backends.protocol import Actor, Coding, Interval, VisitType
from adapter.fhir.find import match_entries
from adapter.fhir.render import appointment, entry
from adapter.scheduling.candidates import Candidate

NY = ZoneInfo("America/New_York")
BASE = "http://example.org/fhir"
UTC = dt.UTC


def _plain(candidates, actors, patients, requested) -> list[dict]:
    out = []
    for token, c in candidates:
        prac = actors.get(f"Practitioner/{c.practitioner_id}")
        loc = actors.get(f"Location/{c.location_id}")
        resource = appointment(
            appt_id=token,
            status="proposed",
            start=c.interval.start,
            end=c.interval.end,
            zone=NY,
            practitioner=(c.practitioner_id, prac.display if prac else None),
            location=(c.location_id, loc.display if loc else None),
            patients=list(patients),
            visit_type=c.visit_type,
            specialties=prac.specialties if prac else (),
            requested=requested,
            participant_status="needs-action",
        )
        out.append(entry(BASE, resource, "match"))
    return out


def test_issue14_4_template_entries_equal_the_plain_renderer_byte_for_byte() -> None:
    cardio = Coding("http://snomed.info/sct", "394579002", "Cardiology")
    visit = VisitType("FOLLOW", "Follow-up", 15, (Coding("urn:x", "FOLLOW", "Follow-up"),), (cardio,))
    echo = VisitType("ECHO", "Echo", 45, (Coding("urn:x", "ECHO"),))
    actors = {
        "Practitioner/A": Actor("Practitioner", "A", "A", "Dr. A", {}, specialties=(cardio,)),
        "Location/1": Actor("Location", "1", "1", "Main", {}),
        "Location/2": Actor("Location", "2", "2", "", {}),
    }  # Practitioner/B is unknown: no display, no specialties
    requested = (dt.datetime(2026, 10, 31, 4, tzinfo=UTC), dt.datetime(2026, 11, 3, 5, tzinfo=UTC))
    starts = [dt.datetime(2026, 11, 1, 4, 30, tzinfo=UTC) + dt.timedelta(minutes=15 * i) for i in range(12)]
    candidates = []
    for i, start in enumerate(starts):  # across 01:00-02:00 twice (the fall-back night)
        vt = visit if i % 3 else echo
        prac, loc = ("A", "1") if i % 2 else ("B", "2")
        iv = Interval(start, start + dt.timedelta(minutes=vt.minutes))
        candidates.append((f"tok{i}", Candidate(prac, loc, vt, iv, (0, 0, 0, 0))))
    for patients in ((), (("P1", "Pat One"),), (("P1", None), ("P2", "Two"))):
        for _ in range(2):  # the second time from the templates kept by the first
            got = match_entries(BASE, NY, candidates, actors, patients, requested)
            assert orjson.dumps(got) == orjson.dumps(_plain(candidates, actors, patients, requested))
