"""The paging cursor: a keyset position (start, id), direction and sort, HMAC-signed with the server secret."""

from __future__ import annotations

import datetime as dt
import hmac
import re
from dataclasses import dataclass

from adapter.fhir.context import FhirContext
from adapter.fhir.outcome import FhirError
from adapter.r4 import FHIR_ID

CURSOR_PARAM = "_cursor"


def _mac(ctx: FhirContext, body: str) -> str:
    """Truncated HMAC with the server secret that signs proposed ids, so every replica agrees; the
    purpose prefix keeps a cursor MAC from ever being valid for a proposed id."""
    return ctx.service.proposals.mac("cursor", body)


@dataclass(frozen=True, slots=True)
class Cursor:
    forward: bool  # True: rows after the key; False: rows before it (a `previous` link)
    descending: bool  # the _sort the cursor was made for
    start: dt.datetime
    appt_id: str

    def encode(self, ctx: FhirContext) -> str:
        micros = (self.start - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)
        body = f"1.{'n' if self.forward else 'p'}{'d' if self.descending else 'a'}.{micros}.{self.appt_id}"
        return f"{body}.{_mac(ctx, body)}"

    @classmethod
    def decode(cls, ctx: FhirContext, token: str) -> Cursor:
        def bad() -> FhirError:
            return FhirError(
                400,
                "invalid",
                f"{CURSOR_PARAM} {token[:80]!r} is not a paging cursor issued by this "
                "server (tampered, truncated or from another server); follow the Bundle's links",
                expression=CURSOR_PARAM,
            )

        body, _, mac = token.rpartition(".")
        if not body or not hmac.compare_digest(_mac(ctx, body), mac):
            raise bad()
        parts = body.split(".", 3)
        if (
            len(parts) != 4
            or parts[0] != "1"
            or len(parts[1]) != 2
            or parts[1][0] not in "np"
            or parts[1][1] not in "ad"
            or not re.fullmatch(r"-?\d+", parts[2])
            or not FHIR_ID.match(parts[3])
        ):
            raise bad()
        start = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=int(parts[2]))
        return cls(parts[1][0] == "n", parts[1][1] == "d", start, parts[3])
