"""Resource-server side of authentication, used by every service.

Access tokens are RFC 9068 JWTs signed by membership. A service verifies them locally:
signature against the JWKS (RS256 only, so ``alg: none`` and HS256-with-the-public-key
forgeries fail), ``typ`` ``at+jwt``, ``iss``, ``aud``, ``exp``, and the ``jti`` deny-list
that membership fills when it revokes live tokens (user deactivated, removed from a firm,
token revoked). Routes declare who may call them with ``Annotated`` aliases.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol

import httpx
from fastapi import Depends, Request
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from redis.asyncio import Redis

from services.kit.errors import InsufficientScope, Unauthorized
from services.kit.ratelimit import RateLimiter, enforce

ALGORITHMS = ("RS256",)
ACCESS_TOKEN_TYPES = ("at+jwt", "application/at+jwt")


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user (web client) or an integrator client acting for a firm."""

    kind: Literal["user", "client"]
    subject: str
    client_id: str
    firm_id: str | None
    scopes: frozenset[str]
    jti: str
    expires_at: int

    @property
    def user_id(self) -> str | None:
        return self.subject if self.kind == "user" else None

    def has(self, scope: str) -> bool:
        return scope in self.scopes


class DenyList(Protocol):
    async def add(self, jti: str, ttl: int) -> None: ...

    async def contains(self, jti: str) -> bool: ...


class MemoryDenyList:
    """Deny-list of one process (embedded mode)."""

    def __init__(self) -> None:
        self._entries: dict[str, float] = {}

    async def add(self, jti: str, ttl: int) -> None:
        now = time.monotonic()
        self._entries[jti] = now + max(ttl, 1)
        if len(self._entries) > 10_000:
            self._entries = {k: v for k, v in self._entries.items() if v > now}

    async def contains(self, jti: str) -> bool:
        until = self._entries.get(jti)
        return until is not None and until > time.monotonic()


class RedisDenyList:
    """Deny-list shared by every replica; entries expire with the tokens they deny."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix

    async def add(self, jti: str, ttl: int) -> None:
        await self.redis.set(f"{self.prefix}:deny:{jti}", b"1", ex=max(ttl, 1))

    async def contains(self, jti: str) -> bool:
        return bool(await self.redis.exists(f"{self.prefix}:deny:{jti}"))


class JwksSource(Protocol):
    async def key_set(self, *, refresh: bool = False) -> KeySet: ...


class LocalJwksSource:
    """Public keys read in-process from the key store (membership, or embedded mode)."""

    def __init__(self, load: Callable[[], Awaitable[dict[str, Any]]], ttl: float = 30.0) -> None:
        self._load = load
        self._ttl = ttl
        self._cached: tuple[float, KeySet] | None = None

    async def key_set(self, *, refresh: bool = False) -> KeySet:
        now = time.monotonic()
        if refresh or self._cached is None or now - self._cached[0] > self._ttl:
            self._cached = (now, KeySet.import_key_set(await self._load()))  # type: ignore[arg-type]
        return self._cached[1]


class HttpJwksSource:
    """Keys fetched from membership's ``jwks_uri``, cached, refreshed on an unknown ``kid``."""

    def __init__(self, url: str, ttl: float = 300.0, min_refresh_interval: float = 5.0) -> None:
        self.url = url
        self.ttl = ttl
        self.min_refresh_interval = min_refresh_interval
        self._cached: tuple[float, KeySet] | None = None
        self._lock = asyncio.Lock()

    async def key_set(self, *, refresh: bool = False) -> KeySet:
        now = time.monotonic()
        cached = self._cached
        stale = cached is None or now - cached[0] > self.ttl
        may_refresh = cached is None or now - cached[0] > self.min_refresh_interval
        if stale or (refresh and may_refresh):
            async with self._lock:
                async with httpx.AsyncClient(timeout=5) as client:
                    response = await client.get(self.url)
                    response.raise_for_status()
                self._cached = (time.monotonic(), KeySet.import_key_set(response.json()))
        assert self._cached is not None
        return self._cached[1]


def _b64json(segment: str) -> dict[str, Any]:
    padded = segment + "=" * (-len(segment) % 4)
    value = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    if not isinstance(value, dict):
        raise ValueError("not an object")
    return value


