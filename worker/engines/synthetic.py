"""Deterministic fake tokens at a configured rate: for tests and overhead measurement only.

It behaves like a continuously batched engine: up to ``max_batch_size``
requests run at once, each getting one token every ``1/tokens_per_second``
seconds; the rest wait for a slot. Token ``i`` of a request depends only
on its prompt, seed and ``i``, so a resumed request continues exactly.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

from shared.settings import Settings
from worker.engines.base import Delta, Engine, EngineRequestError, GenerationRequest

WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa")


def synthetic_token(prompt_key: bytes, index: int) -> int:
    digest = hashlib.blake2b(prompt_key + index.to_bytes(4, "little"), digest_size=4).digest()
    return int.from_bytes(digest, "little") % 10_000


def token_text(token_id: int) -> str:
    return f" {WORDS[token_id % len(WORDS)]}{token_id // len(WORDS)}"


class SyntheticEngine(Engine):
    name = "synthetic"

    def __init__(self, settings: Settings):
        self.model = settings.served_model_name
        self.max_batch_size = settings.max_batch_size
        self.max_model_len = settings.max_model_len
        self.interval = 1.0 / settings.synthetic_tokens_per_second if settings.synthetic_tokens_per_second > 0 else 0.0
        self.fail_on = settings.synthetic_fail_on
        self._slots = asyncio.Semaphore(self.max_batch_size)
        self._running = 0

    def num_running(self) -> int:
        return self._running

    def _prompt_text(self, request: GenerationRequest) -> str:
        if request.messages is not None:
            return "\n".join(str(m.get("content", "")) for m in request.messages)
        return request.prompt if isinstance(request.prompt, str) else " ".join(map(str, request.prompt or []))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        text = self._prompt_text(request)
        prompt_tokens = max(1, len(text.split()))
        params = request.params
        if prompt_tokens + params.max_tokens > self.max_model_len:
            raise EngineRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens; the request has "
                f"{prompt_tokens} prompt tokens and asks for {params.max_tokens} more.",
                param="messages" if request.messages is not None else "prompt", code="context_length_exceeded")
        if self.fail_on and self.fail_on in text:
            raise RuntimeError("synthetic engine crash (poison prompt)")
        key = f"{text}|{params.seed}".encode()
        done = len(request.resume_token_ids)
        async with self._slots:
            self._running += 1
            try:
                while done < params.max_tokens:
                    if self.interval:
                        await asyncio.sleep(self.interval)
                    else:
                        await asyncio.sleep(0)
                    token = synthetic_token(key, done)
                    done += 1
                    yield Delta(token_text(token), [token], "length" if done >= params.max_tokens else None,
                                prompt_tokens, done)
                if not params.max_tokens:
                    yield Delta("", [], "length", prompt_tokens, done)
            finally:
                self._running -= 1
