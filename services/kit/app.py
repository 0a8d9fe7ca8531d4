"""The service app factory: every service is built the same way.

``create_service_app`` wires the kit around a service's routers: problem+json errors,
telemetry, idempotency, health and metrics endpoints, and a lifespan that opens the
database (migrating it in embedded mode), starts the outbox relay, and runs the
service's own start-up and shutdown hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncSession

from services.kit.db import Database
from services.kit.errors import ProblemDetails, install_error_handlers
from services.kit.idempotency import IdempotencyFields, IdempotencyMiddleware
from services.kit.outbox import OutboxFields, OutboxRelay, ProcessedEventFields
from services.kit.runtime import Runtime
from services.kit.settings import Settings
from services.kit.telemetry import TelemetryMiddleware, metrics_endpoint

Hook = Callable[[FastAPI], Awaitable[None]]


@dataclass(frozen=True)
class KitModels:
    """The kit's tables as declared in one service's own metadata."""

    outbox: type[OutboxFields]
    idempotency: type[IdempotencyFields]
    processed_events: type[ProcessedEventFields] | None = None


@dataclass
class ServiceSpec:
    name: str
    title: str
    description: str
    routers: Sequence[APIRouter]
    models: KitModels
    migrations_dir: Path
    on_startup: Sequence[Hook] = ()
    on_shutdown: Sequence[Hook] = ()
    openapi_tags: Sequence[dict[str, Any]] = ()


def create_service_app(
    spec: ServiceSpec, settings: Settings | None = None, runtime: Runtime | None = None
) -> FastAPI:
    settings = settings or Settings()
    runtime = runtime or Runtime(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(
            settings.database_url_for(spec.name), schema=spec.name, pool_size=settings.db_pool_size
        )
        if settings.auto_migrate:
            await db.migrate(spec.migrations_dir)
        app.state.db = db
        await runtime.acquire()
        relay = OutboxRelay(
            db,
            spec.models.outbox,
            runtime.bus,
            source=spec.name,
            poll_interval=settings.outbox_poll_interval,
        )
        app.state.relay = relay
        try:
            for hook in spec.on_startup:
                await hook(app)
            relay.start()
            yield
        finally:
            runtime.draining = True
            for hook in spec.on_shutdown:
                await hook(app)
            await relay.stop()
            await runtime.release()
            await db.dispose()

    app = FastAPI(
        title=spec.title,
        description=spec.description,
        version="1.0.0",
        lifespan=lifespan,
        openapi_tags=list(spec.openapi_tags) or None,
    )
    app.state.settings = settings
    app.state.runtime = runtime
    app.state.service = spec.name
    app.state.models = spec.models
    app.state.verifier = runtime.verifier()
    app.state.rate_limiter = runtime.rate_limiter
    install_error_handlers(app)
    for router in spec.routers:
        app.include_router(router)
    add_operational_routes(app, runtime)
    _register_problem_schema(app)
    app.add_middleware(IdempotencyMiddleware)
    app.add_middleware(TelemetryMiddleware, service=spec.name)
    return app


def add_operational_routes(app: FastAPI, runtime: Runtime) -> None:
    @app.get("/healthz", tags=["operations"], summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], summary="Readiness: database and Redis answer")
    async def readyz(request: Request) -> JSONResponse:
        checks: dict[str, str] = {}
        ok = not runtime.draining
        if runtime.draining:
            checks["shutdown"] = "draining"
        try:
            await request.app.state.db.ping()
            checks["database"] = "ok"
        except Exception as exc:
            ok = False
            checks["database"] = f"error: {type(exc).__name__}"
        if runtime.redis is not None:
            try:
                await runtime.redis_ping()
                checks["redis"] = "ok"
            except Exception as exc:
                ok = False
                checks["redis"] = f"error: {type(exc).__name__}"
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "checks": checks},
            status_code=200 if ok else 503,
        )

    app.add_route("/metrics", metrics_endpoint, include_in_schema=False)


def _register_problem_schema(app: FastAPI) -> None:
    """Put ProblemDetails into components/schemas so ``responses()`` can reference it."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.setdefault("ProblemDetails", ProblemDetails.model_json_schema())
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


READ_METHODS = frozenset({"GET", "HEAD"})


def request_scope(request: Request) -> contextlib.AbstractAsyncContextManager[AsyncSession]:
    """GET and HEAD read in a read-only scope; other methods own a committing transaction."""
    db: Database = request.app.state.db
    return db.read_scope() if request.method in READ_METHODS else db.session_scope()


async def session_dependency(request: Request) -> AsyncIterator[AsyncSession]:
    """The request's session: commits when the handler succeeds, rolls back on error."""
    async with request_scope(request) as session:
        yield session