@dataclass
class TokenVerifier:
    issuer: str
    audience: str
    jwks: JwksSource
    denylist: DenyList
    leeway: int = 30
    _cache: OrderedDict[str, Principal] = field(default_factory=OrderedDict)
    cache_size: int = 20_000

    async def verify(self, token: str) -> Principal:
        """The principal of a valid access token; raises :class:`Unauthorized` otherwise."""
        principal = self._cache.get(token)
        if principal is None:
            principal = await self._verify_signature_and_claims(token)
            self._cache[token] = principal
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        if principal.expires_at + self.leeway < time.time():
            self._cache.pop(token, None)
            raise Unauthorized("The access token has expired.")
        if await self.denylist.contains(principal.jti):
            raise Unauthorized("The access token has been revoked.")
        return principal

    async def _verify_signature_and_claims(self, token: str) -> Principal:
        try:
            header_segment = token.split(".", 1)[0]
            header = _b64json(header_segment)
        except (ValueError, UnicodeError):
            raise Unauthorized("The access token is not a JWT.") from None
        if header.get("alg") not in ALGORITHMS:
            raise Unauthorized("The token's signing algorithm is not accepted.")
        if header.get("typ") not in ACCESS_TOKEN_TYPES:
            raise Unauthorized("The token is not an access token (typ).")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise Unauthorized("The token names no key.")
        key_set = await self.jwks.key_set()
        if not any(k.kid == kid for k in key_set.keys):
            key_set = await self.jwks.key_set(refresh=True)
            if not any(k.kid == kid for k in key_set.keys):
                raise Unauthorized("The token was signed by an unknown key.")
        try:
            decoded = jwt.decode(token, key_set, algorithms=list(ALGORITHMS))
            registry = jwt.JWTClaimsRegistry(
                leeway=self.leeway,
                iss={"essential": True, "value": self.issuer},
                aud={"essential": True, "value": self.audience},
                exp={"essential": True},
                sub={"essential": True},
                jti={"essential": True},
                client_id={"essential": True},
            )
            registry.validate(decoded.claims)
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            raise Unauthorized(f"The access token is invalid: {type(exc).__name__}.") from None
        claims = decoded.claims
        scopes = frozenset(str(claims.get("scope", "")).split())
        kind: Literal["user", "client"] = (
            "client" if claims.get("sub") == claims.get("client_id") else "user"
        )
        return Principal(
            kind=kind,
            subject=str(claims["sub"]),
            client_id=str(claims["client_id"]),
            firm_id=claims.get("firm_id"),
            scopes=scopes,
            jti=str(claims["jti"]),
            expires_at=int(claims["exp"]),
        )


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise Unauthorized("A bearer token is required.", error=None)
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Use the Bearer scheme.", error="invalid_request")
    return token.strip()


async def authenticate(request: Request) -> Principal:
    """The caller's principal, after verification and the per-principal rate limit."""
    cached = getattr(request.state, "principal", None)
    if cached is not None:
        return cached
    verifier: TokenVerifier = request.app.state.verifier
    principal = await verifier.verify(bearer_token(request))
    limiter: RateLimiter = request.app.state.rate_limiter
    settings = request.app.state.settings
    await enforce(limiter, f"principal:{principal.subject}", settings.rate_limit_per_minute, 60)
    if principal.firm_id:
        await enforce(limiter, f"firm:{principal.firm_id}", settings.firm_rate_limit_per_minute, 60)
    request.state.principal = principal
    return principal


def require_scope(*scopes: str) -> Callable[[Principal], Awaitable[Principal]]:
    """A dependency that demands every scope in ``scopes``."""

    async def dependency(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        missing = [s for s in scopes if s not in principal.scopes]
        if missing:
            raise InsufficientScope(f"Missing scope: {' '.join(missing)}.", required=missing)
        return principal

    return dependency


async def require_user(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
    if principal.kind != "user":
        raise InsufficientScope("This operation needs a user's token, not a client's.")
    return principal


CurrentPrincipal = Annotated[Principal, Depends(authenticate)]
CurrentUser = Annotated[Principal, Depends(require_user)]
