"""adapter.settings on pydantic-settings (issue 13, item 5): same names, defaults, precedence and error quality."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapter.cli import demo_paths
from adapter.settings import Settings, SettingsError, load_settings

REQUIRED_ENV = {
    "SCHED_BACKEND__MAPPING": "/m.yaml",
    "SCHED_BACKEND__DATABASE_URL": "sqlite:////x.sqlite",
    "SCHED_SECURITY__SIGNING_SECRET": "0123456789abcdef0123",
    # security.auth = "smart" (the default) needs an authorization server
    "SCHED_SECURITY__ISSUER": "https://auth.example.org/realms/clinic",
    "SCHED_SECURITY__AUDIENCE": "http://127.0.0.1:8080/fhir",
    "SCHED_SECURITY__JWKS_URL": "https://auth.example.org/realms/clinic/protocol/openid-connect/certs",
}


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf" / "config.toml"
    path.parent.mkdir()
    path.write_text(text, encoding="utf-8")
    return path


def test_issue13_5_defaults_are_unchanged() -> None:
    s = load_settings(None, REQUIRED_ENV)
    assert (s.server.host, s.server.port, s.server.workers, s.server.log_level) == ("127.0.0.1", 8080, 1, "info")
    assert s.server.max_body_bytes == 1_048_576 and s.server.public_base() == "http://127.0.0.1:8080/fhir"
    assert (s.backend.kind, s.backend.pool_size, s.backend.timeout_seconds) == ("sql", 4, 10.0)
    assert s.state.path == Path("var/adapter-state.sqlite")
    assert (s.find.default_window_days, s.find.max_window_days, s.find.default_count, s.find.max_count) == (
        14,
        90,
        50,
        500,
    )
    assert (s.find.proposal_ttl_seconds, s.find.cache_seconds) == (3600, 2.0)
    assert (s.hold.ttl_seconds, s.hold.sweep_seconds) == (300, 30)
    assert s.security.auth == "smart" and s.demo is False


def test_issue13_5_environment_wins_over_file_and_file_paths_are_relative_to_it(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        '[server]\nport = 9000\nworkers = 2\n[backend]\nmapping = "maps/m.yaml"\ndatabase_url = "sqlite:///db.sqlite"\n'
        '[state]\npath = "state.sqlite"\n[hold]\nttl_seconds = 60\n[security]\nauth = "off"\nsigning_secret_file = "secret"\n',
    )
    s = load_settings(config, {"SCHED_HOLD__TTL_SECONDS": "90", "sched_server__workers": "3"})
    folder = config.parent.resolve()
    assert s.server.port == 9000 and s.server.workers == 3 and s.hold.ttl_seconds == 90
    assert s.backend.mapping == folder / "maps" / "m.yaml"
    assert s.backend.database_url == f"sqlite:///{folder / 'db.sqlite'}"
    assert s.state.path == folder / "state.sqlite" and s.security.signing_secret_file == folder / "secret"


def test_issue13_5_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in REQUIRED_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SCHED_FIND__MAX_COUNT", "200")
    monkeypatch.setenv("SCHED_CONFIG_FILE", "/not/a/setting.toml")  # for the workers, not a setting
    assert load_settings(None).find.max_count == 200


def test_issue13_5_bad_value_names_key_variable_and_expectation(tmp_path: Path) -> None:
    config = _config(tmp_path, '[server]\nport = "eighty"\n')
    with pytest.raises(SettingsError) as err:
        load_settings(config, {**REQUIRED_ENV, "SCHED_FIND__MAX_COUNT": "0", "SCHED_SERVER__LOG_LEVEL": "loud"})
    text = str(err.value)
    assert f"invalid settings in {config}" in text
    assert "server.port (SCHED_SERVER__PORT): Input should be a valid integer" in text
    assert "find.max_count (SCHED_FIND__MAX_COUNT): Input should be greater than or equal to 1" in text
    assert "server.log_level (SCHED_SERVER__LOG_LEVEL): Input should be 'debug', 'info', 'warning' or 'error'" in text


def test_issue13_5_unknown_keys_and_missing_required_ones_are_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"hold\.ttl_second \(SCHED_HOLD__TTL_SECOND\): Extra inputs"):
        load_settings(None, {**REQUIRED_ENV, "SCHED_HOLD__TTL_SECOND": "5"})
    with pytest.raises(SettingsError, match=r"server\.prot \(SCHED_SERVER__PROT\): Extra inputs"):
        load_settings(_config(tmp_path, "[server]\nprot = 1\n"), REQUIRED_ENV)
    with pytest.raises(SettingsError, match=r"backend\.database_url \(SCHED_BACKEND__DATABASE_URL\): Field required"):
        load_settings(None, {"SCHED_BACKEND__MAPPING": "m.yaml", "SCHED_SECURITY__SIGNING_SECRET": "x" * 20})


def test_issue13_5_unreadable_file_and_bad_toml_and_bad_section_json(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read settings file"):
        load_settings(tmp_path / "missing.toml", REQUIRED_ENV)
    with pytest.raises(SettingsError, match=r"config\.toml: "):
        load_settings(_config(tmp_path, "[server\n"), REQUIRED_ENV)
    with pytest.raises(SettingsError, match="SCHED_HOLD takes a JSON object"):
        load_settings(None, {**REQUIRED_ENV, "SCHED_HOLD": "soon"})


def test_issue13_5_model_validate_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests build Settings from dicts; the environment of the test run must not leak in."""
    monkeypatch.setenv("SCHED_HOLD__TTL_SECONDS", "7")
    s = Settings.model_validate(
        {
            "backend": {"mapping": "m.yaml", "database_url": "sqlite:///x"},
            "security": {"auth": "off", "signing_secret": "x" * 20},
        }
    )
    assert s.hold.ttl_seconds == 300


