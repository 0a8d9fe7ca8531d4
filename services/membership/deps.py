"""Request dependencies of the membership service, as ``Annotated`` aliases."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from services.kit.app import request_scope
from services.kit.auth import Principal, require_scope
from services.kit.db import Database
from services.kit.errors import Problem
from services.membership import audit

AUDITED_FAILURES = {403: "denied", 409: "failed", 410: "failed"}


async def audited_session(request: Request) -> AsyncIterator[AsyncSession]:
    """The request's transaction; a refused change is still written to the audit log.

    The domain's own audit rows roll back with a failed transaction, so a mutating
    request answered with 403, 409 or 410 gets one row (outcome ``denied``/``failed``)
    in a separate transaction, naming the route and its path parameters.
    """
    db: Database = request.app.state.db
    try:
        async with request_scope(request) as session:
            yield session
    except Problem as problem:
        outcome = AUDITED_FAILURES.get(problem.status)
        principal: Principal | None = getattr(request.state, "principal", None)
        if outcome and principal is not None and request.method != "GET":
            route = request.scope.get("route")
            params = dict(request.path_params)
            async with db.session_scope() as audit_session:
                audit.record(
                    audit_session,
                    principal,
                    f"{request.method} {getattr(route, 'path', request.url.path)}",
                    target_kind="route",
                    target_id=next(reversed(params.values()), None) if params else None,
                    firm_id=params.get("firm_id") or principal.firm_id,
                    cluster_id=params.get("cluster_id"),
                    outcome=outcome,
                    detail={"status": problem.status, "problem": problem.slug, **params},
                )
        raise


SessionDep = Annotated[AsyncSession, Depends(audited_session, scope="function")]
MembershipReader = Annotated[Principal, Depends(require_scope("membership:read"))]
MembershipWriter = Annotated[Principal, Depends(require_scope("membership:write"))]
