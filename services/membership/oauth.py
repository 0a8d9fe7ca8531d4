"""The OAuth 2 authorization server, on Authlib's framework-free core.

Authlib's grant machinery is synchronous. Routes await the request body, build an
:class:`OAuthRequest`, and call :meth:`OAuthServer.run` in a worker thread; ``run`` opens
one synchronous database transaction, makes it available to every hook through a
context variable, and returns the framework-neutral :class:`OAuthResponse` together with
the :class:`Effects` that must happen *after* the commit (deny-listing access tokens in
the shared deny-list).

Security decisions, each against a known Authlib pitfall (see REFERENCES.md):

* Headers are Starlette's case-insensitive ``Headers``, so Basic client auth works.
* Confidential clients authenticate with ``client_secret_basic`` *or*
  ``client_secret_post`` on every endpoint, whatever their registration says.
* Client secrets are high-entropy random strings generated here, so they are stored as
  SHA-256 digests and compared with :func:`hmac.compare_digest`; a slow password hash
  (argon2) would add nothing against guessing a 256-bit secret and would make every
  client-credentials request cost tens of milliseconds of CPU. Authorization codes and
  refresh tokens are stored as SHA-256 digests too; the plain values exist only in the
  responses.
* Access tokens live ``settings.access_token_ttl`` seconds, never Authlib's defaults.
* PKCE with ``S256`` is required on every authorization request; ``plain`` and a
  missing challenge are refused.
* A code is consumed with one conditional ``UPDATE … WHERE used_at IS NULL`` inside the
  grant, before any token is issued, so of two concurrent exchanges exactly one wins.
  A replayed code revokes everything issued from it (RFC 6749 §4.1.2).
* Refresh tokens rotate on every use; presenting one that was already used revokes the
  whole family (all its refresh tokens, and its live access tokens are deny-listed).
* There is no password grant: such requests get ``unsupported_grant_type``.
* Plain ``http`` is accepted only when ``settings.insecure_transport_allowed``; the
  decision is made per server from the settings, not from a process-wide variable.
* ``sub`` is always a string.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

import sqlalchemy as sa
from authlib.common.security import is_secure_transport
from authlib.oauth2.rfc6749 import (
    AuthorizationServer,
    ClientMixin,
    InsecureTransportError,
    InvalidGrantError,
    InvalidRequestError,
    JsonRequest,
    OAuth2Request,
)
from authlib.oauth2.rfc6749.grants import (
    AuthorizationCodeGrant,
    ClientCredentialsGrant,
    RefreshTokenGrant,
)
from authlib.oauth2.rfc6749.requests import JsonPayload, OAuth2Payload
from authlib.oauth2.rfc6749.util import scope_to_list
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc7636.challenge import compare_s256_code_challenge
from authlib.oauth2.rfc7662 import IntrospectionEndpoint
from authlib.oauth2.rfc9068 import JWTBearerTokenGenerator
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from sqlalchemy.orm import Session
from sqlmodel import col

from services.kit.db import Database, utcnow
from services.kit.ids import new_id
from services.kit.scopes import ALL_SCOPES
from services.kit.settings import Settings
from services.membership import audit
from services.membership.keys import KeyStore
from services.membership.models import (
    AccessToken,
    AuthorizationCode,
    FirmMember,
    OAuthClient,
    RefreshToken,
    User,
)

log = logging.getLogger("onecluster.membership.oauth")

T = TypeVar("T")

CLIENT_SECRET_PREFIX = "ocs_"
CONFIDENTIAL_AUTH_METHODS = ("client_secret_basic", "client_secret_post")
ALL_AUTH_METHODS = [*CONFIDENTIAL_AUTH_METHODS, "none"]
GRANT_TYPES = ("authorization_code", "refresh_token", "client_credentials")
# Margin added to a deny-list entry's life: the verifiers accept 30 s of clock leeway.
DENY_MARGIN = 60
MAX_PARAM_LENGTH = 2000

_session: ContextVar[Session] = ContextVar("oauth_session")
_effects: ContextVar[Effects] = ContextVar("oauth_effects")


# -- hashing -----------------------------------------------------------------------------
def hash_token(value: str) -> str:
    """The stored form of a code or refresh token (SHA-256, hex)."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def generate_client_secret() -> str:
    return CLIENT_SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_client_secret(secret: str) -> str:
    return "sha256$" + hash_token(secret)


