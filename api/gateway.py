"""The all-in-one gateway: the four services under one ASGI app (embedded mode).

Services share path roots (membership serves ``/v1/clusters/{id}/members``, metrics
``/v1/clusters/{id}/indicators``), so the gateway does not mount them under prefixes: it
asks each service's router whether it matches the request and hands the whole ASGI call
to that service's app, middleware and all. Starlette does not run a mounted app's
lifespan, so the gateway enters each service's lifespan itself, in order, and leaves
them in reverse. It serves one merged OpenAPI document at ``/openapi.json`` and the docs
at ``/docs``; ``/healthz``, ``/readyz`` and ``/metrics`` cover the whole process.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Match
from starlette.types import Receive, Scope, Send

from services.kit.runtime import Runtime
from services.kit.settings import Settings
from services.kit.telemetry import metrics_endpoint

Factory = Callable[[Settings, Runtime], FastAPI]
ROUTE_CACHE_SIZE = 4096  # (method, path) → service; paths carry ids, so it must stay bounded


def service_factories() -> dict[str, Factory]:
    """The services this build contains, in start-up order (membership first: it holds keys)."""
    from services.marketplace.app import create_app as marketplace
    from services.membership.app import create_app as membership
    from services.messaging.app import create_app as messaging
    from services.metrics.app import create_app as metrics

    return {
        "membership": membership,
        "marketplace": marketplace,
        "messaging": messaging,
        "metrics": metrics,
    }


class Gateway:
    def __init__(self, settings: Settings, services: list[str] | None = None) -> None:
        self.settings = settings
        self.runtime = Runtime(settings)
        factories = service_factories()
        names = services or list(factories)
        self.apps: dict[str, FastAPI] = {
            name: factories[name](settings, self.runtime) for name in names
        }
        self._openapi: dict[str, Any] | None = None
        self._routes: dict[tuple[str, str, str], FastAPI] = {}

    # -- lifespan -----------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            await self.runtime.acquire()
            stack.push_async_callback(self.runtime.release)
            for app in self.apps.values():
                await stack.enter_async_context(app.router.lifespan_context(app))
            yield
            self.runtime.draining = True

    # -- ASGI ---------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._serve_lifespan(receive, send)
            return
        if scope["type"] in ("http", "websocket"):
            path = scope["path"]
            if scope["type"] == "http":
                own = self._own_route(path)
                if own is not None:
                    response = await own(Request(scope, receive))
                    await response(scope, receive, send)
                    return
            target = self._route(scope)
            if target is not None:
                await target(scope, receive, send)
                return
            # Nothing matches: let the first service answer (a problem+json 404).
            await next(iter(self.apps.values()))(scope, receive, send)

    def _route(self, scope: Scope) -> FastAPI | None:
        """The service whose router matches; remembered per (method, path), bounded."""
        key = (scope["type"], scope.get("method", ""), scope["path"])
        app = self._routes.get(key)
        if app is None:
            app = self._match(scope)
            if app is not None:
                if len(self._routes) >= ROUTE_CACHE_SIZE:
                    self._routes.pop(next(iter(self._routes)))
                self._routes[key] = app
        return app

    def _match(self, scope: Scope) -> FastAPI | None:
        """The service with the most specific full match, as one router would choose.

        Two services may both match a path (``/v1/clusters/compare`` is metrics' own
        route and also membership's ``/v1/clusters/{cluster_id}``): the match that
        binds fewer path parameters — more literal segments — wins; on a tie, the
        service listed first.
        """
        best: tuple[int, FastAPI] | None = None
        partial: FastAPI | None = None
        for app in self.apps.values():
            for route in app.router.routes:
                match, _ = route.matches(scope)
                if match == Match.FULL:
                    bound = _bound_parameters(route, scope)
                    if best is None or bound < best[0]:
                        best = (bound, app)
                    break
                if match == Match.PARTIAL and partial is None:
                    partial = app  # right path, wrong method: its 405 is the answer
        return best[1] if best is not None else partial

    def _own_route(self, path: str) -> Callable[[Request], Any] | None:
        return {
            "/openapi.json": self._openapi_endpoint,
            "/docs": self._docs_endpoint,
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": metrics_endpoint,
        }.get(path)

    async def _serve_lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        cm = self.lifespan()
        try:
            await cm.__aenter__()
        except BaseException as exc:
            await send({"type": "lifespan.startup.failed", "message": repr(exc)})
            raise
        await send({"type": "lifespan.startup.complete"})
        message = await receive()
        assert message["type"] == "lifespan.shutdown"
        try:
            await cm.__aexit__(None, None, None)
        except BaseException as exc:
            await send({"type": "lifespan.shutdown.failed", "message": repr(exc)})
            raise
        await send({"type": "lifespan.shutdown.complete"})

    # -- merged documents ---------------------------------------------------------------
    def openapi(self) -> dict[str, Any]:
        if self._openapi is None:
            merged: dict[str, Any] = {
                "openapi": "3.1.0",
                "info": {
                    "title": "OneCluster API",
                    "version": "1.0.0",
                    "description": (
                        "One online industrial cluster: membership and identity, the task "
                        "marketplace, messaging and cluster metrics. Errors are RFC 9457 "
                        "problem+json; lists use cursor pagination; POSTs that create accept "
                        "an Idempotency-Key."
                    ),
                },
                "paths": {},
                "components": {"schemas": {}, "securitySchemes": {}},
                "tags": [],
            }
            for app in self.apps.values():
                doc = app.openapi()
                for path, item in doc.get("paths", {}).items():
                    merged["paths"].setdefault(path, {}).update(item)
                for kind, values in doc.get("components", {}).items():
                    merged["components"].setdefault(kind, {}).update(values)
                merged["tags"].extend(doc.get("tags", []))
            self._openapi = merged
        return self._openapi

    async def _openapi_endpoint(self, _: Request) -> Response:
        return JSONResponse(self.openapi())

    async def _docs_endpoint(self, _: Request) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="OneCluster API")

    async def _healthz(self, _: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _readyz(self, request: Request) -> Response:
        checks: dict[str, Any] = {}
        ok = not self.runtime.draining
        for name, app in self.apps.items():
            try:
                await app.state.db.ping()
                checks[name] = "ok"
            except Exception as exc:
                ok = False
                checks[name] = f"error: {type(exc).__name__}"
        if self.runtime.redis is not None:
            try:
                await self.runtime.redis_ping()
                checks["redis"] = "ok"
            except Exception as exc:
                ok = False
                checks["redis"] = f"error: {type(exc).__name__}"
        if self.runtime.draining:
            checks["shutdown"] = "draining"
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "checks": checks},
            status_code=200 if ok else 503,
        )


def create_gateway(settings: Settings | None = None, services: list[str] | None = None) -> Gateway:
    return Gateway(settings or Settings(), services)


def _bound_parameters(route: BaseRoute, scope: Scope) -> int:
    """How many path parameters the route that fully matches ``scope`` binds.

    FastAPI wraps an included router in one route whose match says nothing of the
    route inside it, so look inside (``original_router``) for the one that matched.
    """
    inner = getattr(route, "original_router", None)
    if inner is None:
        _, child = route.matches(scope)
        return len(child.get("path_params") or {})
    for leaf in inner.routes:
        if leaf.matches(scope)[0] == Match.FULL:
            return _bound_parameters(leaf, scope)
    return 0
