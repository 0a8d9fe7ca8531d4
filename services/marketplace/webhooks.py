"""Signed webhooks: firms subscribe HTTPS endpoints to marketplace events.

**Subscriptions** belong to one firm and name the events they want (``EVENTS``). Each
has a 256-bit signing secret, shown once when created or rotated. The secret must be
usable to sign, so it is stored encrypted: JWE (``dir`` + A256GCM) under a key derived
from ``ONECLUSTER_SECRET_KEY`` (HMAC-SHA256 with a fixed label), with the
subscription's id in the authenticated header so a ciphertext cannot be moved to
another row. Changing ``ONECLUSTER_SECRET_KEY`` makes stored secrets unreadable:
deliveries then fail with ``secret unreadable`` until the firm rotates the secret.

**Audience.** Who may receive an event (only their active subscriptions to its type get
a delivery):

=====================  =========================================================
task.published         every active member firm of the task's cluster (from the
                       ``cluster_members`` read model) and the requester
contract.awarded       requester and vendor
submission.accepted,   requester and the annotator's firm
submission.rejected
task.completed         requester and the ``vendor_firm_ids``
payout.settled         payer and payee
=====================  =========================================================

**Fan-out.** The marketplace consumes its own events from the bus (consumer
``marketplace-webhooks``) through ``consume_once``; the deliveries for an event are
inserted in the same transaction that records the event as handled, and a unique
``(subscription_id, event_id)`` pair backs it up, so an event redelivered by the bus
never creates a second delivery.

**Delivery.** ``POST`` of the JSON body ``{"id", "type", "version", "occurred_at",
"data"}`` (``id`` is the event id: the same for every firm and every retry, so
receivers deduplicate on it) with the headers

* ``OneCluster-Webhook-Id``: the delivery id (one per event and subscription);
* ``OneCluster-Event``: the event type;
* ``OneCluster-Timestamp``: unix seconds when this attempt was signed;
* ``OneCluster-Signature``: ``v1=<hex HMAC-SHA256 of "{timestamp}.{raw body}">`` keyed
  with the secret string. For the grace period after a rotation the header carries
  two comma-separated signatures, the new secret's first: ``v1=<new>,v1=<old>``.

Redirects are not followed. A 2xx answer within ``ONECLUSTER_WEBHOOK_TIMEOUT``
(10 s) is success; anything else is retried after 10 s, 30 s, 90 s, … (x3 each time,
±20 % jitter, capped at 3 h) up to ``ONECLUSTER_WEBHOOK_MAX_ATTEMPTS`` (15: about a
day), then the delivery is ``failed``. Every attempt is logged (status, duration,
error, the first 1 KB of the response).

**Verifying on the receiver.** Read the raw body (before any JSON parsing), take
``OneCluster-Timestamp`` and compute ``hex(HMAC_SHA256(secret, f"{timestamp}.{body}"))``;
accept if it equals any ``v1=`` entry of ``OneCluster-Signature`` (compare in constant
time) and the timestamp is within 5 minutes of your clock (older ones may be replays).
Then deduplicate on the body's ``id``. :func:`verify_signature` does exactly that.

**SSRF guard.** At creation, on every URL change and again before every attempt the
host is resolved and every address must be public: private, loopback, link-local,
multicast, reserved, shared and unspecified addresses (IPv4 and IPv6, IPv4-mapped
included) are refused (422 at creation; a failed attempt with the reason at delivery).
The attempt then connects to the address that was checked (the TLS name is still the
URL's host), so a DNS answer that changes in between cannot redirect it. Only https is
accepted unless ``ONECLUSTER_WEBHOOK_ALLOW_PRIVATE_ADDRESSES`` is on (development and
tests), which also allows plain http and private addresses.

**Worker.** Due deliveries (``next_attempt_at <= now`` of active subscriptions) are
taken with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL (on SQLite one writer at a time),
leased by moving ``next_attempt_at`` past the attempt's timeout, and sent outside the
transaction with at most ``ONECLUSTER_WEBHOOK_CONCURRENCY`` calls in flight; so several
replicas share the work and a crashed replica's deliveries come due again after the
lease. A commit that makes a delivery due wakes the worker; a poll catches the rest.
Deliveries of an inactive subscription wait, and go out once it is active again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
import sqlalchemy as sa
from fastapi import FastAPI
from joserfc import jwe
from joserfc.errors import JoseError
from joserfc.jwk import OctKey
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import JSON, Field, col, select

from api.events import (
    ContractAwardedV1,
    Envelope,
    PayoutSettledV1,
    SubmissionReviewed,
    TaskCompletedV1,
    TaskPublishedV1,
)
from services.kit.auth import Principal
from services.kit.db import Database, UTCDateTime, utcnow
from services.kit.errors import Forbidden, InvalidState, NotFound, Unprocessable
from services.kit.ids import new_id
from services.kit.outbox import consume_once
from services.kit.settings import Settings
from services.marketplace.models import (
    KnownClusterMember,
    MarketplaceBase,
    MarketplaceProcessedEvent,
)
from services.marketplace.service import REQUESTER_ADMINS, acting_role

log = logging.getLogger("onecluster.marketplace.webhooks")
CONSUMER = "marketplace-webhooks"
EVENTS = (
    "task.published",
    "contract.awarded",
    "submission.accepted",
    "submission.rejected",
    "task.completed",
    "payout.settled",
)
PING = "webhook.ping"
SIGNATURE_TOLERANCE = 300
SNIPPET_BYTES = 1024
MAX_URL_LENGTH = 2000
DEFAULT_KEEP_PREVIOUS = 86400
USER_AGENT = "OneCluster-Webhooks/1"


# -- tables --------------------------------------------------------------------------
class WebhookSubscription(MarketplaceBase, table=True):
    __tablename__ = "webhook_subscriptions"
    id: str = Field(primary_key=True, max_length=40)
    firm_id: str = Field(max_length=40, index=True)
    url: str = Field(max_length=MAX_URL_LENGTH)
    events: list[str] = Field(default_factory=list, sa_type=JSON)
    description: str = Field(default="", max_length=500)
    active: bool = True
    secret: str = Field(max_length=500)
    """The signing secret, encrypted (see the module docstring)."""
    previous_secret: str | None = Field(default=None, max_length=500)
    """The secret before the last rotation, also signing until ``previous_expires_at``."""
    previous_expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_by: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class WebhookDelivery(MarketplaceBase, table=True):
    """One event for one subscription, until it is delivered or has failed for good."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (sa.UniqueConstraint("subscription_id", "event_id"),)
    id: str = Field(primary_key=True, max_length=40)
    subscription_id: str = Field(foreign_key="webhook_subscriptions.id", max_length=40)
    event_id: str = Field(max_length=40)
    event_type: str = Field(max_length=80)
    event_version: int = 1
    occurred_at: datetime = Field(sa_type=UTCDateTime)
    data: dict[str, Any] = Field(sa_type=JSON)
    status: str = Field(default="pending", max_length=16)  # pending | delivered | failed
    attempts: int = 0
    next_attempt_at: datetime | None = Field(default=None, index=True, sa_type=UTCDateTime)
    """When the next attempt is due; None once delivered or failed."""
    last_status_code: int | None = None
    last_error: str | None = Field(default=None, max_length=500)
    delivered_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class WebhookAttempt(MarketplaceBase, table=True):
    """The log of one HTTP attempt of a delivery."""

    __tablename__ = "webhook_attempts"
    id: str = Field(primary_key=True, max_length=40)
    delivery_id: str = Field(foreign_key="webhook_deliveries.id", max_length=40, index=True)
    number: int
    started_at: datetime = Field(sa_type=UTCDateTime)
    duration_ms: int
    status_code: int | None = None
    error: str | None = Field(default=None, max_length=500)
    response_snippet: str = Field(default="", max_length=SNIPPET_BYTES)


