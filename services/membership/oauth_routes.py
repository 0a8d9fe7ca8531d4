"""OAuth 2 routes (being built)."""

from fastapi import APIRouter, FastAPI

router = APIRouter()


async def on_startup(app: FastAPI) -> None:
    return None
