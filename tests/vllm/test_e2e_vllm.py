"""End to end with INFERENCE_ENGINE=vllm: API + vLLM workers + Redis as subprocesses, via the openai client.

Mirrors tests/test_e2e_model.py (transformers engine) and adds a takeover on the
real model: the worker serving a greedy stream is SIGKILLed and the other one
resumes it, and the client's text equals an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator

import pytest
from openai.types.chat import ChatCompletionMessageParam

from scripts.stack import Proc, Stack
from tests import e2e_checks
from tests.e2e_checks import client
from tests.test_pipeline import MODEL

pytestmark = [pytest.mark.model, pytest.mark.slow]

# float32: the takeover test compares the resumed text with an uninterrupted run token for token, which
# vLLM in bfloat16 (its default on CPUs with native bf16) does not promise.
WORKER_ENV = {"inference_engine": "vllm", "max_batch_size": "4", "max_model_len": "2048", "dtype": "float32"}


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


async def test_vllm_worker_streams_and_answers(vllm_stack):
    stack, workers = vllm_stack
    workers.append(stack.worker("vllm-a", wait=300, **WORKER_ENV))
    c = client(stack.api())
    job_id, streamed = await e2e_checks.streams_and_answers(c)
    assert stack.job(job_id)["worker"] == "vllm-a"
    await e2e_checks.batching_keeps_greedy_output(c)
    # stop strings, and a prompt longer than the context is a 400 from the engine
    stopped = await c.chat.completions.create(model=MODEL, messages=e2e_checks.PARIS, max_tokens=16,
                                              temperature=0, stop=["aris"])
    assert stopped.choices[0].message.content == streamed[:streamed.index("aris")]
    assert stopped.choices[0].finish_reason == "stop"
    await e2e_checks.context_overflow_is_a_400(c)


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
