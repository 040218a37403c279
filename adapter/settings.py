"""The one typed settings object, read from a TOML file and environment variables.

Every setting has a dotted name (``hold.ttl_seconds``) and an environment variable made of the
prefix ``SCHED_`` and the upper-cased name with ``__`` between sections
(``SCHED_HOLD__TTL_SECONDS=120``). Environment variables win over the file. Relative paths in
the file are relative to the file's folder. No other module reads the environment.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ENV_PREFIX = "SCHED_"
CONFIG_FILE_VARIABLE = "SCHED_CONFIG_FILE"  # names the settings file for uvicorn workers; not itself a setting


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64)
    base_url: str | None = Field(None, description="public FHIR base URL; default http://host:port/fhir")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="larger request bodies get 413")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    def public_base(self) -> str:
        return (self.base_url or f"http://{self.host}:{self.port}/fhir").rstrip("/")


class BackendSettings(_Section):
    kind: Literal["sql"] = "sql"
    mapping: Path = Field(description="the mapping YAML file")
    database_url: str = Field(description="sqlite:///path or odbc:DRIVER={...};SERVER=...")
    pool_size: int = Field(4, ge=1, le=64)
    timeout_seconds: float = Field(10.0, gt=0)


class StateSettings(_Section):
    path: Path = Field(Path("var/adapter-state.sqlite"), description="SQLite file for holds and idempotency")
    url: str | None = Field(
        None,
        description="sqlite:///path, redis://host:port/db, redis+sentinel://h:p,h:p/service/db or postgresql://...; "
        "default: sqlite:/// of state.path",
    )
    single_host: bool = Field(
        False, description="allow a host-local (SQLite) state store with a shared (odbc:) legacy database"
    )
    timeout_seconds: float | None = Field(
        None,
        gt=0,
        description="how long a state-store call may wait for the file's lock; default backend.timeout_seconds",
    )


class FindSettings(_Section):
    default_window_days: float = Field(14, gt=0)
    max_window_days: float = Field(90, gt=0)
    default_count: int = Field(50, ge=1)
    max_count: int = Field(500, ge=1)
    proposal_ttl_seconds: int = Field(3600, ge=10, description="how long a proposed id can be held/booked")
    cache_seconds: float = Field(2.0, ge=0, description="per-worker cache of the legacy calendar; 0 = off")


class HoldSettings(_Section):
    ttl_seconds: int = Field(300, ge=1)
    sweep_seconds: int = Field(30, ge=1, description="how often the expiry job runs")


class SecuritySettings(_Section):
    auth: Literal["smart", "off"] = Field("smart", description="'off' must be chosen explicitly")
    signing_secret: str | None = Field(
        None, min_length=16, description="HMAC secret for proposed ids; shared by replicas"
    )
    signing_secret_file: Path | None = Field(None, description="file holding the secret (created if missing)")
    signing_secret_from_state: bool = Field(
        False, description="keep the secret in the shared state store (created by the first replica)"
    )


class Settings(_Section):
    server: ServerSettings = ServerSettings()
    backend: BackendSettings
    state: StateSettings = StateSettings()
    find: FindSettings = FindSettings()
    hold: HoldSettings = HoldSettings()
    security: SecuritySettings = SecuritySettings()
    demo: bool = Field(False, description="create and seed the demo database on first start")

    @model_validator(mode="after")
    def _secret_source(self) -> Settings:
        sec = self.security
        if not sec.signing_secret and not sec.signing_secret_file and not sec.signing_secret_from_state:
            raise ValueError(
                "security.signing_secret, security.signing_secret_file or security.signing_secret_from_state is required"
            )
        return self


class SettingsError(ValueError):
    pass


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_FILE_VARIABLE:
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _resolve_paths(data: dict[str, Any], folder: Path) -> None:
    for section, key in (("backend", "mapping"), ("state", "path"), ("security", "signing_secret_file")):
        value = data.get(section, {}).get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            data[section][key] = str((folder / value).resolve())
    url = data.get("backend", {}).get("database_url")
    if isinstance(url, str) and url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        data["backend"]["database_url"] = "sqlite:///" + str((folder / url[len("sqlite:///") :]).resolve())


def load_settings(path: str | Path | None, env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    folder = Path.cwd()
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise SettingsError(f"{path}: cannot read settings file: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"{path}: {exc}") from exc
        folder = path.resolve().parent
        _resolve_paths(data, folder)
    overrides = _env_overrides(env)
    _resolve_paths(overrides, Path.cwd())
    data = _merge(data, overrides)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            dotted = ".".join(str(p) for p in err["loc"]) or "(settings)"
            env_name = ENV_PREFIX + "__".join(str(p) for p in err["loc"]).upper()
            lines.append(f"{dotted} ({env_name}): {err['msg']}")
        raise SettingsError(f"invalid settings{f' in {path}' if path else ''}:\n  " + "\n  ".join(lines)) from None
