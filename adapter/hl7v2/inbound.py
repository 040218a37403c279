"""Inbound messages -> neutral result types (plain dataclasses; the backend maps them to the domain).

``parse_siu`` (SIU^S12-S17, S26), ``parse_srr`` (SRR^S01-S04 with AA/AE/AR and ERR) and ``parse_sqr`` (SQR^S25
slots) read with the tolerant split-based ``ER7Message`` and take every field location from the HL7v2 mapping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from adapter.hl7v2.er7 import ER7Message, Segment, parse_ts
from adapter.hl7v2.mapping import Hl7v2Mapping

SIU_TRIGGERS = frozenset({"S12", "S13", "S14", "S15", "S16", "S17", "S26"})


@dataclass(frozen=True, slots=True)
class AppointmentData:
    """What one SCH(+TQ1+PID+resource groups) block says about an appointment."""

    placer_id: str
    filler_id: str
    legacy_status: str
    status: str | None  # FHIR Appointment.status, None when neither SCH-25 nor the trigger maps
    status_reason: str | None
    start: datetime | None
    end: datetime | None
    duration_seconds: int | None
    practitioner_ids: tuple[str, ...]
    location_ids: tuple[str, ...]
    patient_ids: tuple[str, ...]
    patient_family: str
    patient_given: str
    service: str
    reason: str


@dataclass(frozen=True, slots=True)
class SiuEvent:
    """One SIU message: the header facts plus the appointment it describes, and the raw text (Z-segments kept)."""

    trigger: str
    control_id: str
    sender: str
    version: str
    message_time: datetime | None
    appointment: AppointmentData
    z_segments: tuple[str, ...]
    raw: str

    @property
    def filler_id(self) -> str:
        return self.appointment.filler_id


@dataclass(frozen=True, slots=True)
class ErrDetail:
    code: str
    text: str
    severity: str


@dataclass(frozen=True, slots=True)
class SrrResult:
    """SRR: MSA-1 AA (booked/changed/cancelled), AE or AR (refused, with the filler's reason in ``errors``/``text``)."""

    ack_code: str
    acknowledged_control_id: str
    text: str
    errors: tuple[ErrDetail, ...]
    appointment: AppointmentData | None

    @property
    def accepted(self) -> bool:
        return self.ack_code in ("AA", "CA")

    @property
    def reason(self) -> str:
        for e in self.errors:
            if e.text:
                return e.text
        return self.text


@dataclass(frozen=True, slots=True)
class SqrSlot:
    start: datetime
    end: datetime
    practitioner_ids: tuple[str, ...]
    location_ids: tuple[str, ...]
    service: str


@dataclass(frozen=True, slots=True)
class SqrResult:
    ack_code: str
    acknowledged_control_id: str
    text: str
    slots: tuple[SqrSlot, ...]
    errors: tuple[ErrDetail, ...] = field(default_factory=tuple)


def _msh(msg: ER7Message) -> Segment:
    msh = msg.first("MSH")
    if msh is None:
        raise ValueError("no MSH segment")
    return msh


def _appointment(msg: ER7Message, mapping: Hl7v2Mapping, version: str, trigger: str) -> AppointmentData:
    f = mapping.fields

    def first(name: str) -> str:
        return msg.first_value(list(f[name]))

    def every(name: str) -> tuple[str, ...]:
        for p in f[name]:
            vals = msg.values(p)
            if vals:
                return tuple(dict.fromkeys(vals))
        return ()

    times = mapping.times_for(version)
    start = parse_ts(msg.first_value(list(times.start)), mapping.zone)
    end = parse_ts(msg.first_value(list(times.end)), mapping.zone) if times.end else None
    duration_seconds: int | None = None
    if start is not None and end is not None:
        # Explicit start and end win over SCH-9/10, which senders fill inconsistently (e.g. "60|s" for 50 minutes).
        duration_seconds = int((end - start).total_seconds())
    else:
        raw_duration = first("duration")
        try:
            amount = float(raw_duration) if raw_duration else -1.0
        except ValueError:
            amount = -1.0
        unit = first("duration_unit").lower() or mapping.interface.duration_unit.lower()
        per = mapping.duration_units.get(unit)
        if amount >= 0 and per is not None:
            duration_seconds = int(amount * per)
            if start is not None:
                end = start + timedelta(seconds=duration_seconds)
    legacy_status = first("status")
    mapped = mapping.fhir_status(legacy_status, trigger)
    return AppointmentData(
        placer_id=first("placer_id"),
        filler_id=first("filler_id"),
        legacy_status=legacy_status,
        status=mapped.status if mapped else None,
        status_reason=mapped.reason if mapped else None,
        start=start,
        end=end,
        duration_seconds=duration_seconds,
        practitioner_ids=every("practitioner"),
        location_ids=every("location"),
        patient_ids=every("patient_id"),
        patient_family=first("patient_family"),
        patient_given=first("patient_given"),
        service=first("service"),
        reason=first("reason"),
    )


def parse_siu(raw: bytes | str, mapping: Hl7v2Mapping) -> SiuEvent:
    msg = ER7Message.parse(raw)
    msh = _msh(msg)
    msg_type = msg.field(msh, 9)
    kind, trigger = msg.component(msg_type, 1), msg.component(msg_type, 2)
    if kind != "SIU" or trigger not in SIU_TRIGGERS:
        raise ValueError(f"not an SIU^S12-S17/S26 message: MSH-9 is {msg_type!r}")
    version = msg.component(msg.field(msh, 12), 1)
    return SiuEvent(
        trigger=trigger,
        control_id=msg.field(msh, 10),
        sender=f"{msg.field(msh, 3)}|{msg.field(msh, 4)}",
        version=version,
        message_time=parse_ts(msg.field(msh, 7), mapping.zone),
        appointment=_appointment(msg, mapping, version, trigger),
        z_segments=tuple(msg.z_segments),
        raw="\r".join(s.raw for s in msg.segments) + "\r",
    )


def _errors(msg: ER7Message) -> tuple[ErrDetail, ...]:
    out = []
    for err in msg.all("ERR"):
        # v2.5+: ERR-3 code (CWE), ERR-4 severity, ERR-8 user message; v2.3/2.4: ERR-1 (ELD, code in component 4).
        code = msg.component(msg.field(err, 3), 1)
        text = msg.field(err, 8) and msg.component(msg.field(err, 8), 1)
        text = text or msg.component(msg.field(err, 3), 2)
        if not code:
            eld = msg.field(err, 1)
            code = msg.component(eld, 4)
            if msg.delimiters.subcomponent in code:
                code = code.split(msg.delimiters.subcomponent)[0]
            text = text or msg.component(eld, 4, 2)
        out.append(ErrDetail(code=code, text=text, severity=msg.component(msg.field(err, 4), 1) or "E"))
    return tuple(out)


def _msa(msg: ER7Message) -> tuple[str, str, str]:
    msa = msg.first("MSA")
    if msa is None:
        raise ValueError("response without MSA segment")
    return msg.field(msa, 1), msg.field(msa, 2), msg.component(msg.field(msa, 3), 1)


def parse_srr(raw: bytes | str, mapping: Hl7v2Mapping) -> SrrResult:
    """SRR^S01-S04 (or a bare ACK with AE/AR, which some fillers send instead of an SRR)."""
    msg = ER7Message.parse(raw)
    msh = _msh(msg)
    code, acked, text = _msa(msg)
    version = msg.component(msg.field(msh, 12), 1)
    trigger = msg.component(msg.field(msh, 9), 2)
    appointment = _appointment(msg, mapping, version, trigger) if msg.first("SCH") else None
    return SrrResult(code, acked, text, _errors(msg), appointment)


def parse_sqr(raw: bytes | str, mapping: Hl7v2Mapping) -> SqrResult:
    """SQR^S25: each SCH block is one free slot (start, end and the resources it needs)."""
    msg = ER7Message.parse(raw)
    msh = _msh(msg)
    code, acked, text = _msa(msg)
    version = msg.component(msg.field(msh, 12), 1)
    header = [s for s in msg.segments if s.name in ("MSH",)]
    slots = []
    block: list[Segment] = []
    blocks: list[list[Segment]] = []
    for seg in msg.segments:
        if seg.name == "SCH":
            if block:
                blocks.append(block)
            block = [seg]
        elif block and seg.name != "DSC":
            block.append(seg)
    if block:
        blocks.append(block)
    for segs in blocks:
        sub = ER7Message(msg.delimiters, header + segs)
        data = _appointment(sub, mapping, version, "S25")
        if data.start is None or data.end is None:
            continue
        slots.append(SqrSlot(data.start, data.end, data.practitioner_ids, data.location_ids, data.service))
    return SqrResult(code, acked, text, tuple(slots), _errors(msg))
