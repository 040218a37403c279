"""The declarative HL7v2 mapping (``mappings/hl7v2-*.yaml``): interface agreement plus field locations.

Loaded with the same YAML-with-line-numbers machinery and ``file:line: dotted.key: problem`` errors as the SQL
mapping (``adapter.mapping.loader``), so both mapping kinds read and fail the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field

from adapter.hl7v2.er7 import FieldPath
from adapter.mapping.loader import MappingError, _dotted, _line_for, read_document
from adapter.r4 import APPOINTMENT_STATUSES

OUTBOUND_VERSIONS = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Paths = str | list[str]


class InterfaceSpec(_Strict):
    """The interface agreement with one legacy scheduler."""

    version: Literal["2.3", "2.3.1", "2.4", "2.5", "2.5.1"] = "2.5.1"
    sending_application: str
    sending_facility: str = ""
    receiving_application: str
    receiving_facility: str = ""
    ack_mode: Literal["original", "enhanced"] = "original"
    encoding: str = Field("UNICODE UTF-8", description="MSH-18 character set written on outbound messages")
    processing_id: Literal["P", "T", "D"] = "P"
    timezone: str = Field(description="IANA zone for timestamps that arrive without a UTC offset")
    timeout_seconds: float = Field(10.0, gt=0)
    retries: int = Field(2, ge=0)
    location_type: str = Field("C", description="AIL-4 (HL7 table 0305) written on outbound AIL segments")
    resource_role: str = Field("D", description="AIP-4 role written on outbound AIP segments")
    duration_unit: str = Field("min", description="unit code written in ARQ-10/AIS-8")


class FieldsSpec(_Strict):
    placer_id: Paths = "SCH-1.1"
    filler_id: Paths = "SCH-2.1"
    practitioner: Paths = "AIP-3.1"
    location: Paths = "AIL-3.1"
    patient_id: Paths = "PID-3.1"
    patient_family: Paths = "PID-5.1"
    patient_given: Paths = "PID-5.2"
    service: Paths = "AIS-3.1"
    reason: Paths = "SCH-7.2"
    status: Paths = "SCH-25.1"
    duration: Paths = "SCH-9"
    duration_unit: Paths = "SCH-10.1"


class TimesRule(_Strict):
    since: str | None = Field(None, description="first message version the rule applies to, e.g. '2.5'")
    start: Paths
    end: Paths = Field(default_factory=list)


class StatusEntry(_Strict):
    status: str
    reason: str | None = Field(None, description="status reason code carried to FHIR (e.g. cancelation reason)")


class DirectoryActor(_Strict):
    """A practitioner or location the legacy scheduler books (an HL7v2 scheduler has no actor query)."""

    id: str = Field(description="the legacy code (AIP-3 / AIL-3) and the FHIR id")
    name: str
    identifiers: dict[str, str] = Field(default_factory=dict, description="identifier system -> value")
    specialties: list[str] = Field(default_factory=list, description="service codes this practitioner offers")
    locations: list[str] = Field(default_factory=list, description="for practitioners: where they work")


class DirectoryPatient(_Strict):
    id: str = Field(description="PID-3 and the FHIR id")
    family: str
    given: str = ""
    identifiers: dict[str, str] = Field(default_factory=dict, description="identifier system -> value")


class DirectoryVisitType(_Strict):
    key: str = Field(description="the service code (AIS-3)")
    display: str
    minutes: int = Field(gt=0)
    system: str = "urn:sched-adapter:hl7v2:service"


class SessionSpec(_Strict):
    """A recurring session for ``mode = templates``: availability = sessions minus the mirrored appointments."""

    practitioner: str
    location: str
    service: str
    weekdays: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4], description="0 = Monday")
    start: str = Field(description="local wall-clock time, HH:MM")
    end: str
    slot_minutes: int = Field(gt=0)


class DirectorySpec(_Strict):
    """What the HL7v2 backend serves for actors and visit types (FHIR reads, $find parameters)."""

    practitioners: list[DirectoryActor] = Field(default_factory=list)
    locations: list[DirectoryActor] = Field(default_factory=list)
    patients: list[DirectoryPatient] = Field(default_factory=list)
    visit_types: list[DirectoryVisitType] = Field(default_factory=list)
    default_visit_type: str | None = None
    slot_step_minutes: int | None = Field(None, gt=0)
    sessions: list[SessionSpec] = Field(default_factory=list)
    appointment_identifier_system: str = Field(
        "urn:sched-adapter:hl7v2:filler-id", description="Appointment.identifier system of the filler id (SCH-2)"
    )
    placer_identifier_system: str = Field(
        "urn:sched-adapter:hl7v2:placer-id", description="Appointment.identifier system of the placer id (SCH-1)"
    )


class Hl7v2MappingDocument(_Strict):
    interface: InterfaceSpec
    fields: FieldsSpec = Field(default_factory=FieldsSpec)
    times: list[TimesRule] = Field(min_length=1)
    status: dict[str, StatusEntry | str]
    status_by_trigger: dict[str, StatusEntry | str] = Field(default_factory=dict)
    duration_units: dict[str, int] = Field(default_factory=lambda: {"min": 60, "s": 1, "h": 3600})
    directory: DirectorySpec = Field(default_factory=lambda: DirectorySpec.model_validate({}))


@dataclass(frozen=True, slots=True)
class CompiledTimes:
    since: tuple[int, ...]
    start: tuple[FieldPath, ...]
    end: tuple[FieldPath, ...]


@dataclass(frozen=True, slots=True)
class Hl7v2Mapping:
    path: Path
    interface: InterfaceSpec
    zone: ZoneInfo
    fields: dict[str, tuple[FieldPath, ...]]
    times: tuple[CompiledTimes, ...]  # most specific (highest ``since``) first
    status: dict[str, StatusEntry]  # table 0278 code, lower-cased -> FHIR
    status_by_trigger: dict[str, StatusEntry]
    duration_units: dict[str, int]  # unit code, lower-cased -> seconds
    status_codes: dict[str, str]  # lower-cased table 0278 code -> the spelling the mapping (and the peer) uses
    directory: DirectorySpec = field(default_factory=lambda: DirectorySpec.model_validate({}))

    def times_for(self, version: str) -> CompiledTimes:
        v = version_tuple(version)
        for rule in self.times:
            if v >= rule.since:
                return rule
        return self.times[-1]

    def fhir_status(self, code: str, trigger: str) -> StatusEntry | None:
        if code:
            found = self.status.get(code.lower())
            if found is not None:
                return found
        return self.status_by_trigger.get(trigger)

    def legacy_status(self, fhir_status: str) -> str | None:
        """Table 0278 code for a FHIR status: the first entry of the mapping that maps to it."""
        for code, entry in self.status.items():
            if entry.status == fhir_status:
                return self.status_codes.get(code, code)
        return None


def version_tuple(version: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in version.strip().split("."):
        if not part.isdigit():
            break
        out.append(int(part))
    return tuple(out) or (0,)


def _as_list(value: Paths) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def load_hl7v2_mapping(path: str | Path) -> Hl7v2Mapping:
    path = Path(path)
    display = str(path)
    doc, lines = read_document(path, Hl7v2MappingDocument)

    problems: list[str] = []

    def fail(loc: tuple[Any, ...], msg: str) -> None:
        problems.append(f"{display}:{_line_for(lines, loc)}: {_dotted(loc)}: {msg}")

    try:
        zone = ZoneInfo(doc.interface.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        fail(("interface", "timezone"), f"expected an IANA time zone name, got {doc.interface.timezone!r}")
        zone = ZoneInfo("UTC")

    def paths(loc: tuple[Any, ...], value: Paths) -> tuple[FieldPath, ...]:
        out = []
        for i, p in enumerate(_as_list(value)):
            try:
                out.append(FieldPath.parse(p))
            except ValueError as exc:
                fail(loc + ((i,) if not isinstance(value, str) else ()), str(exc))
        return tuple(out)

    fields = {name: paths(("fields", name), value) for name, value in doc.fields.model_dump().items()}
    times = []
    for i, rule in enumerate(doc.times):
        since = version_tuple(rule.since) if rule.since else (0,)
        if rule.since and since == (0,):
            fail(("times", i, "since"), f"expected an HL7 version such as 2.5, got {rule.since!r}")
        times.append(
            CompiledTimes(since, paths(("times", i, "start"), rule.start), paths(("times", i, "end"), rule.end))
        )
    times.sort(key=lambda r: r.since, reverse=True)

    def statuses(key: str, table: dict[str, StatusEntry | str]) -> dict[str, StatusEntry]:
        out: dict[str, StatusEntry] = {}
        for code, entry in table.items():
            e = StatusEntry(status=entry, reason=None) if isinstance(entry, str) else entry
            if e.status not in APPOINTMENT_STATUSES:
                fail(
                    (key, code) + (("status",) if not isinstance(entry, str) else ()),
                    f"expected a FHIR Appointment.status ({', '.join(sorted(APPOINTMENT_STATUSES))}), got {e.status!r}",
                )
            out[code.lower() if key == "status" else code] = e
        return out

    status = statuses("status", doc.status)
    by_trigger = statuses("status_by_trigger", doc.status_by_trigger)
    units = {k.lower(): v for k, v in doc.duration_units.items()}
    for unit, seconds in doc.duration_units.items():
        if seconds <= 0:
            fail(("duration_units", unit), "expected a positive number of seconds")
    if problems:
        raise MappingError(problems)
    codes = {k.lower(): k for k in doc.status}
    return Hl7v2Mapping(
        path, doc.interface, zone, fields, tuple(times), status, by_trigger, units, codes, doc.directory
    )
