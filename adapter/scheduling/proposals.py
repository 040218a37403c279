"""Proposed appointment ids: everything needed to hold or book a slot, signed (DESIGN 9).

Compact form (the usual case), readable on purpose so support staff can decode one by eye::

    p<ver>.<practitioner>.<location>.<start>.<minutes>.<visit type>.<patients>.<issued>.<ws>.<we>.<mac>

Numbers are base 36: ``start`` and ``issued`` in minutes since the Unix epoch, ``ws``/``we`` the
requested window's distance from start/end in minutes; ``patients`` are joined with ``-`` (and
``-`` alone... never happens: an empty patient list is an empty field). The MAC is HMAC-SHA256
over the rest with the server secret, truncated to 64 bits, in base 36. Any replica with the
same secret verifies it without shared state.

When a field contains a ``.`` or ``-``, or the id would pass 64 characters, the proposal is stored
in the shared state store under ``r`` + 20 random base-36 characters with a TTL instead.

Ids are valid FHIR ids (``[A-Za-z0-9\\-\\.]{1,64}``) in both forms.
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import secrets
from dataclasses import asdict, dataclass
from typing import Protocol

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
_VERSION = "1"


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
    def put_proposal(self, proposal_id: str, payload: str, expires_at: dt.datetime) -> None: ...

    def get_proposal(self, proposal_id: str, now: dt.datetime) -> str | None: ...


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
    return int((t - _EPOCH).total_seconds() // 60)


def _from_minutes(m: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(minutes=m)


class ProposalCodec:
    def __init__(self, secret: bytes, store: ProposalStore, ttl: dt.timedelta) -> None:
        if len(secret) < 16:
            raise ValueError("the proposal signing secret must be at least 16 bytes")
        self._secret = secret
        self._store = store
        self.ttl = ttl

    def _mac(self, body: str) -> str:
        digest = hmac.digest(self._secret, body.encode("utf-8"), "sha256")[:8]  # one-shot C implementation
        return _b36(int.from_bytes(digest, "big")).rjust(13, "0")

    def mac(self, purpose: str, body: str) -> str:
        """A MAC with the server secret for another signed token (e.g. search cursors). The purpose
        prefix means such a MAC can never verify as a proposed id's."""
        return self._mac(f"{purpose}|{body}")

    def encode(self, p: Proposal) -> str:
        fields = [p.practitioner_id, p.location_id, p.visit_type_key, *p.patient_ids]
        compact_ok = all("." not in f and "-" not in f for f in fields)
        if compact_ok:
            start_m = _minutes(p.start)
            body = ".".join([
                "p" + _VERSION, p.practitioner_id, p.location_id, _b36(start_m), _b36(p.minutes),
                p.visit_type_key, "-".join(p.patient_ids), _b36(_minutes(p.issued)),
                _b36(max(0, start_m - _minutes(p.window_start))), _b36(max(0, _minutes(p.window_end) - start_m)),
            ])
            token = f"{body}.{self._mac(body)}"
            if len(token) <= 64:
                return token
        token = "r" + "".join(secrets.choice(_ALPHABET) for _ in range(20))
        self._store.put_proposal(token, json.dumps(proposal_to_dict(p)), p.issued + self.ttl)
        return token

    def decode(self, token: str, now: dt.datetime) -> Proposal:
        if token.startswith("r") and len(token) == 21:
            payload = self._store.get_proposal(token, now)
            if payload is None:
                raise ProposalError(f"proposed appointment {token!r} is unknown or has expired")
            p = proposal_from_dict(json.loads(payload))
        else:
            body, _, mac = token.rpartition(".")
            if not body.startswith("p" + _VERSION + ".") or not hmac.compare_digest(mac, self._mac(body)):
                raise ProposalError(f"{token!r} is not a proposed appointment issued by this server "
                                    "(unknown or altered id)")
            parts = body.split(".")
            if len(parts) != 10:
                raise ProposalError(f"{token!r} is malformed")
            _, prac, loc, start_s, minutes_s, vt, patients, issued_s, ws, we = parts
            start_m = int(start_s, 36)
            p = Proposal(prac, loc, _from_minutes(start_m), int(minutes_s, 36), vt,
                         tuple(x for x in patients.split("-") if x), _from_minutes(int(issued_s, 36)),
                         _from_minutes(start_m - int(ws, 36)), _from_minutes(start_m + int(we, 36)))
        if now - p.issued > self.ttl:
            raise ProposalError(f"proposed appointment {token!r} has expired (issued {p.issued.isoformat()}, "
                                f"valid for {int(self.ttl.total_seconds())} s); run $find again")
        return p


def proposal_to_dict(p: Proposal) -> dict:
    return {k: (v.isoformat() if isinstance(v, dt.datetime) else list(v) if isinstance(v, tuple) else v)
            for k, v in asdict(p).items()}


def proposal_from_dict(d: dict) -> Proposal:
    return Proposal(d["practitioner_id"], d["location_id"], dt.datetime.fromisoformat(d["start"]),
                    int(d["minutes"]), d["visit_type_key"], tuple(d["patient_ids"]),
                    dt.datetime.fromisoformat(d["issued"]), dt.datetime.fromisoformat(d["window_start"]),
                    dt.datetime.fromisoformat(d["window_end"]))