# -- signing -------------------------------------------------------------------------
def generate_secret() -> str:
    """A new signing secret: 256 random bits."""
    return "whsec_" + secrets.token_hex(32)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``"{timestamp}.{body}"`` keyed with ``secret``."""
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_header(secrets_in_order: Iterable[str], timestamp: int, body: bytes) -> str:
    return ",".join(f"v1={sign(s, timestamp, body)}" for s in secrets_in_order)


def verify_signature(
    secret: str,
    timestamp: str | int,
    body: bytes,
    header: str,
    tolerance: int = SIGNATURE_TOLERANCE,
    *,
    now: float | None = None,
) -> bool:
    """What a receiver runs: a ``v1`` entry of ``header`` matches and the time is fresh."""
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance:
        return False
    expected = sign(secret, ts, body)
    found = False
    for part in header.split(","):
        scheme, _, value = part.strip().partition("=")
        if scheme == "v1" and hmac.compare_digest(value.strip(), expected):
            found = True
    return found


def _secret_key(settings: Settings) -> OctKey:
    master = settings.secret_key.get_secret_value().encode()
    derived = hmac.new(master, b"onecluster/webhook-secrets/v1", hashlib.sha256).digest()
    return OctKey.import_key(derived)


def encrypt_secret(settings: Settings, subscription_id: str, secret: str) -> str:
    header = {"alg": "dir", "enc": "A256GCM", "kid": subscription_id}
    return jwe.encrypt_compact(header, secret.encode(), _secret_key(settings))


def decrypt_secret(settings: Settings, subscription_id: str, stored: str) -> str | None:
    """The secret, or None if it cannot be read (another secret key, or another row's)."""
    try:
        obj = jwe.decrypt_compact(stored, _secret_key(settings))
    except (JoseError, ValueError):
        return None
    if obj.protected.get("kid") != subscription_id or obj.plaintext is None:
        return None
    return obj.plaintext.decode()


# -- SSRF guard ----------------------------------------------------------------------
class UnsafeUrl(Exception):
    """The URL may not be called (scheme, host or a resolved address)."""


def address_problem(address: str) -> str | None:
    """Why ``address`` may not be called, or None if it is a public unicast address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for label, flag in (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
    ):
        if flag:
            return f"address {ip} is {label}"
    if not ip.is_global:
        return f"address {ip} is not public"
    return None


def check_url_shape(url: str, *, allow_private: bool) -> httpx.URL:
    """Scheme, host and form of a webhook URL; raises :class:`UnsafeUrl`."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise UnsafeUrl(f"not a valid URL: {exc}") from None
    allowed = ("https", "http") if allow_private else ("https",)
    if parsed.scheme not in allowed:
        raise UnsafeUrl("the URL must use https")
    if not parsed.host:
        raise UnsafeUrl("the URL has no host")
    if parsed.userinfo:
        raise UnsafeUrl("the URL may not carry credentials")
    if parsed.fragment:
        raise UnsafeUrl("the URL may not have a fragment")
    return parsed


async def resolve_safe(url: httpx.URL, *, allow_private: bool) -> str:
    """Resolve the URL's host; returns the address to connect to, or raises UnsafeUrl."""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            url.host, port, type=socket.SOCK_STREAM
        )
    except (OSError, UnicodeError) as exc:
        raise UnsafeUrl(f"host {url.host} does not resolve: {exc}") from None
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise UnsafeUrl(f"host {url.host} does not resolve")
    if not allow_private:
        for address in addresses:
            problem = address_problem(address)
            if problem:
                raise UnsafeUrl(f"refused: {url.host} resolves to a forbidden {problem}")
    return addresses[0]


