"""Proposed appointment ids: everything needed to hold or book a slot, signed (docs/conformance.md#d9).

Compact form (the usual case), readable on purpose so support staff can decode one by eye::

    p<ver>.<practitioner>.<location>.<start>.<minutes>.<visit type>.<patients>.<issued>.<ws>.<we>.<mac>

Numbers are base 36: ``start`` in minutes and ``issued`` in seconds since the Unix epoch (so a
proposal lives exactly ``find.proposal_ttl_seconds``; version 1 ids, still accepted, kept ``issued``
in minutes), ``ws``/``we`` the requested window's distance from start/end in minutes; ``patients`` are joined with ``-`` (an
empty patient list is an empty field). The MAC is HMAC-SHA256 over the rest with the server
secret, truncated to 64 bits, as the last 11 characters in base 64 over the FHIR id alphabet. Any replica with the same secret verifies it without
shared state.

When a field contains a ``.`` or ``-``, the start is not a whole minute (never on the slot grid, but
the compact form must not truncate it), or the id would pass 64 characters, the proposal is stored
in the shared state store under ``r`` + 20 random base-36 characters with a TTL instead.

Ids are valid FHIR ids (``[A-Za-z0-9\\-\\.]{1,64}``) in both forms.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import hmac
import json
import secrets
from dataclasses import asdict, dataclass
from typing import Any, Protocol

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
_VERSION = "2"
_VERSIONS = {"1": 60, "2": 1}  # version -> seconds per unit of ``issued``
_MAC_LEN = 11
_MACS_KEPT = 16_384


class ProposalError(LookupError):
    """Unknown, tampered or expired proposed id (HTTP 404 not-found)."""


@dataclass(frozen=True, slots=True)
class Proposal:
    practitioner_id: str
    location_id: str
    start: dt.datetime
    minutes: int
    visit_type_key: str
    patient_ids: tuple[str, ...]
    issued: dt.datetime
    window_start: dt.datetime
    window_end: dt.datetime

    @property
    def end(self) -> dt.datetime:
        return self.start + dt.timedelta(minutes=self.minutes)


class ProposalStore(Protocol):
    async def put_proposal(self, proposal_id: str, payload: str, expires_at: dt.datetime) -> None: ...

    async def get_proposal(self, proposal_id: str, now: dt.datetime) -> str | None: ...


@functools.lru_cache(maxsize=65536)
def _b36(n: int) -> str:
    if n < 0:
        raise ValueError("negative")
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = _ALPHABET[r] + out
        if n == 0:
            return out


def _minutes(t: dt.datetime) -> int:
    return int(t.timestamp()) // 60


def _from_minutes(m: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(minutes=m)


class ProposalCodec:
    def __init__(self, secret: bytes, store: ProposalStore, ttl: dt.timedelta) -> None:
        if len(secret) < 16:
            raise ValueError("the proposal signing secret must be at least 16 bytes")
        self._secret = secret
        self._hmac = hmac.new(secret, digestmod="sha256")  # keyed state, copied per MAC (cheaper than re-keying)
        self._macs: dict[str, str] = {}
        self._store = store
        self.ttl = ttl

    def _mac(self, body: str) -> str:
        # 64 bits as 11 base-64 characters over exactly the FHIR id alphabet (A-Za-z0-9 - .),
        # encoded in C. It may contain '.', so tokens split it off by position, not by separator.
        # Kept by body (issue 14): a body names its issue second, so the same slots offered again within one
        # second (another caller, another format, the next page) are signed once; the dict is emptied when full.
        mac = self._macs.get(body)
        if mac is None:
            h = self._hmac.copy()
            h.update(body.encode("utf-8"))
            mac = base64.b64encode(h.digest()[:8], altchars=b"-.").decode("ascii")[:_MAC_LEN]
            if len(self._macs) >= _MACS_KEPT:
                self._macs.clear()
            self._macs[body] = mac
        return mac

    def mac(self, purpose: str, body: str) -> str:
        """A MAC with the server secret for another signed token (e.g. search cursors): 16 hex
        characters, so it never contains a separator. The purpose prefix means such a MAC can never
        verify as a proposed id's."""
        return hmac.digest(self._secret, f"{purpose}|{body}".encode(), "sha256")[:8].hex()

    def issuer(
        self, patient_ids: tuple[str, ...], issued: dt.datetime, window_start: dt.datetime, window_end: dt.datetime
    ) -> Issuer:
        """``encode`` for many slots of one $find answer: the shared parts are computed once.

        Returns ``issue(practitioner_id, location_id, start, minutes, visit_type_key) -> id``; the ids
        are identical to ``encode``'s for the same Proposal. Ids that must be stored are kept until
        ``await issue.save()``, which stores them all in one call (before the answer is sent).
        """
        return Issuer(self, patient_ids, issued, window_start, window_end)

    async def encode(self, p: Proposal) -> str:
        token = self._compact(p)
        if token is not None:
            return token
        token, payload = self._stored(p)
        await self._store.put_proposal(token, payload, p.issued + self.ttl)
        return token

    def _compact(self, p: Proposal) -> str | None:
        # Runs 50 times per $find page, so written for speed rather than elegance.
        patients = "-".join(p.patient_ids)
        text = p.practitioner_id + p.location_id + p.visit_type_key + "".join(p.patient_ids)
        if "." not in text and "-" not in text and not (p.start.second or p.start.microsecond):
            start_m = int(p.start.timestamp()) // 60
            body = (
                f"p{_VERSION}.{p.practitioner_id}.{p.location_id}.{_b36(start_m)}.{_b36(p.minutes)}."
                f"{p.visit_type_key}.{patients}.{_b36(int(p.issued.timestamp()))}."
                f"{_b36(max(0, start_m - int(p.window_start.timestamp()) // 60))}."
                f"{_b36(max(0, int(p.window_end.timestamp()) // 60 - start_m))}"
            )
            token = f"{body}.{self._mac(body)}"  # the MAC is always the last _MAC_LEN characters
            if len(token) <= 64:
                return token
        return None

    def _stored(self, p: Proposal) -> tuple[str, str]:
        """A random id for a proposal kept in the shared store, and what to store under it."""
        token = "r" + "".join(secrets.choice(_ALPHABET) for _ in range(20))
        return token, json.dumps(proposal_to_dict(p))

    async def decode(self, token: str, now: dt.datetime) -> Proposal:
        if token.startswith("r") and len(token) == 21:
            payload = await self._store.get_proposal(token, now)
            if payload is None:
                raise ProposalError(f"proposed appointment {token!r} is unknown or has expired")
            p = proposal_from_dict(json.loads(payload))
        else:
            body, sep, mac = token[: -_MAC_LEN - 1], token[-_MAC_LEN - 1 : -_MAC_LEN], token[-_MAC_LEN:]
            unit = _VERSIONS.get(body[1:2]) if body[:1] == "p" and body[2:3] == "." else None
            if sep != "." or unit is None or not hmac.compare_digest(mac, self._mac(body)):
                raise ProposalError(
                    f"{token!r} is not a proposed appointment issued by this server (unknown or altered id)"
                )
            parts = body.split(".")
            if len(parts) != 10:
                raise ProposalError(f"{token!r} is malformed")
            _, prac, loc, start_s, minutes_s, vt, patients, issued_s, ws, we = parts
            start_m = int(start_s, 36)
            p = Proposal(
                prac,
                loc,
                _from_minutes(start_m),
                int(minutes_s, 36),
                vt,
                tuple(x for x in patients.split("-") if x),
                _EPOCH + dt.timedelta(seconds=int(issued_s, 36) * unit),
                _from_minutes(start_m - int(ws, 36)),
                _from_minutes(start_m + int(we, 36)),
            )
        if now - p.issued > self.ttl:
            raise ProposalError(
                f"proposed appointment {token!r} has expired (issued {p.issued.isoformat()}, "
                f"valid for {int(self.ttl.total_seconds())} s); run $find again"
            )
        return p


