"""Building the real application for tests: settings pointing at a given database, nothing mocked."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from starlette.applications import Starlette

from adapter.server import build_app
from adapter.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DEMO_MAPPING = REPO / "mappings" / "demo.yaml"
ZONE_NAME = "America/New_York"


def make_settings(tmp_path: Path, database_url: str, **sections: dict[str, Any]) -> Settings:
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 8080, "base_url": "http://testserver/fhir"},
        "backend": {"mapping": str(DEMO_MAPPING), "database_url": database_url, "pool_size": 4},
        "state": {"path": str(tmp_path / "state.sqlite")},
        "security": {"auth": "off", "signing_secret": "test-secret-0123456789abcdef"},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return Settings.model_validate(data)


def make_app(tmp_path: Path, database_url: str, **sections: dict[str, Any]) -> Starlette:
    return build_app(make_settings(tmp_path, database_url, **sections))


def parameters(*params: tuple[str, str, Any]) -> dict[str, Any]:
    """parameters(("start", "valueDateTime", "..."), ...) -> a Parameters resource."""
    return {"resourceType": "Parameters", "parameter": [{"name": n, k: v} for n, k, v in params]}


def local_midnight(days_ahead: int, zone_name: str = ZONE_NAME) -> dt.datetime:
    from zoneinfo import ZoneInfo

    zone = ZoneInfo(zone_name)
    day = dt.datetime.now(zone).date() + dt.timedelta(days=days_ahead)
    return dt.datetime.combine(day, dt.time(), tzinfo=zone)


def appointments(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", []) if e["resource"]["resourceType"] == "Appointment"]


def outcomes(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", []) if e["resource"]["resourceType"] == "OperationOutcome"]


def issues(bundle_or_oo: dict[str, Any]) -> list[dict[str, Any]]:
    if bundle_or_oo["resourceType"] == "OperationOutcome":
        return bundle_or_oo["issue"]
    return [i for oo in outcomes(bundle_or_oo) for i in oo["issue"]]


def write_server_config(
    folder: Path,
    port: int,
    *,
    database_url: str = "sqlite:///demo.sqlite",
    workers: int = 1,
    demo: bool = True,
    extra: str = "",
) -> Path:
    """A settings file for `sched-adapter serve` in ``folder`` (relative paths resolve there)."""
    path = folder / "server.toml"
    path.write_text(
        f"""demo = {"true" if demo else "false"}
[server]
host = "127.0.0.1"
port = {port}
workers = {workers}
log_level = "warning"
[backend]
mapping = '{DEMO_MAPPING}'
database_url = '{database_url}'
[state]
path = "state.sqlite"
[security]
auth = "off"
signing_secret_file = "secret"
{extra}""",
        encoding="utf-8",
    )
    return path


class MovableClock:
    """The app's clock (``build_app(settings, clock=...)``): real time plus an offset the test moves forward,
    so a test waits for an expiry by moving the clock instead of sleeping."""

    def __init__(self) -> None:
        self.offset = dt.timedelta(0)

    def __call__(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + self.offset

    def advance_past(self, instant: dt.datetime, margin: dt.timedelta = dt.timedelta(seconds=1)) -> None:
        """From now on the app's "now" is later than ``instant``."""
        gap = instant + margin - self()
        if gap > dt.timedelta(0):
            self.offset += gap
