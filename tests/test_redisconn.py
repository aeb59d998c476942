"""shared.redisconn's pool against a real Redis: the cheap checkout never hands out a
connection that holds a reply nobody read, nor one whose server went away."""

from __future__ import annotations

import asyncio

from shared import redisconn


async def test_pool_serves_concurrent_commands_and_drops_a_connection_with_an_unread_reply(redis_url, prefix):
    r = redisconn.connect(redis_url)
    key = prefix + "n"
    try:
        assert await asyncio.gather(*(r.incr(key) for _ in range(20))) == list(range(1, 21))
        stale = await r.connection_pool.get_connection()
        await stale.send_command("SET", key, "stale")  # its +OK is never read
        await asyncio.sleep(0.05)
        await r.connection_pool.release(stale)
        assert await r.get(key) == b"stale"  # not the leftover "OK"
        assert await r.incr(key + ":2") == 1
    finally:
        await r.delete(key, key + ":2")
        await r.aclose()


async def test_pool_reconnects_after_the_server_closed_the_connection(redis_url):
    r = redisconn.connect(redis_url)
    try:
        victim = await r.client_id()  # the pool's one connection
        killer = redisconn.connect(redis_url)
        await killer.execute_command("CLIENT", "KILL", "ID", victim)
        await killer.aclose()
        await asyncio.sleep(0.05)
        assert await r.ping()
        assert await r.client_id() != victim
    finally:
        await r.aclose()
