"""The limit for ``bench/fanout.py``: a bare ``websockets`` broadcast server.

    uv run python bench/fanout_bare.py --port 8765

Accepts any number of sockets and sends every text frame one of them sends to all the
others, as it is. No authentication, no JSON, no database, no per-socket queue: the
cost of writing one frame to N sockets from one Python process, which is what the
platform's fan-out does at its core.
"""

from __future__ import annotations

import argparse
import asyncio

from websockets.asyncio.server import ServerConnection, broadcast, serve

CONNECTIONS: set[ServerConnection] = set()


async def handler(ws: ServerConnection) -> None:
    CONNECTIONS.add(ws)
    try:
        async for frame in ws:
            broadcast([c for c in CONNECTIONS if c is not ws], frame)
    finally:
        CONNECTIONS.discard(ws)


async def main(port: int) -> None:
    async with serve(handler, "127.0.0.1", port, ping_interval=None, max_size=None) as server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(main(parser.parse_args().port))
