"""Request dependencies of the messaging service, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from sqlalchemy.ext.asyncio import AsyncSession

from services.kit.app import session_dependency
from services.kit.auth import Principal, require_scope

SessionDep = Annotated[AsyncSession, Depends(session_dependency, scope="function")]
MessagingReader = Annotated[Principal, Depends(require_scope("messaging:read"))]
MessagingWriter = Annotated[Principal, Depends(require_scope("messaging:write"))]
