"""A parsed search -> the backend's AppointmentQuery: references and identifiers resolved, visit-type tokens
matched, criteria that exclude each other answered without a query."""

from __future__ import annotations

from adapter.backends.protocol import ActorQuery, AppointmentQuery, Identifier
from adapter.fhir.context import FhirContext
from adapter.fhir.search.params import SearchRequest, _identifier_systems, _RefCriterion


async def _resolve_ref(ctx: FhirContext, crit: _RefCriterion, req: SearchRequest) -> set[str] | None:
    ids = crit.ids
    param = crit.kind.lower()
    backend = ctx.service  # the scheduling layer answers for the backend
    for group in crit.identifier_groups:
        known = _identifier_systems(backend, crit.kind)
        idents: list[Identifier] = []
        for system, value in group:
            if system:
                if known is not None and system not in known:
                    req.nothing.append(
                        f"{param}.identifier system {system!r} cannot be processed by this server"
                        + (f"; it knows {', '.join(sorted(known))}" if known else "")
                    )
                    continue
                idents.append(Identifier(system, value))
            elif known:
                idents += [Identifier(s, value) for s in sorted(known)]  # no system: try every known one
            else:
                req.nothing.append(
                    f"{param}.identifier {value!r} has no system and this server has no "
                    f"{crit.kind} identifier system to interpret it with"
                )
        found: set[str] = set()
        if idents:
            actors = await backend.find_actors(ActorQuery(crit.kind, identifiers=tuple(idents), limit=1000))
            found = {a.id for a in actors}
            if not found:
                req.nothing.append(
                    f"no {crit.kind} with identifier "
                    + " or ".join(f"{i.system}|{i.value}" for i in idents)
                    + " is known"
                )
        ids = found if ids is None else ids & found
    return ids


def _token_matches(token: tuple[str | None, str | None], system: str, code: str) -> bool:
    t_system, t_code = token
    if t_system is not None and t_system != system:
        return False
    return t_code is None or t_code == code


async def build_query(ctx: FhirContext, req: SearchRequest) -> AppointmentQuery | None:
    """The backend query for a parsed request; None when the criteria already show nothing can match."""
    refs: dict[str, tuple[str, ...]] = {}
    for kind, crit in req.refs.items():
        ids = await _resolve_ref(ctx, crit, req)
        if ids is not None:
            if not ids:
                if not req.nothing:
                    req.nothing.append(f"the {kind.lower()} criteria exclude each other")
                return None
            refs[kind] = tuple(sorted(ids))
    if req.nothing:
        return None
    visit_keys: set[str] | None = None
    if req.type_groups:
        types = await ctx.service.visit_types()
        for name, tokens in req.type_groups:
            keys = {
                vt.key
                for vt in types
                for c in (vt.codings if name == "appointment-type" else vt.service_types)
                if any(_token_matches(t, c.system, c.code) for t in tokens)
            }
            visit_keys = keys if visit_keys is None else visit_keys & keys
            if not visit_keys:
                req.nothing.append(
                    f"no visit type of this server matches {name} "
                    + ",".join(f"{s}|{c}" if s is not None else str(c) for s, c in tokens)
                )
                return None
    for what, value in (("_id", req.ids), ("identifier", req.identifiers), ("status", req.statuses)):
        if value is not None and not value:
            req.nothing.append(f"the repeated {what} parameters exclude each other")
            return None
    cursor = req.cursor
    descending = req.descending if cursor is None or cursor.forward else not req.descending
    return AppointmentQuery(
        ids=tuple(sorted(req.ids or ())),
        identifiers=tuple(Identifier(s, v) for s, v in sorted(req.identifiers or ())),
        patient_ids=refs.get("Patient", ()),
        practitioner_ids=refs.get("Practitioner", ()),
        location_ids=refs.get("Location", ()),
        statuses=tuple(sorted(req.statuses or ())),
        visit_type_keys=tuple(sorted(visit_keys or ())),
        specialty_codes=tuple(req.specialty_groups),
        start_bounds=tuple(req.bounds),
        exclude_start_ranges=tuple(req.excluded),
        descending=descending,
        after=(cursor.start, cursor.appt_id) if cursor else None,
        limit=req.count,
        want_total=req.want_total,
        total_cap=None if req.count == 0 else req.total_cap,  # _count=0 asks for the total alone
    )