def verify_client_secret(stored: str | None, presented: str) -> bool:
    if not stored or not presented:
        return False
    return hmac.compare_digest(stored.encode(), hash_client_secret(presented).encode())


def family_of_code(code_hash: str) -> str:
    """The refresh-token family born from a code; a replay of the code revokes it."""
    return "fam_" + code_hash[:32]


# -- per-call state ------------------------------------------------------------------------
@dataclass
class Effects:
    """What must happen after the transaction commits."""

    deny: list[tuple[str, int]] = field(default_factory=list)


def session() -> Session:
    return _session.get()


def effects() -> Effects:
    return _effects.get()


def _deny_ttl(expires_at: datetime, now: datetime) -> int:
    return max(1, int((expires_at - now).total_seconds())) + DENY_MARGIN


# -- client, user and token records handed to Authlib -------------------------------------
def _loopback(host: str | None) -> bool:
    return host in ("127.0.0.1", "::1")


def redirect_uri_allowed(registered: Iterable[str], candidate: str) -> bool:
    """Exact match, or RFC 8252 §7.3: a loopback URI matches whatever its port."""
    registered = list(registered)
    if candidate in registered:
        return True
    try:
        cand = urlsplit(candidate)
        cand_port = cand.port
    except ValueError:
        return False
    if cand.scheme != "http" or not _loopback(cand.hostname) or cand.fragment:
        return False
    del cand_port  # any port (parsed only to refuse malformed ones)
    for uri in registered:
        reg = urlsplit(uri)
        if (
            reg.scheme == "http"
            and _loopback(reg.hostname)
            and reg.hostname == cand.hostname
            and reg.path == cand.path
            and reg.query == cand.query
        ):
            return True
    return False


