"""The gateway hands each request to the service whose route matches it most specifically."""

from __future__ import annotations

from pathlib import Path

import httpx
from fastapi import APIRouter, FastAPI

from api.gateway import create_gateway
from services.kit.settings import Settings


def _service(name: str, path: str) -> FastAPI:
    router = APIRouter(prefix="/v1")

    @router.get(path)
    async def answer() -> dict[str, str]:
        return {"service": name}

    app = FastAPI()
    app.include_router(router)
    return app


async def test_a_literal_segment_beats_a_path_parameter_of_another_service(
    tmp_path: Path,
) -> None:
    gateway = create_gateway(Settings(data_dir=tmp_path))
    # Two services sharing a prefix, the generic one listed first (as membership is
    # before metrics): /v1/things/compare belongs to the one that names it.
    gateway.apps = {
        "generic": _service("generic", "/things/{thing_id}"),
        "specific": _service("specific", "/things/compare"),
    }
    transport = httpx.ASGITransport(app=gateway)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/v1/things/compare")).json() == {"service": "specific"}
        assert (await client.get("/v1/things/t_1")).json() == {"service": "generic"}
