"""Request dependencies of the metrics service, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from sqlalchemy.ext.asyncio import AsyncSession

from services.kit.app import session_dependency
from services.kit.auth import Principal, require_scope

SessionDep = Annotated[AsyncSession, Depends(session_dependency, scope="function")]
MetricsReader = Annotated[Principal, Depends(require_scope("metrics:read"))]
MetricsWriter = Annotated[Principal, Depends(require_scope("metrics:write"))]
