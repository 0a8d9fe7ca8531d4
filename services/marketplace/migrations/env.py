"""Alembic environment of the marketplace service (run through ``onecluster migrate``)."""

import services.marketplace.webhooks  # noqa: F401  (its tables join the metadata)
from services.kit.db import run_alembic_env
from services.marketplace.models import metadata

run_alembic_env(metadata)
