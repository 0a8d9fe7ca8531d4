"""Alembic environment of the membership service (run through ``onecluster migrate``)."""

from services.kit.db import run_alembic_env
from services.membership.models import metadata

run_alembic_env(metadata)
