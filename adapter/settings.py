"""The one typed settings object, read from a TOML file and environment variables (``pydantic-settings``).

Every setting has a dotted name (``hold.ttl_seconds``) and an environment variable made of the
prefix ``SCHED_`` and the upper-cased name with ``__`` between sections
(``SCHED_HOLD__TTL_SECONDS=120``). Environment variables win over the file. Relative paths in
the file are relative to the file's folder, relative paths in the environment to the working
directory. No other module reads the environment. Adding a setting is one annotated line in its section.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import pydantic_settings
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

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


class FindSettings(_Section):
    default_window_days: float = Field(14, gt=0)
    max_window_days: float = Field(90, gt=0)
    default_count: int = Field(50, ge=1)
    max_count: int = Field(500, ge=1)
    proposal_ttl_seconds: int = Field(3600, ge=10, description="how long a proposed id can be held/booked")
    cache_seconds: float = Field(2.0, ge=0, description="per-worker cache of the legacy calendar; 0 = off")
    max_days_ahead: float = Field(365, gt=0, description="booking horizon: nothing later is offered or booked")


class HoldSettings(_Section):
    ttl_seconds: int = Field(300, ge=1)
    sweep_seconds: int = Field(30, ge=1, description="how often the expiry job runs")


class SecuritySettings(_Section):
    auth: Literal["smart", "off"] = Field("smart", description="'off' must be chosen explicitly")
    signing_secret: str | None = Field(
        None, min_length=16, description="HMAC secret for proposed ids; shared by replicas"
    )
    signing_secret_file: Path | None = Field(None, description="file holding the secret (created if missing)")


# The environment the current load_settings() call reads. Outside it (Settings(...), Settings.model_validate in
# tests) no environment is read at all. A context variable, because pydantic-settings builds its sources in a
# classmethod that takes no per-call arguments.
_ENVIRONMENT: ContextVar[Mapping[str, str] | None] = ContextVar("sched_settings_environment", default=None)


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping instead of ``os.environ``."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.env_vars = {name.lower(): value for name, value in env.items()}  # the settings are case-insensitive


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        extra="forbid", env_prefix=ENV_PREFIX, env_nested_delimiter="__", case_sensitive=False
    )

    server: ServerSettings = ServerSettings()
    backend: BackendSettings
    state: StateSettings = StateSettings()
    find: FindSettings = FindSettings()
    hold: HoldSettings = HoldSettings()
    security: SecuritySettings = SecuritySettings()
    demo: bool = Field(False, description="create and seed the demo database on first start")
    demo_page: bool | None = Field(None, description="serve the demo booking page at /demo; default: same as demo")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Earlier sources win: the environment over the file (passed in as init values). No .env, no secrets dir.
        env = _ENVIRONMENT.get()
        return (init_settings,) if env is None else (_MappingEnvSource(settings_cls, env), init_settings)

    @model_validator(mode="after")
    def _secret_source(self) -> Settings:
        if not self.security.signing_secret and not self.security.signing_secret_file:
            raise ValueError("security.signing_secret or security.signing_secret_file is required")
        return self


class SettingsError(ValueError):
    pass


def _resolve_file_paths(data: dict[str, Any], folder: Path) -> None:
    for section, key in (("backend", "mapping"), ("state", "path"), ("security", "signing_secret_file")):
        value = data.get(section, {}).get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            data[section][key] = str((folder / value).resolve())
    url = data.get("backend", {}).get("database_url")
    if isinstance(url, str) and url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        data["backend"]["database_url"] = "sqlite:///" + str((folder / url[len("sqlite:///") :]).resolve())


@contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    token = _ENVIRONMENT.set(env)
    try:
        yield
    finally:
        _ENVIRONMENT.reset(token)


def load_settings(path: str | Path | None, env: Mapping[str, str] | None = None) -> Settings:
    """Settings from the TOML file at ``path`` (optional) overridden by ``SCHED_*`` variables of ``env``."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise SettingsError(f"{path}: cannot read settings file: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"{path}: {exc}") from exc
        _resolve_file_paths(data, path.resolve().parent)
    try:
        with _environment(os.environ if env is None else env):
            return Settings(**data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            dotted = ".".join(str(p) for p in err["loc"]) or "(settings)"
            env_name = ENV_PREFIX + "__".join(str(p) for p in err["loc"]).upper()
            lines.append(f"{dotted} ({env_name}): {err['msg']}")
        raise SettingsError(f"invalid settings{f' in {path}' if path else ''}:\n  " + "\n  ".join(lines)) from None
    except pydantic_settings.SettingsError as exc:  # e.g. a section variable (SCHED_HOLD) that is not JSON
        raise SettingsError(
            f"invalid settings in the environment: {exc} (a section variable such as SCHED_HOLD takes a JSON "
            "object; one key is SCHED_HOLD__TTL_SECONDS=120)"
        ) from None
