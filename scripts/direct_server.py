#!/usr/bin/env python3
"""The synthetic engine behind a bare OpenAI-style streaming endpoint, in ONE process (no queue,
no relay): the baseline of ``bench_overhead.py`` for what the queue and relay add over serving an
engine directly, as vLLM's and TGI's servers do. Same stack as the API (FastAPI, uvicorn, uvloop,
httptools, the API's own SSE response) and the same chunks, so the difference is the queue and
relay alone.

    python scripts/direct_server.py PORT [TOKENS_PER_SECOND] [MAX_BATCH_SIZE]
"""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
import uvicorn
from fastapi import FastAPI, Request

from api.sse import DONE, EventStream, sse
from shared.settings import Settings
from worker.engines.base import GenerationRequest, SamplingParams
from worker.engines.synthetic import SyntheticEngine


def create_app(engine: SyntheticEngine) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": engine.model, "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> EventStream:
        body = await request.json()
        job = GenerationRequest(f"direct-{time.monotonic_ns()}", SamplingParams(max_tokens=body["max_tokens"]),
                                messages=body["messages"])

        def chunk(delta: dict[str, Any], finish: str | None = None, usage: Any = None) -> bytes:
            payload = {"id": job.id, "object": "chat.completion.chunk", "created": int(time.time()),
                       "model": engine.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if usage:
                payload = {**payload, "choices": [], "usage": usage}
            return sse(orjson.dumps(payload))

        async def stream() -> AsyncIterator[bytes]:
            opening = chunk({"role": "assistant", "content": ""})
            async for delta in engine.generate(job):
                yield opening + chunk({"content": delta.text}, delta.finish_reason)
                opening = b""
                if delta.finish_reason:
                    usage = {"prompt_tokens": delta.prompt_tokens, "completion_tokens": delta.completion_tokens,
                             "total_tokens": delta.prompt_tokens + delta.completion_tokens}
                    yield chunk({}, usage=usage) + DONE

        return EventStream(stream())

    return app


if __name__ == "__main__":
    port = int(sys.argv[1])
    rate = float(sys.argv[2]) if len(sys.argv) > 2 else 100.0
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    engine = SyntheticEngine(Settings(synthetic_tokens_per_second=rate, max_batch_size=batch))
    uvicorn.run(create_app(engine), host="127.0.0.1", port=port, log_level="warning", loop="uvloop",
                http="httptools")