async def validate_url(url: str, settings: Settings) -> str:
    """A URL a webhook may be created with (422 otherwise)."""
    allow = settings.webhook_allow_private_addresses
    try:
        await resolve_safe(check_url_shape(url, allow_private=allow), allow_private=allow)
    except UnsafeUrl as exc:
        raise Unprocessable(f"Webhook URL refused: {exc}.", field="url") from None
    return url


# -- subscriptions -------------------------------------------------------------------
async def require_webhook_admin(session: AsyncSession, principal: Principal) -> str:
    """The acting firm, if the caller is its owner, admin or integrator client; else 403."""
    role = await acting_role(session, principal)
    if role is None or principal.firm_id is None:
        raise Forbidden("Webhooks need a firm you are an active member of.")
    if role not in REQUESTER_ADMINS and role != "client":
        raise Forbidden("Managing webhooks needs the firm's owner or admin role.")
    return principal.firm_id


async def get_subscription(
    session: AsyncSession, principal: Principal, webhook_id: str, *, lock: bool = False
) -> WebhookSubscription:
    """The acting firm's subscription (404 for another firm's), for an admin (403 else)."""
    query = select(WebhookSubscription).where(WebhookSubscription.id == webhook_id)
    if lock:
        query = query.with_for_update()
    row = (await session.execute(query)).scalar_one_or_none()
    if row is None or principal.firm_id is None or row.firm_id != principal.firm_id:
        raise NotFound("No webhook with this id.")
    await require_webhook_admin(session, principal)
    return row


