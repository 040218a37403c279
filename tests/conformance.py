"""The conformance checkers for tests: one copy lives in ``adapter.conformance.profiles`` (the kit uses it too)."""

from __future__ import annotations

from adapter.conformance.profiles import (
    ACTOR_TYPES,
    ID_RE,
    LITERAL_REFERENCE_RE,
    PARTICIPANT_STATUSES,
    SCHEMA_PATH,
    STATUS_REASON_URL,
    STATUSES_WITH_CANCELATION_REASON,
    STATUSES_WITHOUT_TIMES,
    TIME_WITH_OFFSET_RE,
    appointment_problems,
    assert_avail_bundle,
    assert_ihe_appointment,
    assert_operation_outcome,
    assert_r4,
    avail_bundle_problems,
    operation_outcome_problems,
    r4_problems,
)

__all__ = [
    "ACTOR_TYPES",
    "ID_RE",
    "LITERAL_REFERENCE_RE",
    "PARTICIPANT_STATUSES",
    "SCHEMA_PATH",
    "STATUSES_WITHOUT_TIMES",
    "STATUSES_WITH_CANCELATION_REASON",
    "STATUS_REASON_URL",
    "TIME_WITH_OFFSET_RE",
    "appointment_problems",
    "assert_avail_bundle",
    "assert_ihe_appointment",
    "assert_operation_outcome",
    "assert_r4",
    "avail_bundle_problems",
    "operation_outcome_problems",
    "r4_problems",
]
