"""Bearer access tokens: JWTs signed by the authorization server, checked with ``joserfc``.

Only asymmetric signatures are accepted (RS256, ES256, ES384): ``alg: none`` and every HMAC
algorithm are refused before any key is looked at, so a token "signed" with the server's public
key as an HMAC secret cannot pass. Keys come from a JWKS document (URL or file). The URL is
fetched in a worker thread, kept, and fetched again when a token names an unknown ``kid`` (key
rotation), at most once per ``refresh_seconds`` so that a flood of made-up ``kid`` values cannot
turn the server into a load generator against the authorization server.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey, import_key

from adapter.security.scopes import Scope, parse_scopes

log = logging.getLogger("adapter.security")

ALGORITHMS = ("RS256", "ES256", "ES384")
_KEY_TYPES = {"RS256": "RSA", "ES256": "EC", "ES384": "EC"}


class TokenError(Exception):
    """The token cannot be used: 401 with ``WWW-Authenticate: Bearer error="invalid_token"``."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as the validated token says."""

    subject: str | None
    client_id: str | None
    scopes: tuple[Scope, ...]
    patient: str | None = None
    fhir_user: str | None = None
    name: str | None = None
    issuer: str | None = None
    claims: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def party(self) -> str:
        """The identity holds and idempotency keys belong to: the client, and the user acting through it."""
        client = self.client_id or "-"
        return f"{client}|{self.subject}" if self.subject and self.subject != self.client_id else client


class JwksSource:
    """The authorization server's public keys, by ``kid``; thread-safe, refreshed on unknown ``kid``."""

    def __init__(
        self,
        *,
        url: str | None = None,
        file: Path | None = None,
        refresh_seconds: float = 60.0,
        timeout_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not url and not file:
            raise ValueError("a JWKS needs a URL or a file")
        self.url = url
        self.file = file
        self.refresh_seconds = refresh_seconds
        self.timeout_seconds = timeout_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, RSAKey | ECKey] = {}
        self._loaded_at: float | None = None
        self.fetches = 0

    def _read(self) -> Any:
        if self.file is not None:
            return json.loads(Path(self.file).read_text(encoding="utf-8"))
        assert self.url is not None
        req = urllib.request.Request(self.url, headers={"Accept": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout_seconds) as resp:
            return json.loads(resp.read())

    def _load(self) -> None:
        self.fetches += 1
        self._loaded_at = self._clock()
        try:
            doc = self._read()
        except (OSError, ValueError) as exc:
            log.warning("cannot load the JWKS from %s: %s", self.url or self.file, exc)
            return
        keys: dict[str, RSAKey | ECKey] = {}
        for entry in doc.get("keys", []) if isinstance(doc, dict) else []:
            if not isinstance(entry, dict) or entry.get("kty") not in ("RSA", "EC") or entry.get("use", "sig") != "sig":
                continue
            try:
                key = import_key(entry)
            except (JoseError, ValueError, TypeError) as exc:
                log.warning("JWKS key %r skipped: %s", entry.get("kid"), exc)
                continue
            if isinstance(key, RSAKey | ECKey):
                keys[str(entry.get("kid") or "")] = key
        self._keys = keys

    def key(self, kid: str | None) -> RSAKey | ECKey | None:
        """The key for ``kid`` (a token without ``kid`` only works with a one-key set); blocking."""
        with self._lock:
            if self._loaded_at is None:
                self._load()
            found = self._pick(kid)
            assert self._loaded_at is not None
            if found is None and self._clock() - self._loaded_at >= self.refresh_seconds:
                self._load()
                found = self._pick(kid)
            return found

    def _pick(self, kid: str | None) -> RSAKey | ECKey | None:
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)


