"""The ``onecluster`` command: serve, migrate, rotate keys, rebuild metrics, simulate."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from services.kit.settings import Settings

if TYPE_CHECKING:
    from services.kit.runtime import Runtime

cli = typer.Typer(help="OneCluster: one online industrial cluster.", no_args_is_help=True)
keys_cli = typer.Typer(help="Token signing keys.", no_args_is_help=True)
cli.add_typer(keys_cli, name="keys")
metrics_cli = typer.Typer(help="The metrics service's fact store.", no_args_is_help=True)
cli.add_typer(metrics_cli, name="metrics")


class Target(StrEnum):
    all = "all"
    membership = "membership"
    marketplace = "marketplace"
    messaging = "messaging"
    metrics = "metrics"


class Service(StrEnum):
    membership = "membership"
    marketplace = "marketplace"
    messaging = "messaging"
    metrics = "metrics"


DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", envvar="ONECLUSTER_DATA_DIR", help="folder of the SQLite files"),
]


def _settings(data_dir: Path | None, **overrides: object) -> Settings:
    values: dict[str, object] = dict(overrides)
    if data_dir is not None:
        values["data_dir"] = data_dir
    return Settings(**values)  # type: ignore[arg-type]


def _migrations_dir(service: str) -> Path:
    import importlib

    module = importlib.import_module(f"services.{service}.app")
    return Path(module.SPEC.migrations_dir)


WORKER_TARGET_ENV = "ONECLUSTER_SERVE_TARGET"
"""How ``serve --workers N`` tells its worker processes which target to build."""
WORKER_SHUTDOWN_DELAY_ENV = "ONECLUSTER_SERVE_SHUTDOWN_DELAY"
"""How ``serve --workers N`` tells its worker processes the ``--shutdown-delay``."""


@cli.command()
def serve(
    target: Annotated[Target, typer.Argument(help="all services, or one of them")] = Target.all,
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    data_dir: DataDir = None,
    workers: Annotated[
        int, typer.Option(min=1, help="worker processes (more than one needs Redis)")
    ] = 1,
    shutdown_delay: Annotated[
        float,
        typer.Option(
            min=0,
            help="seconds to keep serving after SIGTERM while /readyz answers 503"
            " draining, before the listener closes (a second SIGTERM stops at once)",
        ),
    ] = 0.0,
) -> None:
    """Start the platform (``all``, embedded) or one service (distributed).

    With ``--workers N`` (N > 1) uvicorn runs N worker processes on the one port, each a
    full replica of the target: they need ``ONECLUSTER_REDIS_URL``, since the embedded
    event bus and live message delivery live inside one process. The databases are
    migrated once here, before the workers start, so they never race to migrate.

    On SIGTERM uvicorn closes the listener at once, so nothing can ask ``/readyz`` any
    more; ``--shutdown-delay S`` first keeps serving for S seconds with ``/readyz``
    answering 503 ``draining``, so a load balancer that watches readiness stops sending
    requests before the connections are refused.
    """
    import os

    import uvicorn

    from services.kit.telemetry import configure_logging

    overrides: dict[str, object] = {}
    if "ONECLUSTER_PUBLIC_URL" not in os.environ:
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104
        overrides["public_url"] = f"http://{shown}:{port}"
    settings = _settings(data_dir, **overrides)
    configure_logging(settings.log_level, settings.log_json)
    common: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_config": None,
        "proxy_headers": True,
        "timeout_graceful_shutdown": 20,
    }
    if workers > 1:
        if settings.redis_url is None:
            typer.echo(
                "--workers above 1 needs Redis (ONECLUSTER_REDIS_URL): without it events"
                " and live messages stay inside one process.",
                err=True,
            )
            raise typer.Exit(2)
        if settings.auto_migrate:
            _migrate_all(settings, _services_of(target), "heads")
        # The workers are new processes: they read their settings from the environment.
        os.environ.update(
            {
                WORKER_TARGET_ENV: target.value,
                WORKER_SHUTDOWN_DELAY_ENV: str(shutdown_delay),
                "ONECLUSTER_AUTO_MIGRATE": "false",
                "ONECLUSTER_DATA_DIR": str(settings.data_dir),
                "ONECLUSTER_PUBLIC_URL": settings.public_url,
            }
        )
        typer.echo(
            f"OneCluster ({target.value}, {workers} workers) on {settings.public_url}"
            "  — API docs at /docs"
        )
        uvicorn.run("api.cli:worker_app", factory=True, workers=workers, **common)
        return
    typer.echo(f"OneCluster ({target.value}) on {settings.public_url}  — API docs at /docs")
    uvicorn.run(_build(target, settings, shutdown_delay), **common)


def _build(target: Target, settings: Settings, shutdown_delay: float = 0.0) -> Any:
    """The ASGI app of ``target``: the gateway for ``all``, else the one service."""
    if target is Target.all:
        from api.gateway import create_gateway

        gateway = create_gateway(settings)
        return _drain_before_stopping(gateway, gateway.runtime, shutdown_delay)
    import importlib

    app = importlib.import_module(f"services.{target.value}.app").create_app(settings)
    return _drain_before_stopping(app, app.state.runtime, shutdown_delay)


def _drain_before_stopping(app: Any, runtime: Runtime, delay: float) -> Any:
    """``app``, which on the first SIGTERM says ``draining`` on ``/readyz`` (503) and keeps
    serving for ``delay`` seconds before passing the signal on to uvicorn.

    uvicorn installs its signal handlers (``signal.signal``) before it starts the
    lifespan, in a single process and in each ``--workers`` worker alike, so the lifespan
    call puts this handler in front of uvicorn's. The handler only flips the flag and
    wakes the loop; the loop then waits out the delay. A second SIGTERM (or one that
    comes when the lifespan is already ending) goes to uvicorn at once.
    """
    if delay <= 0:
        return app
    import asyncio
    import logging
    import signal
    import threading

    log = logging.getLogger("onecluster.serve")

    def hold_sigterm(loop: asyncio.AbstractEventLoop) -> None:
        stop = signal.getsignal(signal.SIGTERM)
        if not callable(stop) or threading.current_thread() is not threading.main_thread():
            return

        def begin() -> None:
            log.info("SIGTERM: /readyz answers draining; shutting down in %s s", delay)
            loop.call_later(delay, stop, signal.SIGTERM, None)

        def on_sigterm(sig: int, frame: Any) -> None:
            if runtime.draining:
                stop(sig, frame)
            else:
                runtime.draining = True
                loop.call_soon_threadsafe(begin)

        signal.signal(signal.SIGTERM, on_sigterm)

    async def draining_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            hold_sigterm(asyncio.get_running_loop())
        await app(scope, receive, send)

    return draining_app


def worker_app() -> Any:
    """The app of one ``serve --workers N`` worker (uvicorn calls this in each process)."""
    import os

    from services.kit.telemetry import configure_logging

    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    target = Target(os.environ.get(WORKER_TARGET_ENV, "all"))
    return _build(target, settings, float(os.environ.get(WORKER_SHUTDOWN_DELAY_ENV, "0")))


def _services_of(target: Target) -> list[str]:
    return [s.value for s in Service] if target is Target.all else [target.value]


def _migrate_all(settings: Settings, names: list[str], revision: str) -> None:
    from services.kit.db import Database

    for name in names:
        db = Database(settings.database_url_for(name), schema=name)
        try:
            db.migrate_sync(_migrations_dir(name), revision)
        finally:
            if db._sync_engine is not None:
                db._sync_engine.dispose()
        typer.echo(f"{name}: at {revision}")


@cli.command()
def migrate(
    service: Annotated[Service | None, typer.Argument(help="one service; all when omitted")] = None,
    data_dir: DataDir = None,
    revision: Annotated[str, typer.Option(help="target revision")] = "heads",
) -> None:
    """Bring each service's database to the latest (or given) revision."""
    settings = _settings(data_dir)
    names = [service.value] if service else [s.value for s in Service]
    _migrate_all(settings, names, revision)


