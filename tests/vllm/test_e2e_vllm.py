"""End to end with INFERENCE_ENGINE=vllm: API + vLLM workers + Redis as subprocesses, via the openai client.

Mirrors tests/test_e2e_model.py (transformers engine) and adds a takeover on the
real model: the worker serving a greedy stream is SIGKILLed and the other one
resumes it, and the client's text equals an uninterrupted run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from scripts.stack import Proc, Stack
from tests.test_pipeline import MODEL

pytestmark = [pytest.mark.model, pytest.mark.slow]

WORKER_ENV = {"inference_engine": "vllm", "max_batch_size": "4", "max_model_len": "2048"}


def kill_group(proc: Proc) -> None:
    """SIGKILL the worker and vLLM's engine-core processes it started (its session's group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.popen.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.popen.wait(10)


@pytest.fixture
def vllm_stack(make_stack) -> Iterator[tuple[Stack, list[Proc]]]:
    stack = make_stack()
    workers: list[Proc] = []
    yield stack, workers
    for proc in workers:
        kill_group(proc)


def client(url: str, timeout: float = 180) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=timeout)


async def test_vllm_worker_streams_and_answers(vllm_stack):
    stack, workers = vllm_stack
    workers.append(stack.worker("vllm-a", wait=300, **WORKER_ENV))
    url = stack.api()
    c = client(url)
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "What is the capital of France? Answer in one word."}]
    stream = await c.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert "paris" in streamed.lower()
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens > 10 and 0 < usage.completion_tokens <= 16
    assert stack.job(chunks[0].id)["worker"] == "vllm-a"
    # the same request, not streamed, greedy: the same text
    full = await c.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert full.choices[0].message.content == streamed
    assert full.usage is not None and full.usage.completion_tokens == usage.completion_tokens
    completion = await c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5,
                                            temperature=0)
    assert "paris" in completion.choices[0].text.lower()
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 5

    # batching does not change greedy output
    questions = ["Name a color.", "Count from 1 to 5.", "Say hello in French.", "What is 2+2?",
                 "Name a planet.", "Write one word about the sea."]

    async def ask(q: str) -> str:
        r = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}],
                                            max_tokens=12, temperature=0)
        return r.choices[0].message.content or ""

    together = await asyncio.gather(*(ask(q) for q in questions))
    alone = [await ask(q) for q in questions]
    assert together == alone and all(together)

    # stop strings, and a prompt longer than the context is a 400 from the engine
    stopped = await c.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                              stop=["aris"])
    assert stopped.choices[0].message.content == streamed[:streamed.index("aris")]
    assert stopped.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="context"):
        await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello " * 2100}],
                                        max_tokens=10)


async def test_vllm_worker_killed_mid_stream_is_resumed_exactly(vllm_stack):
    stack, workers = vllm_stack
    workers.append(stack.worker("vllm-a", wait=300, **WORKER_ENV))
    workers.append(stack.worker("vllm-b", wait=300, **WORKER_ENV))
    url = stack.api()
    c = client(url)
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Write a short story about a lighthouse keeper."}]
    reference = await c.chat.completions.create(model=MODEL, messages=messages, max_tokens=60, temperature=0)
    expected = reference.choices[0].message.content or ""
    assert reference.choices[0].finish_reason == "length"

    stream = await c.chat.completions.create(model=MODEL, messages=messages, max_tokens=60, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    text, pieces, killed, job_id, usage = "", 0, None, "", None
    async for chunk in stream:
        job_id = chunk.id
        if chunk.usage:
            usage = chunk.usage
        if not chunk.choices or not chunk.choices[0].delta.content:
            continue
        text += chunk.choices[0].delta.content
        pieces += 1
        if killed is None and pieces == 15:
            serving = stack.job(job_id)["worker"]
            killed = next(w for w in workers if w.name == f"worker-{serving}")
            kill_group(killed)
            killed_at = time.time()
    assert killed is not None
    assert text == expected
    assert usage is not None and usage.completion_tokens == 60
    job = stack.job(job_id)
    assert job["status"] == "succeeded" and job["attempts"] == "2"
    assert f"worker-{job['worker']}" != killed.name
    assert time.time() - killed_at < 60
