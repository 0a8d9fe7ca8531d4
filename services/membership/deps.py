"""Request dependencies of the membership service, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from sqlalchemy.ext.asyncio import AsyncSession

from services.kit.app import session_dependency
from services.kit.auth import Principal, require_scope

SessionDep = Annotated[AsyncSession, Depends(session_dependency, scope="function")]
MembershipReader = Annotated[Principal, Depends(require_scope("membership:read"))]
MembershipWriter = Annotated[Principal, Depends(require_scope("membership:write"))]
