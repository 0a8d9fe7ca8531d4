"""Non-guessable, time-ordered identifiers: ``<prefix>_<26 Crockford base32 chars>``.

48 bits of millisecond time followed by 80 random bits (the UUIDv7/ULID layout), so
ids sort by creation and cursor pagination can page on the id alone.
"""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


def _encode(value: int) -> str:
    out = []
    for _ in range(26):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new_id(prefix: str) -> str:
    """A fresh id with the given prefix, e.g. ``new_id("firm")``."""
    millis = time.time_ns() // 1_000_000
    value = (millis << 80) | secrets.randbits(80)
    return f"{prefix}_{_encode(value)}"


def looks_like(prefix: str, value: str) -> bool:
    """Whether ``value`` has the shape of an id with this prefix."""
    head, sep, tail = value.partition("_")
    return sep == "_" and head == prefix and len(tail) == 26 and set(tail) <= set(_ALPHABET)