async def create_subscription(
    session: AsyncSession,
    principal: Principal,
    settings: Settings,
    *,
    url: str,
    events: list[str],
    description: str,
) -> tuple[WebhookSubscription, str]:
    """A new subscription of the acting firm and its secret (returned this once)."""
    firm_id = await require_webhook_admin(session, principal)
    await validate_url(url, settings)
    secret = generate_secret()
    webhook_id = new_id("whk")
    row = WebhookSubscription(
        id=webhook_id,
        firm_id=firm_id,
        url=url,
        events=_ordered(events),
        description=description,
        secret=encrypt_secret(settings, webhook_id, secret),
        created_by=principal.subject,
    )
    session.add(row)
    await session.flush()
    return row, secret


async def list_subscriptions(
    session: AsyncSession, principal: Principal, *, limit: int, after: str | None
) -> list[WebhookSubscription]:
    """The acting firm's subscriptions in creation order (``limit + 1`` rows)."""
    firm_id = await require_webhook_admin(session, principal)
    query = select(WebhookSubscription).where(WebhookSubscription.firm_id == firm_id)
    if after:
        query = query.where(WebhookSubscription.id > after)
    rows = await session.execute(query.order_by(col(WebhookSubscription.id)).limit(limit + 1))
    return list(rows.scalars())


async def update_subscription(
    session: AsyncSession,
    principal: Principal,
    settings: Settings,
    webhook_id: str,
    *,
    fields: dict[str, Any],
) -> WebhookSubscription:
    """Change the URL (checked again), the events, the description or ``active``."""
    row = await get_subscription(session, principal, webhook_id, lock=True)
    if fields.get("url") is not None:
        row.url = await validate_url(fields["url"], settings)
    if fields.get("events") is not None:
        row.events = _ordered(fields["events"])
    if fields.get("description") is not None:
        row.description = fields["description"]
    if fields.get("active") is not None:
        row.active = fields["active"]
        if row.active:
            session.info["webhooks_due"] = True  # held deliveries may go now
    row.updated_at = utcnow()
    await session.flush()
    return row


async def delete_subscription(session: AsyncSession, principal: Principal, webhook_id: str) -> None:
    """Remove the subscription with its deliveries and their attempt log."""
    row = await get_subscription(session, principal, webhook_id, lock=True)
    deliveries = select(WebhookDelivery.id).where(WebhookDelivery.subscription_id == row.id)
    await session.execute(
        sa.delete(WebhookAttempt).where(col(WebhookAttempt.delivery_id).in_(deliveries))
    )
    await session.execute(
        sa.delete(WebhookDelivery).where(col(WebhookDelivery.subscription_id) == row.id)
    )
    await session.delete(row)
    await session.flush()


async def rotate_secret(
    session: AsyncSession,
    principal: Principal,
    settings: Settings,
    webhook_id: str,
    *,
    keep_previous_seconds: int,
) -> tuple[WebhookSubscription, str]:
    """A new secret; the current one keeps signing too for ``keep_previous_seconds``."""
    row = await get_subscription(session, principal, webhook_id, lock=True)
    secret = generate_secret()
    now = utcnow()
    if keep_previous_seconds > 0:
        row.previous_secret = row.secret
        row.previous_expires_at = now + timedelta(seconds=keep_previous_seconds)
    else:
        row.previous_secret = None
        row.previous_expires_at = None
    row.secret = encrypt_secret(settings, row.id, secret)
    row.updated_at = now
    await session.flush()
    return row, secret


