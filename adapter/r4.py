"""FHIR R4 definitions every layer shares (the mapping checks, the wire, HL7v2): one declaration each."""

from __future__ import annotations

import re

# The R4 ``id`` datatype.
FHIR_ID = re.compile(r"^[A-Za-z0-9\-\.]{1,64}$")

APPOINTMENT_STATUS_SYSTEM = "http://hl7.org/fhir/appointmentstatus"
# The AppointmentStatus value set (required binding of Appointment.status).
APPOINTMENT_STATUSES = frozenset(
    {
        "proposed",
        "pending",
        "booked",
        "arrived",
        "fulfilled",
        "cancelled",
        "noshow",
        "entered-in-error",
        "checked-in",
        "waitlist",
    }
)
