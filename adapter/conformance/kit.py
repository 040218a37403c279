"""The conformance kit: runs the requirement catalogue against any Scheduling Server over HTTP.

Only the public FHIR API is used (``metadata``, ``$find``, ``$hold``, ``$book``, search, read), so the
kit works against a partner's server as well as ours. Each check names one requirement ID; it
passes, fails (with the requests and responses that show why) or is skipped (with the reason,
usually that the CapabilityStatement does not claim the feature). Every resource any check
receives is also run through the R4 schema and the IHE profile checkers of
:mod:`adapter.conformance.profiles`, and each problem is charged to the requirement it names.

Two client identities (``X-Client-Id`` ``<id>`` and ``<id>-other``) stand for two Scheduling
Clients, so hold conflicts can be provoked without a second token.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from adapter.client.http import (
    Exchange,
    SchedulingClient,
    actor,
    entries,
    find_parameters,
    hold_expiration,
    issues,
    next_link,
    parameters,
    typed,
)
from adapter.conformance import profiles
from adapter.conformance.requirements import REQUIREMENTS, level, summary

FHIR_NS = "{http://hl7.org/fhir}"
PASS, FAIL, SKIP = "pass", "fail", "skip"
_REQ_RE = re.compile(r"REQ-[A-Z0-9]+-\d+")
#: Problem prefixes of the profile checkers that do not spell a requirement ID themselves.
_RULE_TO_REQ = {"app-": "REQ-APPT-11", "per-1": "REQ-APPT-03", "id:": "REQ-115-28", "bdl-": "REQ-BNDL-01"}
#: Profile requirements reported from the resources every check received.
PROFILE_REQUIREMENTS = [
    "REQ-APPT-01", "REQ-APPT-02", "REQ-APPT-03", "REQ-APPT-04", "REQ-APPT-05", "REQ-APPT-10", "REQ-APPT-11",
    "REQ-BNDL-01", "REQ-BNDL-02", "REQ-BNDL-03", "REQ-BNDL-04", "REQ-BNDL-05", "REQ-BNDL-06", "REQ-BNDL-08",
    "REQ-BNDL-09", "REQ-GEN-22",
]  # fmt: skip


class CheckFailed(Exception):
    pass


class CheckSkipped(Exception):
    pass


@dataclass(slots=True)
class CheckResult:
    requirement: str
    title: str
    status: str
    message: str = ""
    evidence: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "requirement": self.requirement,
            "title": self.title,
            "status": self.status,
            "message": self.message,
            "evidence": self.evidence,
        }


@dataclass(slots=True)
class Trial:
    """What one check did: its exchanges (the evidence) and its verdict helpers."""

    kit: Kit
    exchanges: list[Exchange] = field(default_factory=list)

    def record(self, exchange: Exchange, *, search: bool = False) -> Exchange:
        self.exchanges.append(exchange)
        self.kit.inspect(exchange, search=search)
        return exchange

    def expect(self, condition: object, message: str) -> None:
        if not condition:
            raise CheckFailed(message)

    def expect_status(self, exchange: Exchange, *statuses: int) -> Any:
        if exchange.status not in statuses:
            wanted = " or ".join(str(s) for s in statuses)
            raise CheckFailed(f"{exchange.method} {exchange.url}: expected HTTP {wanted}, got {exchange.status}")
        return exchange.body

    def skip(self, reason: str) -> None:
        raise CheckSkipped(reason)


@dataclass(slots=True)
class Capability:
    """What the server's CapabilityStatement claims."""

    formats: set[str] = field(default_factory=set)
    operations: set[str] = field(default_factory=set)
    interactions: set[str] = field(default_factory=set)
    search_params: set[str] = field(default_factory=set)
    includes: set[str] = field(default_factory=set)

    @classmethod
    def read(cls, statement: Any) -> Capability:
        cap = cls()
        if not isinstance(statement, dict):
            return cap
        cap.formats = {str(f) for f in statement.get("format") or []}
        for rest in statement.get("rest") or []:
            for resource in rest.get("resource") or []:
                if resource.get("type") != "Appointment":
                    continue
                cap.operations |= {str(o.get("name", "")).lstrip("$") for o in resource.get("operation") or []}
                cap.interactions |= {str(i.get("code")) for i in resource.get("interaction") or []}
                cap.search_params |= {str(p.get("name")) for p in resource.get("searchParam") or []}
                cap.includes |= {str(i) for i in resource.get("searchInclude") or []}
        return cap

    def claims(self, feature: str) -> bool:
        kind, _, name = feature.partition(":")
        if kind == "op":
            return name in self.operations
        if kind == "interaction":
            return name in self.interactions
        if kind == "search":
            return "search-type" in self.interactions and name in self.search_params
        if kind == "include":
            return any(i == name or i.startswith(name) for i in self.includes)
        if kind == "format":
            return any(name in f for f in self.formats)
        raise ValueError(feature)


@dataclass(slots=True)
class KitOptions:
    patient: str | None = None
    practitioner: str | None = None
    days_ahead: int = 1
    window_days: int = 7


