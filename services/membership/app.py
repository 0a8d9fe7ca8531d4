"""The membership & identity service: users, firms, clusters, parks, OAuth 2 server, audit."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from services.kit.app import KitModels, ServiceSpec, create_service_app
from services.kit.runtime import Runtime
from services.kit.settings import Settings
from services.membership import client_routes, oauth_routes, passwords, routes
from services.membership.models import MembershipIdempotencyKey, MembershipOutbox

SPEC = ServiceSpec(
    name="membership",
    title="OneCluster membership & identity",
    description=(
        "Users, firms, clusters, join requests, invitations, industrial parks, integrator "
        "clients, the OAuth 2 authorization server and the audit log."
    ),
    routers=[routes.router, client_routes.router, oauth_routes.router],
    models=KitModels(outbox=MembershipOutbox, idempotency=MembershipIdempotencyKey),
    migrations_dir=Path(__file__).parent / "migrations",
    on_startup=[oauth_routes.on_startup],
    on_shutdown=[oauth_routes.on_shutdown],
    openapi_tags=[
        {"name": "users", "description": "Sign-up and your own profile"},
        {"name": "firms", "description": "Firms, their members, invitations and API clients"},
        {"name": "clusters", "description": "Clusters, join requests, invitations, parks"},
        {"name": "reference", "description": "Industries and regions"},
        {"name": "oauth", "description": "The OAuth 2 authorization server"},
    ],
)


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> FastAPI:
    app = create_service_app(SPEC, settings, runtime)
    passwords.configure(app.state.settings)
    return app
