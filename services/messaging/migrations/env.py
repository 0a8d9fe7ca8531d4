"""Alembic environment of the messaging service (run through ``onecluster migrate``)."""

from services.kit.db import run_alembic_env
from services.messaging.models import metadata

run_alembic_env(metadata)
