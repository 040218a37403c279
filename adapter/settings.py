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

from adapter.hl7v2.store import SIU_STORE_SCHEMES

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
    tls_cert: Path | None = Field(None, description="PEM certificate (chain) to serve HTTPS; with tls_key")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    tls_client_ca: Path | None = Field(None, description="PEM CA bundle: clients must present a certificate it signed")

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("server.tls_cert and server.tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("server.tls_client_ca needs server.tls_cert and server.tls_key")
        return self

    def public_base(self) -> str:
        scheme = "https" if self.tls_cert else "http"
        return (self.base_url or f"{scheme}://{self.host}:{self.port}/fhir").rstrip("/")


class BackendSettings(_Section):
    kind: Literal["sql", "hl7v2"] = "sql"
    mapping: Path = Field(description="the mapping YAML file (an HL7v2 mapping for kind 'hl7v2')")
    database_url: str = Field(description="sqlite:///path or odbc:DRIVER={...};SERVER=... (kind 'sql' only)")
    pool_size: int = Field(4, ge=1, le=64)
    timeout_seconds: float = Field(10.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _no_database_for_hl7v2(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind") == "hl7v2" and "database_url" not in data:
            return {**data, "database_url": ""}
        return data


class Hl7v2Settings(_Section):
    """``backend.kind = "hl7v2"``: the legacy scheduler's MLLP peer and the adapter's SIU listener."""

    peer_host: str = Field("127.0.0.1", description="the scheduler's MLLP host (SQM/SRM go there)")
    peer_port: int = Field(2576, ge=1, le=65535, description="the scheduler's MLLP port")
    listen_host: str = Field("127.0.0.1", description="where the adapter's SIU listener binds")
    listen_port: int = Field(2575, ge=0, le=65535, description="the adapter's SIU listener port (MLLP)")
    mode: Literal["query", "templates"] = Field(
        "query", description="availability: SQM^S25 queries, or the mapping's session templates minus the mirror"
    )
    timeout_seconds: float | None = Field(None, gt=0, description="wait per SRM/SQM answer; default the mapping's")
    retries: int | None = Field(None, ge=0, description="resends (same MSH-10) before unknown; default the mapping's")
    inbox: Path | None = Field(
        None,
        description="SQLite file of the SIU inbox and mirror; default beside state.path (unused with a shared "
        "state.url: the feed then lives in the state store, PostgreSQL or Redis)",
    )
    inbox_retention_days: float = Field(
        30,
        ge=0,
        description="how long applied SIU messages (raw bodies, de-duplication keys, stale records) stay in the "
        "inbox; purged hourly by the applier, waiting and failed ones and the mirror are kept; 0 = keep forever",
    )


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
    memo: bool = Field(
        True,
        description="answer a $find repeated within the same second from a per-worker memo (one host, a backend "
        "with a lock, cache_seconds >= 1); false: every $find is computed",
    )
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
    signing_secret_from_state: bool = Field(
        False, description="keep the secret in the shared state store (created by the first replica)"
    )
    issuer: str | None = Field(None, description="the authorization server's issuer (the tokens' iss)")
    audience: str | None = Field(None, description="the tokens' aud; usually this server's FHIR base URL")
    jwks_url: str | None = Field(None, description="the authorization server's JWKS (public signing keys)")
    jwks_file: Path | None = Field(None, description="a local JWKS file instead of jwks_url")
    introspection_url: str | None = Field(None, description="RFC 7662 endpoint for opaque (non-JWT) tokens")
    introspection_client_id: str | None = Field(
        None, description="this server's client id at the introspection endpoint"
    )
    introspection_client_secret: str | None = Field(None, description="its secret (HTTP Basic)")
    introspection_cache_seconds: float = Field(60, ge=0, description="how long an active answer is reused")
    jwks_refresh_seconds: float = Field(60, ge=0, description="least time between JWKS fetches on unknown kid")
    leeway_seconds: int = Field(60, ge=0, le=600, description="clock skew allowed for exp/nbf/iat")
    authorization_endpoint: str | None = Field(None, description="published in .well-known/smart-configuration")
    token_endpoint: str | None = Field(None, description="published in .well-known/smart-configuration")
    rate_limit_per_minute: int = Field(0, ge=0, description="requests per minute per client; 0 = no limit")

    @model_validator(mode="after")
    def _smart_needs(self) -> SecuritySettings:
        if self.auth == "smart":
            missing = [n for n in ("issuer", "audience") if not getattr(self, n)]
            if not self.jwks_url and not self.jwks_file and not self.introspection_url:
                missing.append("jwks_url or jwks_file (or introspection_url)")
            if missing:
                raise ValueError(
                    "security.auth = 'smart' needs security."
                    + ", security.".join(missing)
                    + " (or security.auth = 'off', for demonstrations only)"
                )
        return self


class AuditSettings(_Section):
    sinks: list[Literal["file", "fhir", "syslog"]] = Field(["file"], description="where AuditEvents go; [] = off")
    file: Path | None = Field(None, description="JSON-lines file; default audit.jsonl beside state.path")
    spool: Path | None = Field(None, description="SQLite spool of undelivered events; default beside state.path")
    spool_max_events: int = Field(100_000, ge=100, description="spool bound; beyond it the oldest are dropped")
    retry_seconds: float = Field(30, gt=0, description="how often spooled events are retried")
    site: str | None = Field(None, description="AuditEvent.source.site; default the public base URL")
    fhir_url: str | None = Field(None, description="FHIR base of the Audit Record Repository (sink 'fhir')")
    fhir_ca_file: Path | None = Field(None, description="CA bundle to verify the repository's HTTPS certificate")
    timeout_seconds: float = Field(5, gt=0, description="per delivery to the repository or syslog")
    syslog_host: str | None = Field(None, description="syslog-over-TLS collector (sink 'syslog', RFC 5425)")
    syslog_port: int = Field(6514, ge=1, le=65535)
    syslog_ca_file: Path | None = Field(None, description="CA bundle to verify the collector's certificate")
    syslog_client_cert: Path | None = Field(None, description="PEM client certificate for mutual TLS")
    syslog_client_key: Path | None = Field(None, description="PEM key of syslog_client_cert")

    @model_validator(mode="after")
    def _sink_needs(self) -> AuditSettings:
        if "fhir" in self.sinks and not self.fhir_url:
            raise ValueError("audit sink 'fhir' needs audit.fhir_url")
        if "syslog" in self.sinks and not self.syslog_host:
            raise ValueError("audit sink 'syslog' needs audit.syslog_host")
        return self


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
    hl7v2: Hl7v2Settings = Hl7v2Settings()
    state: StateSettings = StateSettings()
    find: FindSettings = FindSettings()
    hold: HoldSettings = HoldSettings()
    security: SecuritySettings = SecuritySettings.model_construct()
    audit: AuditSettings = AuditSettings()
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
        sec = self.security
        if not sec.signing_secret and not sec.signing_secret_file and not sec.signing_secret_from_state:
            raise ValueError(
                "security.signing_secret, security.signing_secret_file or security.signing_secret_from_state is required"
            )
        return self

    @model_validator(mode="after")
    def _one_siu_listener(self) -> Settings:
        # Every worker process would bind hl7v2.listen_port for the SIU feed; only one can.
        if self.backend.kind == "hl7v2" and self.server.workers != 1:
            raise ValueError("backend.kind = 'hl7v2' needs server.workers = 1 (one SIU listener per adapter process)")
        if self.backend.kind == "hl7v2" and self.state.url and not self.state.url.startswith(SIU_STORE_SCHEMES):
            # The SIU inbox and mirror live in the state store; where the feed has no store, it cannot be shared.
            raise ValueError(
                "backend.kind = 'hl7v2' runs on one host with state.url sqlite:///... (or unset), or on several "
                "sharing state.url postgresql://... or redis://...; the SIU feed has no store for "
                f"{self.state.url.split(':', 1)[0]}"
            )
        return self


class SettingsError(ValueError):
    pass


def _resolve_file_paths(data: dict[str, Any], folder: Path) -> None:
    for section, key in (
        ("backend", "mapping"),
        ("hl7v2", "inbox"),
        ("state", "path"),
        ("security", "signing_secret_file"),
        ("security", "jwks_file"),
        ("server", "tls_cert"),
        ("server", "tls_key"),
        ("server", "tls_client_ca"),
        ("audit", "file"),
        ("audit", "spool"),
        ("audit", "fhir_ca_file"),
        ("audit", "syslog_ca_file"),
        ("audit", "syslog_client_cert"),
        ("audit", "syslog_client_key"),
    ):
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
