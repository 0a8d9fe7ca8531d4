"""The ``onecluster`` command: serve, migrate, rotate keys, rebuild metrics, simulate."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from services.kit.settings import Settings

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


@cli.command()
def serve(
    target: Annotated[Target, typer.Argument(help="all services, or one of them")] = Target.all,
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    data_dir: DataDir = None,
    workers: Annotated[int, typer.Option(help="worker processes")] = 1,
) -> None:
    """Start the platform (``all``, embedded) or one service (distributed)."""
    import os

    import uvicorn

    from services.kit.telemetry import configure_logging

    overrides: dict[str, object] = {}
    if "ONECLUSTER_PUBLIC_URL" not in os.environ:
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104
        overrides["public_url"] = f"http://{shown}:{port}"
    settings = _settings(data_dir, **overrides)
    configure_logging(settings.log_level, settings.log_json)
    if target is Target.all:
        from api.gateway import create_gateway

        app: object = create_gateway(settings)
    else:
        import importlib

        app = importlib.import_module(f"services.{target.value}.app").create_app(settings)
    typer.echo(f"OneCluster ({target.value}) on {settings.public_url}  — API docs at /docs")
    uvicorn.run(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        workers=workers if workers > 1 else None,
        log_config=None,
        proxy_headers=True,
        timeout_graceful_shutdown=20,
    )


@cli.command()
def migrate(
    service: Annotated[Service | None, typer.Argument(help="one service; all when omitted")] = None,
    data_dir: DataDir = None,
    revision: Annotated[str, typer.Option(help="target revision")] = "heads",
) -> None:
    """Bring each service's database to the latest (or given) revision."""
    from services.kit.db import Database

    settings = _settings(data_dir)
    names = [service.value] if service else [s.value for s in Service]
    for name in names:
        db = Database(settings.database_url_for(name), schema=name)
        try:
            db.migrate_sync(_migrations_dir(name), revision)
        finally:
            if db._sync_engine is not None:
                db._sync_engine.dispose()
        typer.echo(f"{name}: at {revision}")


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
