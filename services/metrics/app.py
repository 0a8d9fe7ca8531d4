"""The metrics service: fact store, indicators, collaboration network, classifier."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from services.kit.app import KitModels, ServiceSpec, create_service_app
from services.kit.runtime import Runtime
from services.kit.settings import Settings
from services.metrics import consumers, routes, service
from services.metrics.models import (
    MetricsIdempotencyKey,
    MetricsOutbox,
    MetricsProcessedEvent,
)

SPEC = ServiceSpec(
    name="metrics",
    title="OneCluster metrics",
    description=(
        "Measures each cluster from the platform's own activity (and its imported "
        "history): indicators of the six features of a digital-economy industrial "
        "cluster, the collaboration network, and the cluster type and agglomeration form "
        "with their confidence."
    ),
    routers=[routes.router],
    models=KitModels(
        outbox=MetricsOutbox,
        idempotency=MetricsIdempotencyKey,
        processed_events=MetricsProcessedEvent,
    ),
    migrations_dir=Path(__file__).parent / "migrations",
    on_startup=[consumers.on_startup, service.on_startup],
    on_shutdown=[service.on_shutdown],
    openapi_tags=[
        {
            "name": "metrics",
            "description": "Indicators, network, classification and history import of a "
            "cluster (its operator's owners and admins, or its clients)",
        }
    ],
)


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> FastAPI:
    return create_service_app(SPEC, settings, runtime)
