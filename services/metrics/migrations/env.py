"""Alembic environment of the metrics service (run through ``onecluster migrate``)."""

from services.kit.db import run_alembic_env
from services.metrics.models import metadata

run_alembic_env(metadata)