class Issuer:
    """Issues the proposed ids of one $find answer (see ``ProposalCodec.issuer``)."""

    def __init__(
        self,
        codec: ProposalCodec,
        patient_ids: tuple[str, ...],
        issued: dt.datetime,
        window_start: dt.datetime,
        window_end: dt.datetime,
    ) -> None:
        self._codec = codec
        self._patient_ids = patient_ids
        self._issued = issued
        self._window = (window_start, window_end)
        self._patients = "-".join(patient_ids)
        self._issued_b36 = _b36(int(issued.timestamp()))
        self._ws, self._we = int(window_start.timestamp()) // 60, int(window_end.timestamp()) // 60
        self._compact_patients = "." not in self._patients and all("-" not in p for p in patient_ids)
        self._unsaved: list[tuple[str, str]] = []

    def __call__(
        self, practitioner_id: str, location_id: str, start: dt.datetime, minutes: int, visit_type_key: str
    ) -> str:
        text = practitioner_id + location_id + visit_type_key
        whole_minute = not (start.second or start.microsecond)
        if self._compact_patients and whole_minute and "." not in text and "-" not in text:
            start_m = int(start.timestamp()) // 60
            body = (
                f"p{_VERSION}.{practitioner_id}.{location_id}.{_b36(start_m)}.{_b36(minutes)}."
                f"{visit_type_key}.{self._patients}.{self._issued_b36}.{_b36(max(0, start_m - self._ws))}."
                f"{_b36(max(0, self._we - start_m))}"
            )
            if len(body) + 1 + _MAC_LEN <= 64:
                return f"{body}.{self._codec._mac(body)}"
        p = Proposal(
            practitioner_id, location_id, start, minutes, visit_type_key, self._patient_ids, self._issued, *self._window
        )
        token = self._codec._compact(p)
        if token is None:
            token, payload = self._codec._stored(p)
            self._unsaved.append((token, payload))
        return token

    async def save(self) -> None:
        """Store the proposals that did not fit a compact id (nothing to do in the usual case)."""
        unsaved, self._unsaved = self._unsaved, []
        expires = self._issued + self._codec.ttl
        for token, payload in unsaved:
            await self._codec._store.put_proposal(token, payload, expires)


def proposal_to_dict(p: Proposal) -> dict[str, Any]:
    return {
        k: (v.isoformat() if isinstance(v, dt.datetime) else list(v) if isinstance(v, tuple) else v)
        for k, v in asdict(p).items()
    }


def proposal_from_dict(d: dict[str, Any]) -> Proposal:
    return Proposal(
        d["practitioner_id"],
        d["location_id"],
        dt.datetime.fromisoformat(d["start"]),
        int(d["minutes"]),
        d["visit_type_key"],
        tuple(d["patient_ids"]),
        dt.datetime.fromisoformat(d["issued"]),
        dt.datetime.fromisoformat(d["window_start"]),
        dt.datetime.fromisoformat(d["window_end"]),
    )
