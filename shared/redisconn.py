"""The Redis client that the API and the worker use: redis-py's, with a cheaper pool checkout.

redis-py checks every connection it takes from its pool by reading the socket under a
zero timeout: each command yields to the event loop once and raises and catches a
cancellation. On the hot paths (a request's enqueue, a worker's start, emit and finish)
that is CPU spent per command and, worse, a request's enqueue waits behind whatever
else the loop runs meanwhile. Here a connection whose reader holds no data and has
not hit end-of-file is handed out as it is; anything else (buffered data: a reply
nobody read; a closed socket) gets redis-py's own check, which reconnects.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection


class _Pool(ConnectionPool):
    async def ensure_connection(self, connection: AbstractConnection) -> None:
        reader = getattr(connection, "_reader", None)  # the asyncio.StreamReader of a connected socket
        buffered = getattr(reader, "_buffer", None)
        if reader is not None and buffered is not None and not buffered and not reader.at_eof():
            return
        await super().ensure_connection(connection)


def connect(url: str, **kwargs: Any) -> Redis:
    """``Redis.from_url(url, **kwargs)`` on the pool above."""
    return Redis.from_pool(_Pool.from_url(url, **kwargs))
