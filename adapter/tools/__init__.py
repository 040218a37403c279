"""Tools for IT teams that operate on a mapping and a live legacy database (``sched-adapter mappings ...``).

``check``: the live check of a mapping against its database (also run at server start); ``preview``:
the FHIR resources a mapping produces; ``verify``: an acceptance run before go-live. They sit above
the layers (they compose the backend, the service and the app like ``adapter.server`` does).
"""
