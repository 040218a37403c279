"""Outbound messages (placer role): SQM^S25 and SRM^S01/S02/S04, built per the interface agreement.

Each message is assembled as ER7 with every free-text value escaped, then parsed and validated by hl7apy at
``STRICT`` level for the agreed version (2.3 to 2.5.1) before it is sent, so a message the peer's HL7 definition
would reject never leaves the adapter. Validation costs ~40 ms per message (hl7apy); outbound traffic is one
message per booking, so that is affordable, unlike on the inbound SIU path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message

from adapter.hl7v2.er7 import format_ts
from adapter.hl7v2.escaping import escape
from adapter.hl7v2.mapping import InterfaceSpec, version_tuple

SrmTrigger = Literal["S01", "S02", "S03", "S04"]


class OutboundMessageError(ValueError):
    """hl7apy rejected a message built for the agreed version (a bug or an impossible agreement)."""


@dataclass(frozen=True, slots=True)
class PatientRef:
    id: str
    family: str = ""
    given: str = ""
    assigning_authority: str = ""


@dataclass(frozen=True, slots=True)
class BookingRequest:
    """An SRM request. ``placer_id`` is ARQ-1 and must stay the same across retries of one booking."""

    placer_id: str
    start: datetime
    duration_minutes: int
    service: str
    service_text: str = ""
    practitioner_ids: Sequence[str] = field(default_factory=tuple)
    location_ids: Sequence[str] = field(default_factory=tuple)
    patient: PatientRef | None = None
    reason: str = ""
    filler_id: str = ""  # ARQ-2: known for S02/S03/S04


@dataclass(frozen=True, slots=True)
class AvailabilityRequest:
    """An SQM^S25 query: free slots of ``duration_minutes`` for ``service`` in [window_start, window_end)."""

    query_id: str
    window_start: datetime
    window_end: datetime
    duration_minutes: int
    service: str
    service_text: str = ""
    practitioner_ids: Sequence[str] = field(default_factory=tuple)
    location_ids: Sequence[str] = field(default_factory=tuple)
    max_results: int = 100


def _msh(a: InterfaceSpec, message: str, trigger: str, structure: str, control_id: str, now: datetime) -> str:
    msg_type = f"{message}^{trigger}" if a.version == "2.3" else f"{message}^{trigger}^{structure}"
    fields = [
        "MSH",
        "^~\\&",
        escape(a.sending_application),
        escape(a.sending_facility),
        escape(a.receiving_application),
        escape(a.receiving_facility),
        format_ts(now),
        "",
        msg_type,
        escape(control_id),
        a.processing_id,
        a.version,
        "",
        "",
        "AL" if a.ack_mode == "enhanced" else "",
        "AL" if a.ack_mode == "enhanced" else "",
    ]
    return "|".join(fields).rstrip("|")


def _validated(segments: list[str], structure_alias: tuple[str, str] | None = None) -> bytes:
    text = "\r".join(segments)
    checked = text
    if structure_alias is not None:
        # v2.3 has no MSH-9.3, and hl7apy derives the structure from MSH-9 (SRM^S02 -> SRM_S02, which does not
        # exist): validate with the trigger whose structure the message uses, send the real trigger.
        checked = text.replace(structure_alias[0], structure_alias[1], 1)
    try:
        parsed = parse_message(checked, validation_level=VALIDATION_LEVEL.STRICT, force_validation=True)
        parsed.validate()
    except (HL7apyException, ValueError) as exc:
        raise OutboundMessageError(f"hl7apy rejected the outbound message: {exc}") from exc
    return (text + "\r").encode("utf-8")


def _resources(
    a: InterfaceSpec,
    service: str,
    service_text: str,
    start: str,
    duration: int,
    pract: Sequence[str],
    locs: Sequence[str],
    personnel_first: bool,
) -> list[str]:
    unit = escape(a.duration_unit)
    out = ["RGS|1|A", f"AIS|1|A|{escape(service)}^{escape(service_text)}|{start}|||{duration}|{unit}"]
    ail = [f"AIL|{i}|A|{escape(loc)}|{escape(a.location_type)}" for i, loc in enumerate(locs, 1)]
    aip = [f"AIP|{i}|A|{escape(p)}|{escape(a.resource_role)}" for i, p in enumerate(pract, 1)]
    # SQM/SQR list personnel before locations, SRM/SIU locations before personnel (the message structures differ).
    return out + (aip + ail if personnel_first else ail + aip)


def build_srm(
    agreement: InterfaceSpec,
    trigger: SrmTrigger,
    request: BookingRequest,
    *,
    control_id: str,
    now: datetime | None = None,
) -> bytes:
    """SRM^S01 (new), S02 (reschedule), S03 (modify), S04 (cancel) with ARQ-1 = the stable placer id."""
    a = agreement
    now = now or datetime.now(UTC)
    start = format_ts(request.start)
    reason = escape(request.reason)
    svc = escape(request.service)
    requester = escape(a.sending_application)
    arq = [
        "ARQ",
        f"{escape(request.placer_id)}^{escape(a.sending_application)}",
        escape(request.filler_id),
        "",
        "",
        "",
        "",
        f"^{reason}" if reason else "",
        svc,
        str(request.duration_minutes),
        escape(a.duration_unit),
        f"{start}^{format_ts(request.start)}",
        "",
        "",
        "",
        requester,
        "",
        "",
        "",
        requester,
    ]
    segments = [_msh(a, "SRM", trigger, "SRM_S01", control_id, now), "|".join(arq)]
    if request.patient is not None:
        p = request.patient
        pid3 = f"{escape(p.id)}^^^{escape(p.assigning_authority)}" if p.assigning_authority else escape(p.id)
        segments.append(f"PID|1||{pid3}||{escape(p.family)}^{escape(p.given)}")
    segments += _resources(
        a,
        request.service,
        request.service_text,
        start,
        request.duration_minutes,
        request.practitioner_ids,
        request.location_ids,
        personnel_first=False,
    )
    alias = (f"|SRM^{trigger}|", "|SRM^S01|") if agreement.version == "2.3" else None
    return _validated(segments, alias)


def build_sqm(
    agreement: InterfaceSpec, request: AvailabilityRequest, *, control_id: str, now: datetime | None = None
) -> bytes:
    """SQM^S25 schedule query: window (ARQ-11), service (AIS-3), duration (ARQ-9/10), resources (AIP/AIL)."""
    a = agreement
    now = now or datetime.now(UTC)
    qid = escape(request.query_id)
    who = escape(request.practitioner_ids[0]) if request.practitioner_ids else escape(a.receiving_application)
    svc = escape(request.service)
    requester = escape(a.sending_application)
    segments = [_msh(a, "SQM", "S25", "SQM_S25", control_id, now)]
    if version_tuple(a.version) < (2, 6):
        segments.append(f"QRD|{format_ts(now)}|R|I|{qid}|||{request.max_results}^RD|{who}|APN|{svc}")
    arq = [
        "ARQ",
        qid,
        "",
        "",
        "",
        "",
        "",
        "",
        svc,
        str(request.duration_minutes),
        escape(a.duration_unit),
        f"{format_ts(request.window_start)}^{format_ts(request.window_end)}",
        "",
        "",
        "",
        requester,
        "",
        "",
        "",
        requester,
    ]
    segments.append("|".join(arq))
    segments += _resources(
        a,
        request.service,
        request.service_text,
        "",
        request.duration_minutes,
        request.practitioner_ids,
        request.location_ids,
        personnel_first=True,
    )
    return _validated(segments)
