"""The console script as a user runs it: `sched-adapter serve --config` and `check-mapping`, real processes."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import httpx
from apputil import DEMO_MAPPING, local_midnight, parameters, write_server_config
from conformance import assert_avail_bundle

SCRIPT = Path(sys.executable).parent / "sched-adapter"


def test_serve_with_two_workers_answers_find(tmp_path: Path, live_server_process) -> None:
    from serverutil import free_port

    port = free_port()
    config = write_server_config(tmp_path, port, workers=2)
    p = live_server_process.start([str(SCRIPT), "serve", "--config", str(config)], port=port)
    start = local_midnight(1)
    body = parameters(
        ("start", "valueDateTime", start.isoformat()),
        ("end", "valueDateTime", (start + dt.timedelta(days=2)).isoformat()),
    )
    r = httpx.post(f"{p.base_url}/fhir/Appointment/$find", json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert_avail_bundle(r.json())
    assert (tmp_path / "demo.sqlite").exists() and (tmp_path / "secret").read_text().strip()


def test_check_mapping_reports_file_line_key(tmp_path: Path) -> None:
    ok = subprocess.run([str(SCRIPT), "check-mapping", str(DEMO_MAPPING)], capture_output=True, text=True)
    assert ok.returncode == 0 and "OK" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEMO_MAPPING.read_text().replace("timezone: America/New_York", "timezone: Mars/Olympus"))
    out = subprocess.run([str(SCRIPT), "check-mapping", str(bad)], capture_output=True, text=True)
    assert out.returncode == 1
    assert f"{bad}:" in out.stderr and "system.timezone: expected an IANA time zone" in out.stderr


def test_issue11_1_serve_refuses_smart_auth_without_an_authorization_server(tmp_path: Path) -> None:
    """auth defaults to 'smart'; without issuer, audience and keys the server must not start open."""
    config = tmp_path / "c.toml"
    config.write_text(
        f'[backend]\nmapping = "{DEMO_MAPPING}"\ndatabase_url = "sqlite:///x.sqlite"\n'
        '[security]\nsigning_secret = "0123456789abcdef0123"\n'
    )
    out = subprocess.run([str(SCRIPT), "serve", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "security.auth" in out.stderr
    assert "security.issuer" in out.stderr and "jwks_url or jwks_file" in out.stderr


def test_workers_starting_together_share_one_signing_secret(tmp_path: Path) -> None:
    """First start with several workers: every worker must end up with the same secret."""
    import multiprocessing

    from apputil import make_settings

    from adapter.server import signing_secret

    settings = make_settings(
        tmp_path,
        "sqlite:///unused.sqlite",
        security={"signing_secret": None, "signing_secret_file": str(tmp_path / "secret")},
    )
    with multiprocessing.get_context("fork").Pool(8) as pool:
        secrets_seen = set(pool.map(signing_secret, [settings] * 32))
    assert len(secrets_seen) == 1
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".secret-")] == []
