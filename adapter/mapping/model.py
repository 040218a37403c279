"""The typed shape of a mapping file (see mappings/README.md for the prose version).

These models only describe and validate the *document*; ``loader.py`` turns a validated
document into compiled expressions and checks cross-references (code tables, bind names).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OrganizationSpec(_Strict):
    id: str
    name: str


class SystemSpec(_Strict):
    name: str
    timezone: str = Field(description="IANA zone of the legacy wall-clock times, e.g. America/New_York")
    identifier_base: str = Field(description="URI prefix for identifier systems minted by the adapter")
    organization: OrganizationSpec | None = None
    sql_fold: dict[Literal["sqlite", "postgresql", "mariadb", "odbc"], str] = Field(
        default_factory=dict,
        description="per dialect, the SQL that folds a column for name search: FOLD(col) in a name filter "
        "becomes this template with {} replaced by col (defaults: see mappings/README.md)",
    )


class CodeTableSpec(_Strict):
    entries: dict[str, Any] | None = None
    conceptmap: str | None = Field(None, description="path of a FHIR ConceptMap JSON, relative to the mapping")
    reverse: dict[str, str] | None = Field(None, description="explicit 'system|code' -> legacy code overrides")
    fallback: Any = Field(
        None, description="target (FHIR code or coding) for legacy codes missing from the table; default: error"
    )


class IdRule(_Strict):
    """How a legacy key becomes a valid FHIR id and back, exactly."""

    trim: bool = False
    pad_right: int | None = Field(None, ge=1, description="re-pad the trimmed id with spaces to this width")
    encode: Literal["none", "hex"] = "none"
    key_type: Literal["str", "int", "bigint"] = Field(
        "str", description="type of the legacy key when bound to SQL: str, int (SQL INTEGER, 32-bit), bigint (64-bit)"
    )


class QuerySpec(_Strict):
    sql: str
    binds: dict[str, str] = Field(default_factory=dict)
    fields: dict[str, str] = Field(default_factory=dict)
    repeat: str | None = Field(
        None,
        description="availability sections: expression giving the local dates a row occurs on (recurring "
        "events); inputs: the row's columns plus window_start/window_end; fields then see 'occurrence'",
    )


class ActorSpec(_Strict):
    select: str
    key: str = Field(description="column holding the legacy key")
    id: IdRule = IdRule()
    filters: dict[str, str] = Field(default_factory=dict, description="SQL conditions: key, name")
    identifier_filters: dict[str, str] = Field(
        default_factory=dict, description="identifier system -> SQL condition using :values"
    )
    fields: dict[str, str] = Field(default_factory=dict)
    resource: dict[str, Any]

    @field_validator("filters")
    @classmethod
    def _known_filters(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = set(v) - {"key", "name"}
        if unknown:
            raise ValueError(f"unknown filter(s) {sorted(unknown)}; expected 'key' and/or 'name'")
        if "key" not in v:
            raise ValueError("a 'key' filter (e.g. \"PROV_ID IN (:keys)\") is required")
        return v


class VisitTypesSpec(_Strict):
    sql: str
    fields: dict[str, str]
    codings: list[Any] = Field(default_factory=list)
    service_types: list[Any] = Field(default_factory=list)
    default: str
    slot_step_minutes: int | None = Field(None, ge=1, le=1440)
    # Where the grid of candidate starts begins: at each working-time period's start ("period": 08:05, 08:20, ...
    # for a session opening at 08:05) or at local midnight ("clock": 08:15, 08:30, ... with a 15-minute step).
    slot_alignment: Literal["period", "clock"] = "period"

    @field_validator("fields")
    @classmethod
    def _required_fields(cls, v: dict[str, str]) -> dict[str, str]:
        missing = {"key", "display", "minutes"} - set(v)
        if missing:
            raise ValueError(f"missing field(s) {sorted(missing)}")
        return v


class WorkingTimeSpec(QuerySpec):
    kind: Literal["weekly", "free_slots", "markers"]


class AvailabilitySpec(_Strict):
    working_time: WorkingTimeSpec
    absences: QuerySpec | None = None
    busy: QuerySpec


APPOINTMENT_FILTERS: dict[str, set[str] | None] = {
    # filter name -> bind names the engine supplies (None: the names declared under ``binds``)
    "key": {"keys"},
    "patient": {"patient_keys"},
    "practitioner": {"practitioner_keys"},
    "location": {"location_keys"},
    "status": {"status_codes"},
    "visit_type": {"visit_type_keys"},
    "specialty": {"specialty_keys"},
    "start_from": None,  # Appointment.start >= the bound instant
    "start_before": None,  # Appointment.start <  the bound instant
}


class IdentifierFilterSpec(_Strict):
    """An ``Appointment.identifier`` system the search can match, and how."""

    sql: str = Field(description="SQL condition using :values (the identifier values, as a list)")
    value: str = Field(
        "{value}",
        description="expression turning one identifier value (input 'value') into "
        'the legacy bind value, e.g. "{value|int}"',
    )


class AppointmentsSpec(_Strict):
    select: str
    key: str
    id: IdRule = IdRule()
    filters: dict[str, str] = Field(
        default_factory=dict, description="SQL conditions over the select's columns: " + ", ".join(APPOINTMENT_FILTERS)
    )
    identifier_filters: dict[str, str | IdentifierFilterSpec] = Field(
        default_factory=dict, description="Appointment.identifier system -> SQL condition using :values"
    )
    order: dict[str, str] = Field(
        default_factory=dict,
        description="start: sort expression(s) of the start time; key: tie-breaker column (default: key)",
    )
    binds: dict[str, str] = Field(
        default_factory=dict,
        description="binds of start_from/start_before, computed "
        "from the bound instant (input 'bound', already in the mapping's zone)",
    )
    start_resolution_seconds: int = Field(
        1,
        ge=1,
        le=3600,
        description="smallest step the legacy start columns "
        "can express (60 for HHMM); search bounds are rounded up to it",
    )
    codes: dict[Literal["status", "specialty"], str] = Field(
        default_factory=dict, description="code tables that translate FHIR search tokens to legacy codes"
    )
    fields: dict[str, str]
    identifier: list[Any] = Field(default_factory=list)

    @field_validator("fields")
    @classmethod
    def _required_fields(cls, v: dict[str, str]) -> dict[str, str]:
        missing = {"status", "start", "practitioner", "location", "patient"} - set(v)
        if missing:
            raise ValueError(f"missing field(s) {sorted(missing)}")
        if "end" not in v and "minutes" not in v:
            raise ValueError("expected an 'end' or a 'minutes' field")
        return v

    @field_validator("filters")
    @classmethod
    def _known_filters(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = set(v) - set(APPOINTMENT_FILTERS)
        if unknown:
            raise ValueError(f"unknown filter(s) {sorted(unknown)}; expected some of {list(APPOINTMENT_FILTERS)}")
        if "key" not in v:
            raise ValueError("a 'key' filter (e.g. \"APPT_ID IN (:keys)\") is required")
        if ("start_from" in v) != ("start_before" in v):
            raise ValueError("'start_from' and 'start_before' go together (date search and paging need both)")
        return v

    @field_validator("order")
    @classmethod
    def _known_order(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = set(v) - {"start", "key"}
        if unknown:
            raise ValueError(f"unknown sort key(s) {sorted(unknown)}; expected 'start' and optionally 'key'")
        return v

    @field_validator("start_resolution_seconds")
    @classmethod
    def _divides_an_hour(cls, v: int) -> int:
        if 3600 % v:
            raise ValueError("expected a number of seconds that divides 3600 (1, 60, 300, ...)")
        return v


class IdAllocationSpec(_Strict):
    strategy: Literal["counter", "database", "sequence", "uuid"]
    next_sql: str | None = Field(None, description="counter: read the next value; sequence: fetch nextval")
    bump_sql: str | None = Field(None, description="counter: increment, run under the booking lock")
    last_id_sql: str | None = Field(None, description="database: read the generated key after insert")


class StatementSpec(_Strict):
    sql: str
    binds: dict[str, str] = Field(default_factory=dict)
    allowed_statuses: list[str] | None = Field(
        None,
        description="reschedule/cancel only: the FHIR statuses an appointment may have for this change; "
        "any other is refused with 409 naming it (default: every status the engine allows)",
    )


class PatientCreateSpec(_Strict):
    allowed: bool = False
    id_allocation: IdAllocationSpec | None = None
    insert: StatementSpec | None = None


class WritesSpec(_Strict):
    lock: StatementSpec
    # Locks one patient (bind :patient_key) after the practitioner lock, so that one patient's
    # bookings with different practitioners are serialised; default: the Patient select by key.
    patient_lock: StatementSpec | None = None
    id_allocation: IdAllocationSpec
    book: StatementSpec
    reschedule: StatementSpec
    cancel: StatementSpec
    create_patient: PatientCreateSpec = PatientCreateSpec()


class MappingDocument(_Strict):
    mapping_version: Literal[1]
    system: SystemSpec
    codes: dict[str, CodeTableSpec] = Field(default_factory=dict)
    actors: dict[Literal["Practitioner", "Location", "Patient"], ActorSpec]
    visit_types: VisitTypesSpec
    availability: AvailabilitySpec
    appointments: AppointmentsSpec
    writes: WritesSpec | None = None

    @field_validator("actors")
    @classmethod
    def _all_actor_kinds(cls, v: dict[str, Any]) -> dict[str, Any]:
        missing = {"Practitioner", "Location", "Patient"} - set(v)
        if missing:
            raise ValueError(f"missing actor section(s) {sorted(missing)}")
        return v
