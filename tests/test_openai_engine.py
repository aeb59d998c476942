"""OpenAIUpstreamEngine against a real upstream: `transformers serve` on the materialized SmolLM2."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from scripts.stack import free_port
from shared.settings import Settings
from worker.engines.base import Delta, EngineRequestError, GenerationRequest, SamplingParams
from worker.engines.openai_engine import OpenAIUpstreamEngine, UpstreamError, chunk_token_id

pytestmark = pytest.mark.model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


class Upstream:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, model: str, log: Path):
        self.proc, self.url, self.model, self.log = proc, url, model, log

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """`transformers serve` pinned to the local model directory, fully offline."""
    from worker.engines.hf_loader import materialize

    settings = Settings()
    model_dir = str(materialize(settings.model, settings.model_cache_dir))
    cli = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
    if cli is None:
        pytest.skip("the transformers CLI is not installed")
    tmp = tmp_path_factory.mktemp("upstream")
    port = free_port()
    # /v1/models scans the hub cache and fails when it does not exist: give it an empty one.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_CACHE": str(tmp / "hub")}
    (tmp / "hub").mkdir()
    log = tmp / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([cli, "serve", model_dir, "--host", "127.0.0.1", "--port", str(port),
                                 "--device", "cpu", "--dtype", "float32"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"transformers serve not ready:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield Upstream(proc, url, model_dir, log)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
async def engine(upstream: Upstream) -> AsyncIterator[OpenAIUpstreamEngine]:
    e = OpenAIUpstreamEngine(Settings(inference_engine="openai", upstream_url=upstream.url,
                                      upstream_model=upstream.model, max_batch_size=4))
    await e.start()
    yield e
    await e.close()


def chat(messages: list[dict[str, str]], max_tokens: int = 24, resume: list[int] | None = None,
         **params: object) -> GenerationRequest:
    params.setdefault("temperature", 0.0)
    return GenerationRequest(id="o", params=SamplingParams(max_tokens=max_tokens, **params),  # type: ignore[arg-type]
                             messages=messages, resume_token_ids=resume or [])


async def collect(engine: OpenAIUpstreamEngine, request: GenerationRequest) -> list[Delta]:
    deltas = [d async for d in engine.generate(request)]
    assert deltas[-1].finish_reason is not None
    assert all(d.finish_reason is None for d in deltas[:-1])
    return deltas


def text(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


def ids(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


async def test_streaming_chat(engine):
    deltas = await collect(engine, chat(QUESTION, max_tokens=40))
    assert "Paris" in text(deltas)
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].prompt_tokens > 10  # the chat template's system prompt and the question
    assert deltas[-1].completion_tokens >= len(deltas) - 1
    for d in deltas[:-1]:
        assert d.token_ids == [chunk_token_id(d.text)]
    assert [d.completion_tokens for d in deltas[:-1]] == list(range(1, len(deltas)))
    assert engine.num_running() == 0


async def test_completion_stops_at_max_tokens(engine):
    req = GenerationRequest(id="c", params=SamplingParams(max_tokens=6, temperature=0.0), prompt="The quick brown fox")
    deltas = await collect(engine, req)
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].completion_tokens == 6 and deltas[-1].prompt_tokens == 4
    assert len(ids(deltas)) == 6 and text(deltas).strip()


async def test_stop_string_is_applied_upstream(engine):
    full = text(await collect(engine, chat(QUESTION, max_tokens=40)))
    assert " is " in full
    deltas = await collect(engine, chat(QUESTION, max_tokens=40, stop=[" is "]))
    assert deltas[-1].finish_reason == "stop"
    assert text(deltas) == full[:full.index(" is ")]  # cut before the stop string, like OpenAI


async def test_resume_reruns_and_skips_what_was_delivered(engine):
    full = await collect(engine, chat(STORY, max_tokens=20))
    assert full[-1].finish_reason == "length"
    k = 7
    resumed = await collect(engine, chat(STORY, max_tokens=20, resume=ids(full)[:k]))
    assert text(full[:k]) + text(resumed) == text(full)
    assert ids(full)[:k] + ids(resumed) == ids(full)
    assert resumed[-1].completion_tokens == full[-1].completion_tokens == 20
    assert resumed[0].completion_tokens == k + 1
    done = await collect(engine, chat(STORY, max_tokens=5, resume=ids(full)[:5]))
    assert done == [Delta("", [], "length", 0, 5)]


async def test_resume_with_a_stop_string(engine):
    """The held-back start of a stop string and the stop itself behave as in an uninterrupted run."""
    full = text(await collect(engine, chat(QUESTION, max_tokens=40)))
    stop = " Paris"
    assert stop in full
    plain = await collect(engine, chat(QUESTION, max_tokens=40, stop=[stop]))
    assert text(plain) == full[:full.index(stop)] and plain[-1].finish_reason == "stop"
    for k in range(1, len(ids(plain))):
        delivered = text([d for d in plain if d.completion_tokens <= k])
        resumed = await collect(engine, chat(QUESTION, max_tokens=40, stop=[stop], resume=ids(plain)[:k]))
        assert delivered + text(resumed) == text(plain), k
        assert resumed[-1].finish_reason == "stop"


async def test_upstream_4xx_is_a_request_error_with_its_message(engine, upstream):
    wrong = OpenAIUpstreamEngine(Settings(inference_engine="openai", upstream_url=upstream.url,
                                          upstream_model="no-such-model", max_batch_size=1))
    try:
        with pytest.raises(EngineRequestError) as err:
            await anext(wrong.generate(chat(QUESTION)))
        assert "no-such-model" in str(err.value)
    finally:
        await wrong.close()
    # transformers serve only takes text prompts
    req = GenerationRequest(id="t", params=SamplingParams(max_tokens=4), prompt=[1, 2, 3])
    with pytest.raises(EngineRequestError) as err:
        await anext(engine.generate(req))
    assert "prompt" in str(err.value)
    assert engine.num_running() == 0


async def test_unreachable_upstream_is_a_plain_error():
    e = OpenAIUpstreamEngine(Settings(inference_engine="openai", upstream_url=f"http://127.0.0.1:{free_port()}/v1",
                                      upstream_model="m", max_batch_size=1))
    try:
        with pytest.raises(UpstreamError) as err:
            await anext(e.generate(chat(QUESTION)))
        assert not isinstance(err.value, EngineRequestError)
        with pytest.raises(httpx.ConnectError):
            await e.check_health()
    finally:
        await e.close()


async def test_closing_the_generator_aborts_upstream(engine, upstream):
    gen = engine.generate(chat(STORY, max_tokens=1500, temperature=1.0))
    await anext(gen)
    await anext(gen)
    assert engine.num_running() == 1
    busy_from = upstream.cpu_seconds()
    await asyncio.sleep(1.0)
    assert upstream.cpu_seconds() - busy_from > 0.3  # generating
    await gen.aclose()
    assert engine.num_running() == 0
    await asyncio.sleep(1.5)  # the server notices the disconnect at its next token
    idle_from = upstream.cpu_seconds()
    await asyncio.sleep(2.0)
    assert upstream.cpu_seconds() - idle_from < 0.3, "the upstream kept generating after the client left"
    # and it serves the next request normally
    deltas = await collect(engine, chat(QUESTION, max_tokens=10))
    assert deltas[-1].finish_reason in ("stop", "length")


async def test_cancelling_the_consumer_frees_the_request(engine):
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(chat(STORY, max_tokens=1500)):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.num_running() == 0


async def test_health(engine):
    await engine.check_health()
