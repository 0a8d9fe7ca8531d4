"""HTTP side of the OAuth 2 authorization server: login page, token-type endpoints,
userinfo, discovery documents and the JWKS.

Endpoints defined by OAuth answer in OAuth's own formats: ``/oauth/token``,
``/oauth/revoke`` and ``/oauth/introspect`` use the RFC 6749 JSON error body
(``error``, ``error_description``) with 400/401; the authorization endpoint redirects
errors to the client once its ``redirect_uri`` is known to be registered, and shows an
error page otherwise (it never redirects to an unregistered URI). Everything else uses
the platform's problem+json.

The login form carries a CSRF token: an HMAC (keyed with ``settings.secret_key``) over a
random browser id kept in an HttpOnly, SameSite=Lax cookie and the time it was issued, so
a form cannot be submitted from another site, or replayed after an hour.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import html
import json
import logging
import re
import secrets
import time
from functools import cache
from pathlib import Path
from string import Template
from typing import Any, Literal

import sqlalchemy as sa
from authlib.oauth2.rfc6749 import (
    AccessDeniedError,
    InvalidRequestError,
    OAuth2Error,
)
from authlib.oauth2.rfc6749.grants import AuthorizationCodeGrant
from authlib.oauth2.rfc6749.util import extract_basic_authorization
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import col
from starlette.concurrency import run_in_threadpool

from services.kit.auth import CurrentPrincipal, LocalJwksSource
from services.kit.db import Database, utcnow
from services.kit.errors import (
    InsufficientScope,
    RateLimited,
    Unauthorized,
    problem_response,
    responses,
)
from services.kit.ratelimit import enforce
from services.kit.scopes import ALL_SCOPES, DEFAULT_USER_SCOPE
from services.kit.settings import Settings
from services.membership import audit
from services.membership.deps import SessionDep
from services.membership.keys import KeyStore
from services.membership.models import (
    AccessToken,
    AuthorizationCode,
    OAuthClient,
    User,
)
from services.membership.oauth import (
    Effects,
    OAuthRequest,
    OAuthResponse,
    OAuthServer,
    Subject,
    choose_firm,
    memberships_query,
)
from services.membership.passwords import verify_password

log = logging.getLogger("onecluster.membership.oauth")
router = APIRouter(tags=["oauth"])

TEMPLATES = Path(__file__).parent / "templates"
AUTHORIZE_PARAMS = (
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "code_challenge",
    "code_challenge_method",
    "firm_id",
    "nonce",
)
CSRF_COOKIE = "oc_login"
CSRF_MAX_AGE = 3600
_PARAM_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # safe to echo in error_description
_BROWSER_ID = re.compile(r"^[A-Za-z0-9_-]{20,64}$")
INSUFFICIENT_OPENID = 'Bearer realm="onecluster", error="insufficient_scope", scope="openid"'
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
# The login page is the one place a password is typed: no framing, no scripts, no referrer.
PAGE_HEADERS = {
    **NO_STORE,
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


# -- OpenAPI shapes ----------------------------------------------------------------------------
class OAuthErrorBody(BaseModel):
    """RFC 6749 §5.2 error response."""

    error: str = Field(examples=["invalid_grant"])
    error_description: str | None = Field(None, examples=["Invalid 'code' in request."])


class TokenResponse(BaseModel):
    access_token: str = Field(description="an RFC 9068 JWT (RS256, typ at+jwt)")
    token_type: Literal["Bearer"] = "Bearer"
    expires_in: int = Field(examples=[600])
    scope: str = Field(examples=["openid membership:read"])
    refresh_token: str | None = Field(
        None, description="authorization_code and refresh_token grants; rotated on each use"
    )


class IntrospectionResponse(BaseModel):
    model_config = ConfigDict(extra="allow")
    active: bool
    token_type: str | None = None
    client_id: str | None = None
    scope: str | None = None
    sub: str | None = None
    firm_id: str | None = None
    iss: str | None = None
    aud: str | None = None
    iat: int | None = None
    exp: int | None = None
    jti: str | None = None


class UserInfo(BaseModel):
    sub: str
    email: str | None = Field(None, description="with the email scope")
    email_verified: bool | None = Field(None, description="with the email scope; always false")
    name: str | None = Field(None, description="with the profile scope")
    firm_id: str | None = Field(None, description="the firm the token acts for")


class ServerMetadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    revocation_endpoint: str
    introspection_endpoint: str
    userinfo_endpoint: str
    scopes_supported: list[str]
    response_types_supported: list[str]
    grant_types_supported: list[str]
    token_endpoint_auth_methods_supported: list[str]
    code_challenge_methods_supported: list[str]
    subject_types_supported: list[str]
    id_token_signing_alg_values_supported: list[str]


class Jwks(BaseModel):
    keys: list[dict[str, Any]] = Field(description="public RSA keys (kty, n, e, kid, alg, use)")


def _form_body(fields: dict[str, str], required: list[str]) -> dict[str, Any]:
    """``openapi_extra`` describing an ``application/x-www-form-urlencoded`` body."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/x-www-form-urlencoded": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            name: {"type": "string", "description": text}
                            for name, text in fields.items()
                        },
                        "required": required,
                    }
                }
            },
        }
    }


