"""api.sse.EventStream against a fake ASGI server: chunks in order, keep-alive comments, disconnects."""

from __future__ import annotations

import asyncio
from typing import Any

from api.sse import PING, EventStream


async def run(body, receive, ping: float = 15.0) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await EventStream(body, ping=ping)({"type": "http"}, receive, send)
    return sent


async def never_disconnects() -> dict[str, Any]:
    await asyncio.Event().wait()
    return {}


async def test_chunks_go_out_in_order_then_the_end():
    async def body():
        for i in range(3):
            yield b"data: %d\n\n" % i

    sent = await run(body(), never_disconnects)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in sent[0]["headers"]
    assert [m["body"] for m in sent[1:]] == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n", b""]
    assert sent[-1]["more_body"] is False


async def test_a_quiet_stream_gets_keep_alive_comments():
    async def body():
        await asyncio.sleep(0.35)
        yield b"data: late\n\n"

    sent = await run(body(), never_disconnects, ping=0.1)
    bodies = [m["body"] for m in sent[1:]]
    assert bodies.count(PING) >= 2 and bodies[-2:] == [b"data: late\n\n", b""]


async def test_a_disconnect_cancels_and_closes_the_body():
    closed = asyncio.Event()

    async def body():
        try:
            yield b"data: first\n\n"
            await asyncio.sleep(30)
            yield b"data: never\n\n"
        finally:
            closed.set()

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    sent = await asyncio.wait_for(run(body(), receive), 5)  # returns at once, without raising
    assert closed.is_set()
    assert [m["body"] for m in sent[1:]] == [b"data: first\n\n"]
