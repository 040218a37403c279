"""The HTTP floor for bench/find.py: a trivial Starlette app that answers ``$find`` with a prebuilt body.

The body is the exact bytes one real ``$find`` call returned (same size, same media type), read once
at import from the file named by ``BENCH_FLOOR_BODY``. Nothing is parsed or serialized per request,
so this measures what uvicorn + Starlette + the loopback socket cost on their own.

Run by bench/find.py as ``uvicorn _floor_app:app --app-dir bench --workers 2``.
"""

from __future__ import annotations

import os
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

_BODY = Path(os.environ["BENCH_FLOOR_BODY"]).read_bytes()
_MEDIA = "application/fhir+json; charset=utf-8"


async def find(request: Request) -> Response:
    await request.body()  # consume the Parameters body like the adapter does
    return Response(_BODY, media_type=_MEDIA)


async def ready(request: Request) -> Response:
    return Response(b"ok", media_type="text/plain")


app = Starlette(routes=[
    Route("/fhir/Appointment/$find", find, methods=["GET", "POST"]),
    Route("/ready", ready, methods=["GET"]),
])
