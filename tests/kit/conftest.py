"""A real demo server (SQLite, uvicorn in a thread) shared by the kit's tests of one module."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from apputil import make_settings
from serverutil import ThreadServer

from adapter.demo.seed import ensure_demo_database
from adapter.server import build_app


@pytest.fixture(scope="module")
def demo_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """FHIR base URL of a seeded SQLite demo server with the demo page on."""
    tmp: Path = tmp_path_factory.mktemp("kit")
    ensure_demo_database(tmp / "demo.sqlite", today=dt.date.today())
    holder: dict[str, str] = {}

    def factory() -> object:
        settings = make_settings(tmp, f"sqlite:///{tmp / 'demo.sqlite'}", server={"base_url": holder["base"]})
        settings = settings.model_copy(update={"demo": True})
        return build_app(settings)

    server = ThreadServer(factory, factory=True)
    holder["base"] = server.base_url + "/fhir"
    server.start()
    try:
        yield holder["base"]
    finally:
        server.stop()
