"""Messaging's domain metrics (Prometheus), beside the kit's RED metrics per route.

Operators watch the conversation itself and the health of live delivery: messages
posted (counted when their transaction commits), frames written to sockets, open
sockets, slow consumers cut off and subscriptions told to resync over REST.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from prometheus_client import Counter, Gauge

MESSAGES_POSTED = Counter(
    "messaging_messages_posted_total",
    "Messages posted (system messages included), by the kind of their channel",
    ["channel_kind"],
)
FRAMES_DELIVERED = Counter(
    "messaging_frames_delivered_total",
    "Frames written to WebSocket clients, by frame type",
    ["type"],
)


@cache
def frames_delivered(kind: str) -> Any:
    """The ``FRAMES_DELIVERED`` child of a frame type (labelled once, not per frame)."""
    return FRAMES_DELIVERED.labels(kind)


OPEN_SOCKETS = Gauge(
    "messaging_websocket_connections",
    "WebSocket connections open on this replica (accepted and not yet closed)",
)
SLOW_CONSUMER_DISCONNECTS = Counter(
    "messaging_slow_consumer_disconnects_total",
    "Sockets closed with 4008 because their client fell behind",
)
RESYNCS = Counter(
    "messaging_resyncs_total",
    "resync_required frames: on subscribe (too far back or ahead) or live (fell behind)",
    ["at"],
)