@keys_cli.command("rotate")
def keys_rotate(data_dir: DataDir = None) -> None:
    """Add a new signing key; the old one stays in the JWKS until its tokens expire."""
    from services.membership.keys import rotate_signing_key

    settings = _settings(data_dir)
    kid = rotate_signing_key(settings)
    typer.echo(f"new signing key: {kid}")


@metrics_cli.command("rebuild")
def metrics_rebuild(data_dir: DataDir = None) -> None:
    """Empty the metrics fact store and replay every service's outbox into it.

    Reads the outbox tables of membership, marketplace and messaging (their databases
    must be reachable with this process's settings); the imported history is kept.
    """
    import asyncio

    from services.kit.db import Database
    from services.metrics.rebuild import rebuild

    settings = _settings(data_dir)

    async def run() -> None:
        metrics = Database(settings.database_url_for("metrics"), schema="metrics")
        sources = {
            name: Database(settings.database_url_for(name), schema=name)
            for name in ("membership", "marketplace", "messaging")
        }
        try:
            await metrics.migrate(_migrations_dir("metrics"))
            outcome = await rebuild(metrics, sources)
        finally:
            for db in (metrics, *sources.values()):
                await db.dispose()
        typer.echo(
            f"metrics: replayed {outcome.events_applied} of {outcome.events_read} events, "
            f"kept {outcome.imported_records} imported records"
        )

    asyncio.run(run())


@cli.command()
def simulate(
    base_url: Annotated[str, typer.Option(help="the platform's public URL")] = (
        "http://127.0.0.1:8000"
    ),
    scenario: Annotated[
        list[str] | None,
        typer.Option(help="software, furniture, ai, idle_park, loose or thin; all if omitted"),
    ] = None,
    redirect_uri: Annotated[
        str | None,
        typer.Option(help="a redirect URI of the web client (default <base-url>/oauth/callback)"),
    ] = None,
    tag: Annotated[str | None, typer.Option(help="suffix of the simulated emails")] = None,
) -> None:
    """Drive the simulator's clusters through the public API and print their classification."""
    import asyncio

    import httpx

    from services.metrics.simulator import SCENARIOS, run

    unknown = sorted(set(scenario or ()) - set(SCENARIOS))
    if unknown:
        raise typer.BadParameter(f"unknown scenario: {', '.join(unknown)}")
    base = base_url.rstrip("/")

    async def go() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            sims = await run(
                client,
                scenario or None,
                redirect_uri=redirect_uri or f"{base}/oauth/callback",
                tag=tag,
            )
            for key, sim in sims.items():
                answer = await client.get(
                    f"/v1/clusters/{sim.cluster_id}/classification", headers=sim.operator.auth
                )
                body = answer.json()
                typer.echo(f"{key}: {sim.cluster_id} {body['label']} — {body['explanation']}")

    asyncio.run(go())


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
