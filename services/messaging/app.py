"""The messaging service: cluster channels, conversations, messages, live delivery."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from services.kit.app import KitModels, ServiceSpec, create_service_app
from services.kit.runtime import Runtime
from services.kit.settings import Settings
from services.messaging import consumers, routes, search, ws
from services.messaging.fanout import Hub
from services.messaging.models import (
    MessagingIdempotencyKey,
    MessagingOutbox,
    MessagingProcessedEvent,
)


async def start_hub(app: FastAPI) -> None:
    runtime = app.state.runtime
    hub = Hub(app.state.db, app.state.settings, runtime.redis, runtime.denylist)
    app.state.hub = hub
    hub.start()


async def stop_hub(app: FastAPI) -> None:
    hub: Hub | None = getattr(app.state, "hub", None)
    if hub is not None:
        await hub.stop()


SPEC = ServiceSpec(
    name="messaging",
    title="OneCluster messaging",
    description=(
        "Real-time conversations between the firms of a cluster: the cluster's general "
        "channel, topic and private channels, direct conversations. Messages carry a "
        "gap-free per-channel seq; the WebSocket at /v1/ws replays what a client missed "
        "and then streams live (frame protocol: services/messaging/PROTOCOL.md)."
    ),
    routers=[routes.router, ws.router],
    models=KitModels(
        outbox=MessagingOutbox,
        idempotency=MessagingIdempotencyKey,
        processed_events=MessagingProcessedEvent,
    ),
    migrations_dir=Path(__file__).parent / "migrations",
    on_startup=[search.on_startup, consumers.on_startup, start_hub],
    on_shutdown=[stop_hub],
    openapi_tags=[
        {"name": "channels", "description": "Channels, conversations and their people"},
        {"name": "messages", "description": "Messages, their history and read markers"},
    ],
)


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> FastAPI:
    return create_service_app(SPEC, settings, runtime)
