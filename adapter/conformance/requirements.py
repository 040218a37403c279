"""The requirement IDs the kit checks, with their level and a one-line summary in the project's words.

The IDs are those of the project's requirement catalogue (``docs/requirements.md``). ``DESIGN``
marks a decision of this project where the IG is silent: a partner's server may legitimately
differ, so the report shows the level next to each result.
"""

from __future__ import annotations

REQUIREMENTS: dict[str, tuple[str, str]] = {
    "REQ-GEN-01": ("SHALL", "GET metadata: a CapabilityStatement, kind instance, fhirVersion 4.0.1, rest.mode server"),
    "REQ-GEN-03": ("SHALL", "CapabilityStatement.format lists FHIR JSON and FHIR XML"),
    "REQ-GEN-04": ("SHALL", "every endpoint reads and answers FHIR JSON and FHIR XML"),
    "REQ-GEN-06": ("DESIGN", "an unsupported request Content-Type is 415 not-supported"),
    "REQ-GEN-07": ("SHALL", "Appointment resource entry: ihe-sched-appt profile, read and search-type"),
    "REQ-GEN-08": ("SHALL", "Appointment entry declares the find and book operations"),
    "REQ-GEN-09": ("SHOULD", "Appointment entry declares the hold operation"),
    "REQ-GEN-10": ("SHALL", "search parameters _id, identifier, patient and the patient+date combination"),
    "REQ-GEN-13": ("SHALL", "Bundle resource entry with the ihe-sched-avail-bundle profile"),
    "REQ-GEN-19": ("DESIGN", "request-level failures are a bare fatal OperationOutcome (400 structure/invalid)"),
    "REQ-GEN-20": ("DESIGN", "a failed $hold/$book is a searchset, total 0, only a fatal OperationOutcome"),
    "REQ-GEN-22": ("DESIGN", "every dateTime/instant carries a timezone offset"),
    "REQ-115-01": ("SHALL", "POST $find with Parameters answers 200 with an ihe-sched-avail-bundle"),
    "REQ-115-02": ("DESIGN", "GET $find with query parameters answers like the POST"),
    "REQ-115-03": ("SHOULD", "proposals lie inside the requested start/end window"),
    "REQ-115-04": ("DESIGN", "a missing start/end gets the default window and a warning naming it"),
    "REQ-115-05": ("DESIGN", "end before start is 400 invalid naming the parameter"),
    "REQ-115-06": ("SHOULD", "specialty narrows the proposals to that specialty"),
    "REQ-115-07": ("SHOULD", "visit-type narrows the proposals to that appointment type"),
    "REQ-115-10": ("SHOULD", "practitioner narrows the proposals to that practitioner"),
    "REQ-115-16": ("DESIGN", "patient-reference: the patient is a participant of every proposal"),
    "REQ-115-18": ("SHOULD", "different criteria combine with AND, repeats of one with OR"),
    "REQ-115-19": ("DESIGN", "results ranked by the preference order of repeated values"),
    "REQ-115-20": ("SHALL", "_count limits the number of proposals per page"),
    "REQ-115-22": ("SHALL", "Bundle.total counts every option found, not the page"),
    "REQ-115-23": ("DESIGN", "a next link pages through the remaining options"),
    "REQ-115-24": ("SHALL", "a held appointment is never proposed"),
    "REQ-115-25": ("SHALL", "$find answers a searchset whose Appointments are proposed"),
    "REQ-115-26": ("DESIGN", "no options: total 0 and exactly one information OperationOutcome"),
    "REQ-115-28": ("DESIGN", "proposed ids are valid FHIR ids; unknown or tampered ids are 404"),
    "REQ-115-29": ("DESIGN", "the next link repeats every criterion of the request"),
    "REQ-116-02": ("SHALL", "$hold needs exactly one appointment-reference (else 400)"),
    "REQ-116-04": ("SHALL", "$hold answers 200, total 1, one pending Appointment"),
    "REQ-116-05": ("DESIGN", "the held Appointment keeps the proposed id"),
    "REQ-116-06": ("DESIGN", "the hold expiry is in the hold-expiration extension"),
    "REQ-116-08": ("SHALL", "another client's $hold/$book of a held slot is 409 conflict"),
    "REQ-116-09": ("SHALL", "a hold that cannot be made answers only a fatal not-found OperationOutcome"),
    "REQ-116-10": ("DESIGN", "an unknown proposed id is 404 not-found in a total-0 searchset"),
    "REQ-116-11": ("DESIGN", "holding again from the same client returns the same hold, unextended"),
    "REQ-117-04": ("DESIGN", "$book with neither reference nor resource is 400 invalid"),
    "REQ-117-05": ("SHALL", "$book of a proposal answers 200, total 1, one booked Appointment"),
    "REQ-117-06": ("SHALL", "the holder books the held appointment"),
    "REQ-117-07": ("SHALL", "$book with status booked and an existing id reschedules it"),
    "REQ-117-08": ("DESIGN", "a reschedule onto a taken time is 409 and leaves the original untouched"),
    "REQ-117-09": ("SHALL", "$book with status cancelled cancels, keeps the reason, frees the slot"),
    "REQ-117-10": ("DESIGN", "cancelling an unknown appointment id is 404"),
    "REQ-117-16": ("DESIGN", "Idempotency-Key: same key and body replays; same key, other body is 422"),
    "REQ-118-01": ("SHALL", "GET Appointment?... answers 200 with a searchset"),
    "REQ-118-02": ("SHALL", "POST Appointment/_search answers like the GET"),
    "REQ-118-03": ("SHALL", "patient search by id and by Patient/id finds the patient's appointments"),
    "REQ-118-05": ("SHALL", "date with the prefixes eq ne gt lt ge le sa eb ap"),
    "REQ-118-06": ("SHALL", "patient + date combine with AND"),
    "REQ-118-07": ("SHALL", "_id finds the appointment with that id"),
    "REQ-118-08": ("SHALL", "identifier (system|value) finds the appointment"),
    "REQ-118-09": ("SHOULD", "practitioner search matches practitioner participants"),
    "REQ-118-10": ("SHOULD", "specialty and appointment-type searches match"),
    "REQ-118-11": ("DESIGN", "location and status (comma = OR) narrow the search"),
    "REQ-118-12": ("SHALL", "_count limits the matches per page"),
    "REQ-118-13": ("SHALL", "Bundle.total counts every match across pages"),
    "REQ-118-14": ("MAY", "search pages are linked with next"),
    "REQ-118-15": ("SHALL", "_include adds the participant actors with search.mode include"),
    "REQ-118-16": ("DESIGN", "_sort=date / -date orders by start"),
    "REQ-118-20": ("SHALL", "read returns the Appointment; an unknown id is 404"),
    "REQ-APPT-01": ("SHALL", "every Appointment validates against ihe-sched-appt and the R4 schema"),
    "REQ-APPT-02": ("SHALL", "start and end are present, with offsets"),
    "REQ-APPT-03": ("SHALL", "exactly one requestedPeriod"),
    "REQ-APPT-04": ("SHALL", "every participant has an actor of an allowed type"),
    "REQ-APPT-05": ("SHALL", "every participant has a valid status"),
    "REQ-APPT-06": ("SHALL", "status follows proposed -> pending -> booked -> cancelled"),
    "REQ-APPT-10": ("SHALL", "the status-reason extension carries only a valueCodeableConcept"),
    "REQ-APPT-11": ("SHALL", "the R4 Appointment invariants app-1..app-4 hold"),
    "REQ-BNDL-01": ("SHALL", "every $find/$hold/$book/search response validates against ihe-sched-avail-bundle"),
    "REQ-BNDL-02": ("SHALL", "Bundle.type is searchset"),
    "REQ-BNDL-03": ("SHALL", "Bundle.total is always present"),
    "REQ-BNDL-04": ("SHALL", "an operation Bundle has at least one entry"),
    "REQ-BNDL-05": ("SHALL", "Appointment entries have search.mode match"),
    "REQ-BNDL-06": ("SHALL", "OperationOutcome entries have search.mode outcome"),
    "REQ-BNDL-07": ("MAY", "other entries (includes) have search.mode include"),
    "REQ-BNDL-08": ("SHOULD", "every entry has an absolute fullUrl ending in Type/id"),
    "REQ-BNDL-09": ("DESIGN", "total is not less than the match entries present"),
}


def level(req: str) -> str:
    return REQUIREMENTS.get(req, ("", ""))[0]


def summary(req: str) -> str:
    return REQUIREMENTS.get(req, ("", req))[1]
