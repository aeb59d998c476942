"""The pipeline end to end: real API and worker subprocesses, real Redis, the official openai client.

The synthetic engine makes the expected text computable, so every byte a client
receives is checked: no duplicate, no gap, nothing invented.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from worker.engines.synthetic import synthetic_token, token_text

MODEL = "smollm2-135m-instruct"


def expected(prompt: str, n: int, seed: int | None = None) -> str:
    key = f"{prompt}|{seed}".encode()
    return "".join(token_text(synthetic_token(key, i)) for i in range(n))


def client(url: str, **kw: object) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=str(kw.pop("api_key", "none")), max_retries=0, **kw)


def sse_events(text: str) -> list[dict[str, str]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if fields:
            events.append(fields)
    return events


async def test_stream_chat_through_openai_client(make_stack):
    stack = make_stack()
    stack.worker(synthetic_tokens_per_second="200")
    url = stack.api()
    stream = await client(url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "tell me a story"}], max_tokens=20, stream=True,
        stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected("tell me a story", 20)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20 and chunks[-1].usage.prompt_tokens == 4
    assert stack.job(chunks[0].id)["status"] == "succeeded"


async def test_non_stream_chat_and_completion(make_stack):
    stack = make_stack()
    stack.worker(synthetic_tokens_per_second="0")
    url = stack.api()
    c = client(url)
    chat = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=7)
    assert chat.choices[0].message.content == expected("hi", 7)
    assert chat.usage.completion_tokens == 7 and chat.id.startswith("job-")
    comp = await c.completions.create(model=MODEL, prompt="once upon", max_tokens=5, seed=3)
    assert comp.choices[0].text == expected("once upon", 5, seed=3)
    assert comp.usage.total_tokens == 2 + 5
    models = await c.models.list()
    assert [m.id for m in models.data] == [MODEL]


async def test_submit_poll_and_resume_events(make_stack):
    stack = make_stack()
    stack.worker(synthetic_tokens_per_second="100")
    url = stack.api()
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        r = await http.post("/v1/jobs", json={"model": MODEL, "prompt": "long job", "max_tokens": 30})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert r.headers["location"] == f"/v1/jobs/{job_id}"
        # read the first few events, drop the connection, resume from the last id seen
        seen: list[dict[str, str]] = []
        async with http.stream("GET", f"/v1/jobs/{job_id}/events") as events:
            async for line in events.aiter_lines():
                if line.startswith("id: "):
                    seen.append({"id": line[4:]})
                if len(seen) == 5:
                    break
        assert [e["id"] for e in seen] == ["0", "1", "2", "3", "4"]
        rest = await http.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "4"})
        events = sse_events(rest.text)
        assert [int(e["id"]) for e in events] == list(range(5, 30))
        assert events[-1]["event"] == "done"
        status = (await http.get(f"/v1/jobs/{job_id}")).json()
        assert status["status"] == "succeeded"
        assert status["output"] == expected("long job", 30)
        assert status["result"]["choices"][0]["text"] == status["output"]
        assert status["usage"]["completion_tokens"] == 30
        t = status["timings"]
        assert 0 <= t["queued_s"] <= t["time_to_first_token_s"] <= t["total_s"]
        # a full replay after the end gives every event once
        replay = sse_events((await http.get(f"/v1/jobs/{job_id}/events")).text)
        assert [int(e["id"]) for e in replay] == list(range(30))


async def test_cancel_frees_the_batch_slot(make_stack):
    stack = make_stack()
    stack.worker(synthetic_tokens_per_second="20", max_batch_size="1")
    url = stack.api()
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        long = (await http.post("/v1/jobs", json={"model": MODEL, "prompt": "a", "max_tokens": 1000})).json()["id"]
        short = (await http.post("/v1/jobs", json={"model": MODEL, "prompt": "b", "max_tokens": 3})).json()["id"]
        await _wait_for(http, long, lambda job: job["tokens"] >= 2)
        cancelled = await http.delete(f"/v1/jobs/{long}")
        assert cancelled.json()["status"] == "cancelled"
        started = time.monotonic()
        done = await _wait_status(http, short, "succeeded")
        assert time.monotonic() - started < 3  # the only slot was freed at once
        assert done["output"] == expected("b", 3)
        final = (await http.get(f"/v1/jobs/{long}")).json()
        assert final["status"] == "cancelled" and 0 < final["tokens"] < 1000


async def test_client_disconnect_cancels_the_job(make_stack):
    stack = make_stack()
    stack.worker(synthetic_tokens_per_second="20")
    url = stack.api()
    stream = await client(url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1000, stream=True)
    job_id = None
    async for chunk in stream:
        job_id = chunk.id
        if chunk.choices and chunk.choices[0].delta.content:
            break
    await stream.close()
    assert job_id
    deadline = time.time() + 5
    while stack.job(job_id)["status"] != "cancelled" and time.time() < deadline:
        await asyncio.sleep(0.1)
    assert stack.job(job_id)["status"] == "cancelled"


async def test_two_workers_share_one_queue_and_serve_each_job_once(make_stack):
    stack = make_stack()
    stack.worker("wa", synthetic_tokens_per_second="50", max_batch_size="2")
    stack.worker("wb", synthetic_tokens_per_second="50", max_batch_size="2")
    url = stack.api()
    c = client(url)
    prompts = [f"job number {i}" for i in range(16)]

    async def one(p: str) -> tuple[str, str]:
        r = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=10)
        return r.id, r.choices[0].message.content or ""

    results = await asyncio.gather(*(one(p) for p in prompts))
    for (job_id, text), p in zip(results, prompts, strict=True):
        assert text == expected(p, 10)
        job = stack.job(job_id)
        assert job["attempts"] == "1" and stack.redis.llen(f"{stack.prefix}job:{{{job_id}}}:log") == 10
    served_by = {stack.job(job_id)["worker"] for job_id, _ in results}
    assert served_by == {"wa", "wb"}
    stream = f"{stack.prefix}jobs:{MODEL}"  # every entry acked and deleted with its job's finish
    assert stack.redis.xlen(stream) == 0 and stack.redis.xpending(stream, "workers")["pending"] == 0


async def test_worker_killed_mid_stream_is_taken_over_without_gap_or_duplicate(make_stack):
    stack = make_stack()
    first = stack.worker("first", synthetic_tokens_per_second="20")
    url = stack.api()
    stream = await client(url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "survive"}], max_tokens=60, stream=True)
    text, killed = "", False
    async for chunk in stream:
        text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
        if not killed and len(text.split()) >= 10:
            first.kill()
            stack.worker("second", synthetic_tokens_per_second="20")
            killed = True
    assert killed and text == expected("survive", 60)
    job = stack.job(chunk.id)
    assert job["status"] == "succeeded" and job["attempts"] == "2" and job["worker"] == "second"


async def _wait_for(http: httpx.AsyncClient, job_id: str, check, timeout: float = 20) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = (await http.get(f"/v1/jobs/{job_id}")).json()
        if check(job):
            return job
        await asyncio.sleep(0.05)
    pytest.fail(f"job {job_id} never got there: {job}")


async def _wait_status(http: httpx.AsyncClient, job_id: str, status: str, timeout: float = 20) -> dict:
    return await _wait_for(http, job_id, lambda job: job["status"] == status, timeout)


def test_worker_check_exits_0_only_while_a_worker_of_this_host_is_alive(make_stack):
    import socket
    import subprocess
    import sys

    stack = make_stack()

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "worker", "--check"], env=stack.base_env, capture_output=True,
                              text=True, timeout=30)

    assert check().returncode == 1
    worker = stack.worker(f"{socket.gethostname()}-1")
    alive = check()
    assert alive.returncode == 0 and "healthy" in alive.stdout
    worker.kill()
    time.sleep(2.5)  # past HEARTBEAT_TTL
    assert check().returncode == 1
