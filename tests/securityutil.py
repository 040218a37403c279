"""Test helpers for authorization, TLS and audit: real keys, real signed JWTs, a JWKS served over
real HTTP, certificates, and an app with SMART authorization on."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apputil import DEMO_MAPPING
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey
from serverutil import ThreadServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from adapter.server import build_app
from adapter.settings import Settings

ISSUER = "https://auth.example.org/realms/clinic"
SECRET = "security-tests-secret-0123456789"


def _pem(private_key: Any) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: RSAKey | ECKey
    public_pem: bytes

    def public_jwk(self) -> dict[str, Any]:
        return {**self.private.as_dict(private=False), "kid": self.kid, "alg": self.alg, "use": "sig"}


def rsa_key(kid: str) -> SigningKey:
    k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub = k.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return SigningKey(kid, "RS256", RSAKey.import_key(_pem(k)), pub)


def ec_key(kid: str, curve: str) -> SigningKey:
    k = ec.generate_private_key(ec.SECP256R1() if curve == "P-256" else ec.SECP384R1())
    pub = k.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return SigningKey(kid, "ES256" if curve == "P-256" else "ES384", ECKey.import_key(_pem(k)), pub)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass
class Minter:
    """Makes access tokens for one audience."""

    key: SigningKey
    audience: str
    issuer: str = ISSUER

    def claims(self, scope: str, **extra: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": "user-1",
            "azp": "app-1",
            "iat": now,
            "exp": now + 300,
            "scope": scope,
        }
        claims.update(extra)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, scope: str, *, key: SigningKey | None = None, kid: str | None = None, **extra: Any) -> str:
        key = key or self.key
        header = {"alg": key.alg, "kid": kid or key.kid, "typ": "JWT"}
        return jwt.encode(header, self.claims(scope, **extra), key.private, algorithms=[key.alg])

    def unsigned(self, scope: str, **extra: Any) -> str:
        """``alg: none``."""
        header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
        return f"{header}.{b64url(json.dumps(self.claims(scope, **extra)).encode())}."

    def hs256_with_public_key(self, scope: str) -> str:
        """The classic key-confusion attack: HMAC "signed" with the server's public key as secret."""
        header = b64url(json.dumps({"alg": "HS256", "kid": self.key.kid, "typ": "JWT"}).encode())
        body = b64url(json.dumps(self.claims(scope)).encode())
        sig = hmac.new(self.key.public_pem, f"{header}.{body}".encode(), hashlib.sha256).digest()
        return f"{header}.{body}.{b64url(sig)}"


def headers(token: str | None, **more: str) -> dict[str, str]:
    out = {"Accept": "application/fhir+json", **more}
    if token:
        out["Authorization"] = f"Bearer {token}"
    return out


class JwksServer:
    """The authorization server's JWKS endpoint over real HTTP; counts fetches; keys can be rotated."""

    def __init__(self, keys: list[SigningKey]) -> None:
        self.keys = list(keys)
        self.fetches = 0

        async def jwks(request: Request) -> JSONResponse:
            self.fetches += 1
            return JSONResponse({"keys": [k.public_jwk() for k in self.keys]})

        self.server = ThreadServer(Starlette(routes=[Route("/jwks", jwks)]), factory=False)
        self.url = self.server.start() + "/jwks"

    def stop(self) -> None:
        self.server.stop()


def smart_settings(tmp: Path, database_url: str, base_url: str, jwks_url: str, **sections: dict[str, Any]) -> Settings:
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "base_url": base_url + "/fhir"},
        "backend": {"mapping": str(DEMO_MAPPING), "database_url": database_url, "pool_size": 4},
        "state": {"path": str(tmp / "state.sqlite")},
        "security": {
            "auth": "smart",
            "signing_secret": SECRET,
            "issuer": ISSUER,
            "audience": base_url + "/fhir",
            "jwks_url": jwks_url,
            "token_endpoint": ISSUER + "/protocol/openid-connect/token",
            "authorization_endpoint": ISSUER + "/protocol/openid-connect/auth",
        },
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return Settings.model_validate(data)


@dataclass
class RunningApp:
    base: str  # the FHIR base URL
    server: ThreadServer
    holder: dict[str, Any] = field(default_factory=dict)

    @property
    def app(self) -> Starlette:
        app: Starlette = self.holder["app"]
        return app

    def flush_audit(self) -> None:
        trail = self.app.state.audit
        assert trail is not None and trail.flush(30)


@contextmanager
def running_app(tmp: Path, database_url: str, jwks_url: str | None, **sections: dict[str, Any]) -> Iterator[RunningApp]:
    """uvicorn in a thread serving build_app(); SMART on when ``jwks_url`` is given, else auth off."""
    holder: dict[str, Any] = {}

    def factory() -> Starlette:
        holder["app"] = build_app(holder["settings"])
        return holder["app"]

    server = ThreadServer(factory, factory=True)
    if jwks_url is None:
        sections = {**sections, "security": {"auth": "off", **sections.get("security", {})}}
        holder["settings"] = smart_settings(tmp, database_url, server.base_url, "unused", **sections)
    else:
        holder["settings"] = smart_settings(tmp, database_url, server.base_url, jwks_url, **sections)
    server.start()
    try:
        yield RunningApp(server.base_url + "/fhir", server, holder)
    finally:
        server.stop()


# -- certificates ------------------------------------------------------------------------------------


@dataclass
class Cert:
    cert: Path
    key: Path


def make_ca(folder: Path, name: str = "Test CA") -> tuple[Cert, Any, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    slug = name.lower().replace(" ", "-")
    paths = Cert(folder / f"{slug}.pem", folder / f"{slug}.key")
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(_pem(key))
    return paths, key, cert


def issue_cert(folder: Path, ca_key: Any, ca_cert: x509.Certificate, name: str, *, client: bool = False) -> Cert:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.ExtendedKeyUsage(
                [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH if client else x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
    )
    if not client:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    paths = Cert(folder / f"{name}.pem", folder / f"{name}.key")
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(_pem(key))
    return paths
