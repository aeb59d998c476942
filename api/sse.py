"""The one place that formats Server-Sent Events bytes on the wire."""

from __future__ import annotations


def sse(data: bytes, id: int | None = None, event: str | None = None) -> bytes:
    head = b""
    if id is not None:
        head += b"id: %d\n" % id
    if event:
        head += b"event: " + event.encode() + b"\n"
    return head + b"data: " + data + b"\n\n"


DONE = sse(b"[DONE]")
