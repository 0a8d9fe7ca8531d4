"""Non-guessable, time-ordered identifiers: ``<prefix>_<26 Crockford base32 chars>``.

48 bits of millisecond time followed by 80 random bits (the UUIDv7/ULID layout), so
ids sort by creation and cursor pagination can page on the id alone. Within one process
ids are strictly increasing even inside one millisecond (the ULID "monotonic" rule, with
a random step so the next id is still not guessable): events emitted in one transaction
keep their order in the outbox.
"""

from __future__ import annotations

import secrets
import threading
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_lock = threading.Lock()
_last = 0


def _encode(value: int) -> str:
    out = []
    for _ in range(26):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new_id(prefix: str) -> str:
    """A fresh id with the given prefix, e.g. ``new_id("firm")``."""
    global _last
    millis = time.time_ns() // 1_000_000
    value = (millis << 80) | secrets.randbits(80)
    with _lock:
        if value <= _last:
            value = _last + 1 + secrets.randbits(40)
        _last = value
    return f"{prefix}_{_encode(value)}"


def looks_like(prefix: str, value: str) -> bool:
    """Whether ``value`` has the shape of an id with this prefix."""
    head, sep, tail = value.partition("_")
    return sep == "_" and head == prefix and len(tail) == 26 and set(tail) <= set(_ALPHABET)