@dataclass(frozen=True)
class Client(ClientMixin):
    """A snapshot of an ``oauth_clients`` row, usable after its session closed."""

    client_id: str
    firm_id: str | None
    name: str
    kind: str
    secret_hash: str | None
    scope: str
    redirect_uris: tuple[str, ...]
    grant_types: tuple[str, ...]
    token_endpoint_auth_method: str

    @classmethod
    def of(cls, row: OAuthClient) -> Client:
        return cls(
            client_id=row.id,
            firm_id=row.firm_id,
            name=row.name,
            kind=row.kind,
            secret_hash=row.secret_hash,
            scope=row.scope,
            redirect_uris=tuple(row.redirect_uris or ()),
            grant_types=tuple(row.grant_types or ()),
            token_endpoint_auth_method=row.token_endpoint_auth_method,
        )

    @property
    def public(self) -> bool:
        return self.kind == "public"

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        # Only an unambiguous default; with several registered URIs the client must say.
        return self.redirect_uris[0] if len(self.redirect_uris) == 1 else None

    def get_allowed_scope(self, scope: str | None) -> str | None:
        """The client's whole scope when none is asked; None (invalid_scope) when the
        request names a scope the client was not given, rather than silently narrowing."""
        allowed = scope_to_list(self.scope) or []
        if not scope:
            return " ".join(allowed)
        requested = list(dict.fromkeys(scope_to_list(scope) or []))
        if not set(requested) <= set(allowed):
            return None
        return " ".join(requested)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri_allowed(self.redirect_uris, redirect_uri)

    def check_client_secret(self, client_secret: str) -> bool:
        return not self.public and verify_client_secret(self.secret_hash, client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        if self.public:
            # A public client has no secret; it may still revoke its own tokens (RFC 7009),
            # but it may not introspect.
            return method == "none" and endpoint in ("token", "revocation")
        return method in CONFIDENTIAL_AUTH_METHODS

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code" and "authorization_code" in self.grant_types

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.grant_types


@dataclass(frozen=True)
class Subject:
    """The resource owner of a grant, with what the token must say about the session."""

    user_id: str
    firm_id: str | None
    auth_time: int
    family_id: str | None = None

    def get_user_id(self) -> str:
        return self.user_id


@dataclass(frozen=True)
class CodeRecord:
    code_hash: str
    client_id: str
    user_id: str
    firm_id: str | None
    redirect_uri: str
    scope: str
    code_challenge: str
    code_challenge_method: str
    auth_time: int

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope


@dataclass(frozen=True)
class TokenRecord:
    """An access or refresh token as the revocation and introspection endpoints see it."""

    kind: str  # access_token | refresh_token
    key: str  # jti, or the refresh token's row id
    client_id: str
    subject: str
    firm_id: str | None
    scope: str
    family_id: str | None
    issued_at: datetime
    expires_at: datetime
    revoked: bool
    user_active: bool = True

    # -- TokenMixin --
    def check_client(self, client: Client) -> bool:
        return self.client_id == client.client_id

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return max(0, int((self.expires_at - self.issued_at).total_seconds()))

    def is_expired(self) -> bool:
        return self.expires_at <= utcnow()

    def is_revoked(self) -> bool:
        return self.revoked or not self.user_active


# -- requests and responses -----------------------------------------------------------------
_VSCHAR = re.compile(r"^[\x20-\x7e]*$")
_RESPONSE_TYPE = re.compile(r"^[A-Za-z0-9_ ]*$")


def check_parameters(items: Sequence[tuple[str, str]]) -> None:
    """Refuse values RFC 6749 (Appendix A) does not allow, before Authlib sees them.

    Every parameter we accept is printable ASCII (VSCHAR); ``response_type`` is letters,
    digits and ``_``; a ``redirect_uri`` is a URI, so it has no ``"`` or backslash.
    Besides being right, this matters because Authlib copies ``response_type`` and
    ``redirect_uri`` into error descriptions and raises a plain ``ValueError`` (a 500)
    when a description would contain such characters. Names and values are not echoed.
    """
    for name, value in items:
        if len(value) > MAX_PARAM_LENGTH * 4 or not _VSCHAR.match(name) or not _VSCHAR.match(value):
            raise InvalidRequestError("Parameters must be printable ASCII (RFC 6749 Appendix A).")
        if name == "response_type" and not _RESPONSE_TYPE.match(value):
            raise InvalidRequestError("Invalid 'response_type'.")
        if name == "redirect_uri" and ('"' in value or "\\" in value):
            raise InvalidRequestError("Invalid 'redirect_uri'.")


class _Payload(OAuth2Payload):
    def __init__(self, items: Sequence[tuple[str, str]]) -> None:
        self._datalist: dict[str, list[str]] = {}
        for key, value in items:
            self._datalist.setdefault(key, []).append(value)
        self._data = {key: values[0] for key, values in self._datalist.items()}

    @property
    def data(self) -> dict[str, str]:
        return self._data

    @property
    def datalist(self) -> dict[str, list[str]]:
        return self._datalist


class OAuthRequest(OAuth2Request):
    """An OAuth 2 request built from Starlette data: case-insensitive headers, the query
    (authorization endpoint) or form (token-type endpoints) as the payload."""

    def __init__(
        self,
        method: str,
        uri: str,
        headers: Mapping[str, str],
        items: Sequence[tuple[str, str]],
        *,
        is_form: bool,
    ) -> None:
        # Authlib's constructor refuses http unless AUTHLIB_INSECURE_TRANSPORT is set for
        # the whole process; OAuthServer.build_request has already judged the transport
        # from the settings, so the constructor is shown the https form of the URI.
        super().__init__(method, _as_https(uri), headers=headers)
        self.uri = uri
        self.payload = _Payload(items)
        self._form = dict(self.payload.data) if is_form else {}
        self._args = {} if is_form else dict(self.payload.data)

    @property
    def form(self) -> dict[str, str]:
        return self._form

    @property
    def args(self) -> dict[str, str]:
        return self._args


class _JsonPayload(JsonPayload):
    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    @property
    def data(self) -> dict[str, Any]:
        return self._data


def _as_https(uri: str) -> str:
    parts = urlsplit(uri)
    return parts._replace(scheme="https").geturl() if parts.scheme == "http" else uri


@dataclass
class OAuthResponse:
    """What Authlib answered, independent of the web framework."""

    status: int
    body: dict[str, Any] | str
    headers: list[tuple[str, str]]


# -- access tokens ----------------------------------------------------------------------------
class AccessTokenGenerator(JWTBearerTokenGenerator):
    """RFC 9068 JWTs: RS256 with ``typ: at+jwt`` and ``kid``, our audience, our lifetime,
    a ``jti`` from the platform's id scheme and a ``firm_id`` claim."""

    def __init__(self, settings: Settings, keys: KeyStore) -> None:
        super().__init__(
            issuer=settings.issuer,
            alg="RS256",
            refresh_token_generator=lambda **_: secrets.token_urlsafe(48),
            expires_generator=lambda client, grant_type: settings.access_token_ttl,
        )
        self.settings = settings
        self.keys = keys

    def get_jwks(self) -> KeySet:
        # A set holding only the signing key: joserfc picks it and writes its kid.
        _, key = self.keys.signing_key_sync()
        return KeySet([key])

    def get_audiences(self, client: Client, user: Subject | None, scope: str) -> str:
        return self.settings.token_audience

    def get_jti(self, client: Client, grant_type: str, user: Subject | None, scope: str) -> str:
        return new_id("jti")

    def get_auth_time(self, user: Subject | None) -> int | None:
        return user.auth_time if user is not None else None

    def get_extra_claims(
        self, client: Client, grant_type: str, user: Subject | None, scope: str
    ) -> dict[str, Any]:
        firm_id = user.firm_id if user is not None else client.firm_id
        return {"firm_id": firm_id} if firm_id else {}


def unverified_claims(token: str) -> dict[str, Any]:
    """Claims of a JWT we have just signed ourselves (no need to check our own signature)."""
    segment = token.split(".")[1]
    value = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    assert isinstance(value, dict)
    return value


def _ts(value: int) -> datetime:
    return datetime.fromtimestamp(int(value), UTC)


# -- firms ---------------------------------------------------------------------------------
def memberships_query(user_id: str) -> sa.Select[str]:
    """The firms a user actively belongs to, earliest membership first."""
    return (
        sa.select(col(FirmMember.firm_id))
        .where(col(FirmMember.user_id) == user_id, col(FirmMember.status) == "active")
        .order_by(col(FirmMember.created_at), col(FirmMember.id))
    )


def choose_firm(member_of: Sequence[str], preferred: str | None) -> str | None:
    """The preferred firm when the user still belongs to it, else the earliest, else none."""
    if preferred and preferred in member_of:
        return preferred
    return member_of[0] if member_of else None


def firm_for_user_sync(user_id: str, preferred: str | None) -> str | None:
    firms = list(session().execute(memberships_query(user_id)).scalars().all())
    return choose_firm(firms, preferred)


def _active_user_sync(user_id: str) -> User | None:
    user = session().get(User, user_id)
    return user if user is not None and user.is_active else None


# -- revocation helpers (sync, inside OAuthServer.run) ------------------------------------
def revoke_family_sync(family_id: str) -> int:
    """Revoke every refresh token of a family and every live access token issued in it."""
    db = session()
    now = utcnow()
    db.execute(
        sa.update(RefreshToken)
        .where(col(RefreshToken.family_id) == family_id, col(RefreshToken.revoked_at).is_(None))
        .values(revoked_at=now)
        .execution_options(synchronize_session=False)
    )
    return _revoke_access_tokens_sync(AccessToken.family_id == family_id, now)


def _revoke_access_tokens_sync(condition: Any, now: datetime) -> int:
    db = session()
    live = (
        db.execute(
            sa.select(AccessToken).where(
                condition,
                col(AccessToken.expires_at) > now,
                col(AccessToken.revoked_at).is_(None),
            )
        )
        .scalars()
        .all()
    )
    for token in live:
        token.revoked_at = now
        effects().deny.append((token.jti, _deny_ttl(token.expires_at, now)))
    return len(live)


def _audit_sync(action: str, **kwargs: Any) -> None:
    # ``audit.record`` only calls ``session.add``; a sync session serves as well.
    audit.record(session(), None, action, **kwargs)  # type: ignore[arg-type]


# -- grants ----------------------------------------------------------------------------------
class S256CodeChallenge(CodeChallenge):
    """PKCE, S256 only, on every authorization request, confidential clients included."""

    DEFAULT_CODE_CHALLENGE_METHOD = "S256"
    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]
    CODE_CHALLENGE_METHODS = {"S256": compare_s256_code_challenge}

    def validate_code_challenge(self, grant: AuthorizationCodeGrant, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if not data.get("code_challenge"):
            raise InvalidRequestError("PKCE is required: send a code_challenge (S256).")
        if data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("Only code_challenge_method=S256 is supported.")
        super().validate_code_challenge(grant, redirect_uri)

    def validate_code_verifier(self, grant: AuthorizationCodeGrant, result: Any) -> None:
        if not grant.request.form.get("code_verifier"):
            raise InvalidRequestError("Missing 'code_verifier'.")
        super().validate_code_verifier(grant, result)


class CodeGrant(AuthorizationCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ALL_AUTH_METHODS
    server: OAuthServer

    def validate_authorization_request(self) -> str:
        redirect_uri: str = super().validate_authorization_request()
        datalist = self.request.payload.datalist
        for name in ("firm_id", "nonce", "code_challenge", "code_challenge_method"):
            if len(datalist.get(name, [])) > 1:
                raise InvalidRequestError(
                    f"Multiple '{name}' in request.", redirect_uri=redirect_uri
                )
        firm_id = self.request.payload.data.get("firm_id")
        if firm_id is not None and (not firm_id or len(firm_id) > 40 or not firm_id.isascii()):
            raise InvalidRequestError("Invalid 'firm_id'.", redirect_uri=redirect_uri)
        nonce = self.request.payload.data.get("nonce")
        if nonce is not None and len(nonce) > 255:
            raise InvalidRequestError("Invalid 'nonce'.", redirect_uri=redirect_uri)
        return redirect_uri

    def save_authorization_code(self, code: str, request: OAuthRequest) -> None:
        subject: Subject = request.user
        data = request.payload.data
        session().add(
            AuthorizationCode(
                code_hash=hash_token(code),
                client_id=request.client.client_id,
                user_id=subject.user_id,
                firm_id=subject.firm_id,
                # As sent: the token request must repeat it only if it was sent.
                redirect_uri=request.payload.redirect_uri or "",
                scope=request.scope or "",
                code_challenge=data["code_challenge"],
                code_challenge_method=data["code_challenge_method"],
                nonce=data.get("nonce"),
                auth_time=subject.auth_time,
                expires_at=utcnow()
                + timedelta(seconds=self.server.settings.authorization_code_ttl),
            )
        )

    def query_authorization_code(self, code: str, client: Client) -> CodeRecord | None:
        if len(code) > MAX_PARAM_LENGTH:
            return None
        row = session().get(AuthorizationCode, hash_token(code))
        if row is None or row.client_id != client.client_id:
            return None
        if row.used_at is not None:
            self._replayed(row.code_hash, row.client_id, row.user_id)
            return None
        if row.expires_at <= utcnow():
            return None
        return CodeRecord(
            code_hash=row.code_hash,
            client_id=row.client_id,
            user_id=row.user_id,
            firm_id=row.firm_id,
            redirect_uri=row.redirect_uri,
            scope=row.scope,
            code_challenge=row.code_challenge,
            code_challenge_method=row.code_challenge_method,
            auth_time=row.auth_time,
        )

    def _replayed(self, code_hash: str, client_id: str, user_id: str) -> None:
        revoked = revoke_family_sync(family_of_code(code_hash))
        _audit_sync(
            "oauth.code_replayed",
            target_kind="user",
            target_id=user_id,
            outcome="denied",
            detail={"client_id": client_id, "access_tokens_revoked": revoked},
        )

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        code: CodeRecord = self.request.authorization_code
        consumed = session().execute(
            sa.update(AuthorizationCode)
            .where(
                col(AuthorizationCode.code_hash) == code.code_hash,
                col(AuthorizationCode.used_at).is_(None),
            )
            .values(used_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        if consumed.rowcount != 1:  # type: ignore[attr-defined]
            # Another exchange of this code won the race: treat it as a replay.
            self._replayed(code.code_hash, code.client_id, code.user_id)
            raise InvalidGrantError("The authorization code has already been used.")
        return super().create_token_response()

    def delete_authorization_code(self, authorization_code: CodeRecord) -> None:
        """Kept, marked used, until it expires: that is how a replay is recognised."""

    def authenticate_user(self, authorization_code: CodeRecord) -> Subject:
        user = _active_user_sync(authorization_code.user_id)
        if user is None:
            raise InvalidGrantError("The user of this code is not active.")
        return Subject(
            user_id=user.id,
            firm_id=firm_for_user_sync(user.id, authorization_code.firm_id),
            auth_time=authorization_code.auth_time,
            family_id=family_of_code(authorization_code.code_hash),
        )


@dataclass(frozen=True)
class RefreshRecord:
    id: str
    family_id: str
    client_id: str
    user_id: str
    firm_id: str | None
    scope: str

    def check_client(self, client: Client) -> bool:
        return self.client_id == client.client_id

    def get_scope(self) -> str:
        return self.scope


class RefreshGrant(RefreshTokenGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ALL_AUTH_METHODS
    INCLUDE_NEW_REFRESH_TOKEN = True

    def authenticate_refresh_token(self, refresh_token: str) -> RefreshRecord | None:
        if len(refresh_token) > MAX_PARAM_LENGTH:
            return None
        row = (
            session()
            .execute(
                sa.select(RefreshToken).where(
                    col(RefreshToken.token_hash) == hash_token(refresh_token)
                )
            )
            .scalars()
            .first()
        )
        client: Client = self.request.client
        if row is None or row.client_id != client.client_id or row.revoked_at is not None:
            return None
        if row.used_at is not None:
            self._reused(row.family_id, row.client_id, row.user_id)
            raise InvalidGrantError(
                "The refresh token was already used; its whole session has been revoked."
            )
        if row.expires_at <= utcnow():
            return None
        return RefreshRecord(
            id=row.id,
            family_id=row.family_id,
            client_id=row.client_id,
            user_id=row.user_id,
            firm_id=row.firm_id,
            scope=row.scope,
        )

    def _reused(self, family_id: str, client_id: str, user_id: str) -> None:
        revoked = revoke_family_sync(family_id)
        _audit_sync(
            "oauth.refresh_family_revoked",
            target_kind="user",
            target_id=user_id,
            outcome="denied",
            detail={
                "client_id": client_id,
                "family_id": family_id,
                "access_tokens_revoked": revoked,
            },
        )

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        record: RefreshRecord = self.request.refresh_token
        used = session().execute(
            sa.update(RefreshToken)
            .where(
                col(RefreshToken.id) == record.id,
                col(RefreshToken.used_at).is_(None),
                col(RefreshToken.revoked_at).is_(None),
            )
            .values(used_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        if used.rowcount != 1:  # type: ignore[attr-defined]
            self._reused(record.family_id, record.client_id, record.user_id)
            raise InvalidGrantError(
                "The refresh token was already used; its whole session has been revoked."
            )
        return super().create_token_response()

    def authenticate_user(self, refresh_token: RefreshRecord) -> Subject:
        user = _active_user_sync(refresh_token.user_id)
        if user is None:
            raise InvalidGrantError("The user of this refresh token is not active.")
        return Subject(
            user_id=user.id,
            firm_id=firm_for_user_sync(user.id, refresh_token.firm_id),
            auth_time=int(self._auth_time(refresh_token.family_id)),
            family_id=refresh_token.family_id,
        )

    def _auth_time(self, family_id: str) -> int:
        """When the user signed in: the earliest token of the family carries it."""
        issued = (
            session()
            .execute(
                sa.select(sa.func.min(col(RefreshToken.issued_at))).where(
                    col(RefreshToken.family_id) == family_id
                )
            )
            .scalar()
        )
        return int(issued.timestamp()) if issued is not None else int(utcnow().timestamp())

    def revoke_old_credential(self, refresh_token: RefreshRecord) -> None:
        """Already marked used, atomically, before the new tokens were issued."""


class ClientCredentials(ClientCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = list(CONFIDENTIAL_AUTH_METHODS)


# -- revocation and introspection --------------------------------------------------------------
class _TokenLookup:
    server: OAuthServer

    def query_token(self, token_string: str, token_type_hint: str | None) -> TokenRecord | None:
        if len(token_string) > 8192:
            return None
        finders = [self.server.find_access_token, self.server.find_refresh_token]
        if token_type_hint == "refresh_token":
            finders.reverse()
        for find in finders:
            record = find(token_string)
            if record is not None:
                return record
        return None


class Revocation(_TokenLookup, RevocationEndpoint):
    """RFC 7009. Revoking a refresh token revokes its family; revoking an access token
    deny-lists its ``jti`` so every service refuses it at once."""

    CLIENT_AUTH_METHODS = ALL_AUTH_METHODS

    def revoke_token(self, token: TokenRecord, request: OAuthRequest) -> None:
        now = utcnow()
        if token.kind == "refresh_token" and token.family_id:
            revoked = revoke_family_sync(token.family_id)
        else:
            revoked = _revoke_access_tokens_sync(AccessToken.jti == token.key, now)
        _audit_sync(
            "oauth.token_revoked",
            target_kind=token.kind,
            target_id=token.key,
            firm_id=token.firm_id,
            detail={"client_id": token.client_id, "access_tokens_revoked": revoked},
        )


class Introspection(_TokenLookup, IntrospectionEndpoint):
    """RFC 7662 for confidential clients.

    The rule: a client sees a token as active only when it was issued to that very client,
    or when it acts for the same firm as the client (a firm's integrations may check the
    firm's tokens). Tokens of other firms, and firm-less user tokens, read as
    ``active: false`` — they are not the caller's business. A confidential client without a
    firm is a platform client provisioned by operators and may introspect any token.
    """

    CLIENT_AUTH_METHODS = list(CONFIDENTIAL_AUTH_METHODS)

    def check_permission(self, token: TokenRecord, client: Client, request: OAuthRequest) -> bool:
        if token.client_id == client.client_id or client.firm_id is None:
            return True
        return token.firm_id is not None and token.firm_id == client.firm_id

    def introspect_token(self, token: TokenRecord) -> dict[str, Any]:
        settings = self.server.settings
        body: dict[str, Any] = {
            "active": True,
            "token_type": "Bearer" if token.kind == "access_token" else "refresh_token",
            "client_id": token.client_id,
            "scope": token.scope,
            "sub": token.subject,
            "iss": settings.issuer,
            "iat": int(token.issued_at.timestamp()),
            "exp": int(token.expires_at.timestamp()),
        }
        if token.kind == "access_token":
            body["aud"] = settings.token_audience
            body["jti"] = token.key
        if token.firm_id:
            body["firm_id"] = token.firm_id
        return body


# -- the server ---------------------------------------------------------------------------------
class OAuthServer(AuthorizationServer):
    def __init__(self, settings: Settings, db: Database, keys: KeyStore) -> None:
        super().__init__(scopes_supported=list(ALL_SCOPES))
        self.settings = settings
        self.db = db
        self.keys = keys
        self.register_token_generator("default", AccessTokenGenerator(settings, keys))
        self.register_grant(CodeGrant, [S256CodeChallenge(required=True)])
        self.register_grant(RefreshGrant)
        self.register_grant(ClientCredentials)
        self.register_endpoint(Revocation)
        self.register_endpoint(Introspection)

    # -- running a call ----------------------------------------------------------------------
    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, Effects]:
        """Call ``fn`` (a server method) in one transaction; blocking, so call it from a
        worker thread. Returns its result and the effects to apply after the commit."""
        fx = Effects()
        with self.db.sync_session_scope() as db_session:
            s_token = _session.set(db_session)
            e_token = _effects.set(fx)
            try:
                result = fn(*args, **kwargs)
            finally:
                _session.reset(s_token)
                _effects.reset(e_token)
        return result, fx

    def build_request(
        self,
        method: str,
        uri: str,
        headers: Mapping[str, str],
        items: Sequence[tuple[str, str]],
        *,
        is_form: bool,
    ) -> OAuthRequest:
        """An Authlib request; raises InsecureTransportError for http outside development
        and InvalidRequestError for parameters outside RFC 6749's syntax (see
        :func:`check_parameters`)."""
        if not self.settings.insecure_transport_allowed and not is_secure_transport(uri):
            raise InsecureTransportError()
        check_parameters(items)
        return OAuthRequest(method, uri, headers, items, is_form=is_form)

    # -- Authlib hooks -----------------------------------------------------------------------
    def query_client(self, client_id: str | None) -> Client | None:
        """The client, or None when unknown or disabled: a disabled client gets nothing."""
        if not client_id or len(client_id) > 64:
            return None
        row = session().get(OAuthClient, client_id)
        if row is None or row.disabled:
            return None
        return Client.of(row)

    def save_token(self, token: dict[str, Any], request: OAuthRequest) -> None:
        db = session()
        claims = unverified_claims(token["access_token"])
        subject: Subject | None = request.user
        db.add(
            AccessToken(
                jti=claims["jti"],
                client_id=claims["client_id"],
                subject=str(claims["sub"]),
                firm_id=claims.get("firm_id"),
                scope=claims.get("scope") or "",
                family_id=subject.family_id if subject else None,
                issued_at=_ts(claims["iat"]),
                expires_at=_ts(claims["exp"]),
            )
        )
        refresh = token.get("refresh_token")
        if refresh and subject is not None and subject.family_id:
            previous: RefreshRecord | None = request.refresh_token
            db.add(
                RefreshToken(
                    id=new_id("rft"),
                    token_hash=hash_token(refresh),
                    family_id=subject.family_id,
                    client_id=claims["client_id"],
                    user_id=subject.user_id,
                    firm_id=subject.firm_id,
                    # RFC 6749 §6: a narrower access-token scope leaves the grant unchanged.
                    scope=previous.scope if previous else (claims.get("scope") or ""),
                    expires_at=utcnow() + timedelta(seconds=self.settings.refresh_token_ttl),
                )
            )

    def create_oauth2_request(self, request: Any) -> OAuthRequest:
        if isinstance(request, OAuthRequest):
            return request
        raise TypeError("build requests with OAuthServer.build_request")

    def create_json_request(self, request: Any) -> JsonRequest:
        if isinstance(request, OAuthRequest):
            json_request = JsonRequest(request.method, request.uri, request.headers)
            json_request.payload = _JsonPayload(dict(request.payload.data))
            return json_request
        raise TypeError("build requests with OAuthServer.build_request")

    def handle_response(
        self, status: int, body: Any, headers: Iterable[tuple[str, str]]
    ) -> OAuthResponse:
        return OAuthResponse(status=status, body=body, headers=list(headers))

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        log.debug("oauth signal %s", name)

    # -- token lookup for revocation and introspection -----------------------------------
    def find_access_token(self, token: str) -> TokenRecord | None:
        """An access token we signed (signature checked, expiry not) and its row."""
        if token.count(".") != 2:
            return None
        try:
            decoded = jwt.decode(token, self.keys.verification_key_set_sync(), algorithms=["RS256"])
        except (JoseError, ValueError, TypeError, KeyError):
            return None
        jti = decoded.claims.get("jti")
        if not isinstance(jti, str):
            return None
        row = session().get(AccessToken, jti)
        if row is None:
            return None
        return TokenRecord(
            kind="access_token",
            key=row.jti,
            client_id=row.client_id,
            subject=row.subject,
            firm_id=row.firm_id,
            scope=row.scope,
            family_id=row.family_id,
            issued_at=row.issued_at,
            expires_at=row.expires_at,
            revoked=row.revoked_at is not None,
            user_active=row.subject == row.client_id or _active_user_sync(row.subject) is not None,
        )

    def find_refresh_token(self, token: str) -> TokenRecord | None:
        row = (
            session()
            .execute(
                sa.select(RefreshToken).where(col(RefreshToken.token_hash) == hash_token(token))
            )
            .scalars()
            .first()
        )
        if row is None:
            return None
        return TokenRecord(
            kind="refresh_token",
            key=row.id,
            client_id=row.client_id,
            subject=row.user_id,
            firm_id=row.firm_id,
            scope=row.scope,
            family_id=row.family_id,
            issued_at=row.issued_at,
            expires_at=row.expires_at,
            revoked=row.revoked_at is not None or row.used_at is not None,
            user_active=_active_user_sync(row.user_id) is not None,
        )