def test_issue13_1_demo_paths_follow_data_dir_and_yield_to_the_environment(tmp_path: Path) -> None:
    paths = demo_paths(tmp_path / "d", Path("/pkg/mapping.yaml"), {"SCHED_STATE__PATH": "/elsewhere.sqlite"})
    assert paths == {
        "SCHED_BACKEND__MAPPING": "/pkg/mapping.yaml",
        "SCHED_BACKEND__DATABASE_URL": f"sqlite:///{tmp_path / 'd' / 'clinicware.sqlite'}",
        "SCHED_SECURITY__SIGNING_SECRET_FILE": str(tmp_path / "d" / "signing-secret"),
    }


def test_issue13_3_example_production_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[1] / "docs" / "config.example.toml"
    s = load_settings(example, {})
    assert s.server.host == "0.0.0.0" and s.backend.database_url.startswith("odbc:DRIVER={PostgreSQL Unicode}")
    assert s.backend.mapping == example.parent / "mapping.yaml"


def test_issue8_hl7v2_backend_runs_one_worker() -> None:
    """Each worker would bind the SIU listener port; the settings refuse more than one."""
    env = {
        "SCHED_BACKEND__KIND": "hl7v2",
        "SCHED_BACKEND__MAPPING": "/m.yaml",
        "SCHED_SECURITY__AUTH": "off",
        "SCHED_SECURITY__SIGNING_SECRET": "0123456789abcdef0123",
    }
    assert load_settings(None, env).server.workers == 1
    with pytest.raises(SettingsError, match=r"server\.workers = 1"):
        load_settings(None, {**env, "SCHED_SERVER__WORKERS": "2"})
    with pytest.raises(SettingsError, match="runs on one host.*no store for mongodb"):
        load_settings(None, {**env, "SCHED_STATE__URL": "mongodb://db/state"})


def test_issue10_hl7v2_backend_runs_on_several_hosts_with_a_postgresql_state_store() -> None:
    """The SIU inbox and mirror live in the shared state database: each replica runs one listener over it."""
    env = {
        "SCHED_BACKEND__KIND": "hl7v2",
        "SCHED_BACKEND__MAPPING": "/m.yaml",
        "SCHED_SECURITY__AUTH": "off",
        "SCHED_SECURITY__SIGNING_SECRET": "0123456789abcdef0123",
        "SCHED_STATE__URL": "postgresql://postgres@127.0.0.1:5432/state",
    }
    assert load_settings(None, env).state.url == "postgresql://postgres@127.0.0.1:5432/state"
    with pytest.raises(SettingsError, match=r"server\.workers = 1"):
        load_settings(None, {**env, "SCHED_SERVER__WORKERS": "2"})


def test_issue10_hl7v2_backend_accepts_a_shared_redis_state_store() -> None:
    """The SIU inbox and mirror live in the state store: replicas share them through redis://."""
    env = {
        "SCHED_BACKEND__KIND": "hl7v2",
        "SCHED_BACKEND__MAPPING": "/m.yaml",
        "SCHED_SECURITY__AUTH": "off",
        "SCHED_SECURITY__SIGNING_SECRET": "0123456789abcdef0123",
    }
    for url in ("redis://127.0.0.1:6379/0", "redis+sentinel://s1:26379,s2:26379/mymaster/0"):
        assert load_settings(None, {**env, "SCHED_STATE__URL": url}).state.url == url


def test_retention_hl7v2_inbox_retention_days() -> None:
    """Applied SIU messages are kept 30 days by default; 0 keeps them forever; a negative period is refused."""
    env = {
        "SCHED_BACKEND__KIND": "hl7v2",
        "SCHED_BACKEND__MAPPING": "/m.yaml",
        "SCHED_SECURITY__AUTH": "off",
        "SCHED_SECURITY__SIGNING_SECRET": "0123456789abcdef0123",
    }
    assert load_settings(None, env).hl7v2.inbox_retention_days == 30
    assert load_settings(None, {**env, "SCHED_HL7V2__INBOX_RETENTION_DAYS": "0"}).hl7v2.inbox_retention_days == 0
    assert load_settings(None, {**env, "SCHED_HL7V2__INBOX_RETENTION_DAYS": "7.5"}).hl7v2.inbox_retention_days == 7.5
    with pytest.raises(SettingsError, match="inbox_retention_days"):
        load_settings(None, {**env, "SCHED_HL7V2__INBOX_RETENTION_DAYS": "-1"})
