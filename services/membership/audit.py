"""The audit log: every mutating action appends one row, in the action's transaction."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from services.kit.auth import Principal
from services.kit.ids import new_id
from services.kit.telemetry import request_id_var
from services.membership.models import AuditEvent


def record(
    session: AsyncSession,
    actor: Principal | None,
    action: str,
    *,
    target_kind: str,
    target_id: str | None,
    firm_id: str | None = None,
    cluster_id: str | None = None,
    outcome: str = "success",
    detail: dict[str, Any] | None = None,
    actor_id: str | None = None,
) -> AuditEvent:
    """Append an audit event (``action`` like ``firm.member_removed``)."""
    event = AuditEvent(
        id=new_id("aud"),
        actor_kind=actor.kind if actor else ("user" if actor_id else "anonymous"),
        actor_id=actor.subject if actor else actor_id,
        action=action,
        target_kind=target_kind,
        target_id=target_id,
        firm_id=firm_id,
        cluster_id=cluster_id,
        request_id=request_id_var.get(),
        outcome=outcome,
        detail=detail or {},
    )
    session.add(event)
    return event
