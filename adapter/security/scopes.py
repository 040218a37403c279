"""SMART on FHIR scopes, v1 (``patient/Appointment.read``) and v2 (``patient/Appointment.rs``) syntax.

A scope grants a set of the v2 permission letters on one resource type (or ``*``) in one context:
``patient/`` (only the patient of the token's ``patient`` claim), ``user/`` (what the user may do)
or ``system/`` (a back-end service). v1 ``read`` is ``rs``, ``write`` is ``cud``, ``*`` is
``cruds``. A v2 scope narrowed by a query (``patient/Observation.rs?category=...``) grants nothing
here: this server cannot apply the narrowing, so it refuses instead of granting too much.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SCOPE = re.compile(r"^(patient|user|system)/(\*|[A-Z][A-Za-z]+)\.(read|write|\*|[cruds]+)$")
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}


@dataclass(frozen=True, slots=True)
class Scope:
    context: str  # patient | user | system
    resource: str  # a resource type or "*"
    permissions: frozenset[str]  # letters of "cruds"
    text: str

    def grants(self, resource: str, permission: str) -> bool:
        return self.resource in ("*", resource) and permission in self.permissions


def parse_scopes(text: str) -> tuple[Scope, ...]:
    out: list[Scope] = []
    for word in text.split():
        m = _SCOPE.match(word)
        if m is None:
            continue  # openid, launch/patient, offline_access, query-narrowed scopes, ...
        context, resource, perm = m.groups()
        letters = _V1.get(perm, perm)
        out.append(Scope(context, resource, frozenset(letters), word))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Need:
    """One of these (resource, permission letter) pairs is enough."""

    options: tuple[tuple[str, str], ...]

    def describe(self) -> str:
        return " or ".join(f"{r}.{p}" for r, p in self.options)


@dataclass(frozen=True, slots=True)
class Grant:
    allowed: bool
    patient_only: bool  # only patient/ scopes grant it: restricted to the token's patient


def evaluate(scopes: tuple[Scope, ...], need: Need) -> Grant:
    granting = [s for s in scopes for r, p in need.options if s.grants(r, p)]
    if not granting:
        return Grant(False, False)
    return Grant(True, all(s.context == "patient" for s in granting))
