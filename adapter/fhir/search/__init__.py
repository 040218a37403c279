"""ITI-118 Find Existing Appointments: ``GET [base]/Appointment?…`` and ``POST [base]/Appointment/_search``.

Modules, one concern each: ``params`` (the declared parameters and request parsing), ``dates`` (date
prefixes and ranges), ``cursor`` (the signed paging cursor), ``query`` (criteria -> the backend query),
``endpoint`` (the HTTP endpoint and the searchset it renders).

Decisions (20; repeated in the README's conformance notes):

* POST takes an ``application/x-www-form-urlencoded`` body; its parameters are added to those of the URL
  and the answer is the same as the equivalent GET. Page links are always GET URLs.
* Parameters: ``_id``, ``identifier``, ``patient`` / ``practitioner`` / ``location`` (``id``,
  ``Type/id``, ``[base]/Type/id``; the ``:Type`` modifier; chained ``.identifier=system|value``), ``date``,
  ``status``, ``specialty``, ``appointment-type``, ``service-type``, ``_count``, ``_sort``, ``_include``,
  ``_total``, ``_format`` and the paging cursor ``_cursor``. A comma inside one value is OR, a repeated
  parameter is AND (except ``date``: a comma there is a 400; repeat ``date`` for ranges).
* ``date`` is ``Appointment.start``, compared as an instant: a search value is the range its precision
  implies (a year, month, day, minute, second; dates and zone-less times in the legacy system's zone),
  ``[lo, hi)``. eq: lo <= start < hi; ne: not eq; lt: start < lo; le: start < hi; gt: start >= hi;
  ge: start >= lo; sa: start >= hi (starts after the range ends); eb: start < lo (the point "ends"
  before the range starts); ap: eq on the range widened on both sides by 10 % of the distance between
  the value and now, at least one day. With starts at whole seconds (minutes in the demo) and values at
  second precision or coarser this is exactly FHIR's range semantics for a one-second target range.
* ``status`` takes AppointmentStatus codes (system optional); ``cancelled`` matches every legacy code that
  maps to it. A code outside AppointmentStatus is a 400. ``pending`` etc. that no legacy code maps to
  simply match nothing. Holds (``$hold``) live outside the legacy system and are not searched.
* ``_count`` default ``find.default_count`` (50), capped at ``find.max_count`` (500) with an information
  issue; ``_count=0`` returns only ``total``. ``_sort=date`` (default) or ``-date``. ``_total=none`` skips
  the count query (``total`` is then only given when the first page is also the last); ``_total=accurate``
  always counts; the default (``estimate``) counts up to ``TOTAL_ESTIMATE_CAP`` matches and omits ``total``
  beyond (docs/conformance.md#d20).
* Paging is a keyset on (start, id): ``next``/``previous`` links carry an opaque, HMAC-signed ``_cursor``
  (the start and id of the row a page ended at, the direction and the sort). Links stay correct while
  appointments are added or cancelled; a tampered or foreign cursor is a 400.
* Unknown or unsupported parameters (including modifiers such as ``:missing`` and chains other than
  ``.identifier``) and empty values are ignored and named in a warning issue of the outcome entry; with
  ``Prefer: handling=strict`` they are a 400 ``invalid`` naming the parameter.
* An identifier system the server cannot process (``patient.identifier=urn:x|1``), or a reference to
  another server, gives 200 with ``total`` 0, no Appointment and an information issue saying why
  (REQ-118-04). Every answer without an Appointment has an information OperationOutcome entry.
* A search without any criterion (only ``_count``, ``_sort``, ...) is not run: 200, ``total`` 0 and an
  information issue asking for at least one criterion, preferably ``patient`` and ``date`` (REQ-118-18).
"""

from adapter.fhir.search.endpoint import search_endpoint
from adapter.fhir.search.params import prefer_strict

__all__ = ["prefer_strict", "search_endpoint"]
