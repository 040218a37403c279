"""Legacy keys <-> FHIR ids, reversibly (docs/conformance.md#d9a).

FHIR ids are ``[A-Za-z0-9\\-\\.]{1,64}``. Legacy keys are often not: space-padded CHAR columns,
spaces or slashes inside, longer than 64. The mapping declares the rule per entity:

* ``trim`` (+ ``pad_right: N``): ``'SPEARSB '`` <-> ``SPEARSB``; the way back re-pads to N.
* ``encode: hex``: any key -> ``x`` + hex of its UTF-8 bytes, for keys with other characters.

A key the rule cannot turn into a valid id raises ``InvalidKey`` rather than emitting a bad id.
"""

from __future__ import annotations

import re
from typing import Any

from adapter.mapping.model import IdRule
from adapter.r4 import FHIR_ID

_CANONICAL_INT = re.compile(r"^(0|-?[1-9][0-9]{0,18})$")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


class InvalidKey(ValueError):
    pass


def to_fhir_id(rule: IdRule, key: Any) -> str:
    text = str(key)
    if rule.trim:
        text = text.strip()
    if rule.encode == "hex":
        text = "x" + text.encode("utf-8").hex()
    if not FHIR_ID.match(text):
        raise InvalidKey(f"legacy key {key!r} does not give a valid FHIR id under rule {rule.model_dump()}")
    return text


def to_legacy_key(rule: IdRule, fhir_id: str) -> Any:
    """The exact legacy key for a FHIR id; raises InvalidKey when the id cannot be one of ours."""
    if not FHIR_ID.match(fhir_id):
        raise InvalidKey(f"{fhir_id!r} is not a valid FHIR id")
    text = fhir_id
    if rule.encode == "hex":
        if not text.startswith("x"):
            raise InvalidKey(f"{fhir_id!r} is not a hex-encoded key")
        try:
            text = bytes.fromhex(text[1:]).decode("utf-8")
        except ValueError as exc:
            raise InvalidKey(f"{fhir_id!r} is not a hex-encoded key") from exc
    if rule.pad_right:
        if len(text) > rule.pad_right:
            raise InvalidKey(f"{fhir_id!r} is longer than the legacy key width {rule.pad_right}")
        text = text.ljust(rule.pad_right)
    if rule.key_type in ("int", "bigint"):
        # Only the canonical decimal form names a key (Patient/007 is not Patient/7), and only values
        # the key column can hold reach the database: a larger one is an error there, not "no row"
        # (PostgreSQL compares an INTEGER column with an out-of-range literal by failing the query).
        if not _CANONICAL_INT.match(text):
            raise InvalidKey(f"{fhir_id!r} is not a numeric legacy key in canonical form")
        value = int(text)
        low, high = (INT64_MIN, INT64_MAX) if rule.key_type == "bigint" else (INT32_MIN, INT32_MAX)
        if not low <= value <= high:
            raise InvalidKey(f"{fhir_id!r} is out of the range of a legacy integer key")
        return value
    return text