def _oauth_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "OAuth error (RFC 6749 §5.2), e.g. invalid_request, invalid_grant",
        401: "invalid_client: client authentication failed",
    }
    return {s: {"model": OAuthErrorBody, "description": text[s]} for s in statuses}


# -- start-up ---------------------------------------------------------------------------------
async def on_startup(app: FastAPI) -> None:
    """Keys, the in-process JWKS, the first-party web client and the Authlib server."""
    settings: Settings = app.state.settings
    db: Database = app.state.db
    keys = KeyStore(db, settings)
    await keys.ensure_active_key()
    app.state.keystore = keys

    async def load_jwks() -> dict[str, Any]:
        # Called by the verifier on a cache miss or an unknown kid; the 2 s floor keeps
        # tokens with made-up kids from costing a query each.
        return await keys.public_jwks(max_age=2.0)

    app.state.runtime.local_jwks = LocalJwksSource(load_jwks)
    await _upsert_web_client(db, settings)
    await _housekeeping(db)
    app.state.oauth_server = OAuthServer(settings, db, keys)
    app.state.housekeeping = asyncio.create_task(
        _housekeeping_loop(db), name="membership-housekeeping"
    )


async def on_shutdown(app: FastAPI) -> None:
    """Stop the housekeeping loop started by :func:`on_startup`."""
    task: asyncio.Task[None] | None = getattr(app.state, "housekeeping", None)
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _upsert_web_client(db: Database, settings: Settings) -> None:
    """The first-party public client, kept in line with the settings at every start."""
    values = {
        "name": "OneCluster web",
        "kind": "public",
        "secret_hash": None,
        "scope": DEFAULT_USER_SCOPE,
        "redirect_uris": list(settings.web_redirect_uris),
        "grant_types": ["authorization_code", "refresh_token"],
        "token_endpoint_auth_method": "none",
        "disabled": False,
    }
    if db.postgres:
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    table = OAuthClient.__table__  # type: ignore[attr-defined]
    statement = insert(table).values(id=settings.web_client_id, created_at=utcnow(), **values)
    statement = statement.on_conflict_do_update(index_elements=[table.c.id], set_=values)
    async with db.session_scope() as session:
        await session.execute(statement)


async def _housekeeping(db: Database) -> None:
    """Drop rows nobody can use any more: expired access-token records and old codes."""
    cutoff = utcnow()
    async with db.session_scope() as session:
        await session.execute(sa.delete(AccessToken).where(col(AccessToken.expires_at) < cutoff))
        await session.execute(
            sa.delete(AuthorizationCode).where(col(AuthorizationCode.expires_at) < cutoff)
        )


HOUSEKEEPING_INTERVAL = 3600.0  # seconds between purges in a running process


async def _housekeeping_loop(db: Database) -> None:
    """Purge expired rows every hour, so a long-running process does not accumulate them.

    Every replica runs it; concurrent deletes of the same expired rows are harmless.
    """
    while True:
        await asyncio.sleep(HOUSEKEEPING_INTERVAL)
        try:
            await _housekeeping(db)
        except Exception:
            log.warning("housekeeping failed", exc_info=True)


# -- helpers ----------------------------------------------------------------------------------
def _server(request: Request) -> OAuthServer:
    server: OAuthServer = request.app.state.oauth_server
    return server


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _url(settings: Settings, path: str) -> str:
    return settings.issuer + path