class Kit:
    def __init__(self, client: SchedulingClient, other: SchedulingClient, options: KitOptions | None = None) -> None:
        self._client = client
        self._other = other
        self._skipping = False
        self.options = options or KitOptions()
        self.results: list[CheckResult] = []
        self.capability = Capability()
        self.statement: Any = None
        self._profile_problems: dict[str, list[tuple[str, Exchange]]] = {}
        self._inspected = 0
        self._booked: list[str] = []
        today = dt.date.today()
        self.start = (today + dt.timedelta(days=self.options.days_ahead)).isoformat()
        self.end = (today + dt.timedelta(days=self.options.days_ahead + self.options.window_days)).isoformat()

    @property
    def client(self) -> SchedulingClient:
        """The kit's client; inside a skipped check any use ends the check before a request is sent."""
        if self._skipping:
            raise _Skipped
        return self._client

    @property
    def other(self) -> SchedulingClient:
        """A second Scheduling Client (another X-Client-Id), for conflicts."""
        if self._skipping:
            raise _Skipped
        return self._other

    # -- running checks ---------------------------------------------------------------------------
    @contextmanager
    def check(self, requirement: str, title: str, *needs: str) -> Iterator[Trial]:
        """Run the body as one check; the outcome is recorded, never raised (except KeyboardInterrupt)."""
        if requirement not in REQUIREMENTS:
            raise ValueError(f"unknown requirement {requirement}")
        trial = Trial(self)
        missing = [n for n in needs if not self.capability.claims(n)]
        if missing:
            self.results.append(
                CheckResult(requirement, title, SKIP, f"the CapabilityStatement does not claim {', '.join(missing)}")
            )
            self._skipping = True
            try:
                yield _SkipTrial(self)
            except _Skipped:  # the skipped check stops here; its SKIP result is recorded above
                pass
            finally:
                self._skipping = False
            return
        try:
            yield trial
        except CheckSkipped as exc:
            self.results.append(CheckResult(requirement, title, SKIP, str(exc), _evidence(trial.exchanges)))
        except CheckFailed as exc:
            self.results.append(CheckResult(requirement, title, FAIL, str(exc), _evidence(trial.exchanges)))
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            # A malformed answer (missing element, wrong JSON type) is the server's failure, not the kit's.
            message = f"unexpected response shape: {exc.__class__.__name__}: {exc}"
            self.results.append(CheckResult(requirement, title, FAIL, message, _evidence(trial.exchanges)))
        else:
            self.results.append(CheckResult(requirement, title, PASS, "", _evidence(trial.exchanges, brief=True)))

    def inspect(self, exchange: Exchange, *, search: bool = False) -> None:
        """Charge every profile problem of a received resource to the requirement it names."""
        body = exchange.body
        if not isinstance(body, dict) or "resourceType" not in body:
            return
        self._inspected += 1
        kind = body["resourceType"]
        if kind == "Bundle":
            problems = profiles.avail_bundle_problems(body, search=search)
        elif kind == "Appointment":
            problems = profiles.appointment_problems(body)
        elif kind == "OperationOutcome":
            problems = profiles.operation_outcome_problems(body)
        else:
            problems = profiles.r4_problems(body)
        for problem in problems:
            for req in _requirements_of(problem, kind):
                self._profile_problems.setdefault(req, []).append((problem, exchange))

    def run(self) -> list[CheckResult]:
        for section in (
            self.capability_checks,
            self.find_checks,
            self.hold_book_checks,
            self.search_checks,
            self.error_checks,
        ):
            section()
        self.cleanup()
        self.profile_results()
        return self.results

    # -- helpers ----------------------------------------------------------------------------------
    def window(self, **extra: Any) -> dict[str, Any]:
        return find_parameters(start=self.start, end=self.end, **extra)

    def practitioner(self, t: Trial) -> str:
        """The practitioner to work with: --practitioner, else the first one the server proposes."""
        if self.options.practitioner:
            return typed("Practitioner", self.options.practitioner)
        found = entries(t.record(self.client.find(self.window(count=1))).body, "Appointment", "match")
        ref = actor(found[0], "Practitioner") if found else None
        if not ref or "reference" not in ref:
            t.skip("the server proposed no appointment with a Practitioner to work with")
        assert ref is not None
        self.options.practitioner = str(ref["reference"]).split("/")[-1]
        return typed("Practitioner", self.options.practitioner)

    def proposals(self, t: Trial, count: int = 20, *, patient: bool = True, **extra: Any) -> list[dict[str, Any]]:
        pats = [self.options.patient] if patient and self.options.patient else []
        ex = t.record(self.client.find(self.window(count=count, patient=pats, **extra)))
        t.expect_status(ex, 200)
        return entries(ex.body, "Appointment", "match")

    def need_patient(self, t: Trial) -> str:
        if not self.options.patient:
            t.skip("no --patient given: booking needs a patient the server knows")
        assert self.options.patient
        return self.options.patient

    # -- CapabilityStatement ----------------------------------------------------------------------
    def capability_checks(self) -> None:
        with self.check("REQ-GEN-01", "GET metadata answers a CapabilityStatement") as t:
            ex = t.record(self.client.metadata())
            body = t.expect_status(ex, 200)
            self.statement = body
            self.capability = Capability.read(body)
            t.expect(
                isinstance(body, dict) and body.get("resourceType") == "CapabilityStatement",
                "the body is not a CapabilityStatement",
            )
            t.expect(body.get("kind") == "instance", f"kind is {body.get('kind')!r}, not 'instance'")
            t.expect(body.get("fhirVersion") == "4.0.1", f"fhirVersion is {body.get('fhirVersion')!r}")
            t.expect(any(r.get("mode") == "server" for r in body.get("rest") or []), "no rest entry with mode server")
            problems = profiles.r4_problems(body)
            t.expect(not problems, "; ".join(problems[:5]))
        cap = self.capability
        with self.check("REQ-GEN-03", "format lists application/fhir+json and application/fhir+xml") as t:
            t.expect(cap.claims("format:json") and cap.claims("format:xml"), f"format is {sorted(cap.formats)}")
        with self.check("REQ-GEN-07", "Appointment: ihe-sched-appt profile, read and search-type") as t:
            appt = self._statement_resource("Appointment")
            t.expect(appt is not None, "no rest.resource for Appointment")
            assert appt is not None
            t.expect(
                str(appt.get("profile", "")).endswith("/StructureDefinition/ihe-sched-appt"),
                f"profile is {appt.get('profile')!r}",
            )
            t.expect({"read", "search-type"} <= cap.interactions, f"interactions are {sorted(cap.interactions)}")
        with self.check("REQ-GEN-08", "Appointment declares the find and book operations") as t:
            t.expect({"find", "book"} <= cap.operations, f"operations are {sorted(cap.operations)}")
        with self.check("REQ-GEN-09", "Appointment declares the hold operation") as t:
            t.expect("hold" in cap.operations, f"operations are {sorted(cap.operations)}")
        with self.check("REQ-GEN-10", "search parameters _id, identifier, patient; patient+date combination") as t:
            t.expect(
                {"_id", "identifier", "patient"} <= cap.search_params,
                f"search parameters are {sorted(cap.search_params)}",
            )
            appt = self._statement_resource("Appointment") or {}
            combos = [
                {str(part.get("valueString")) for part in ext.get("extension") or [] if part.get("url") == "required"}
                for ext in appt.get("extension") or []
                if str(ext.get("url", "")).endswith("capabilitystatement-search-parameter-combination")
            ]
            t.expect({"patient", "date"} in combos, "no search-parameter-combination extension requiring patient+date")
        with self.check("REQ-GEN-13", "Bundle: ihe-sched-avail-bundle profile") as t:
            bundle = self._statement_resource("Bundle")
            t.expect(
                bundle is not None and str(bundle.get("profile", "")).endswith("/ihe-sched-avail-bundle"),
                "no Bundle resource entry with the ihe-sched-avail-bundle profile",
            )

    def _statement_resource(self, kind: str) -> dict[str, Any] | None:
        if not isinstance(self.statement, dict):
            return None
        for rest in self.statement.get("rest") or []:
            for resource in rest.get("resource") or []:
                if resource.get("type") == kind:
                    return dict(resource)
        return None

    # -- ITI-115 $find ----------------------------------------------------------------------------
    def find_checks(self) -> None:
        with self.check("REQ-115-01", "POST $find answers 200 with an availability Bundle", "op:find") as t:
            ex = t.record(self.client.find(self.window(count=5)))
            body = t.expect_status(ex, 200)
            t.expect(body.get("resourceType") == "Bundle", "the answer is not a Bundle")
            t.expect(entries(body, "Appointment", "match"), "no proposed appointment in the first week ahead")
        with self.check("REQ-115-25", "$find answers a searchset of proposed Appointments", "op:find") as t:
            found = self.proposals(t, 10, patient=False)
            t.expect(found, "no proposals to inspect")
            bad = [a.get("status") for a in found if a.get("status") != "proposed"]
            t.expect(not bad, f"statuses other than proposed: {bad}")
        with self.check("REQ-115-03", "proposals lie inside the requested window", "op:find") as t:
            found = self.proposals(t, 50, patient=False)
            lo, hi = dt.date.fromisoformat(self.start), dt.date.fromisoformat(self.end)
            outside = [
                a["start"]
                for a in found
                if not lo <= dt.datetime.fromisoformat(a["start"]).date() <= hi
                or not dt.datetime.fromisoformat(a["end"]).date() <= hi
            ]
            t.expect(not outside, f"proposals outside {self.start}..{self.end}: {outside[:5]}")
        with self.check("REQ-115-02", "GET $find answers like the POST", "op:find") as t:
            post = t.record(self.client.find(self.window(count=3)))
            get = t.record(
                self.client.request(
                    "GET", "Appointment/$find", params={"start": self.start, "end": self.end, "_count": "3"}
                )
            )
            t.expect_status(get, 200)
            t.expect_status(post, 200)
            t.expect(
                get.body.get("total") == post.body.get("total"),
                f"GET total {get.body.get('total')} != POST total {post.body.get('total')}",
            )
        with self.check("REQ-115-04", "no start/end: default window and a warning", "op:find") as t:
            ex = t.record(self.client.find(find_parameters(count=1)))
            body = t.expect_status(ex, 200)
            t.expect(
                any(i.get("severity") == "warning" for i in issues(body)),
                "no warning OperationOutcome issue states the window used",
            )
        with self.check("REQ-115-05", "end before start is 400 invalid naming the parameter", "op:find") as t:
            ex = t.record(self.client.find(find_parameters(start=self.end, end=self.start)))
            body = t.expect_status(ex, 400)
            found = issues(body)
            t.expect(any(i.get("code") == "invalid" for i in found), "no issue with code invalid")
            t.expect(any(i.get("expression") for i in found), "no issue names the parameter in expression")
        with self.check("REQ-115-20", "_count limits the proposals per page", "op:find") as t:
            found = self.proposals(t, 2, patient=False)
            t.expect(len(found) <= 2, f"_count=2 returned {len(found)} proposals")
        with self.check("REQ-115-22", "Bundle.total counts every option, not the page", "op:find") as t:
            small = t.record(self.client.find(self.window(count=2)))
            t.expect_status(small, 200)
            large = t.record(self.client.find(self.window(count=500)))
            t.expect_status(large, 200)
            total_small, total_large = small.body.get("total"), large.body.get("total")
            t.expect(total_small == total_large, f"total is {total_small} with _count=2 and {total_large} with 500")
            if next_link(large.body) is None:
                matches = len(entries(large.body, "Appointment", "match"))
                t.expect(total_large == matches, f"total {total_large} but {matches} options on a complete page")
            if isinstance(total_small, int) and total_small > 2:
                t.expect(
                    total_small > len(entries(small.body, "Appointment", "match")),
                    "total equals the page size although more options exist",
                )
        with self.check("REQ-115-23", "a next link pages through the remaining options", "op:find") as t:
            first = t.record(self.client.find(self.window(count=2)))
            t.expect_status(first, 200)
            if (first.body.get("total") or 0) <= 2:
                t.skip("two options or fewer: nothing to page through")
            link = next_link(first.body)
            t.expect(link, "more options than _count but no next link")
            second = t.record(self.client.request("GET", str(link)))
            t.expect_status(second, 200)
            ids1 = {a["id"] for a in entries(first.body, "Appointment", "match")}
            ids2 = {a["id"] for a in entries(second.body, "Appointment", "match")}
            t.expect(ids2 and not ids1 & ids2, "the next page is empty or repeats the first page")
        with self.check("REQ-115-10", "practitioner narrows proposals to that practitioner", "op:find") as t:
            prac = self.practitioner(t)
            found = self.proposals(t, 20, patient=False, practitioner=[prac])
            t.expect(found, f"no proposals for {prac}")
            others = {str((actor(a, "Practitioner") or {}).get("reference")) for a in found} - {prac}
            others = {o for o in others if not o.endswith("/" + prac)}
            t.expect(not others, f"proposals for other practitioners: {sorted(others)}")
        with self.check("REQ-115-29", "the next link repeats the practitioner criterion", "op:find") as t:
            prac = self.practitioner(t)
            first = t.record(self.client.find(self.window(count=2, practitioner=[prac])))
            t.expect_status(first, 200)
            link = next_link(first.body)
            if not link:
                t.skip("no second page for this practitioner")
            second = t.record(self.client.request("GET", str(link)))
            t.expect_status(second, 200)
            wrong = [
                a["id"]
                for a in entries(second.body, "Appointment", "match")
                if not str((actor(a, "Practitioner") or {}).get("reference", "")).endswith(prac)
            ]
            t.expect(not wrong, f"page 2 proposes other practitioners: {wrong[:3]}")
        self._and_or_checks()
        self._token_checks()
        with self.check("REQ-115-26", "no options: total 0 and one information OperationOutcome", "op:find") as t:
            ex = t.record(self.client.find(self.window(practitioner=[f"Practitioner/kit-{uuid.uuid4().hex[:8]}"])))
            body = t.expect_status(ex, 200)
            t.expect(body.get("total") == 0, f"total is {body.get('total')!r}, not 0")
            all_entries = body.get("entry") or []
            t.expect(len(all_entries) == 1, f"{len(all_entries)} entries, expected exactly one OperationOutcome")
            t.expect(entries(body, "OperationOutcome", "outcome"), "the only entry is not an OperationOutcome")
            t.expect(any(i.get("severity") == "information" for i in issues(body)), "no information issue")
        with self.check("REQ-115-16", "patient-reference: the patient is in every proposal", "op:find") as t:
            patient = typed("Patient", self.need_patient(t))
            found = self.proposals(t, 5)
            t.expect(found, "no proposals")
            missing = [
                a["id"] for a in found if not str((actor(a, "Patient") or {}).get("reference", "")).endswith(patient)
            ]
            t.expect(not missing, f"proposals without {patient}: {missing[:3]}")

    def _token_checks(self) -> None:
        """REQ-115-06/07: a specialty or visit type the server itself proposes narrows the result to it."""
        for req, element, name, title in (
            ("REQ-115-06", "specialty", "specialty", "specialty narrows proposals to that specialty"),
            ("REQ-115-07", "appointmentType", "visit_type", "visit-type narrows proposals to that type"),
        ):
            with self.check(req, title, "op:find") as t:
                sample = [c for a in self.proposals(t, 50, patient=False) for c in _codings(a, element)]
                if not sample:
                    t.skip(f"the proposals carry no {element} coding to search with")
                system, code = sample[0]
                found = self.proposals(t, 50, patient=False, **{name: [f"{system}|{code}"]})
                t.expect(found, f"no proposals for {element} {system}|{code}")
                wrong = [a["id"] for a in found if (system, code) not in _codings(a, element)]
                t.expect(not wrong, f"proposals without {element} {system}|{code}: {wrong[:3]}")

    def _and_or_checks(self) -> None:
        with self.check("REQ-115-18", "practitioner AND location; repeated practitioner is OR", "op:find") as t:
            found = self.proposals(t, 100, patient=False)
            pracs: list[str] = []
            for a in found:
                ref = str((actor(a, "Practitioner") or {}).get("reference", ""))
                if ref and ref not in pracs:
                    pracs.append(ref)
            if len(pracs) < 2:
                t.skip("fewer than two practitioners offered in the window")
            first, second = pracs[0], pracs[1]
            both = self.proposals(t, 100, patient=False, practitioner=[first, second])
            got = {str((actor(a, "Practitioner") or {}).get("reference", "")) for a in both}
            t.expect(got and got <= {first, second}, f"OR of {first}, {second} proposed {sorted(got)}")
            t.expect(len(got) == 2 or len(both) == 100, f"OR of two practitioners proposed only {sorted(got)}")
            sample = next(a for a in found if str((actor(a, "Practitioner") or {}).get("reference")) == first)
            location = str((actor(sample, "Location") or {}).get("reference", ""))
            if not location:
                t.skip("the proposals name no Location")
            anded = self.proposals(t, 50, patient=False, practitioner=[first], location=[location])
            t.expect(anded, f"no proposals for {first} AND {location}")
            wrong = [
                a["id"]
                for a in anded
                if str((actor(a, "Practitioner") or {}).get("reference")) != first
                or str((actor(a, "Location") or {}).get("reference")) != location
            ]
            t.expect(not wrong, f"proposals not matching {first} AND {location}: {wrong[:3]}")
            self._pair = (first, second)
        with self.check("REQ-115-19", "results follow the preference order of repeated values", "op:find") as t:
            pair = getattr(self, "_pair", None)
            if not pair:
                t.skip("needs two practitioners (REQ-115-18 found none)")
            assert pair is not None
            ranked = self.proposals(t, 100, patient=False, practitioner=[pair[1], pair[0]])
            order = [str((actor(a, "Practitioner") or {}).get("reference")) for a in ranked]
            if pair[1] in order and pair[0] in order:
                t.expect(
                    max(i for i, p in enumerate(order) if p == pair[1]) < order.index(pair[0]),
                    f"{pair[1]} was asked first but {pair[0]} is proposed before some of its options",
                )

    # -- ITI-116/117 ------------------------------------------------------------------------------
    def hold_book_checks(self) -> None:
        held: dict[str, Any] = {}
        with self.check("REQ-116-04", "$hold answers 200, total 1, one pending Appointment", "op:hold") as t:
            self.need_patient(t)
            found = self.proposals(t, 5)
            t.expect(found, "no proposal to hold")
            ex = t.record(self.client.hold(found[0]["id"]))
            body = t.expect_status(ex, 200)
            t.expect(body.get("total") == 1, f"total is {body.get('total')!r}")
            appts = entries(body, "Appointment")
            t.expect(len(appts) == 1 and appts[0].get("status") == "pending", "not exactly one pending Appointment")
            held.update(proposed=found[0], held=appts[0], others=found[1:])
        with self.check("REQ-116-05", "the held Appointment keeps the proposed id", "op:hold") as t:
            if not held:
                t.skip("no hold was made (REQ-116-04)")
            t.expect(
                held["held"].get("id") == held["proposed"]["id"],
                f"held id {held['held'].get('id')!r} != proposed id {held['proposed']['id']!r}",
            )
        with self.check("REQ-116-06", "the hold expiry is in the hold-expiration extension", "op:hold") as t:
            if not held:
                t.skip("no hold was made (REQ-116-04)")
            expiry = hold_expiration(held["held"])
            t.expect(expiry and profiles.TIME_WITH_OFFSET_RE.match(expiry), f"expiry {expiry!r}")
        with self.check("REQ-116-11", "holding again from the same client returns the same hold", "op:hold") as t:
            if not held:
                t.skip("no hold was made (REQ-116-04)")
            again = t.record(self.client.hold(held["proposed"]["id"]))
            body = t.expect_status(again, 200)
            appts = entries(body, "Appointment")
            t.expect(appts and appts[0].get("id") == held["held"].get("id"), "another id")
            t.expect(hold_expiration(appts[0]) == hold_expiration(held["held"]), "the expiry changed")
        with self.check("REQ-116-08", "another client's $hold and $book of the held slot are 409", "op:hold") as t:
            if not held:
                t.skip("no hold was made (REQ-116-04)")
            for ex in (self.other.hold(held["proposed"]["id"]), self.other.book(held["proposed"]["id"])):
                t.record(ex)
                t.expect_status(ex, 409)
                t.expect(any(i.get("code") == "conflict" for i in issues(ex.body)), "no conflict issue")
            held["conflict"] = t.exchanges[-1]
        with self.check("REQ-116-09", "a conflicting hold answers only a fatal not-found outcome", "op:hold") as t:
            if "conflict" not in held:
                t.skip("no conflict was provoked (REQ-116-08)")
            ex = t.record(self.other.hold(held["proposed"]["id"]))
            t.expect(not entries(ex.body, "Appointment"), "the failure carries an Appointment")
            t.expect(
                any(i.get("severity") == "fatal" and i.get("code") == "not-found" for i in issues(ex.body)),
                "no fatal issue with code not-found",
            )
        with self.check("REQ-GEN-20", "a failed $hold is a searchset, total 0, one fatal outcome", "op:hold") as t:
            ex = t.record(self.client.hold("kit-unknown-" + uuid.uuid4().hex[:8]))
            body = t.expect_status(ex, 404)
            t.expect(isinstance(body, dict) and body.get("resourceType") == "Bundle", "not a Bundle")
            t.expect(body.get("type") == "searchset" and body.get("total") == 0, "not a searchset with total 0")
            t.expect(len(body.get("entry") or []) == 1 and entries(body, "OperationOutcome"), "not one outcome")
            t.expect(any(i.get("severity") == "fatal" for i in issues(body)), "no fatal issue")
        with self.check("REQ-116-10", "an unknown proposed id is 404 not-found", "op:hold") as t:
            ex = t.record(self.client.hold("kit-unknown-" + uuid.uuid4().hex[:8]))
            t.expect_status(ex, 404)
            t.expect(any(i.get("code") == "not-found" for i in issues(ex.body)), "no not-found issue")
        with self.check("REQ-116-02", "$hold without appointment-reference is 400", "op:hold") as t:
            t.expect_status(t.record(self.client.request("POST", "Appointment/$hold", json_body=parameters())), 400)
        with self.check("REQ-115-24", "a held appointment is not proposed again", "op:hold", "op:find") as t:
            if not held:
                t.skip("no hold was made (REQ-116-04)")
            prac = str((actor(held["proposed"], "Practitioner") or {}).get("reference", ""))
            offered = self.proposals(t, 500, patient=False, practitioner=[prac] if prac else [])
            t.expect(
                all(a.get("start") != held["proposed"]["start"] for a in offered),
                f"{prac} at {held['proposed']['start']} is still proposed while held",
            )
        booked: dict[str, Any] = {}
        with self.check("REQ-117-06", "the holder books the held appointment", "op:book") as t:
            if not held:
                t.skip("no hold was made (REQ-116-04)")
            ex = t.record(self.client.book(held["proposed"]["id"], comment="conformance kit"))
            body = t.expect_status(ex, 200)
            appts = entries(body, "Appointment")
            t.expect(len(appts) == 1 and appts[0].get("status") == "booked", "not one booked Appointment")
            booked["first"] = appts[0]
            self._booked.append(appts[0]["id"])
        with self.check("REQ-117-05", "$book of a proposal answers one booked Appointment", "op:book") as t:
            self.need_patient(t)
            found = self.proposals(t, 5)
            t.expect(found, "no proposal to book")
            ex = t.record(self.client.book(found[0]["id"]))
            body = t.expect_status(ex, 200)
            t.expect(body.get("total") == 1, f"total is {body.get('total')!r}")
            appts = entries(body, "Appointment")
            t.expect(len(appts) == 1 and appts[0].get("status") == "booked", "not one booked Appointment")
            t.expect(appts[0].get("start") == found[0].get("start"), "booked at another time than proposed")
            booked["second"] = appts[0]
            self._booked.append(appts[0]["id"])
        with self.check(
            "REQ-118-20", "read returns the booked Appointment; unknown id is 404", "interaction:read"
        ) as t:
            if not booked:
                t.skip("nothing was booked")
            first = next(iter(booked.values()))
            ex = t.record(self.client.read(first["id"]))
            body = t.expect_status(ex, 200)
            t.expect(body.get("id") == first["id"] and body.get("status") == "booked", "not the booked Appointment")
            t.expect_status(t.record(self.client.read("kit-unknown-" + uuid.uuid4().hex[:8])), 404)
        self._idempotency_check()
        self._reschedule_checks(booked)
        self._cancel_checks(booked)
        self._booked_for_search = booked

    def _idempotency_check(self) -> None:
        with self.check("REQ-117-16", "Idempotency-Key replays; another body with it is 422", "op:book") as t:
            self.need_patient(t)
            found = self.proposals(t, 5)
            t.expect(len(found) >= 2, "two proposals needed")
            key = f"kit-{uuid.uuid4().hex}"
            first = t.record(self.client.book(found[0]["id"], idempotency_key=key))
            t.expect_status(first, 200)
            again = t.record(self.client.book(found[0]["id"], idempotency_key=key))
            t.expect_status(again, 200)
            ids = [entries(x.body, "Appointment")[0]["id"] for x in (first, again)]
            self._booked.append(ids[0])
            t.expect(ids[0] == ids[1], f"the replay booked {ids[1]} besides {ids[0]}")
            other = t.record(self.client.book(found[1]["id"], idempotency_key=key))
            t.expect_status(other, 422)

    def _reschedule_checks(self, booked: dict[str, Any]) -> None:
        with self.check("REQ-117-07", "status booked with an existing id reschedules it", "op:book") as t:
            if "second" not in booked:
                t.skip("nothing was booked (REQ-117-05)")
            appt = booked["second"]
            prac = str((actor(appt, "Practitioner") or {}).get("reference", ""))
            target = [
                a
                for a in self.proposals(t, 50, practitioner=[prac])
                if dt.datetime.fromisoformat(a["start"]) >= dt.datetime.fromisoformat(appt["end"])
            ]
            t.expect(target, "no later free time of the same practitioner")
            moved = {**_resource_of(appt), "start": target[0]["start"], "end": target[0]["end"]}
            ex = t.record(self.client.book(resource=moved))
            body = t.expect_status(ex, 200)
            appts = entries(body, "Appointment")
            t.expect(appts and appts[0].get("status") == "booked", "not booked")
            t.expect(appts[0].get("id") == appt["id"], "the id changed")
            t.expect(appts[0].get("start") == target[0]["start"], f"start {appts[0].get('start')!r}")
            booked["second"] = appts[0]
        with self.check("REQ-117-08", "a reschedule onto a taken time is 409, original kept", "op:book") as t:
            if "second" not in booked:
                t.skip("nothing was booked (REQ-117-05)")
            appt = booked["second"]
            prac = str((actor(appt, "Practitioner") or {}).get("reference", ""))
            free = self.proposals(t, 50, patient=False, practitioner=[prac])
            t.expect(free, "no free time to hold")
            taken = t.record(self.other.hold(free[-1]["id"]))
            t.expect_status(taken, 200)
            moved = {**_resource_of(appt), "start": free[-1]["start"], "end": free[-1]["end"]}
            ex = t.record(self.client.book(resource=moved))
            t.expect_status(ex, 409)
            after = t.record(self.client.read(appt["id"]))
            t.expect(after.body.get("start") == appt["start"], "the original booking moved")

    def _cancel_checks(self, booked: dict[str, Any]) -> None:
        with self.check("REQ-117-09", "status cancelled cancels, keeps the reason, frees the slot", "op:book") as t:
            if "first" not in booked:
                t.skip("nothing was booked (REQ-117-06)")
            appt = booked["first"]
            ex = t.record(self.client.cancel(appt["id"], "patient-cancel", patient=self.options.patient))
            body = t.expect_status(ex, 200)
            appts = entries(body, "Appointment")
            t.expect(appts and appts[0].get("status") == "cancelled", "not cancelled")
            reason = str(appts[0].get("cancelationReason", "")) + str(appts[0].get("extension", ""))
            t.expect("patient-cancel" in reason, "the cancellation reason is not kept")
            self._booked.remove(appt["id"])
            prac = str((actor(appt, "Practitioner") or {}).get("reference", ""))
            again = self.proposals(t, 500, patient=False, practitioner=[prac])
            t.expect(any(a.get("start") == appt["start"] for a in again), "the cancelled time is not offered again")
        with self.check("REQ-117-10", "cancelling an unknown appointment id is 404", "op:book") as t:
            patient = self.need_patient(t)
            ex = t.record(self.client.cancel("kit-unknown-" + uuid.uuid4().hex[:8], "patient-cancel", patient=patient))
            t.expect_status(ex, 404)
        with self.check("REQ-117-04", "$book with neither reference nor resource is 400", "op:book") as t:
            t.expect_status(t.record(self.client.request("POST", "Appointment/$book", json_body=parameters())), 400)

    # -- ITI-118 ----------------------------------------------------------------------------------
    def search_checks(self) -> None:
        booked = getattr(self, "_booked_for_search", {})
        target = booked.get("second")
        patient = typed("Patient", self.options.patient) if self.options.patient else None

        def need_target(t: Trial) -> dict[str, Any]:
            if not target or not patient:
                t.skip("needs an appointment booked by the kit (--patient)")
            assert target is not None
            return dict(target)

        def search(t: Trial, *query: tuple[str, str]) -> dict[str, Any]:
            ex = t.record(self.client.search(list(query)), search=True)
            body = t.expect_status(ex, 200)
            t.expect(body.get("resourceType") == "Bundle" and body.get("type") == "searchset", "not a searchset")
            return dict(body)

        def ids(body: dict[str, Any]) -> set[str]:
            return {a["id"] for a in entries(body, "Appointment", "match")}

        with self.check("REQ-118-01", "GET Appointment?patient answers a searchset", "search:patient") as t:
            appt = need_target(t)
            t.expect(appt["id"] in ids(search(t, ("patient", str(patient)))), "the booked appointment is missing")
        with self.check("REQ-118-03", "patient by id and by Patient/id", "search:patient") as t:
            appt = need_target(t)
            by_ref = search(t, ("patient", str(patient)))
            by_id = search(t, ("patient", str(patient).split("/")[-1]))
            t.expect(ids(by_ref) == ids(by_id), "patient=Patient/x and patient=x differ")
            wrong = [
                a["id"]
                for a in entries(by_ref, "Appointment", "match")
                if not str((actor(a, "Patient") or {}).get("reference", "")).endswith(str(patient))
            ]
            t.expect(not wrong, f"appointments of other patients: {wrong[:3]}")
            t.expect(appt["id"] in ids(by_ref), "the booked appointment is missing")
        with self.check("REQ-118-02", "POST _search answers like the GET", "search:patient") as t:
            need_target(t)
            get = search(t, ("patient", str(patient)))
            post = t.record(
                self.client.request(
                    "POST",
                    "Appointment/_search",
                    content=f"patient={patient}",
                    headers={"Content-Type": "application/x-www-form-urlencoded"},
                ),
                search=True,
            )
            t.expect_status(post, 200)
            t.expect(ids(post.body) == ids(get), "POST _search found other appointments than GET")
        with self.check("REQ-118-07", "_id finds that appointment", "search:_id") as t:
            appt = need_target(t)
            t.expect(ids(search(t, ("_id", appt["id"]))) == {appt["id"]}, "not exactly the appointment")
        with self.check("REQ-118-05", "date prefixes eq ne gt lt ge le sa eb ap", "search:date") as t:
            appt = need_target(t)
            day = dt.datetime.fromisoformat(appt["start"]).date().isoformat()
            expected = {
                "": True,
                "eq": True,
                "ne": False,
                "gt": False,
                "lt": False,
                "ge": True,
                "le": True,
                "sa": False,
                "eb": False,
                "ap": True,
            }
            wrong = []
            for prefix, included in expected.items():
                got = appt["id"] in ids(search(t, ("patient", str(patient)), ("date", f"{prefix}{day}")))
                if got != included:
                    wrong.append(f"date={prefix}{day} {'finds' if got else 'misses'} an appointment starting {day}")
            t.expect(not wrong, "; ".join(wrong))
        with self.check("REQ-118-06", "patient + date combine with AND", "search:patient", "search:date") as t:
            appt = need_target(t)
            that_day = dt.date.fromisoformat(appt["start"][:10])
            body = search(
                t, ("patient", str(patient)), ("date", f"ge{that_day}"), ("date", f"lt{that_day + dt.timedelta(1)}")
            )
            wrong = [
                a["start"] for a in entries(body, "Appointment", "match") if a["start"][:10] != that_day.isoformat()
            ]
            t.expect(not wrong and appt["id"] in ids(body), f"other days {wrong[:3]} or the appointment missing")
        with self.check("REQ-118-08", "identifier finds the appointment", "search:identifier") as t:
            appt = need_target(t)
            idents = [i for i in appt.get("identifier") or [] if i.get("system") and i.get("value")]
            if not idents:
                t.skip("the booked appointment carries no identifier with system and value")
            token = f"{idents[0]['system']}|{idents[0]['value']}"
            t.expect(ids(search(t, ("identifier", token))) == {appt["id"]}, f"identifier={token} is not exactly it")
        with self.check(
            "REQ-118-09", "practitioner search matches practitioner participants", "search:practitioner"
        ) as t:
            appt = need_target(t)
            prac = str((actor(appt, "Practitioner") or {}).get("reference", ""))
            body = search(t, ("practitioner", prac), ("date", f"ge{appt['start'][:10]}"), ("_count", "500"))
            wrong = [
                a["id"]
                for a in entries(body, "Appointment", "match")
                if str((actor(a, "Practitioner") or {}).get("reference")) != prac
            ]
            t.expect(
                not wrong and appt["id"] in ids(body), f"wrong practitioner {wrong[:3]} or the appointment missing"
            )
        with self.check("REQ-118-10", "specialty and appointment-type match", "search:specialty") as t:
            appt = need_target(t)
            for param, element in (("specialty", "specialty"), ("appointment-type", "appointmentType")):
                codings = _codings(appt, element)
                if not codings or not self.capability.claims(f"search:{param}"):
                    continue
                token = "|".join(codings[0])
                body = search(t, ("patient", str(patient)), (param, token))
                t.expect(appt["id"] in ids(body), f"{param}={token} misses the appointment")
                wrong = [
                    a["id"] for a in entries(body, "Appointment", "match") if codings[0] not in _codings(a, element)
                ]
                t.expect(not wrong, f"{param}={token} finds appointments without it: {wrong[:3]}")
        with self.check("REQ-118-11", "location narrows the search", "search:location") as t:
            appt = need_target(t)
            loc = str((actor(appt, "Location") or {}).get("reference", ""))
            body = search(t, ("patient", str(patient)), ("location", loc))
            wrong = [
                a["id"]
                for a in entries(body, "Appointment", "match")
                if str((actor(a, "Location") or {}).get("reference")) != loc
            ]
            t.expect(not wrong and appt["id"] in ids(body), f"wrong location {wrong[:3]} or the appointment missing")
        with self.check("REQ-118-11", "status narrows the search", "search:status") as t:
            need_target(t)
            body = search(t, ("patient", str(patient)), ("status", "cancelled"))
            wrong = [a.get("status") for a in entries(body, "Appointment", "match") if a.get("status") != "cancelled"]
            t.expect(not wrong, f"status=cancelled found {wrong[:3]}")
        self._search_paging_checks(patient, search, ids, need_target)

    def _search_paging_checks(
        self,
        patient: str | None,
        search: Callable[..., dict[str, Any]],
        ids: Callable[[dict[str, Any]], set[str]],
        need_target: Callable[[Trial], dict[str, Any]],
    ) -> None:
        with self.check("REQ-118-12", "_count limits the matches per page", "search:patient") as t:
            need_target(t)
            body = search(t, ("patient", str(patient)), ("_count", "1"))
            t.expect(len(entries(body, "Appointment", "match")) <= 1, "more than one match with _count=1")
        with self.check("REQ-118-13", "total counts every match across pages", "search:patient") as t:
            need_target(t)
            whole = search(t, ("patient", str(patient)))
            page = search(t, ("patient", str(patient)), ("_count", "1"))
            t.expect(
                whole.get("total") == page.get("total"),
                f"total {page.get('total')} with _count=1, {whole.get('total')} without",
            )
        with self.check("REQ-118-14", "search pages are linked with next", "search:patient") as t:
            need_target(t)
            page = search(t, ("patient", str(patient)), ("_count", "1"))
            if (page.get("total") or 0) < 2:
                t.skip("fewer than two appointments for the patient")
            link = next_link(page)
            t.expect(link, "no next link although total > _count")
            second = t.record(self.client.request("GET", str(link)), search=True)
            t.expect_status(second, 200)
            t.expect(ids(second.body) and not ids(second.body) & ids(page), "the next page repeats or is empty")
        with self.check(
            "REQ-118-15", "_include adds the practitioners", "search:patient", "include:Appointment:practitioner"
        ) as t:
            need_target(t)
            body = search(t, ("patient", str(patient)), ("_include", "Appointment:practitioner"))
            t.expect(entries(body, "Practitioner", "include"), "no Practitioner entry with search.mode include")
        with self.check("REQ-118-16", "_sort=date and -date order by start", "search:patient", "search:_sort") as t:
            need_target(t)
            up = [a["start"] for a in entries(search(t, ("patient", str(patient)), ("_sort", "date")), "Appointment")]
            down = [
                a["start"] for a in entries(search(t, ("patient", str(patient)), ("_sort", "-date")), "Appointment")
            ]
            key = dt.datetime.fromisoformat
            t.expect(up == sorted(up, key=key), "_sort=date is not ascending")
            t.expect(down == sorted(down, key=key, reverse=True), "_sort=-date is not descending")

    # -- formats and errors -----------------------------------------------------------------------
    def error_checks(self) -> None:
        with self.check("REQ-GEN-04", "metadata and $find in FHIR XML", "format:xml") as t:
            meta = t.record(self.client.request("GET", "metadata", params={"_format": "xml"}))
            t.expect_status(meta, 200)
            t.expect("xml" in meta.response_headers.get("content-type", ""), "the answer is not XML")
            root = _xml_root(meta.response_text)
            t.expect(root == f"{FHIR_NS}CapabilityStatement", f"the XML root is {root!r}")
            xml_body = (
                '<Parameters xmlns="http://hl7.org/fhir"><parameter><name value="start"/>'
                f'<valueDateTime value="{self.start}"/></parameter><parameter><name value="end"/>'
                f'<valueDateTime value="{self.end}"/></parameter><parameter><name value="_count"/>'
                '<valueInteger value="1"/></parameter></Parameters>'
            )
            find = t.record(
                self.client.request(
                    "POST",
                    "Appointment/$find",
                    content=xml_body,
                    headers={"Content-Type": "application/fhir+xml", "Accept": "application/fhir+xml"},
                )
            )
            t.expect_status(find, 200)
            t.expect(_xml_root(find.response_text) == f"{FHIR_NS}Bundle", "the XML $find answer is not a Bundle")
        with self.check("REQ-GEN-06", "an unsupported Content-Type is 415 not-supported", "op:find") as t:
            ex = t.record(
                self.client.request(
                    "POST", "Appointment/$find", content="start=tomorrow", headers={"Content-Type": "text/plain"}
                )
            )
            t.expect_status(ex, 415)
            t.expect(any(i.get("code") == "not-supported" for i in issues(ex.body)), "no not-supported issue")
        with self.check("REQ-GEN-19", "a malformed body is 400 with a bare fatal OperationOutcome", "op:find") as t:
            ex = t.record(
                self.client.request(
                    "POST", "Appointment/$find", content='{"broken', headers={"Content-Type": "application/fhir+json"}
                )
            )
            body = t.expect_status(ex, 400)
            t.expect(isinstance(body, dict) and body.get("resourceType") == "OperationOutcome", "not an outcome")
            t.expect(
                any(i.get("severity") == "fatal" and i.get("code") in ("structure", "invalid") for i in issues(body)),
                "no fatal structure/invalid issue",
            )

    # -- the end ----------------------------------------------------------------------------------
    def cleanup(self) -> None:
        """Cancel what the kit booked (best effort; failures are not a requirement result)."""
        for appointment_id in list(self._booked):
            self.client.cancel(appointment_id, "other", patient=self.options.patient)
        self._booked.clear()

    def profile_results(self) -> None:
        for req in PROFILE_REQUIREMENTS:
            title = f"profile check of every received resource: {summary(req)}"
            found = self._profile_problems.get(req, [])
            if found:
                shown = list(dict.fromkeys(p for p, _ in found))
                message = f"{len(found)} problem(s): " + "; ".join(shown[:8])
                exchanges = list({id(ex): ex for _, ex in found}.values())[:3]
                self.results.append(CheckResult(req, title, FAIL, message, _evidence(exchanges)))
            elif self._inspected:
                self.results.append(CheckResult(req, title, PASS, f"{self._inspected} responses inspected"))
            else:
                self.results.append(CheckResult(req, title, SKIP, "no resource was received"))


