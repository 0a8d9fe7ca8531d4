"""Object-level access checks shared by membership's routes.

A caller who is not a member of a firm gets 404 for it (never 403, which would reveal
that it exists); a member whose role is too low gets 403.
"""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import select

from services.kit.auth import Principal
from services.kit.errors import Forbidden, NotFound
from services.membership.models import Firm, FirmMember

ROLE_RANK = {"annotator": 0, "member": 1, "admin": 2, "owner": 3}
ADMIN_ROLES = frozenset({"owner", "admin"})


async def firm_role(session: AsyncSession, firm_id: str, principal: Principal) -> str | None:
    """The caller's role in the firm, or None; 403 when the membership is suspended.

    An integrator client has the pseudo-role ``client`` in its own firm.
    """
    if principal.kind == "client":
        return "client" if principal.firm_id == firm_id else None
    row = (
        await session.execute(
            select(FirmMember.role, FirmMember.status).where(
                FirmMember.firm_id == firm_id, FirmMember.user_id == principal.subject
            )
        )
    ).one_or_none()
    if row is None:
        return None
    role, status = row
    if status != "active":
        raise Forbidden("Your membership of this firm is deactivated.")
    return str(role)


async def require_firm(
    session: AsyncSession,
    firm_id: str,
    principal: Principal,
    roles: Collection[str] | None = None,
    *,
    lock: bool = False,
) -> tuple[Firm, str]:
    """The firm and the caller's role in it; 404 for outsiders, 403 for a too-low role."""
    role = await firm_role(session, firm_id, principal)
    if role is None:
        raise NotFound("No firm with this id.")
    query = select(Firm).where(Firm.id == firm_id)
    if lock:
        query = query.with_for_update()
    firm = (await session.execute(query)).scalar_one_or_none()
    if firm is None:
        raise NotFound("No firm with this id.")
    if roles is not None and role not in roles:
        raise Forbidden(f"Needs one of the firm roles: {', '.join(sorted(roles))}.")
    return firm, role