def _ordered(events: Iterable[str]) -> list[str]:
    wanted = set(events)
    return [e for e in EVENTS if e in wanted]


# -- deliveries ----------------------------------------------------------------------
async def ping(session: AsyncSession, principal: Principal, webhook_id: str) -> WebhookDelivery:
    """A ``webhook.ping`` delivery to this subscription only, due at once."""
    row = await get_subscription(session, principal, webhook_id)
    if not row.active:
        raise InvalidState("The webhook is not active.", state="inactive")
    now = utcnow()
    delivery = WebhookDelivery(
        id=new_id("whd"),
        subscription_id=row.id,
        event_id=new_id("evt"),
        event_type=PING,
        occurred_at=now,
        data={"webhook_id": row.id, "firm_id": row.firm_id},
        next_attempt_at=now,
        created_at=now,
    )
    session.add(delivery)
    session.info["webhooks_due"] = True
    await session.flush()
    return delivery


async def list_deliveries(
    session: AsyncSession,
    principal: Principal,
    webhook_id: str,
    *,
    status: str | None,
    limit: int,
    before: str | None,
) -> list[WebhookDelivery]:
    """A subscription's deliveries, newest first (``limit + 1`` rows)."""
    row = await get_subscription(session, principal, webhook_id)
    query = select(WebhookDelivery).where(WebhookDelivery.subscription_id == row.id)
    if status:
        query = query.where(WebhookDelivery.status == status)
    if before:
        query = query.where(WebhookDelivery.id < before)
    rows = await session.execute(query.order_by(col(WebhookDelivery.id).desc()).limit(limit + 1))
    return list(rows.scalars())


async def get_delivery(
    session: AsyncSession,
    principal: Principal,
    webhook_id: str,
    delivery_id: str,
    *,
    lock: bool = False,
) -> tuple[WebhookSubscription, WebhookDelivery]:
    row = await get_subscription(session, principal, webhook_id)
    query = select(WebhookDelivery).where(
        WebhookDelivery.id == delivery_id, WebhookDelivery.subscription_id == row.id
    )
    if lock:
        query = query.with_for_update()
    delivery = (await session.execute(query)).scalar_one_or_none()
    if delivery is None:
        raise NotFound("No delivery with this id for this webhook.")
    return row, delivery


async def delivery_attempts(session: AsyncSession, delivery_id: str) -> list[WebhookAttempt]:
    rows = await session.execute(
        select(WebhookAttempt)
        .where(WebhookAttempt.delivery_id == delivery_id)
        .order_by(col(WebhookAttempt.number))
    )
    return list(rows.scalars())


async def redeliver(
    session: AsyncSession, principal: Principal, webhook_id: str, delivery_id: str
) -> WebhookDelivery:
    """One more attempt at once, whatever the delivery's state.

    If it fails, the delivery retries on its schedule while attempts are left
    (``ONECLUSTER_WEBHOOK_MAX_ATTEMPTS`` counts every attempt), else it is failed again.
    """
    row, delivery = await get_delivery(session, principal, webhook_id, delivery_id, lock=True)
    if not row.active:
        raise InvalidState("The webhook is not active.", state="inactive")
    delivery.status = "pending"
    delivery.next_attempt_at = utcnow()
    session.info["webhooks_due"] = True
    await session.flush()
    return delivery


# -- fan-out -------------------------------------------------------------------------
def fixed_audience(envelope: Envelope) -> set[str]:
    """The firms an event goes to that its payload names (all but cluster members)."""
    payload = envelope.payload()
    if isinstance(payload, TaskPublishedV1):
        return {payload.requester_firm_id}
    if isinstance(payload, ContractAwardedV1):
        return {payload.requester_firm_id, payload.vendor_firm_id}
    if isinstance(payload, SubmissionReviewed):
        return {payload.requester_firm_id, payload.annotator_firm_id}
    if isinstance(payload, TaskCompletedV1):
        return {payload.requester_firm_id, *payload.vendor_firm_ids}
    if isinstance(payload, PayoutSettledV1):
        return {payload.payer_firm_id, payload.payee_firm_id}
    return set()


