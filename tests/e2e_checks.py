"""End-to-end checks on the real model that every engine must pass, through the official openai client.

Shared by tests/test_e2e_model.py (transformers engine) and tests/vllm/test_e2e_vllm.py (vllm engine).
"""

from __future__ import annotations

import asyncio

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.test_pipeline import MODEL

PARIS: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France? Answer in one word."}]


def client(url: str, timeout: float = 180) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=timeout)


async def streams_and_answers(c: openai.AsyncOpenAI) -> tuple[str, str]:
    """A streamed chat with usage, the same chat not streamed, and a completion. (job id, streamed text)."""
    stream = await c.chat.completions.create(model=MODEL, messages=PARIS, max_tokens=16, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert "paris" in streamed.lower()
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens > 10 and 0 < usage.completion_tokens <= 16
    # the same request, not streamed, greedy: the same text
    full = await c.chat.completions.create(model=MODEL, messages=PARIS, max_tokens=16, temperature=0)
    assert full.choices[0].message.content == streamed
    assert full.usage is not None and full.usage.completion_tokens == usage.completion_tokens
    completion = await c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5,
                                            temperature=0)
    assert "paris" in completion.choices[0].text.lower()
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    return chunks[0].id, streamed


async def batching_keeps_greedy_output(c: openai.AsyncOpenAI) -> None:
    """6 concurrent greedy requests equal their one-at-a-time runs.

    Both runs start with the prompts' prefixes cached (the warm-up fills the cache): a prefill
    from a cached prefix and a whole prefill may round differently, which bfloat16 GEMMs can
    turn into a different greedy token. Here only the batching differs."""
    questions = ["Name a color.", "Count from 1 to 5.", "Say hello in French.", "What is 2+2?",
                 "Name a planet.", "Write one word about the sea."]

    async def ask(q: str) -> str:
        r = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}],
                                            max_tokens=12, temperature=0)
        return r.choices[0].message.content or ""

    for q in questions:
        await ask(q)
    together = await asyncio.gather(*(ask(q) for q in questions))
    alone = [await ask(q) for q in questions]
    assert together == alone and all(together)


async def context_overflow_is_a_400(c: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="context"):
        await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello " * 2100}],
                                        max_tokens=10)