class _SkipTrial(Trial):
    """Handed to a skipped check's body: the first thing it does ends it without recording anything."""

    def record(self, exchange: Exchange, *, search: bool = False) -> Exchange:
        raise _Skipped

    def expect(self, condition: object, message: str) -> None:
        raise _Skipped

    def expect_status(self, exchange: Exchange, *statuses: int) -> Any:
        raise _Skipped

    def skip(self, reason: str) -> None:
        raise _Skipped


class _Skipped(Exception):
    pass


def _codings(resource: dict[str, Any], element: str) -> list[tuple[str, str]]:
    """(system, code) pairs of a CodeableConcept element (a list or a single one)."""
    value = resource.get(element)
    concepts = value if isinstance(value, list) else [value] if isinstance(value, dict) else []
    return [
        (str(c["system"]), str(c["code"]))
        for concept in concepts
        if isinstance(concept, dict)
        for c in concept.get("coding") or []
        if isinstance(c, dict) and c.get("system") and c.get("code")
    ]


def _resource_of(appt: dict[str, Any]) -> dict[str, Any]:
    keep = ("id", "status", "start", "end", "participant", "serviceType", "specialty", "appointmentType")
    return {"resourceType": "Appointment", **{k: appt[k] for k in keep if k in appt}}


def _requirements_of(problem: str, resource_type: str) -> list[str]:
    found = _REQ_RE.findall(problem)
    for prefix, req in _RULE_TO_REQ.items():
        if problem.startswith(prefix) or f": {prefix}" in problem:
            found.append(req)
    if problem.startswith("R4 schema") or "R4 schema" in problem:
        found.append("REQ-APPT-01" if resource_type == "Appointment" else "REQ-BNDL-01")
    if any(r.startswith("REQ-APPT-") for r in found):
        found.append("REQ-APPT-01")  # any profile problem makes the Appointment invalid
    if resource_type == "Bundle" and found:
        found.append("REQ-BNDL-01")
    return list(dict.fromkeys(found))


def _evidence(exchanges: list[Exchange], *, brief: bool = False) -> list[dict[str, Any]]:
    if brief:
        return [{"request": {"method": e.method, "url": e.url}, "response": {"status": e.status}} for e in exchanges]
    return [e.evidence() for e in exchanges]


def _xml_root(text: str) -> str | None:
    try:
        return ET.fromstring(text).tag
    except ET.ParseError:
        return None


__all__ = ["FAIL", "PASS", "SKIP", "CheckResult", "Kit", "KitOptions", "level"]
