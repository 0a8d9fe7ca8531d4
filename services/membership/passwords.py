"""Password hashing with argon2id (argon2-cffi's current RFC 9106 low-memory profile).

Under ``ONECLUSTER_ENV=test`` (and only then) the service hashes with a light argon2id
profile instead: test suites and load tests sign up hundreds of users, and the real
profile's 64 MiB and three passes per hash would dominate them. Hashes record their own
parameters, so either profile verifies the other's.
"""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from services.kit.settings import Settings

_PRODUCTION = PasswordHasher()
_TEST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
_hasher = _PRODUCTION
# A real hash to compare against when the email is unknown, so that a miss costs the
# same time as a wrong password and does not reveal which emails exist.
_DUMMY_HASH = _hasher.hash("a password nobody has")


def configure(settings: Settings) -> None:
    """Choose the hashing profile for this process from the environment it runs in."""
    global _hasher, _DUMMY_HASH
    hasher = _TEST if settings.env == "test" else _PRODUCTION
    if hasher is not _hasher:
        _hasher = hasher
        _DUMMY_HASH = hasher.hash("a password nobody has")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False
