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


class CodeTableSpec(_Strict):
    entries: dict[str, Any] | None = None
    conceptmap: str | None = Field(None, description="path of a FHIR ConceptMap JSON, relative to the mapping")
    reverse: dict[str, str] | None = Field(None, description="explicit 'system|code' -> legacy code overrides")


class IdRule(_Strict):
    """How a legacy key becomes a valid FHIR id and back, exactly."""

    trim: bool = False
    pad_right: int | None = Field(None, ge=1, description="re-pad the trimmed id with spaces to this width")
    encode: Literal["none", "hex"] = "none"
    key_type: Literal["str", "int"] = Field("str", description="Python type of the legacy key when bound to SQL")


class QuerySpec(_Strict):
    sql: str
    binds: dict[str, str] = Field(default_factory=dict)
    fields: dict[str, str] = Field(default_factory=dict)


class ActorSpec(_Strict):
    select: str
    key: str = Field(description="column holding the legacy key")
    id: IdRule = IdRule()
    filters: dict[str, str] = Field(default_factory=dict, description="SQL conditions: key, name")
    identifier_filters: dict[str, str] = Field(default_factory=dict, description="identifier system -> SQL condition using :values")
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

    @field_validator("fields")
    @classmethod
    def _required_fields(cls, v: dict[str, str]) -> dict[str, str]:
        missing = {"key", "display", "minutes"} - set(v)
        if missing:
            raise ValueError(f"missing field(s) {sorted(missing)}")
        return v


class WorkingTimeSpec(QuerySpec):
    kind: Literal["weekly", "free_slots"]


class AvailabilitySpec(_Strict):
    working_time: WorkingTimeSpec
    absences: QuerySpec | None = None
    busy: QuerySpec


class AppointmentsSpec(_Strict):
    select: str
    key: str
    id: IdRule = IdRule()
    filters: dict[str, str] = Field(default_factory=dict)
    order: dict[str, str] = Field(default_factory=dict, description="sort keys: start")
    binds: dict[str, str] = Field(default_factory=dict)
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


class IdAllocationSpec(_Strict):
    strategy: Literal["counter", "database", "sequence", "uuid"]
    next_sql: str | None = Field(None, description="counter: read the next value; sequence: fetch nextval")
    bump_sql: str | None = Field(None, description="counter: increment, run under the booking lock")
    last_id_sql: str | None = Field(None, description="database: read the generated key after insert")


class StatementSpec(_Strict):
    sql: str
    binds: dict[str, str] = Field(default_factory=dict)


class PatientCreateSpec(_Strict):
    allowed: bool = False
    id_allocation: IdAllocationSpec | None = None
    insert: StatementSpec | None = None


class WritesSpec(_Strict):
    lock: StatementSpec
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
    def _all_actor_kinds(cls, v: dict) -> dict:
        missing = {"Practitioner", "Location", "Patient"} - set(v)
        if missing:
            raise ValueError(f"missing actor section(s) {sorted(missing)}")
        return v
