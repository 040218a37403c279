"""Issue 11 items 3 and 4: ``serve`` over HTTPS (and mutual TLS), and the per-client rate limit."""

from __future__ import annotations

import datetime as dt
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from apputil import write_server_config
from conformance import assert_operation_outcome
from securityutil import JwksServer, Minter, headers, issue_cert, make_ca, rsa_key, running_app
from serverutil import free_port

from adapter.demo.seed import ensure_demo_database

SCRIPT = Path(sys.executable).parent / "sched-adapter"


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    ca, ca_key, ca_cert = make_ca(tmp_path)
    return {
        "ca": ca,
        "server": issue_cert(tmp_path, ca_key, ca_cert, "adapter"),
        "client": issue_cert(tmp_path, ca_key, ca_cert, "scheduling-client", client=True),
    }


def test_issue11_3_serve_over_https(tmp_path: Path, pki: dict[str, Any], live_server_process: Any) -> None:
    port = free_port()
    config = write_server_config(tmp_path, port)
    env = {"SCHED_SERVER__TLS_CERT": str(pki["server"].cert), "SCHED_SERVER__TLS_KEY": str(pki["server"].key)}
    live_server_process.start([str(SCRIPT), "serve", "--config", str(config)], env=env, port=port)
    with httpx.Client(verify=ssl.create_default_context(cafile=str(pki["ca"].cert)), timeout=30) as https:
        resp = https.get(f"https://127.0.0.1:{port}/fhir/metadata")
        assert resp.status_code == 200
        cs = resp.json()
        assert cs["implementation"]["url"] == f"https://127.0.0.1:{port}/fhir"
    with httpx.Client(timeout=30) as plain, pytest.raises(httpx.TransportError):
        plain.get(f"http://127.0.0.1:{port}/fhir/metadata")


def test_issue11_3_mutual_tls_refuses_a_client_without_certificate(
    tmp_path: Path, pki: dict[str, Any], live_server_process: Any
) -> None:
    port = free_port()
    config = write_server_config(tmp_path, port)
    env = {
        "SCHED_SERVER__TLS_CERT": str(pki["server"].cert),
        "SCHED_SERVER__TLS_KEY": str(pki["server"].key),
        "SCHED_SERVER__TLS_CLIENT_CA": str(pki["ca"].cert),
    }
    live_server_process.start([str(SCRIPT), "serve", "--config", str(config)], env=env, port=port)
    anonymous = ssl.create_default_context(cafile=str(pki["ca"].cert))
    with httpx.Client(verify=anonymous, timeout=30) as https, pytest.raises(httpx.TransportError):
        https.get(f"https://127.0.0.1:{port}/fhir/metadata")
    known = ssl.create_default_context(cafile=str(pki["ca"].cert))
    known.load_cert_chain(str(pki["client"].cert), str(pki["client"].key))
    with httpx.Client(verify=known, timeout=30) as https:
        assert https.get(f"https://127.0.0.1:{port}/fhir/metadata").status_code == 200


def test_issue11_3_tls_settings_go_together(tmp_path: Path, pki: dict[str, Any]) -> None:
    from adapter.settings import SettingsError, load_settings

    config = write_server_config(tmp_path, 8080)
    with pytest.raises(SettingsError, match="tls_cert and server.tls_key go together"):
        load_settings(config, {"SCHED_SERVER__TLS_CERT": str(pki["server"].cert)})
    with pytest.raises(SettingsError, match="tls_client_ca needs"):
        load_settings(config, {"SCHED_SERVER__TLS_CLIENT_CA": str(pki["ca"].cert)})


# -- rate limit -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rl-db") / "demo.sqlite"
    ensure_demo_database(path, today=dt.date.today())
    return path


@pytest.fixture(scope="module")
def jwks() -> Iterator[tuple[JwksServer, Any]]:
    key = rsa_key("rl")
    server = JwksServer([key])
    yield server, key
    server.stop()


def assert_throttled(resp: httpx.Response) -> int:
    assert resp.status_code == 429, resp.text
    wait = int(resp.headers["retry-after"])
    assert 1 <= wait <= 60
    oo = resp.json()
    assert_operation_outcome(oo)
    assert oo["issue"][0]["code"] == "throttled"
    return wait


def test_issue11_4_rate_limit_per_token_client(tmp_path: Path, db: Path, jwks: tuple[JwksServer, Any]) -> None:
    server, key = jwks
    with running_app(tmp_path, f"sqlite:///{db}", server.url, security={"rate_limit_per_minute": 3}) as app:
        mint = Minter(key, audience=app.base)
        busy = mint.token("user/Patient.read", azp="busy-app")
        calm = mint.token("user/Patient.read", azp="calm-app")
        with httpx.Client(timeout=30) as http:
            for _ in range(3):
                assert http.get(f"{app.base}/Patient/5", headers=headers(busy)).status_code == 200
            assert_throttled(http.get(f"{app.base}/Patient/5", headers=headers(busy)))
            # The same user through another client, and the same address, are not held back.
            assert http.get(f"{app.base}/Patient/5", headers=headers(calm)).status_code == 200
            assert http.get(f"{app.base}/metadata").status_code == 200  # discovery is never limited
            # Requests with bad tokens are counted against the address: guessing is limited too.
            for _ in range(3):
                assert http.get(f"{app.base}/Patient/5", headers=headers("bad-token")).status_code == 401
            assert_throttled(http.get(f"{app.base}/Patient/5", headers=headers("bad-token")))


def test_issue11_4_rate_limit_by_address_without_authorization(tmp_path: Path, db: Path) -> None:
    with running_app(tmp_path, f"sqlite:///{db}", None, security={"rate_limit_per_minute": 2}) as app:
        with httpx.Client(timeout=30) as http:
            for _ in range(2):
                assert http.get(f"{app.base}/Patient/5", headers={"X-Client-Id": "a"}).status_code == 200
            # A header is no identity: changing it does not reset the limit.
            assert_throttled(http.get(f"{app.base}/Patient/5", headers={"X-Client-Id": "b"}))


def test_issue11_4_token_bucket_refills() -> None:
    from adapter.security.ratelimit import RateLimiter

    now = [0.0]
    limiter = RateLimiter(60, clock=lambda: now[0])
    assert all(limiter.take("k") == 0 for _ in range(60))
    assert limiter.take("k") == 1
    now[0] += 1.0
    assert limiter.take("k") == 0
    assert limiter.take("other") == 0