async def audience(session: AsyncSession, envelope: Envelope) -> set[str]:
    """Every firm that may receive ``envelope`` (see the table in the module docstring)."""
    firms = fixed_audience(envelope)
    payload = envelope.payload()
    if isinstance(payload, TaskPublishedV1):
        members = await session.execute(
            select(KnownClusterMember.firm_id).where(
                KnownClusterMember.cluster_id == payload.cluster_id,
                col(KnownClusterMember.active).is_(True),
            )
        )
        firms.update(members.scalars())
    return firms


async def fan_out(session: AsyncSession, envelope: Envelope) -> int:
    """One delivery per active subscription of the audience that wants this event."""
    if envelope.type not in EVENTS:
        return 0
    try:
        firms = await audience(session, envelope)
    except KeyError:
        log.warning("no contract for %s v%s; not delivered", envelope.type, envelope.version)
        return 0
    if not firms:
        return 0
    rows = await session.execute(
        select(WebhookSubscription).where(
            col(WebhookSubscription.firm_id).in_(sorted(firms)),
            col(WebhookSubscription.active).is_(True),
        )
    )
    now = utcnow()
    created = 0
    for sub in rows.scalars():
        if envelope.type not in sub.events:
            continue
        session.add(
            WebhookDelivery(
                id=new_id("whd"),
                subscription_id=sub.id,
                event_id=envelope.id,
                event_type=envelope.type,
                event_version=envelope.version,
                occurred_at=envelope.occurred_at,
                data=envelope.data,
                next_attempt_at=now,
                created_at=now,
            )
        )
        created += 1
    if created:
        session.info["webhooks_due"] = True
        await session.flush()
    return created


async def _apply_fan_out(session: AsyncSession, envelope: Envelope) -> None:
    await fan_out(session, envelope)


def subscribe_fan_out(app: FastAPI) -> None:
    """Consume the marketplace's own events into deliveries, once per event.

    The handler applies each event through ``consume_once`` before it returns; if it
    fails, the bus delivers the event again (embedded: the relay keeps it unsent).
    """
    db: Database = app.state.db

    async def handle(envelope: Envelope) -> None:
        await consume_once(db, MarketplaceProcessedEvent, CONSUMER, envelope, _apply_fan_out)

    app.state.runtime.bus.subscribe(CONSUMER, handle, sources=["marketplace"], types=EVENTS)


# -- the delivery worker -------------------------------------------------------------
@dataclass
class Job:
    """A delivery leased for one attempt, with what is needed to send it."""

    delivery_id: str
    lease: datetime
    url: str
    secrets: list[str]
    event_type: str
    body: bytes


