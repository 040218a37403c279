"""A legacy scheduler simulator speaking HL7v2 over MLLP. NOT PRODUCTION CODE: a test double for demos and tests.

It plays the filler role: answers SQM^S25 with SQR^S25 (free slots of its session templates minus its bookings),
SRM^S01/S02/S04 with SRR (AA, or AE when the slot is taken), and sends SIU (S12 new, S13 rescheduled, S15
cancelled) to a configured listener whenever its bookings change, including bookings made at its own front desk
(``front_desk_book`` / ``front_desk_reschedule`` / ``front_desk_cancel``).

Fault switches (``Faults``; each is a count of upcoming messages it applies to):
``drop`` close the connection after reading a request, before answering (``drop_after_apply`` decides whether the
request was carried out first), ``delay`` answer ``delay_seconds`` late, ``twice`` answer twice, ``ae`` answer AE,
``ar`` answer AR (application reject: a rule of the filler's refuses the request), ``duplicate_siu`` send an SIU
twice with the same MSH-10, ``out_of_order_siu`` hold an SIU back and send it after the next one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from adapter.hl7v2.er7 import ER7Message, FieldPath, format_ts, parse_ts
from adapter.hl7v2.escaping import escape
from adapter.mllp import CloseConnection, MLLPClient, MLLPError, MLLPServer, Peer, build_ack, read_msh

log = logging.getLogger("adapter.testing.hl7_simulator")


@dataclass(frozen=True, slots=True)
class SessionTemplate:
    """A recurring working session: ``practitioner`` at ``location`` offers ``service`` on ``weekdays``."""

    practitioner: str
    location: str
    service: str
    weekdays: frozenset[int]  # 0 = Monday
    start: time
    end: time
    slot_minutes: int


@dataclass(slots=True)
class SimAppointment:
    filler_id: str
    placer_id: str
    start: datetime
    end: datetime
    practitioner: str
    location: str
    service: str
    patient_id: str
    family: str
    given: str
    status: str = "Booked"  # HL7 table 0278


@dataclass(slots=True)
class Faults:
    drop: int = 0
    drop_after_apply: bool = False
    # Only messages of this type (MSH-9.1, e.g. "SRM") count for ``drop``; empty: every message. A reschedule asks
    # the filler's schedule (SQM) before its SRM, and a test may want only the SRM lost.
    drop_type: str = ""
    delay: int = 0
    delay_seconds: float = 2.0
    delay_type: str = ""  # as ``drop_type``, for ``delay``
    twice: int = 0
    ae: int = 0
    ar: int = 0
    duplicate_siu: int = 0
    out_of_order_siu: int = 0

    @staticmethod
    def take(counter: int) -> tuple[bool, int]:
        return (True, counter - 1) if counter > 0 else (False, 0)


@dataclass(slots=True)
class _Booking:
    placer_id: str
    filler_id: str
    start: datetime | None
    minutes: int
    service: str
    practitioner: str
    location: str
    patient_id: str
    family: str
    given: str


class LegacySchedulerSimulator:
    def __init__(
        self,
        templates: Sequence[SessionTemplate],
        *,
        zone: str = "Europe/Berlin",
        version: str = "2.5.1",
        host: str = "127.0.0.1",
        port: int = 0,
        siu_target: tuple[str, int] | None = None,
        application: str = "LEGACY-PM",
        facility: str = "DEMO",
    ) -> None:
        self.templates = list(templates)
        self.zone = ZoneInfo(zone)
        self.version = version
        self.app = application
        self.facility = facility
        self.appointments: dict[str, SimAppointment] = {}
        self.faults = Faults()
        self.received: list[bytes] = []
        self.siu_sent: list[bytes] = []
        self._server = MLLPServer(self.handle, host=host, port=port)
        self._siu_target = siu_target
        self._siu_client: MLLPClient | None = None
        self._siu_queue: asyncio.Queue[bytes] | None = None
        self._siu_task: asyncio.Task[None] | None = None
        self._held: bytes | None = None
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()

    # --- lifecycle ------------------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._server.port

    async def start(self) -> None:
        await self._server.start()
        if self._siu_target is not None:
            self._siu_client = MLLPClient(*self._siu_target, timeout=5, retries=5, backoff_initial=0.05)
            self._siu_queue = asyncio.Queue()
            self._siu_task = asyncio.create_task(self._siu_sender(), name="simulator-siu-sender")

    async def stop(self) -> None:
        if self._siu_task is not None:
            self._siu_task.cancel()
            await asyncio.gather(self._siu_task, return_exceptions=True)
        if self._siu_client is not None:
            await self._siu_client.close()
        await self._server.stop()

    async def __aenter__(self) -> LegacySchedulerSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def siu_idle(self) -> None:
        """Wait until every queued SIU has been acknowledged by the listener (held ones excepted)."""
        if self._siu_queue is not None:
            await self._siu_queue.join()

    # --- schedule -------------------------------------------------------------------------------------------------

    def _sessions(self, day: date) -> list[tuple[SessionTemplate, datetime, datetime]]:
        out = []
        for t in self.templates:
            if day.weekday() in t.weekdays:
                out.append(
                    (
                        t,
                        datetime.combine(day, t.start, self.zone),
                        datetime.combine(day, t.end, self.zone),
                    )
                )
        return out

    def _busy(self, who: str, location: str, start: datetime, end: datetime, ignore: str = "") -> bool:
        for a in self.appointments.values():
            if a.filler_id == ignore or a.status != "Booked":
                continue
            if (a.practitioner == who or (location and a.location == location)) and a.start < end and start < a.end:
                return True
        return False

    def free_slots(
        self,
        window_start: datetime,
        window_end: datetime,
        minutes: int,
        service: str = "",
        practitioners: Sequence[str] = (),
        locations: Sequence[str] = (),
    ) -> list[tuple[datetime, datetime, SessionTemplate]]:
        out = []
        day = window_start.astimezone(self.zone).date()
        while datetime.combine(day, time(0), self.zone) < window_end:
            for t, s, e in self._sessions(day):
                if service and t.service != service:
                    continue
                if practitioners and t.practitioner not in practitioners:
                    continue
                if locations and t.location not in locations:
                    continue
                step = timedelta(minutes=t.slot_minutes)
                cur = s
                while cur + timedelta(minutes=minutes) <= e:
                    end = cur + timedelta(minutes=minutes)
                    if cur >= window_start and end <= window_end and not self._busy(t.practitioner, "", cur, end):
                        out.append((cur, end, t))
                    cur += step
            day += timedelta(days=1)
        return sorted(out, key=lambda x: x[0])

    def _template_for(self, who: str, start: datetime, end: datetime) -> SessionTemplate | None:
        for t, s, e in self._sessions(start.astimezone(self.zone).date()):
            if t.practitioner == who and s <= start and end <= e:
                return t
        return None

    def _book(self, b: _Booking) -> tuple[SimAppointment | None, str]:
        for a in self.appointments.values():
            if a.placer_id == b.placer_id and a.status == "Booked" and b.placer_id:
                return a, ""  # the same request again (a retry): the filler de-duplicates by placer id
        if b.start is None:
            return None, "no start time requested"
        end = b.start + timedelta(minutes=b.minutes)
        template = self._template_for(b.practitioner, b.start, end)
        if template is None:
            return None, "outside the practitioner's schedule"
        if self._busy(b.practitioner, b.location, b.start, end):
            return None, "slot already taken"
        appt = SimAppointment(
            filler_id=f"F{next(self._ids):05d}",
            placer_id=b.placer_id,
            start=b.start,
            end=end,
            practitioner=b.practitioner,
            location=b.location or template.location,
            service=b.service or template.service,
            patient_id=b.patient_id,
            family=b.family,
            given=b.given,
        )
        self.appointments[appt.filler_id] = appt
        return appt, ""

    def _find(self, placer_id: str, filler_id: str) -> SimAppointment | None:
        if filler_id and filler_id in self.appointments:
            return self.appointments[filler_id]
        for a in self.appointments.values():
            if placer_id and a.placer_id == placer_id:
                return a
        return None

    # --- front desk -----------------------------------------------------------------------------------------------

    async def front_desk_book(
        self,
        practitioner: str,
        start: datetime,
        minutes: int,
        *,
        patient_id: str = "WALKIN",
        family: str = "Walk-in",
        given: str = "",
    ) -> SimAppointment:
        async with self._lock:
            b = _Booking("", "", start, minutes, "", practitioner, "", patient_id, family, given)
            appt, reason = self._book(b)
            if appt is None:
                raise ValueError(reason)
            self._queue_siu("S12", appt)
            return appt

    async def front_desk_reschedule(self, filler_id: str, start: datetime) -> SimAppointment:
        async with self._lock:
            appt = self.appointments[filler_id]
            end = start + (appt.end - appt.start)
            if self._busy(appt.practitioner, appt.location, start, end, ignore=filler_id):
                raise ValueError("slot already taken")
            appt.start, appt.end = start, end
            self._queue_siu("S13", appt)
            return appt

    async def front_desk_cancel(self, filler_id: str) -> SimAppointment:
        async with self._lock:
            appt = self.appointments[filler_id]
            appt.status = "Cancelled"
            self._queue_siu("S15", appt)
            return appt

    # --- messages -------------------------------------------------------------------------------------------------

    def _msh(self, kind: str, trigger: str, structure: str, control_id: str, to: tuple[str, str]) -> str:
        mtype = f"{kind}^{trigger}" if self.version == "2.3" else f"{kind}^{trigger}^{structure}"
        # Sub-second MSH-7 so the receiver can order two events of the same second.
        stamp = datetime.now(UTC)
        now = stamp.strftime("%Y%m%d%H%M%S.") + f"{stamp.microsecond // 100:04d}+0000"
        return f"MSH|^~\\&|{self.app}|{self.facility}|{escape(to[0])}|{escape(to[1])}|{now}||{mtype}|{control_id}|P|{self.version}"

    def _schedule_block(
        self, appt: SimAppointment | None, slot: tuple[datetime, datetime, str, str, str] | None
    ) -> list[str]:
        if appt is not None:
            start, end, who, where, svc = appt.start, appt.end, appt.practitioner, appt.location, appt.service
            placer, filler, status = escape(appt.placer_id), appt.filler_id, appt.status
        else:
            assert slot is not None  # one of the two is always given
            start, end, who, where, svc = slot
            placer = filler = status = ""
        minutes = int((end - start).total_seconds() // 60)
        sch = [
            "SCH",
            placer,
            filler,
            "",
            "",
            "",
            "",
            "",
            "",
            str(minutes),
            "min",
            f"^^^{format_ts(start)}^{format_ts(end)}",
        ]
        sch += [""] * 14
        sch[25] = status
        segs = ["|".join(sch)]
        if self.version not in ("2.3", "2.3.1", "2.4"):
            segs.append(f"TQ1|||||||{format_ts(start)}|{format_ts(end)}")
        if appt is not None:
            segs.append(f"PID|1||{escape(appt.patient_id)}||{escape(appt.family)}^{escape(appt.given)}")
        segs += [
            "RGS|1|A",
            f"AIS|1|A|{escape(svc)}|{format_ts(start)}|||{minutes}|min",
            f"AIL|1|A|{escape(where)}",
            f"AIP|1|A|{escape(who)}",
        ]
        return segs

    def _siu(self, trigger: str, appt: SimAppointment) -> bytes:
        cid = f"SIU{next(self._ids):06d}"
        segs = [self._msh("SIU", trigger, "SIU_S12", cid, ("SCHED-ADAPTER", "DEMO"))]
        segs += self._schedule_block(appt, None)
        return ("\r".join(segs) + "\r").encode()

    def _queue_siu(self, trigger: str, appt: SimAppointment) -> None:
        if self._siu_queue is None:
            return
        message = self._siu(trigger, appt)
        held, self.faults.out_of_order_siu = Faults.take(self.faults.out_of_order_siu)
        if held and self._held is None:
            self._held = message
            return
        dup, self.faults.duplicate_siu = Faults.take(self.faults.duplicate_siu)
        self._siu_queue.put_nowait(message)
        if dup:
            self._siu_queue.put_nowait(message)
        if self._held is not None:
            self._siu_queue.put_nowait(self._held)
            self._held = None

    async def _siu_sender(self) -> None:
        assert self._siu_queue is not None and self._siu_client is not None  # started together in start()
        while True:
            message = await self._siu_queue.get()
            try:
                self.siu_sent.append(message)
                await self._siu_client.send(message)
            except MLLPError as exc:
                log.warning("simulator could not deliver an SIU: %s", exc)
            finally:
                self._siu_queue.task_done()

    async def handle(self, message: bytes, peer: Peer) -> bytes | list[bytes]:
        self.received.append(message)
        msh = read_msh(message)
        drop = False
        if not self.faults.drop_type or msh.message_type == self.faults.drop_type:
            drop, self.faults.drop = Faults.take(self.faults.drop)
        if drop and not self.faults.drop_after_apply:
            raise CloseConnection()
        async with self._lock:
            if msh.message_type == "SQM":
                response = self._answer_sqm(message)
            elif msh.message_type == "SRM":
                response = self._answer_srm(message)
            else:
                response = build_ack(msh, "AR", control_id=f"R{next(self._ids)}", text="unsupported", error="200")
        if drop:
            raise CloseConnection()
        delay = False
        if not self.faults.delay_type or msh.message_type == self.faults.delay_type:
            delay, self.faults.delay = Faults.take(self.faults.delay)
        if delay:
            await asyncio.sleep(self.faults.delay_seconds)
        twice, self.faults.twice = Faults.take(self.faults.twice)
        return [response, response] if twice else response

    def _reply_header(self, msg: ER7Message, kind: str, ack: str, text: str = "") -> list[str]:
        msh = msg.first("MSH")
        assert msh is not None  # ER7Message.parse guarantees it
        trigger = msg.component(msg.field(msh, 9), 2)
        structure = {"SQR": "SQR_S25", "SRR": "SRR_S01"}[kind]
        to = (msg.field(msh, 3), msg.field(msh, 4))
        return [
            self._msh(kind, trigger, structure, f"R{next(self._ids):06d}", to),
            f"MSA|{ack}|{msg.field(msh, 10)}|{escape(text)}",
        ]

    def _answer_sqm(self, raw: bytes) -> bytes:
        msg = ER7Message.parse(raw)
        arq = msg.first("ARQ")
        if arq is None:
            return ("\r".join(self._reply_header(msg, "SQR", "AE", "no ARQ")) + "\r").encode()
        window = msg.field(arq, 11)
        ws = parse_ts(msg.component(window, 1), self.zone)
        we = parse_ts(msg.component(window, 2), self.zone)
        minutes = int(msg.field(arq, 9) or 0) or 15
        service = msg.first_value([_p("AIS-3.1")])
        who = msg.values(_p("AIP-3.1"))
        where = msg.values(_p("AIL-3.1"))
        segs = self._reply_header(msg, "SQR", "AA")
        if ws is not None and we is not None:
            for s, e, t in self.free_slots(ws, we, minutes, service, who, where):
                segs += self._schedule_block(None, (s, e, t.practitioner, t.location, t.service))
        return ("\r".join(segs) + "\r").encode()

    def _answer_srm(self, raw: bytes) -> bytes:
        msg = ER7Message.parse(raw)
        msh = msg.first("MSH")
        arq = msg.first("ARQ")
        assert msh is not None
        trigger = msg.component(msg.field(msh, 9), 2)
        if arq is None:
            return self._refuse(msg, "AR", "no ARQ segment")
        ae, self.faults.ae = Faults.take(self.faults.ae)
        if ae:
            return self._refuse(msg, "AE", "forced error (simulator fault switch)")
        ar, self.faults.ar = Faults.take(self.faults.ar)
        if ar:
            return self._refuse(msg, "AR", "rejected by rule (simulator fault switch)")
        placer = msg.component(msg.field(arq, 1), 1)
        filler = msg.component(msg.field(arq, 2), 1)
        start = parse_ts(msg.first_value([_p("AIS-4.1")]) or msg.component(msg.field(arq, 11), 1), self.zone)
        minutes = int(msg.field(arq, 9) or msg.first_value([_p("AIS-7")]) or 0)
        if trigger == "S01":
            b = _Booking(
                placer,
                "",
                start,
                minutes,
                msg.first_value([_p("AIS-3.1")]),
                msg.first_value([_p("AIP-3.1")]),
                msg.first_value([_p("AIL-3.1")]),
                msg.first_value([_p("PID-3.1")]),
                msg.first_value([_p("PID-5.1")]),
                msg.first_value([_p("PID-5.2")]),
            )
            known = self._find(placer, "")
            appt, reason = self._book(b)
            if appt is None:
                return self._refuse(msg, "AE", reason)
            if known is None:
                self._queue_siu("S12", appt)
            return self._srr(msg, appt)
        appt = self._find(placer, filler)
        if appt is None:
            return self._refuse(msg, "AE", "unknown appointment")
        if trigger == "S04":
            if appt.status != "Cancelled":
                appt.status = "Cancelled"
                self._queue_siu("S15", appt)
            return self._srr(msg, appt)
        if trigger in ("S02", "S03") and start is not None:
            end = start + timedelta(minutes=minutes or int((appt.end - appt.start).total_seconds() // 60))
            if (start, end) != (appt.start, appt.end):
                if self._template_for(appt.practitioner, start, end) is None:
                    return self._refuse(msg, "AE", "outside the practitioner's schedule")
                if self._busy(appt.practitioner, appt.location, start, end, ignore=appt.filler_id):
                    return self._refuse(msg, "AE", "slot already taken")
                appt.start, appt.end = start, end
                self._queue_siu("S13" if trigger == "S02" else "S14", appt)
            return self._srr(msg, appt)
        return self._refuse(msg, "AR", f"trigger {trigger} not supported")

    def _srr(self, msg: ER7Message, appt: SimAppointment) -> bytes:
        segs = self._reply_header(msg, "SRR", "AA") + self._schedule_block(appt, None)
        return ("\r".join(segs) + "\r").encode()

    def _refuse(self, msg: ER7Message, code: str, reason: str) -> bytes:
        segs = self._reply_header(msg, "SRR", code, reason)
        if self.version in ("2.3", "2.3.1", "2.4"):
            segs.append(f"ERR|ARQ^1^1^207&{escape(reason)}")
        else:
            segs.append(f"ERR|||207^Application internal error^HL70357|E||||{escape(reason)}")
        return ("\r".join(segs) + "\r").encode()


def _p(text: str) -> FieldPath:
    return FieldPath.parse(text)


def demo_templates() -> list[SessionTemplate]:
    """Two practitioners, weekdays 08:00-12:00, 20-minute check-ups."""
    weekdays = frozenset(range(5))
    return [
        SessionTemplate("DOC1", "ROOM1", "CHECKUP", weekdays, time(8), time(12), 20),
        SessionTemplate("DOC2", "ROOM2", "CHECKUP", weekdays, time(8), time(12), 20),
    ]
