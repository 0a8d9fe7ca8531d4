"""Alembic environment of the marketplace service (run through ``onecluster migrate``)."""

from services.kit.db import run_alembic_env
from services.marketplace.models import metadata

run_alembic_env(metadata)