def _client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def _apply(request: Request, fx: Effects) -> None:
    """Deny-list access tokens revoked in a transaction that has now committed.

    The database already says they are revoked (introspection refuses them); a failure to
    reach the shared deny-list is logged, not turned into an error for this request."""
    denylist = request.app.state.runtime.denylist
    for jti, ttl in fx.deny:
        try:
            await denylist.add(jti, ttl)
        except Exception:
            log.exception("could not deny-list %s", jti)


def _oauth_response(result: OAuthResponse, *, no_store: bool = True) -> Response:
    headers = {k: v for k, v in result.headers if k.lower() != "content-type"}
    if no_store:
        headers.update(NO_STORE)
    if result.status == 302:
        return Response(status_code=302, headers=headers)  # Location exactly as Authlib built it
    if isinstance(result.body, dict):
        return JSONResponse(result.body, status_code=result.status, headers=headers)
    return Response(result.body or b"", status_code=result.status, headers=headers)


def _oauth_error(error: OAuth2Error) -> Response:
    status, body, headers = error()
    return _oauth_response(OAuthResponse(status, body, list(headers)))


def _form_items(form: Any) -> list[tuple[str, str]]:
    return [(k, v) for k, v in form.multi_items() if isinstance(v, str)]


async def _read_form(request: Request) -> list[tuple[str, str]]:
    try:
        form = await request.form()
    except Exception:
        raise InvalidRequestError("The body is not a valid form.") from None
    return _form_items(form)


def _no_duplicates(items: list[tuple[str, str]]) -> None:
    """RFC 6749 §3.2: request parameters MUST NOT be included more than once."""
    seen: set[str] = set()
    for key, _ in items:
        if key in seen:
            named = f"'{key}'" if _PARAM_NAME.match(key) else "parameters"
            raise InvalidRequestError(f"Multiple {named} in request.")
        seen.add(key)


# -- pages ------------------------------------------------------------------------------------
@cache
def _template(name: str) -> Template:
    return Template((TEMPLATES / name).read_text(encoding="utf-8"))


def _page(
    title: str, content: str, status: int = 200, headers: dict[str, str] | None = None
) -> HTMLResponse:
    body = _template("base.html").substitute(title=html.escape(title), content=content)
    return HTMLResponse(body, status_code=status, headers={**PAGE_HEADERS, **(headers or {})})


def _message_page(heading: str, message: str, status: int, detail: str = "") -> HTMLResponse:
    content = _template("message.html").substitute(
        heading=html.escape(heading), message=html.escape(message), detail=detail
    )
    return _page(heading, content, status)


def _browser_id(request: Request) -> tuple[str, bool]:
    value = request.cookies.get(CSRF_COOKIE, "")
    if _BROWSER_ID.match(value):
        return value, False
    return secrets.token_urlsafe(24), True


def _csrf_mac(settings: Settings, browser: str, issued: int) -> str:
    key = settings.secret_key.get_secret_value().encode()
    return hmac.new(key, f"login-csrf|{browser}|{issued}".encode(), hashlib.sha256).hexdigest()


def csrf_token(settings: Settings, browser: str, now: int | None = None) -> str:
    issued = int(time.time()) if now is None else now
    return f"{issued}.{_csrf_mac(settings, browser, issued)}"


def csrf_valid(settings: Settings, browser: str | None, token: str | None) -> bool:
    if not browser or not token or not _BROWSER_ID.match(browser):
        return False
    issued_text, _, mac = token.partition(".")
    if not issued_text.isdigit():
        return False
    issued = int(issued_text)
    if not 0 <= time.time() - issued <= CSRF_MAX_AGE:
        return False
    return hmac.compare_digest(mac, _csrf_mac(settings, browser, issued))


