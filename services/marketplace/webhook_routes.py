"""HTTP routes of webhooks: a firm's subscriptions, their deliveries and attempt log.

Everything acts on the acting firm's own subscriptions (another firm's id is a 404)
and needs the firm's owner or admin role, or one of its integrator clients (403 else).
Signing, audience, retries and the receiver's verification recipe: see
:mod:`services.marketplace.webhooks`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from services.kit.errors import responses
from services.kit.pagination import Page, PageParams, page_of
from services.kit.settings import Settings
from services.marketplace import webhooks
from services.marketplace.deps import MarketplaceReader, MarketplaceWriter, SessionDep
from services.marketplace.webhooks import (
    DEFAULT_KEEP_PREVIOUS,
    EVENTS,
    MAX_URL_LENGTH,
    WebhookAttempt,
    WebhookDelivery,
    WebhookSubscription,
)

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
ERR = responses(400, 401, 403, 404, 409, 422, 429)
Id = Annotated[str, Path(min_length=1, max_length=64)]
EventType = Literal[
    "task.published",
    "contract.awarded",
    "submission.accepted",
    "submission.rejected",
    "task.completed",
    "payout.settled",
]
assert set(EventType.__args__) == set(EVENTS)  # type: ignore[attr-defined]
Url = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_URL_LENGTH)
]
Events = Annotated[list[EventType], Field(min_length=1, max_length=len(EVENTS))]
Description = Annotated[str, StringConstraints(max_length=500)]
DeliveryStatus = Literal["pending", "delivered", "failed"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WebhookCreate(_Request):
    url: Url = Field(examples=["https://hooks.example.com/onecluster"])
    events: Events = Field(examples=[["task.published", "submission.accepted"]])
    description: Description = ""


class WebhookUpdate(_Request):
    url: Url | None = None
    events: Events | None = None
    description: Description | None = None
    active: bool | None = Field(
        None, description="an inactive webhook gets no new events; pending ones wait"
    )


class RotateSecret(_Request):
    keep_previous_seconds: int = Field(
        DEFAULT_KEEP_PREVIOUS,
        ge=0,
        le=7 * 86400,
        description="how long the old secret keeps signing beside the new one (0: at once)",
    )


class WebhookOut(BaseModel):
    id: str
    firm_id: str
    url: str
    events: list[str]
    description: str
    active: bool
    previous_secret_expires_at: datetime | None = Field(
        None, description="until then deliveries also carry the old secret's signature"
    )
    created_at: datetime
    updated_at: datetime


class WebhookWithSecret(WebhookOut):
    secret: str = Field(description="the signing secret; shown only in this response")


class DeliveryOut(BaseModel):
    id: str = Field(description="sent as OneCluster-Webhook-Id")
    event_id: str = Field(description="the body's id; the same for every retry")
    event: str
    status: DeliveryStatus
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    created_at: datetime


class AttemptOut(BaseModel):
    number: int
    started_at: datetime
    duration_ms: int
    status_code: int | None
    error: str | None
    response_snippet: str = Field(description="the first 1 KB of the response body")


class DeliveryDetail(DeliveryOut):
    attempt_log: list[AttemptOut]


def webhook_out(row: WebhookSubscription) -> WebhookOut:
    return WebhookOut(
        id=row.id,
        firm_id=row.firm_id,
        url=row.url,
        events=row.events,
        description=row.description,
        active=row.active,
        previous_secret_expires_at=row.previous_expires_at if row.previous_secret else None,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def with_secret(row: WebhookSubscription, secret: str) -> WebhookWithSecret:
    return WebhookWithSecret(**webhook_out(row).model_dump(), secret=secret)


def delivery_out(row: WebhookDelivery) -> DeliveryOut:
    return DeliveryOut(
        id=row.id,
        event_id=row.event_id,
        event=row.event_type,
        status=row.status,
        attempts=row.attempts,
        last_status_code=row.last_status_code,
        last_error=row.last_error,
        next_attempt_at=row.next_attempt_at,
        delivered_at=row.delivered_at,
        created_at=row.created_at,
    )


def attempt_out(row: WebhookAttempt) -> AttemptOut:
    return AttemptOut(
        number=row.number,
        started_at=row.started_at,
        duration_ms=row.duration_ms,
        status_code=row.status_code,
        error=row.error,
        response_snippet=row.response_snippet,
    )


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


@router.post(
    "",
    status_code=201,
    response_model=WebhookWithSecret,
    summary="Subscribe an endpoint to events (its signing secret is shown once)",
    responses=ERR,
)
async def create_webhook(
    body: WebhookCreate,
    request: Request,
    response: Response,
    session: SessionDep,
    principal: MarketplaceWriter,
) -> WebhookWithSecret:
    row, secret = await webhooks.create_subscription(
        session,
        principal,
        _settings(request),
        url=body.url,
        events=list(body.events),
        description=body.description,
    )
    response.headers["Cache-Control"] = "no-store"  # carries the secret: never replayed
    return with_secret(row, secret)


@router.get("", response_model=Page[WebhookOut], summary="Your firm's webhooks", responses=ERR)
async def list_webhooks(
    session: SessionDep, principal: MarketplaceReader, page: PageParams
) -> Page[WebhookOut]:
    rows = await webhooks.list_subscriptions(session, principal, limit=page.limit, after=page.after)
    return page_of([webhook_out(r) for r in rows], rows, page.limit, lambda r: r.id)


@router.get("/{webhook_id}", response_model=WebhookOut, summary="One webhook", responses=ERR)
async def get_webhook(
    webhook_id: Id, session: SessionDep, principal: MarketplaceReader
) -> WebhookOut:
    return webhook_out(await webhooks.get_subscription(session, principal, webhook_id))


@router.patch(
    "/{webhook_id}",
    response_model=WebhookOut,
    summary="Change the URL, events, description, or pause/resume (active)",
    responses=ERR,
)
async def update_webhook(
    webhook_id: Id,
    body: WebhookUpdate,
    request: Request,
    session: SessionDep,
    principal: MarketplaceWriter,
) -> WebhookOut:
    fields = {name: getattr(body, name) for name in body.model_fields_set}
    row = await webhooks.update_subscription(
        session, principal, _settings(request), webhook_id, fields=fields
    )
    return webhook_out(row)


@router.delete(
    "/{webhook_id}",
    status_code=204,
    summary="Delete a webhook with its deliveries",
    responses=ERR,
)
async def delete_webhook(
    webhook_id: Id, session: SessionDep, principal: MarketplaceWriter
) -> Response:
    await webhooks.delete_subscription(session, principal, webhook_id)
    return Response(status_code=204)


@router.post(
    "/{webhook_id}:rotate-secret",
    response_model=WebhookWithSecret,
    summary="A new signing secret; the old one also signs for a grace period",
    responses=ERR,
)
async def rotate_webhook_secret(
    webhook_id: Id,
    request: Request,
    response: Response,
    session: SessionDep,
    principal: MarketplaceWriter,
    body: RotateSecret | None = None,
) -> WebhookWithSecret:
    keep = (body or RotateSecret()).keep_previous_seconds
    row, secret = await webhooks.rotate_secret(
        session, principal, _settings(request), webhook_id, keep_previous_seconds=keep
    )
    response.headers["Cache-Control"] = "no-store"
    return with_secret(row, secret)


@router.post(
    "/{webhook_id}:ping",
    status_code=202,
    response_model=DeliveryOut,
    summary="Send a webhook.ping event to this endpoint now",
    responses=ERR,
)
async def ping_webhook(
    webhook_id: Id, session: SessionDep, principal: MarketplaceWriter
) -> DeliveryOut:
    return delivery_out(await webhooks.ping(session, principal, webhook_id))


@router.get(
    "/{webhook_id}/deliveries",
    response_model=Page[DeliveryOut],
    summary="Deliveries to this webhook, newest first",
    responses=ERR,
)
async def list_deliveries(
    webhook_id: Id,
    session: SessionDep,
    principal: MarketplaceReader,
    page: PageParams,
    status: Annotated[DeliveryStatus | None, Query()] = None,
) -> Page[DeliveryOut]:
    rows = await webhooks.list_deliveries(
        session, principal, webhook_id, status=status, limit=page.limit, before=page.after
    )
    return page_of([delivery_out(r) for r in rows], rows, page.limit, lambda r: r.id)


@router.get(
    "/{webhook_id}/deliveries/{delivery_id}",
    response_model=DeliveryDetail,
    summary="One delivery with its attempt log",
    responses=ERR,
)
async def get_delivery(
    webhook_id: Id, delivery_id: Id, session: SessionDep, principal: MarketplaceReader
) -> DeliveryDetail:
    _, row = await webhooks.get_delivery(session, principal, webhook_id, delivery_id)
    attempts = await webhooks.delivery_attempts(session, row.id)
    return DeliveryDetail(
        **delivery_out(row).model_dump(), attempt_log=[attempt_out(a) for a in attempts]
    )


@router.post(
    "/{webhook_id}/deliveries/{delivery_id}:redeliver",
    status_code=202,
    response_model=DeliveryOut,
    summary="Attempt this delivery again now, whatever its state",
    responses=ERR,
)
async def redeliver(
    webhook_id: Id, delivery_id: Id, session: SessionDep, principal: MarketplaceWriter
) -> DeliveryOut:
    return delivery_out(await webhooks.redeliver(session, principal, webhook_id, delivery_id))
