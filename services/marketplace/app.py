"""The marketplace service: annotation tasks, items, and leased assignments."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from services.kit.app import KitModels, ServiceSpec, create_service_app
from services.kit.runtime import Runtime
from services.kit.settings import Settings
from services.marketplace import (
    consumers,
    contract_routes,
    kinds,
    ledger_routes,
    results_routes,
    review,
    routes,
    webhook_routes,
    webhooks,
)
from services.marketplace.models import (
    MarketplaceIdempotencyKey,
    MarketplaceOutbox,
    MarketplaceProcessedEvent,
)

SPEC = ServiceSpec(
    name="marketplace",
    title="OneCluster task marketplace",
    description=(
        "Data-annotation tasks posted in a cluster, their items and gold items, and open "
        "allocation of leased assignments to eligible member firms' annotators."
    ),
    routers=[
        routes.router,
        contract_routes.router,
        webhook_routes.router,
        results_routes.router,
        ledger_routes.router,
    ],
    models=KitModels(
        outbox=MarketplaceOutbox,
        idempotency=MarketplaceIdempotencyKey,
        processed_events=MarketplaceProcessedEvent,
    ),
    migrations_dir=Path(__file__).parent / "migrations",
    on_startup=[consumers.on_startup, webhooks.on_startup, review.on_startup],
    on_shutdown=[webhooks.on_shutdown, review.on_shutdown],
    openapi_tags=[
        {
            "name": "tasks",
            "description": "Annotation tasks and their life cycle. " + (kinds.__doc__ or ""),
        },
        {"name": "items", "description": "Bulk import of items and gold items"},
        {"name": "assignments", "description": "Claim, release and submit leased items"},
        {"name": "contracts", "description": "Bids, awarded contracts, quotas (contracted tasks)"},
        {"name": "reputation", "description": "Vendor firms' reputation from their work"},
        {"name": "webhooks", "description": "Signed HTTP callbacks of marketplace events"},
        {
            "name": "results",
            "description": "Quality report, aggregated results and raw annotation exports",
        },
        {"name": "ledger", "description": "Credits: grants, escrow, payouts, statements"},
        {"name": "review", "description": "Accept or reject submissions; auto-acceptance"},
    ],
)


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> FastAPI:
    return create_service_app(SPEC, settings, runtime)
