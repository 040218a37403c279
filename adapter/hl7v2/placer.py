"""The placer side in one object: build, send, correlate, read, and say honestly what is known about the outcome.

``Placer.request`` returns one of three outcomes for an SRM, which the backend maps onto its seam:
``Confirmed`` (AA: the SRR's appointment, with the filler id), ``Refused`` (AE/AR with the filler's reason), or
``Unknown`` (no answer after the retry budget, or the connection broke after the message was written: the filler
may have acted; settle it from the SIU feed or a later query by placer id). A message that could not be written
at all raises ``NotDelivered``: nothing happened at the filler.
"""

from __future__ import annotations

import itertools
import os
import ssl as ssl_module
from dataclasses import dataclass
from datetime import UTC, datetime

from adapter.hl7v2.inbound import AppointmentData, SqrResult, SrrResult, parse_sqr, parse_srr
from adapter.hl7v2.mapping import Hl7v2Mapping
from adapter.hl7v2.outbound import AvailabilityRequest, BookingRequest, SrmTrigger, build_sqm, build_srm
from adapter.mllp import AckTimeout, ConnectionLost, MLLPClient


class NotDelivered(Exception):
    """The message never reached the filler (unreachable): the request had no effect there."""


@dataclass(frozen=True, slots=True)
class Confirmed:
    appointment: AppointmentData | None
    srr: SrrResult
    attempts: int


@dataclass(frozen=True, slots=True)
class Refused:
    code: str  # AE or AR
    reason: str
    srr: SrrResult


@dataclass(frozen=True, slots=True)
class Unknown:
    """Sent, but no correlated answer: the outcome must be settled later (same placer id, never a new booking)."""

    placer_id: str
    control_id: str
    attempts: int
    detail: str


Outcome = Confirmed | Refused | Unknown


class ControlIds:
    """Unique MSH-10 values: a per-process prefix plus a counter (a resend reuses the id it was given)."""

    def __init__(self, prefix: str = "") -> None:
        self._prefix = prefix or f"{datetime.now(UTC).strftime('%y%m%d%H%M%S')}{os.getpid() % 10000:04d}"
        self._n = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._n):06d}"


class Placer:
    def __init__(
        self,
        mapping: Hl7v2Mapping,
        host: str,
        port: int,
        *,
        ssl: ssl_module.SSLContext | None = None,
        server_hostname: str | None = None,
        control_ids: ControlIds | None = None,
    ) -> None:
        self.mapping = mapping
        a = mapping.interface
        self.client = MLLPClient(
            host, port, ssl=ssl, server_hostname=server_hostname, timeout=a.timeout_seconds, retries=a.retries
        )
        self.ids = control_ids or ControlIds()

    async def close(self) -> None:
        await self.client.close()

    async def query(self, request: AvailabilityRequest) -> SqrResult:
        """SQM^S25 -> SQR^S25. Raises ``NotDelivered``/``AckTimeout`` (a query has no side effect to settle)."""
        raw = build_sqm(self.mapping.interface, request, control_id=self.ids.next())
        try:
            reply = await self.client.send(raw)
        except ConnectionLost as exc:
            if not exc.delivered:
                raise NotDelivered(str(exc)) from exc
            raise
        return parse_sqr(reply.message, self.mapping)

    async def request(self, trigger: SrmTrigger, booking: BookingRequest) -> Outcome:
        control_id = self.ids.next()
        raw = build_srm(self.mapping.interface, trigger, booking, control_id=control_id)
        try:
            reply = await self.client.send(raw)
        except AckTimeout as exc:
            return Unknown(booking.placer_id, control_id, exc.attempts, str(exc))
        except ConnectionLost as exc:
            if not exc.delivered:
                raise NotDelivered(str(exc)) from exc
            return Unknown(booking.placer_id, control_id, 1, str(exc))
        srr = parse_srr(reply.message, self.mapping)
        if srr.accepted:
            return Confirmed(srr.appointment, srr, reply.attempts)
        return Refused(srr.ack_code, srr.reason, srr)