@dataclass
class Outcome:
    status_code: int | None
    error: str | None
    snippet: str
    started_at: datetime
    duration_ms: int

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def event_body(delivery: WebhookDelivery) -> bytes:
    document = {
        "id": delivery.event_id,
        "type": delivery.event_type,
        "version": delivery.event_version,
        "occurred_at": delivery.occurred_at.isoformat(),
        "data": delivery.data,
    }
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def retry_delay(attempts: int, settings: Settings, rng: random.Random | None = None) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones: x3 each, ±20 %."""
    base = min(settings.webhook_retry_base * 3 ** (attempts - 1), settings.webhook_retry_max)
    return base * (rng or random).uniform(0.8, 1.2)


class WebhookWorker:
    """Sends due deliveries; one per service process, any number of replicas."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        *,
        clock: Callable[[], datetime] = utcnow,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.clock = clock
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._slots = asyncio.Semaphore(settings.webhook_concurrency)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        db.after_commit.append(self._after_commit)

    def _after_commit(self, session: Any) -> None:
        if session.info.pop("webhooks_due", False):
            self._wake.set()

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=self._transport,
                timeout=self.settings.webhook_timeout,
                follow_redirects=False,
                trust_env=False,
                headers={"User-Agent": USER_AGENT},
            )
        return self._client

    def start(self) -> None:
        self._stopping = False
        self._wake.set()
        self._task = asyncio.create_task(self._run(), name="webhook-worker")

    async def stop(self) -> None:
        """Stop taking work, let attempts in flight finish (bounded), close the client."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            task, self._task = self._task, None
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._in_flight:
            _, pending = await asyncio.wait(
                set(self._in_flight), timeout=self.settings.webhook_timeout + 2
            )
            for left in pending:  # its lease runs out and another replica retries it
                left.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._wake.wait(), timeout=self.settings.webhook_poll_interval
                )
            self._wake.clear()
            try:
                while not self._stopping:
                    started = await self.dispatch_due()
                    if started == 0:
                        break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("webhook worker: %r", exc)

    async def dispatch_due(self) -> int:
        """Lease as many due deliveries as there are free slots and start sending them."""
        free = self.settings.webhook_concurrency - len(self._in_flight)
        if free <= 0:
            await asyncio.wait(set(self._in_flight), return_when=asyncio.FIRST_COMPLETED)
            return 1
        jobs = await self.claim_due(free)
        for job in jobs:
            task = asyncio.create_task(self._send_and_record(job), name="webhook-delivery")
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
        return len(jobs)

    async def run_due_once(self, limit: int = 100) -> int:
        """Send every due delivery (up to ``limit``) and wait for them; for tests and tools."""
        jobs = await self.claim_due(limit)
        await asyncio.gather(*(self._send_and_record(job) for job in jobs))
        return len(jobs)

    async def claim_due(self, limit: int) -> list[Job]:
        """Take due deliveries of active subscriptions and lease them for one attempt."""
        now = self.clock()
        lease = now + timedelta(seconds=self.settings.webhook_timeout + 30)
        if not await self._anything_due(now):
            return []  # polls stay off the write lock (SQLite) when there is nothing to do
        async with self.db.session_scope() as session:
            query = (
                select(WebhookDelivery, WebhookSubscription)
                .join(
                    WebhookSubscription,
                    col(WebhookSubscription.id) == col(WebhookDelivery.subscription_id),
                )
                .where(
                    col(WebhookDelivery.next_attempt_at) <= now,
                    col(WebhookSubscription.active).is_(True),
                )
                .order_by(col(WebhookDelivery.next_attempt_at))
                .limit(limit)
            )
            if self.db.postgres:
                query = query.with_for_update(of=WebhookDelivery, skip_locked=True)
            rows = (await session.execute(query)).all()
            jobs = []
            for delivery, sub in rows:
                delivery.next_attempt_at = lease
                jobs.append(
                    Job(
                        delivery_id=delivery.id,
                        lease=lease,
                        url=sub.url,
                        secrets=self._signing_secrets(sub, now),
                        event_type=delivery.event_type,
                        body=event_body(delivery),
                    )
                )
            await session.flush()
        return jobs

    async def _anything_due(self, now: datetime) -> bool:
        async with self.db.read_scope() as session:
            found = await session.execute(
                select(WebhookDelivery.id)
                .join(
                    WebhookSubscription,
                    col(WebhookSubscription.id) == col(WebhookDelivery.subscription_id),
                )
                .where(
                    col(WebhookDelivery.next_attempt_at) <= now,
                    col(WebhookSubscription.active).is_(True),
                )
                .limit(1)
            )
            return found.first() is not None

    def _signing_secrets(self, sub: WebhookSubscription, now: datetime) -> list[str]:
        found = [decrypt_secret(self.settings, sub.id, sub.secret)]
        if sub.previous_secret and sub.previous_expires_at and sub.previous_expires_at > now:
            found.append(decrypt_secret(self.settings, sub.id, sub.previous_secret))
        return [s for s in found if s]

    async def _send_and_record(self, job: Job) -> None:
        async with self._slots:
            outcome = await self.send(job)
        try:
            await self.record(job, outcome)
        except Exception:
            # The lease runs out and the delivery is tried again: at least once.
            log.exception("recording webhook attempt of %s failed", job.delivery_id)

    async def send(self, job: Job) -> Outcome:
        """One HTTP attempt; never raises."""
        started_at = self.clock()
        t0 = time.perf_counter()

        def outcome(status: int | None, error: str | None, snippet: str = "") -> Outcome:
            duration = int((time.perf_counter() - t0) * 1000)
            return Outcome(status, error and error[:500], snippet, started_at, duration)

        if not job.secrets:
            return outcome(None, "secret unreadable: rotate the webhook's secret")
        allow = self.settings.webhook_allow_private_addresses
        try:
            url = check_url_shape(job.url, allow_private=allow)
            address = await resolve_safe(url, allow_private=allow)
        except UnsafeUrl as exc:
            return outcome(None, str(exc))
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "Host": url.netloc.decode("ascii"),
            "OneCluster-Webhook-Id": job.delivery_id,
            "OneCluster-Event": job.event_type,
            "OneCluster-Timestamp": str(timestamp),
            "OneCluster-Signature": signature_header(job.secrets, timestamp, job.body),
        }
        # Connect to the address that was checked, not to a second DNS answer.
        pinned = url.copy_with(host=address)
        extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
        try:
            async with (
                asyncio.timeout(self.settings.webhook_timeout),  # the whole exchange
                self.client.stream(
                    "POST", pinned, content=job.body, headers=headers, extensions=extensions
                ) as response,
            ):
                snippet = await _read_snippet(response)
                status = response.status_code
        except (httpx.TimeoutException, TimeoutError):
            return outcome(None, f"timed out after {self.settings.webhook_timeout:g} s")
        except httpx.HTTPError as exc:
            return outcome(None, f"{type(exc).__name__}: {exc}")
        error = None if 200 <= status < 300 else f"HTTP {status}"
        return outcome(status, error, snippet)

    async def record(self, job: Job, outcome: Outcome) -> None:
        """Log the attempt and schedule what comes next."""
        async with self.db.session_scope() as session:
            delivery = (
                await session.execute(
                    select(WebhookDelivery)
                    .where(WebhookDelivery.id == job.delivery_id)
                    .with_for_update()
                )
            ).scalar_one_or_none()
            if delivery is None:  # the subscription was deleted meanwhile
                return
            delivery.attempts += 1
            session.add(
                WebhookAttempt(
                    id=new_id("wha"),
                    delivery_id=delivery.id,
                    number=delivery.attempts,
                    started_at=outcome.started_at,
                    duration_ms=outcome.duration_ms,
                    status_code=outcome.status_code,
                    error=outcome.error,
                    response_snippet=outcome.snippet,
                )
            )
            delivery.last_status_code = outcome.status_code
            delivery.last_error = outcome.error
            now = self.clock()
            if delivery.next_attempt_at != job.lease:
                pass  # redelivery asked for meanwhile: keep its schedule
            elif outcome.ok:
                delivery.status = "delivered"
                delivery.delivered_at = now
                delivery.next_attempt_at = None
            elif delivery.attempts >= self.settings.webhook_max_attempts:
                delivery.status = "failed"
                delivery.next_attempt_at = None
            else:
                delay = retry_delay(delivery.attempts, self.settings)
                delivery.next_attempt_at = now + timedelta(seconds=delay)
            await session.flush()


async def _read_snippet(response: httpx.Response) -> str:
    """The first 1 KB of the response body (the rest is not read)."""
    data = b""
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) >= SNIPPET_BYTES:
            break
    return data[:SNIPPET_BYTES].decode("utf-8", errors="replace")[:SNIPPET_BYTES]


async def on_startup(app: FastAPI) -> None:
    """Subscribe the fan-out to the bus and start the delivery worker (if enabled)."""
    subscribe_fan_out(app)
    worker = WebhookWorker(app.state.db, app.state.settings)
    app.state.webhook_worker = worker
    if app.state.settings.webhook_delivery_enabled:
        worker.start()


async def on_shutdown(app: FastAPI) -> None:
    worker: WebhookWorker | None = getattr(app.state, "webhook_worker", None)
    if worker is not None:
        await worker.stop()
