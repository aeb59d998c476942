"""Token events: what a worker emits per engine step and every reader consumes.

Each event of a job carries a sequence number (0, 1, 2, …). The job's log holds
every event at the index equal to its ``seq``, so a reader that knows the last
``seq`` it saw can always fill a gap or resume, and drops what it has seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass
class Event:
    seq: int
    text: str = ""
    ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | cancelled | error | expired
    usage: dict[str, int] | None = None
    error: dict[str, Any] | None = None  # {"message", "type", "code", "param", "status"}

    @property
    def terminal(self) -> bool:
        return self.finish_reason is not None

    def encode(self) -> bytes:
        """JSON with the empty fields left out (the hot path: one per token; no ``asdict`` copy)."""
        out: dict[str, Any] = {"seq": self.seq}
        if self.text:
            out["text"] = self.text
        if self.ids:
            out["ids"] = self.ids
        if self.finish_reason:
            out["finish_reason"] = self.finish_reason
        if self.usage:
            out["usage"] = self.usage
        if self.error:
            out["error"] = self.error
        return orjson.dumps(out)

    @classmethod
    def decode(cls, raw: bytes | str) -> Event:
        return cls(**orjson.loads(raw))


def error_payload(message: str, type_: str = "server_error", code: str | None = None,
                  param: str | None = None, status: int = 500) -> dict[str, Any]:
    return {"message": message, "type": type_, "code": code, "param": param, "status": status}
