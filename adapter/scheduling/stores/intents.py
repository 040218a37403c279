"""What a booking in flight occupies, read from its journal payload, for the shared stores.

The SQLite store reads the same fields (``SqliteStateStore._intent_rows``): the proposal's ``start``
(ISO 8601), ``minutes``, ``practitioner_id``, ``patient_ids`` and the booking's ``patient_id``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from adapter.backends.protocol import Interval


def in_flight(payload: dict[str, Any]) -> tuple[str, Interval, tuple[str, ...]]:
    """(practitioner, interval, patients) of an intent's payload, exactly as the SQLite store reads it."""
    start = dt.datetime.fromisoformat(payload["start"])
    end = start + dt.timedelta(minutes=int(payload["minutes"]))
    patients = tuple(str(x) for x in (payload.get("patient_ids") or ()))
    if payload.get("patient_id"):
        patients += (str(payload["patient_id"]),)
    return str(payload["practitioner_id"]), Interval(start, end), patients
