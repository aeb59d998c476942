"""End to end on the real model: SmolLM2-135M-Instruct behind API + worker + Redis, via the openai client."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.test_pipeline import MODEL

pytestmark = [pytest.mark.model, pytest.mark.slow]


@pytest.fixture
def model_stack(make_stack):
    stack = make_stack()
    stack.worker("hf", inference_engine="transformers", wait=240, max_batch_size="8")
    return stack, stack.api()


async def test_real_model_streams_and_answers(model_stack):
    _, url = model_stack
    c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    stream = await c.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert "paris" in streamed.lower()
    usage = chunks[-1].usage
    assert usage.prompt_tokens > 10 and 0 < usage.completion_tokens <= 16
    # the same request, not streamed, greedy: the same text
    full = await c.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert full.choices[0].message.content == streamed
    assert full.usage.completion_tokens == usage.completion_tokens
    completion = await c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5,
                                            temperature=0)
    assert "paris" in completion.choices[0].text.lower()
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 5


async def test_real_model_concurrent_greedy_requests_match_sequential(model_stack):
    """Batching must not change greedy output: 6 concurrent requests equal their one-at-a-time runs."""
    _, url = model_stack
    c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=180)
    questions = ["Name a color.", "Count from 1 to 5.", "Say hello in French.", "What is 2+2?",
                 "Name a planet.", "Write one word about the sea."]

    async def ask(q: str) -> str:
        r = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}],
                                            max_tokens=12, temperature=0)
        return r.choices[0].message.content or ""

    together = await asyncio.gather(*(ask(q) for q in questions))
    alone = [await ask(q) for q in questions]
    assert together == alone
    assert all(together)


async def test_real_model_context_overflow_is_a_400(model_stack):
    _, url = model_stack
    c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError, match="context"):
        await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello " * 2100}],
                                        max_tokens=10)