def _login_page(
    request: Request,
    grant: AuthorizationCodeGrant,
    params: list[tuple[str, str]],
    *,
    error: str | None = None,
    email: str = "",
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> HTMLResponse:
    settings = _settings(request)
    browser, new = _browser_id(request)
    hidden = [(k, v) for k, v in params if k in AUTHORIZE_PARAMS]
    hidden.append(("csrf_token", csrf_token(settings, browser)))
    scopes = (grant.request.scope or "").split()
    content = _template("login.html").substitute(
        client_name=html.escape(grant.request.client.name),
        action="/oauth/authorize",
        error=f'<p class="error" role="alert">{html.escape(error)}</p>' if error else "",
        hidden="\n".join(
            f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
            for k, v in hidden
        ),
        email=html.escape(email),
        scopes="\n".join(
            f"<li>{html.escape(ALL_SCOPES.get(s, s))} <code>{html.escape(s)}</code></li>"
            for s in scopes
        ),
    )
    response = _page("Sign in", content, status, headers)
    if new:
        response.set_cookie(
            CSRF_COOKIE,
            browser,
            httponly=True,
            samesite="lax",
            secure=settings.issuer.startswith("https://"),
            path="/oauth/authorize",
        )
    return response


def _consent(
    server: OAuthServer, oreq: OAuthRequest
) -> tuple[AuthorizationCodeGrant | None, OAuth2Error | None]:
    try:
        return server.get_consent_grant(oreq), None
    except OAuth2Error as error:
        return None, error


def _authorize_error(error: OAuth2Error) -> Response:
    """To the client when its redirect URI is verified, else an error page: never redirect
    to a URI the client did not register."""
    if error.redirect_uri:
        return _oauth_error(error)
    return _message_page(
        "This sign-in link is not valid",
        error.description or error.error or "invalid_request",
        400,
        detail=f'<p class="sub">Error: <code>{html.escape(str(error.error))}</code></p>',
    )


async def _validated(
    request: Request, method: str, items: list[tuple[str, str]]
) -> tuple[AuthorizationCodeGrant | None, OAuthRequest | None, Response | None]:
    server = _server(request)
    try:
        oreq = server.build_request(method, str(request.url), request.headers, items, is_form=False)
    except OAuth2Error as refused:  # insecure transport, malformed parameters
        return None, None, _authorize_error(refused)
    (grant, error), _ = await run_in_threadpool(server.run, _consent, server, oreq)
    if error is not None:
        return None, None, _authorize_error(error)
    return grant, oreq, None


_REQUIRED_AUTHORIZE = ("response_type", "client_id", "code_challenge", "code_challenge_method")
AUTHORIZE_QUERY = {
    "parameters": [
        {
            "name": name,
            "in": "query",
            "required": name in _REQUIRED_AUTHORIZE,
            "schema": {"type": "string"},
        }
        for name in AUTHORIZE_PARAMS
    ]
}


@router.get(
    "/oauth/authorize",
    summary="Authorization endpoint: the sign-in page",
    description=(
        "Validates the client, redirect URI, response type (`code`) and PKCE (S256, "
        "required) before showing the sign-in form. Optional `firm_id` picks the firm the "
        "token acts for (the user must belong to it); otherwise the user's earliest firm."
    ),
    response_class=HTMLResponse,
    responses={
        200: {"description": "The sign-in form", "content": {"text/html": {}}},
        302: {"description": "Error redirected to the client's registered redirect URI"},
        400: {"description": "Unknown client or unregistered redirect URI (HTML page)"},
    },
    openapi_extra=AUTHORIZE_QUERY,
)
async def authorize_page(request: Request) -> Response:
    items = list(request.query_params.multi_items())
    grant, _, failure = await _validated(request, "GET", items)
    if failure is not None:
        return failure
    assert grant is not None
    return _login_page(request, grant, items)


@router.post(
    "/oauth/authorize",
    summary="Authorization endpoint: sign in and get a code",
    description=(
        "Checks the CSRF token and the credentials, then redirects to the client's "
        "redirect URI with `code` and `state`. Wrong credentials re-render the form."
    ),
    response_class=HTMLResponse,
    responses={
        200: {"description": "The form again, with an error", "content": {"text/html": {}}},
        302: {"description": "Redirect to the client with `code` and `state` (or an error)"},
        400: {"description": "Invalid request or expired form (HTML page)"},
        429: {"description": "Too many sign-in attempts; see Retry-After (HTML page)"},
    },
    openapi_extra=_form_body(
        {
            "email": "the user's email",
            "password": "the user's password",
            "csrf_token": "from the form",
            **{name: "as received by GET /oauth/authorize" for name in AUTHORIZE_PARAMS},
        },
        ["email", "password", "csrf_token", "client_id", "response_type"],
    ),
)
async def authorize_submit(request: Request) -> Response:
    settings = _settings(request)
    try:
        items = await _read_form(request)
    except InvalidRequestError as error:
        return _authorize_error(error)
    form = dict(items)
    params = [(k, v) for k, v in items if k in AUTHORIZE_PARAMS]
    grant, oreq, failure = await _validated(request, "POST", params)
    if failure is not None:
        return failure
    assert grant is not None and oreq is not None
    email = form.get("email", "").strip()[:320]
    password = form.get("password", "")[:1024]

    if not csrf_valid(settings, request.cookies.get(CSRF_COOKIE), form.get("csrf_token")):
        return _login_page(
            request, grant, params, email=email, status=400,
            error="This sign-in form has expired. Please sign in again.",
        )  # fmt: skip
    if not email or not password:
        return _login_page(
            request, grant, params, email=email, error="Enter your email and password."
        )

    normalized = email.lower()
    throttle_key = hashlib.sha256(normalized.encode()).hexdigest()[:32]
    try:
        await enforce(
            request.app.state.rate_limiter,
            f"login:{throttle_key}:{_client_ip(request)}",
            settings.login_rate_limit_per_minute,
            60,
        )
    except RateLimited as limited:
        return _login_page(
            request, grant, params, email=email, status=429, headers=limited.headers,
            error="Too many sign-in attempts. Wait a minute and try again.",
        )  # fmt: skip

    db: Database = request.app.state.db
    client_id = grant.request.client.client_id
    async with db.session_scope() as session:
        user = (
            await session.execute(sa.select(User).where(col(User.email_normalized) == normalized))
        ).scalar_one_or_none()
    # argon2 costs tens of milliseconds of CPU: keep it off the event loop. An unknown
    # email is checked against a dummy hash so it takes as long as a wrong password.
    password_ok = await run_in_threadpool(
        verify_password, user.password_hash if user else None, password
    )
    if user is None or not password_ok or not user.is_active:
        reason = (
            "unknown_email" if user is None else ("bad_password" if not password_ok else "inactive")
        )
        async with db.session_scope() as session:
            audit.record(
                session, None, "user.login_failed",
                target_kind="user", target_id=user.id if user else None,
                actor_id=user.id if user else None, outcome="failed",
                detail={"client_id": client_id, "reason": reason, "email": normalized},
            )  # fmt: skip
        message = (
            "This account has been deactivated."
            if user is not None and password_ok
            else "Wrong email or password."
        )
        return _login_page(request, grant, params, email=email, error=message)

    async with db.session_scope() as session:
        firms = list((await session.execute(memberships_query(user.id))).scalars().all())
        requested = form.get("firm_id")
        if requested and requested not in firms:
            audit.record(
                session, None, "user.login_failed",
                target_kind="user", target_id=user.id, actor_id=user.id, outcome="denied",
                detail={"client_id": client_id, "reason": "not_a_member", "firm_id": requested},
            )  # fmt: skip
            denied = AccessDeniedError(
                "The user is not a member of the requested firm.",
                redirect_uri=grant.redirect_uri,
                state=oreq.payload.state,
            )
            return _oauth_error(denied)
        firm_id = choose_firm(firms, requested)
        audit.record(
            session, None, "user.logged_in",
            target_kind="user", target_id=user.id, actor_id=user.id, firm_id=firm_id,
            detail={"client_id": client_id},
        )  # fmt: skip

    subject = Subject(user_id=user.id, firm_id=firm_id, auth_time=int(time.time()))
    server = _server(request)
    result, _ = await run_in_threadpool(
        server.run, server.create_authorization_response, oreq, subject, grant
    )
    return _oauth_response(result)


@router.get(
    "/oauth/callback",
    summary="Shows an authorization code (first-party and development use)",
    response_class=HTMLResponse,
    responses={
        200: {"description": "A page showing the code or the error", "content": {"text/html": {}}}
    },
)
async def callback(request: Request) -> HTMLResponse:
    params = request.query_params
    code, error = params.get("code"), params.get("error")
    if error:
        return _message_page(
            "Sign-in did not complete",
            params.get("error_description") or error,
            400,
            detail=f'<p class="sub">Error: <code>{html.escape(error)}</code></p>',
        )
    if not code:
        return _message_page("No code", "This page expects a code from the sign-in.", 400)
    state = params.get("state")
    detail = f'<p>Code:</p><p><code id="code">{html.escape(code)}</code></p>'
    if state:
        detail += f'<p class="sub">State: <code id="state">{html.escape(state)}</code></p>'
    return _message_page(
        "Signed in",
        "Exchange this code at /oauth/token with your PKCE verifier within a few minutes.",
        200,
        detail=detail,
    )


# -- token-type endpoints -------------------------------------------------------------------------
async def _token_endpoint(request: Request, run: Any) -> Response:
    server = _server(request)
    try:
        items = await _read_form(request)
        oreq = server.build_request("POST", str(request.url), request.headers, items, is_form=True)
        _no_duplicates(items)
    except OAuth2Error as error:
        return _oauth_error(error)
    result, fx = await run_in_threadpool(server.run, run, oreq)
    await _apply(request, fx)
    return _oauth_response(result)


@router.post(
    "/oauth/token",
    summary="Token endpoint",
    description=(
        "Grants: `authorization_code` (with the PKCE `code_verifier`), `refresh_token` "
        "(the refresh token rotates; reusing an old one revokes the session) and "
        "`client_credentials`. Confidential clients authenticate with HTTP Basic or with "
        "`client_id`/`client_secret` in the body. No password grant."
    ),
    response_model=TokenResponse,
    responses={**_oauth_errors(400, 401), **responses(429)},
    openapi_extra=_form_body(
        {
            "grant_type": "authorization_code | refresh_token | client_credentials",
            "code": "authorization_code grant",
            "redirect_uri": "authorization_code grant, when sent to /oauth/authorize",
            "code_verifier": "authorization_code grant (PKCE)",
            "refresh_token": "refresh_token grant",
            "scope": "optional narrower scope",
            "client_id": "public clients, and client_secret_post",
            "client_secret": "client_secret_post",
        },
        ["grant_type"],
    ),
)
async def token(request: Request) -> Response:
    settings = _settings(request)
    try:
        items = await _read_form(request)
    except OAuth2Error as error:
        return _oauth_error(error)
    basic_id, _ = extract_basic_authorization(request.headers)
    client_id = basic_id or dict(items).get("client_id")
    key = f"token:client:{client_id[:64]}" if client_id else f"token:ip:{_client_ip(request)}"
    try:
        await enforce(request.app.state.rate_limiter, key, settings.token_rate_limit_per_minute, 60)
    except RateLimited as limited:
        response = problem_response(limited, request)
        response.headers.update(NO_STORE)
        return response
    if not dict(items).get("grant_type"):
        return _oauth_error(InvalidRequestError("Missing 'grant_type'."))
    server = _server(request)
    return await _token_endpoint(request, server.create_token_response)


@router.post(
    "/oauth/revoke",
    summary="Revoke a token (RFC 7009)",
    description=(
        "Revoking a refresh token revokes its whole session (the family, and its live "
        "access tokens); revoking an access token deny-lists it on every service. Unknown "
        "tokens are answered with 200, as RFC 7009 asks."
    ),
    responses={200: {"description": "Revoked, or nothing to revoke"}, **_oauth_errors(400, 401)},
    openapi_extra=_form_body(
        {
            "token": "the access or refresh token",
            "token_type_hint": "access_token | refresh_token",
            "client_id": "public clients, and client_secret_post",
            "client_secret": "client_secret_post",
        },
        ["token"],
    ),
)
async def revoke(request: Request) -> Response:
    server = _server(request)
    return await _token_endpoint(
        request, lambda oreq: server.create_endpoint_response("revocation", oreq)
    )


@router.post(
    "/oauth/introspect",
    summary="Introspect a token (RFC 7662)",
    description=(
        "For confidential clients. A token reads as active only when it was issued to the "
        "calling client or acts for the caller's firm; tokens of other firms read "
        "`active: false`."
    ),
    response_model=IntrospectionResponse,
    responses=_oauth_errors(400, 401),
    openapi_extra=_form_body(
        {
            "token": "the access or refresh token",
            "token_type_hint": "access_token | refresh_token",
            "client_id": "client_secret_post",
            "client_secret": "client_secret_post",
        },
        ["token"],
    ),
)
async def introspect(request: Request) -> Response:
    server = _server(request)
    response = await _token_endpoint(
        request, lambda oreq: server.create_endpoint_response("introspection", oreq)
    )
    if isinstance(response, JSONResponse) and response.status_code == 200:
        body = json.loads(bytes(response.body))
        jti = body.get("jti")
        # The deny-list may know of revocations made outside this server's tables.
        if body.get("active") and jti and await request.app.state.runtime.denylist.contains(jti):
            return JSONResponse({"active": False}, headers=NO_STORE)
    return response


# -- userinfo -----------------------------------------------------------------------------------
async def _userinfo(principal: CurrentPrincipal, session: SessionDep) -> UserInfo:
    if principal.kind != "user" or not principal.has("openid"):
        raise InsufficientScope(
            "Userinfo needs a user's token with the openid scope.",
            headers={"WWW-Authenticate": INSUFFICIENT_OPENID},
        )
    user = await session.get(User, principal.subject)
    if user is None or not user.is_active:
        raise Unauthorized("The user of this token is not active.")
    info = UserInfo(sub=user.id, firm_id=principal.firm_id)
    if principal.has("email"):
        info.email, info.email_verified = user.email, False
    if principal.has("profile"):
        info.name = user.display_name
    return info


_USERINFO_DOC: dict[str, Any] = {
    "summary": "OpenID Connect userinfo",
    "description": (
        "Needs a user's access token with the `openid` scope. `email` and `email_verified` "
        "come with the `email` scope, `name` with `profile`."
    ),
    "response_model": UserInfo,
    "response_model_exclude_none": True,
    "responses": responses(401, 403, 429),
}


@router.get("/oauth/userinfo", **_USERINFO_DOC)
async def userinfo_get(principal: CurrentPrincipal, session: SessionDep) -> UserInfo:
    return await _userinfo(principal, session)


@router.post("/oauth/userinfo", **_USERINFO_DOC)
async def userinfo_post(principal: CurrentPrincipal, session: SessionDep) -> UserInfo:
    return await _userinfo(principal, session)


# -- discovery ----------------------------------------------------------------------------------
def server_metadata(settings: Settings) -> dict[str, Any]:
    """RFC 8414 / OpenID Connect Discovery metadata; every URL derives from the issuer."""
    return {
        "issuer": settings.issuer,
        "authorization_endpoint": _url(settings, "/oauth/authorize"),
        "token_endpoint": _url(settings, "/oauth/token"),
        "jwks_uri": _url(settings, "/.well-known/jwks.json"),
        "revocation_endpoint": _url(settings, "/oauth/revoke"),
        "introspection_endpoint": _url(settings, "/oauth/introspect"),
        "userinfo_endpoint": _url(settings, "/oauth/userinfo"),
        "scopes_supported": list(ALL_SCOPES),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "token_endpoint_auth_methods_supported": [
            "client_secret_basic",
            "client_secret_post",
            "none",
        ],
        "revocation_endpoint_auth_methods_supported": [
            "client_secret_basic",
            "client_secret_post",
            "none",
        ],
        "introspection_endpoint_auth_methods_supported": [
            "client_secret_basic",
            "client_secret_post",
        ],
        "code_challenge_methods_supported": ["S256"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "claims_supported": ["sub", "email", "email_verified", "name", "firm_id"],
    }


_METADATA_DOC: dict[str, Any] = {
    "response_model": ServerMetadata,
    "responses": {200: {"description": "The server's metadata"}},
}


@router.get(
    "/.well-known/openid-configuration",
    summary="OpenID Connect discovery document",
    **_METADATA_DOC,
)
@router.get(
    "/.well-known/oauth-authorization-server",
    summary="OAuth 2 authorization server metadata (RFC 8414)",
    **_METADATA_DOC,
)
async def server_metadata_document(request: Request) -> JSONResponse:
    """The same metadata at both standard addresses."""
    return JSONResponse(
        server_metadata(_settings(request)), headers={"Cache-Control": "public, max-age=300"}
    )


@router.get(
    "/.well-known/jwks.json",
    summary="The public keys that sign access tokens",
    description="The signing key and retired keys whose tokens may still be alive.",
    response_model=Jwks,
)
async def jwks(request: Request) -> JSONResponse:
    keys: KeyStore = request.app.state.keystore
    document = await keys.public_jwks()
    # Public parts only, whatever the stored JWK holds.
    private = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
    document = {
        "keys": [{k: v for k, v in key.items() if k not in private} for key in document["keys"]]
    }
    return JSONResponse(document, headers={"Cache-Control": "public, max-age=60"})
