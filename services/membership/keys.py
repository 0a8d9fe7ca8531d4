"""Token signing keys: RS256 RSA-2048 keys kept in ``signing_keys``.

Exactly one key signs at a time: the newest one without ``retired_at``. Rotation adds a
new key and retires the previous one with ``drop_after`` set far enough ahead that every
token it signed has expired before it leaves the JWKS, so verifiers never see a valid
token whose key has disappeared. The ``kid`` is the key's RFC 7638 thumbprint.

Keys are cached in memory (signing must not hit the database once per token) and
reloaded every :attr:`KeyStore.reload_interval` seconds, so a rotation made by another
process (``onecluster keys rotate``) is picked up by every replica within that time; the
verifier side asks for a fresh load when it meets an unknown ``kid``, throttled so that
tokens carrying made-up ``kid`` values cannot turn into one query each.

Both an async API (routes, start-up) and a sync one (the Authlib grant machinery, which
runs in a worker thread) read the same cache.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from joserfc.jwk import KeySet, RSAKey
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from sqlmodel import col

from services.kit.db import Database, utcnow
from services.kit.settings import Settings
from services.membership.models import SigningKey

ALGORITHM = "RS256"
KEY_SIZE = 2048
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# PostgreSQL advisory-lock id serialising key creation across replicas (SQLite
# transactions are already serialised by ``BEGIN IMMEDIATE``).
_KEY_LOCK_ID = 0x6F63_6B65  # "ocke"


@dataclass(frozen=True)
class _Snapshot:
    loaded_at: float
    signing_kid: str | None
    signing_key: RSAKey | None
    published: tuple[dict[str, Any], ...]


def new_signing_key() -> tuple[str, str, dict[str, Any]]:
    """A fresh RSA key as ``(kid, private PEM, public JWK)``."""
    key = RSAKey.generate_key(KEY_SIZE, parameters={"alg": ALGORITHM, "use": "sig"}, private=True)
    kid = key.thumbprint()
    public = dict(key.as_dict(private=False))
    public.update({"kid": kid, "alg": ALGORITHM, "use": "sig"})
    pem = key.as_pem(private=True).decode("ascii")
    return kid, pem, public


def _import_private(row: SigningKey) -> RSAKey:
    return RSAKey.import_key(
        row.private_pem, parameters={"kid": row.kid, "alg": ALGORITHM, "use": "sig"}
    )


def _active_query() -> sa.Select[SigningKey]:
    return (
        sa.select(SigningKey)
        .where(col(SigningKey.retired_at).is_(None))
        .order_by(col(SigningKey.created_at).desc(), col(SigningKey.kid).desc())
    )


def _published_query() -> sa.Select[SigningKey]:
    now = utcnow()
    return (
        sa.select(SigningKey)
        .where(
            sa.or_(
                col(SigningKey.retired_at).is_(None),
                col(SigningKey.drop_after) > now,
            )
        )
        .order_by(col(SigningKey.created_at).desc(), col(SigningKey.kid).desc())
    )


def _snapshot(rows: list[SigningKey]) -> _Snapshot:
    """Cache entry from the published rows (newest first); the newest active one signs."""
    active = next((r for r in rows if r.retired_at is None), None)
    return _Snapshot(
        loaded_at=time.monotonic(),
        signing_kid=active.kid if active else None,
        signing_key=_import_private(active) if active else None,
        published=tuple(dict(r.public_jwk) for r in rows),
    )


def _insert_key_sync(session: Session) -> str:
    kid, pem, public = new_signing_key()
    session.add(SigningKey(kid=kid, algorithm=ALGORITHM, private_pem=pem, public_jwk=public))
    return kid


class KeyStore:
    """The signing keys of membership, cached in memory."""

    def __init__(self, db: Database, settings: Settings, reload_interval: float = 30.0) -> None:
        self.db = db
        self.settings = settings
        self.reload_interval = reload_interval
        self._snapshot: _Snapshot | None = None
        self._lock = threading.Lock()
        self._async_lock = asyncio.Lock()

    # -- cache ------------------------------------------------------------------------
    def _fresh(self, max_age: float | None) -> _Snapshot | None:
        snap = self._snapshot
        limit = self.reload_interval if max_age is None else max_age
        if snap is not None and time.monotonic() - snap.loaded_at <= limit:
            return snap
        return None

    def invalidate(self) -> None:
        """Forget the cache: the next use reads the table (after a rotation, in tests)."""
        self._snapshot = None

    # -- async API ----------------------------------------------------------------------
    async def ensure_active_key(self) -> str:
        """The signing key's kid, creating the first key when there is none."""
        async with self.db.session_scope() as session:
            await self._lock_keys(session)
            row = (await session.execute(_active_query().limit(1))).scalars().first()
            if row is not None:
                kid = row.kid
            else:
                kid, pem, public = new_signing_key()
                session.add(
                    SigningKey(kid=kid, algorithm=ALGORITHM, private_pem=pem, public_jwk=public)
                )
        await self.reload()
        return kid

    async def reload(self) -> _Snapshot:
        async with self.db.read_scope() as session:
            rows = list((await session.execute(_published_query())).scalars().all())
        snap = _snapshot(rows)
        self._snapshot = snap
        return snap

    async def _current(self, max_age: float | None = None) -> _Snapshot:
        snap = self._fresh(max_age)
        if snap is not None:
            return snap
        async with self._async_lock:  # one reload when many requests find the cache stale
            return self._fresh(max_age) or await self.reload()

    async def public_jwks(self, max_age: float | None = None) -> dict[str, Any]:
        """The JWKS: the signing key plus retired keys still inside ``drop_after``."""
        snap = await self._current(max_age)
        return {"keys": [dict(k) for k in snap.published]}

    async def signing_key(self) -> tuple[str, RSAKey]:
        snap = await self._current()
        if snap.signing_key is None or snap.signing_kid is None:
            raise RuntimeError("no active signing key; start membership to create one")
        return snap.signing_kid, snap.signing_key

    async def _lock_keys(self, session: AsyncSession) -> None:
        if self.db.postgres:
            await session.execute(
                sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _KEY_LOCK_ID}
            )

    # -- sync API (worker threads) ------------------------------------------------------
    def ensure_active_key_sync(self) -> str:
        """:meth:`ensure_active_key` for code that runs outside the event loop."""
        with self.db.sync_session_scope() as session:
            if self.db.postgres:
                session.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _KEY_LOCK_ID})
            row = session.execute(_active_query().limit(1)).scalars().first()
            kid = row.kid if row is not None else _insert_key_sync(session)
        self.invalidate()
        self.reload_sync()
        return kid

    def reload_sync(self) -> _Snapshot:
        with self._lock:
            snap = self._fresh(None)
            if snap is not None:  # another thread reloaded while we waited
                return snap
            # A read scope: this runs inside token grants whose own session already holds
            # SQLite's write lock on this thread; a writing session here would wait on it.
            with self.db.sync_read_scope() as session:
                rows = list(session.execute(_published_query()).scalars().all())
            snap = _snapshot(rows)
            self._snapshot = snap
            return snap

    def signing_key_sync(self) -> tuple[str, RSAKey]:
        snap = self._fresh(None) or self.reload_sync()
        if snap.signing_key is None or snap.signing_kid is None:
            raise RuntimeError("no active signing key; start membership to create one")
        return snap.signing_kid, snap.signing_key

    def public_jwks_sync(self) -> dict[str, Any]:
        snap = self._fresh(None) or self.reload_sync()
        return {"keys": [dict(k) for k in snap.published]}

    def verification_key_set_sync(self) -> KeySet:
        """Public keys as a joserfc key set, for checking our own tokens (revoke, introspect)."""
        return KeySet.import_key_set(self.public_jwks_sync())  # type: ignore[arg-type]


def rotate_signing_key(settings: Settings) -> str:
    """Add a new signing key and retire the previous one; returns the new kid.

    The retired key stays published until ``now + max(access_token_ttl,
    signing_key_retention)``, so tokens it signed keep verifying until they expire.
    Keys whose ``drop_after`` has passed are deleted: nothing can verify with them any
    more and their private halves should not linger. Creates and migrates the database
    when needed, so it also works before the first start.
    """
    db = Database(settings.database_url_for("membership"), schema="membership")
    try:
        db.migrate_sync(MIGRATIONS_DIR)
        now = utcnow()
        keep = timedelta(seconds=max(settings.access_token_ttl, settings.signing_key_retention))
        with db.sync_session_scope() as session:
            if db.postgres:
                session.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _KEY_LOCK_ID})
            session.execute(
                sa.update(SigningKey)
                .where(col(SigningKey.retired_at).is_(None))
                .values(retired_at=now, drop_after=now + keep)
            )
            session.execute(
                sa.delete(SigningKey).where(
                    col(SigningKey.drop_after).is_not(None),
                    col(SigningKey.drop_after) <= now,
                )
            )
            kid = _insert_key_sync(session)
        return kid
    finally:
        db.sync_engine.dispose()
