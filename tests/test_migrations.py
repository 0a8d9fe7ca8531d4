"""Each service's migrations build exactly the tables its models declare.

The schema is made by Alembic alone (as ``onecluster migrate`` does in production) and
then compared with the models' metadata by Alembic's autogenerate: any table, column,
type, index or nullability that one has and the other lacks is a difference.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from api.gateway import service_factories
from services.kit.db import Database

KIT_TABLES = {"alembic_version"}


def metadata_of(service: str) -> sa.MetaData:
    """The metadata the service's migration environment compares against."""
    env = Path(importlib.import_module(f"services.{service}.app").SPEC.migrations_dir) / "env.py"
    for line in env.read_text().splitlines():  # the env imports what joins the metadata
        if line.startswith("import services."):
            importlib.import_module(line.split()[1])
    metadata: sa.MetaData = importlib.import_module(f"services.{service}.models").metadata
    return metadata


@pytest.mark.parametrize("service", list(service_factories()))
def test_migrations_build_what_the_models_declare(
    service: str, tmp_path: Path, database_url: str | None
) -> None:
    url = database_url or f"sqlite:///{tmp_path / f'{service}.sqlite3'}"
    db = Database(url, schema=service)
    spec = importlib.import_module(f"services.{service}.app").SPEC
    db.migrate_sync(spec.migrations_dir)
    metadata = metadata_of(service)
    with db.sync_engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "target_metadata": metadata}
        )
        diffs: list[Any] = [
            d
            for d in compare_metadata(context, metadata)
            if not (d[0] == "remove_table" and d[1].name in KIT_TABLES)
        ]
    db.sync_engine.dispose()
    assert not diffs, f"{service}: migrations and models differ: {diffs}"