class Introspector:
    """RFC 7662 token introspection for opaque access tokens, with a short cache of active answers.

    The cache key is a hash of the token (the token itself is not kept); an active answer is reused
    for at most ``cache_seconds`` and never beyond the token's ``exp``. Inactive answers are not
    cached, so a token that becomes active (clock skew at the authorization server) is not refused
    for longer than one request.
    """

    def __init__(
        self,
        url: str,
        *,
        client_id: str | None = None,
        client_secret: str | None = None,
        timeout_seconds: float = 5.0,
        cache_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self.timeout_seconds = timeout_seconds
        self.cache_seconds = cache_seconds
        self._clock = clock
        self._auth: str | None = None
        if client_id:
            pair = f"{urllib.parse.quote(client_id, safe='')}:{urllib.parse.quote(client_secret or '', safe='')}"
            self._auth = "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self.calls = 0

    def introspect(self, token: str) -> dict[str, Any]:
        digest = hashlib.sha256(token.encode("utf-8")).hexdigest()
        now = self._clock()
        with self._lock:
            hit = self._cache.get(digest)
            if hit is not None and hit[0] > now:
                return hit[1]
        answer = self._ask(token)
        if answer.get("active") is True:
            until = now + self.cache_seconds
            exp = answer.get("exp")
            if isinstance(exp, int | float) and not isinstance(exp, bool):
                until = min(until, float(exp))
            with self._lock:
                if len(self._cache) > 10_000:
                    self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
                self._cache[digest] = (until, answer)
        return answer

    def _ask(self, token: str) -> dict[str, Any]:
        self.calls += 1
        data = urllib.parse.urlencode({"token": token, "token_type_hint": "access_token"}).encode("ascii")
        headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
        if self._auth:
            headers["Authorization"] = self._auth
        req = urllib.request.Request(self.url, data=data, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_seconds) as resp:
                answer = json.loads(resp.read())
        except (OSError, ValueError) as exc:
            log.warning("token introspection at %s failed: %s", self.url, exc)
            raise TokenError("the token cannot be checked right now (introspection failed)") from None
        if not isinstance(answer, dict):
            raise TokenError("the introspection answer is not a JSON object")
        return answer


class TokenValidator:
    def __init__(
        self,
        keys: JwksSource | None,
        *,
        issuer: str,
        audience: str,
        leeway_seconds: int = 60,
        introspector: Introspector | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if keys is None and introspector is None:
            raise ValueError("a token validator needs a JWKS or an introspection endpoint")
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway_seconds
        self.introspector = introspector
        self._clock = clock

    async def validate(self, token: str) -> Principal:
        """Validate off the event loop (the key lookup may fetch the JWKS; introspection is a call)."""
        return await asyncio.to_thread(self.validate_blocking, token)

    def validate_blocking(self, token: str) -> Principal:
        if self.keys is None or (self.introspector is not None and token.count(".") != 2):
            return self._introspected(token)
        return self._jwt(token)

    def _introspected(self, token: str) -> Principal:
        assert self.introspector is not None
        claims = self.introspector.introspect(token)
        if claims.get("active") is not True:
            raise TokenError("the token is not active (revoked, expired or unknown)")
        # RFC 7662 makes iss, aud and exp optional in the answer: checked when given.
        if claims.get("iss") is not None and claims.get("iss") != self.issuer:
            raise TokenError("the token was issued by another authorization server")
        if claims.get("aud") is not None:
            aud = claims["aud"]
            if self.audience not in (aud if isinstance(aud, list) else [aud]):
                raise TokenError("the token is meant for another audience")
        exp = claims.get("exp")
        if isinstance(exp, int | float) and not isinstance(exp, bool) and self._clock() > exp + self.leeway:
            raise TokenError("the token has expired")
        return _principal(claims)

    def _jwt(self, token: str) -> Principal:
        assert self.keys is not None
        try:
            header = jws.extract_compact(token.encode("ascii")).headers()
        except (JoseError, ValueError, UnicodeError) as exc:
            raise TokenError("the access token is not a well-formed JWT") from exc
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise TokenError(f"the token's signature algorithm {alg!r} is not accepted (only {', '.join(ALGORITHMS)})")
        kid = header.get("kid")
        key = self.keys.key(str(kid) if kid is not None else None)
        if key is None:
            raise TokenError("the token was not signed with a key of the authorization server (unknown kid)")
        if key.key_type != _KEY_TYPES[str(alg)]:
            raise TokenError("the token's algorithm does not fit its key")
        try:
            claims = jwt.decode(token, key, algorithms=[str(alg)]).claims
        except JoseError as exc:
            raise TokenError("the token's signature is not valid") from exc
        self._check_claims(claims)
        return _principal(claims)

    def _check_claims(self, claims: dict[str, Any]) -> None:
        now = self._clock()
        if claims.get("iss") != self.issuer:
            raise TokenError("the token was issued by another authorization server")
        aud = claims.get("aud")
        audiences = aud if isinstance(aud, list) else [aud]
        if self.audience not in audiences:
            raise TokenError("the token is meant for another audience")
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise TokenError("the token has no expiry (exp)")
        if now > exp + self.leeway:
            raise TokenError("the token has expired")
        nbf = claims.get("nbf")
        if nbf is not None and (not isinstance(nbf, int | float) or now + self.leeway < nbf):
            raise TokenError("the token is not valid yet (nbf)")
        iat = claims.get("iat")
        if iat is not None and isinstance(iat, int | float) and now + self.leeway < iat:
            raise TokenError("the token was issued in the future (iat)")


def _text(value: Any) -> str | None:
    return str(value) if isinstance(value, str | int) and not isinstance(value, bool) and str(value) else None


def _principal(claims: dict[str, Any]) -> Principal:
    raw_scope = claims.get("scope", claims.get("scp", ""))
    scope_text = " ".join(raw_scope) if isinstance(raw_scope, list) else str(raw_scope or "")
    return Principal(
        subject=_text(claims.get("sub")),
        client_id=_text(claims.get("client_id")) or _text(claims.get("azp")),
        scopes=parse_scopes(scope_text),
        patient=_text(claims.get("patient")),
        fhir_user=_text(claims.get("fhirUser")),
        name=_text(claims.get("name")) or _text(claims.get("preferred_username")),
        issuer=_text(claims.get("iss")),
        claims=claims,
    )
