"""Helpers that drive the real OAuth flows, for any test that needs users and tokens.

``login`` goes through the sign-in page like a browser: GET /oauth/authorize, read the
form, POST the credentials, take the code from the 302 ``Location`` and exchange it at
/oauth/token with the PKCE verifier.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

DEFAULT_PASSWORD = "correct horse battery"


class _FormParser(HTMLParser):
    """The action and the named inputs of the first form in a page."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self._in_form = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "form" and self.action is None:
            self.action = values.get("action", "")
            self._in_form = True
        elif tag == "input" and self._in_form and values.get("name"):
            self.fields[values["name"]] = values.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False


def parse_form(page: str) -> tuple[str, dict[str, str]]:
    """``(action, fields)`` of the first form of an HTML page."""
    parser = _FormParser()
    parser.feed(page)
    assert parser.action is not None, "the page has no form"
    return parser.action, parser.fields


def pkce_pair() -> tuple[str, str]:
    """A PKCE ``(code_verifier, S256 code_challenge)``."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def query_of(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def bearer(tokens_or_access_token: dict[str, Any] | str) -> dict[str, str]:
    """``Authorization`` header from a token response or an access token string."""
    if isinstance(tokens_or_access_token, dict):
        token = tokens_or_access_token["access_token"]
    else:
        token = tokens_or_access_token
    return {"Authorization": f"Bearer {token}"}


async def sign_up(
    client: httpx.AsyncClient,
    email: str,
    password: str = DEFAULT_PASSWORD,
    display_name: str = "Test User",
) -> dict[str, Any]:
    """Create a user through POST /v1/users; returns the user JSON (with ``id``)."""
    response = await client.post(
        "/v1/users", json={"email": email, "password": password, "display_name": display_name}
    )
    assert response.status_code == 201, response.text
    user: dict[str, Any] = response.json()
    return user


async def authorize_code(
    client: httpx.AsyncClient,
    email: str,
    password: str = DEFAULT_PASSWORD,
    *,
    firm_id: str | None = None,
    scope: str | None = None,
    client_id: str = "onecluster-web",
    redirect_uri: str = "http://testserver/cb",
) -> tuple[str, str]:
    """Sign in through the login page; returns ``(code, code_verifier)``."""
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(12)
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "state": state,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    if scope is not None:
        params["scope"] = scope
    if firm_id is not None:
        params["firm_id"] = firm_id
    page = await client.get("/oauth/authorize", params=params)
    assert page.status_code == 200, page.text
    action, fields = parse_form(page.text)
    fields.update(email=email, password=password)
    submitted = await client.post(action, data=fields)
    assert submitted.status_code == 302, submitted.text
    location = submitted.headers["location"]
    assert location.startswith(redirect_uri), location
    answer = query_of(location)
    assert answer.get("state") == state, location
    assert "code" in answer, location
    return answer["code"], verifier


async def exchange_code(
    client: httpx.AsyncClient,
    code: str,
    verifier: str,
    *,
    client_id: str = "onecluster-web",
    redirect_uri: str = "http://testserver/cb",
) -> httpx.Response:
    """POST the authorization_code grant; returns the raw response."""
    return await client.post(
        "/oauth/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "client_id": client_id,
            "code_verifier": verifier,
        },
    )


async def login(
    client: httpx.AsyncClient,
    email: str,
    password: str = DEFAULT_PASSWORD,
    *,
    firm_id: str | None = None,
    scope: str | None = None,
    client_id: str = "onecluster-web",
    redirect_uri: str = "http://testserver/cb",
) -> dict[str, Any]:
    """The token response (access_token, refresh_token, …) of a full code + PKCE sign-in."""
    code, verifier = await authorize_code(
        client,
        email,
        password,
        firm_id=firm_id,
        scope=scope,
        client_id=client_id,
        redirect_uri=redirect_uri,
    )
    response = await exchange_code(
        client, code, verifier, client_id=client_id, redirect_uri=redirect_uri
    )
    assert response.status_code == 200, response.text
    tokens: dict[str, Any] = response.json()
    return tokens


async def refresh(
    client: httpx.AsyncClient, refresh_token: str, client_id: str = "onecluster-web"
) -> httpx.Response:
    """POST the refresh_token grant for a public client; returns the raw response."""
    return await client.post(
        "/oauth/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": client_id,
        },
    )


async def client_credentials(
    client: httpx.AsyncClient,
    client_id: str,
    secret: str,
    scope: str | None = None,
    method: str = "basic",
) -> dict[str, Any]:
    """Tokens for an integrator client; ``method`` is ``basic`` or ``post``."""
    response = await client_credentials_response(client, client_id, secret, scope, method)
    assert response.status_code == 200, response.text
    tokens: dict[str, Any] = response.json()
    return tokens


async def client_credentials_response(
    client: httpx.AsyncClient,
    client_id: str,
    secret: str,
    scope: str | None = None,
    method: str = "basic",
) -> httpx.Response:
    data = {"grant_type": "client_credentials"}
    if scope is not None:
        data["scope"] = scope
    if method == "basic":
        return await client.post("/oauth/token", data=data, auth=(client_id, secret))
    if method == "post":
        data.update(client_id=client_id, client_secret=secret)
        return await client.post("/oauth/token", data=data)
    raise ValueError(f"unknown client authentication method {method!r}")


async def create_firm(
    client: httpx.AsyncClient, tokens: dict[str, Any], name: str = "Test Firm"
) -> dict[str, Any]:
    """A firm owned by the token's user (POST /v1/firms)."""
    response = await client.post(
        "/v1/firms",
        json={
            "name": name,
            "region": "CN-BJ",
            "city": "Beijing",
            "actor_type": "small_micro_enterprise",
            "industries": ["0301"],
        },
        headers=bearer(tokens),
    )
    assert response.status_code == 201, response.text
    firm: dict[str, Any] = response.json()
    return firm


async def invite_member(
    client: httpx.AsyncClient,
    owner_tokens: dict[str, Any],
    firm_id: str,
    member_tokens: dict[str, Any],
    email: str,
    role: str = "member",
) -> None:
    """Make the user of ``member_tokens`` (with ``email``) a member of the firm."""
    invited = await client.post(
        f"/v1/firms/{firm_id}/invitations",
        json={"email": email, "role": role},
        headers=bearer(owner_tokens),
    )
    assert invited.status_code == 201, invited.text
    invitation = invited.json()
    accepted = await client.post(
        f"/v1/firms/{firm_id}/invitations/{invitation['id']}:accept",
        json={"token": invitation["token"]},
        headers=bearer(member_tokens),
    )
    assert accepted.status_code == 200, accepted.text


def jwt_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(header, claims)`` of a JWT, unverified."""

    def segment(text: str) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        return value

    head, body, _ = token.split(".")
    return segment(head), segment(body)
