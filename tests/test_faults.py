"""Faults done for real: workers killed and stopped, poison jobs, Redis restarted under load."""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
import redis

from scripts.stack import Stack, free_port
from tests.test_pipeline import MODEL, client, expected, sse_events

pytestmark = pytest.mark.slow


async def stream_text(c: openai.AsyncOpenAI, prompt: str, max_tokens: int) -> tuple[str, str]:
    stream = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                             max_tokens=max_tokens, stream=True, temperature=0)
    text, job_id = "", ""
    async for chunk in stream:
        job_id = chunk.id
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    return job_id, text


async def test_chaos_workers_killed_at_random_lose_nothing(make_stack):
    """50 streaming jobs over 3 workers; workers are SIGKILLed while they run and replaced.
    Six kills can hit one job three times (its attempts: the poison-job limit, tested on its own
    below), so the limit is raised here: this test is about losing nothing."""
    stack = make_stack()
    env = {"synthetic_tokens_per_second": "40", "max_batch_size": "8", "max_attempts": "10"}
    workers = [stack.worker(f"w{i}", **env) for i in range(3)]
    url = stack.api()
    c = client(url, timeout=120)
    prompts = [f"chaos job {i}" for i in range(50)]
    tasks = [asyncio.create_task(stream_text(c, p, 40)) for p in prompts]
    rng = random.Random(7)
    kills = 0
    for n in range(6):
        await asyncio.sleep(rng.uniform(0.5, 1.5))
        victim = rng.randrange(len(workers))
        workers[victim].kill()
        kills += 1
        workers[victim] = stack.worker(f"r{n}", **env)
    results = await asyncio.gather(*tasks)
    assert kills == 6
    attempts = []
    for (job_id, text), prompt in zip(results, prompts, strict=True):
        assert text == expected(prompt, 40), f"{job_id}: stream has a gap or a duplicate"
        job = stack.job(job_id)
        assert job["status"] == "succeeded"
        assert stack.redis.llen(f"{stack.prefix}job:{{{job_id}}}:log") == 40
        attempts.append(int(job["attempts"]))
    assert max(attempts) >= 2, "no job was ever taken over: the kills hit nothing"


async def test_poison_job_is_dead_lettered_after_max_attempts(make_stack):
    stack = make_stack()
    stack.worker("wp", synthetic_fail_on="POISON", max_attempts="3", synthetic_tokens_per_second="0")
    url = stack.api()
    c = client(url, timeout=60)
    with pytest.raises(openai.InternalServerError, match="dead-lettered"):
        await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "POISON pill"}])
    dead = stack.redis.xrange(f"{stack.prefix}dead:{MODEL}")
    assert len(dead) == 1 and dead[0][1][b"attempts"] == b"3"
    # the worker did not loop on it and still serves
    ok = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "fine"}], max_tokens=3)
    assert ok.choices[0].message.content == expected("fine", 3)
    async with httpx.AsyncClient(base_url=url) as http:
        stats = (await http.get("/stats")).json()
    assert stats["models"][MODEL]["dead_letters"] == 1 and stats["models"][MODEL]["pending"] == 0


async def test_sigterm_hands_back_running_jobs_and_strands_nothing(make_stack):
    stack = make_stack()
    leaving = stack.worker("leaving", synthetic_tokens_per_second="20", shutdown_grace="0.5")
    url = stack.api()
    c = client(url, timeout=60)
    task = asyncio.create_task(stream_text(c, "hand me over", 60))
    await asyncio.sleep(1.0)
    started = time.monotonic()
    assert leaving.terminate() == 0
    assert time.monotonic() - started < 5
    pending = stack.redis.xpending(f"{stack.prefix}jobs:{MODEL}", "workers")
    assert pending["pending"] == 0  # handed back, not stranded with a dead consumer
    stack.worker("staying", synthetic_tokens_per_second="20")
    job_id, text = await task
    assert text == expected("hand me over", 60)
    job = stack.job(job_id)
    assert job["worker"] == "staying" and job["status"] == "succeeded"


async def test_sigterm_lets_short_jobs_finish_within_the_grace(make_stack):
    stack = make_stack()
    worker = stack.worker("w", synthetic_tokens_per_second="20", shutdown_grace="10")
    url = stack.api()
    task = asyncio.create_task(stream_text(client(url), "short", 20))
    await asyncio.sleep(0.5)
    assert worker.terminate() == 0
    job_id, text = await task
    assert text == expected("short", 20) and stack.job(job_id)["worker"] == "w"


@pytest.fixture
def own_redis(tmp_path: Path):
    """A redis-server of the test's own, with AOF, that the test may restart."""
    port = free_port()
    data = tmp_path / "redis"
    data.mkdir()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--appendonly", "yes",
            "--appendfsync", "always", "--save", ""]

    class Server:
        url = f"redis://127.0.0.1:{port}/0"
        proc: subprocess.Popen[bytes]

        def start(self) -> None:
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
            for _ in range(100):
                try:
                    redis.Redis(port=port).ping()
                    return
                except redis.ConnectionError:
                    time.sleep(0.05)
            raise RuntimeError("redis-server did not start")

        def stop(self) -> None:
            self.proc.terminate()
            self.proc.wait(10)

    server = Server()
    server.start()
    yield server
    server.stop()


async def test_redis_restart_under_load_loses_no_accepted_job(own_redis, tmp_path: Path):
    stack = Stack(own_redis.url, "r:", tmp_path)
    try:
        for i in range(2):
            stack.worker(f"w{i}", synthetic_tokens_per_second="30")
        url = stack.api()
        accepted: list[str] = []
        refused = 0
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            async def submit(n: int) -> None:
                nonlocal refused
                for i in range(n):
                    r = await http.post("/v1/jobs", json={"model": MODEL, "prompt": f"p{len(accepted)}-{i}",
                                                         "max_tokens": 30})
                    if r.status_code == 202:
                        accepted.append(r.json()["id"])
                    else:
                        assert r.status_code == 503, r.text
                        assert r.json()["error"]["code"] == "service_unavailable"
                        refused += 1
                    await asyncio.sleep(0.02)

            await submit(20)
            streaming = asyncio.create_task(stream_text(client(url, timeout=60), "through the outage", 90))
            await asyncio.sleep(0.5)
            own_redis.stop()
            await submit(5)  # Redis is down: refused with 503, never accepted and lost
            ready = await http.get("/ready")
            assert ready.status_code == 503
            own_redis.start()
            await submit(10)
            deadline = time.time() + 60
            statuses: dict[str, str] = {}
            while time.time() < deadline:
                statuses = {j: (await http.get(f"/v1/jobs/{j}")).json()["status"] for j in accepted}
                if all(s == "succeeded" for s in statuses.values()):
                    break
                await asyncio.sleep(0.5)
            assert refused >= 5 and len(accepted) == 35 - refused  # a 503 is never an accepted job
            try:  # an in-flight stream goes on after the restart, or ends with an error: it never hangs
                _, text = await asyncio.wait_for(streaming, 60)
                assert text == expected("through the outage", 90)
            except openai.APIError as exc:
                assert "Redis" in str(exc)
            assert all(s == "succeeded" for s in statuses.values()), statuses
            for job_id in accepted:
                events = sse_events((await http.get(f"/v1/jobs/{job_id}/events")).text)
                assert [int(e["id"]) for e in events] == list(range(30)), (stack.job(job_id), events[-3:])
    finally:
        stack.stop()


async def test_streams_end_with_an_error_event_while_redis_stays_down(own_redis, tmp_path: Path):
    stack = Stack(own_redis.url, "d:", tmp_path)
    try:
        stack.worker("w", synthetic_tokens_per_second="20")
        url = stack.api()
        streaming = asyncio.create_task(stream_text(client(url, timeout=60), "stranded", 200))
        await asyncio.sleep(1.0)
        own_redis.stop()
        started = time.monotonic()
        with pytest.raises(openai.APIError, match="Redis"):
            await asyncio.wait_for(streaming, 30)
        assert time.monotonic() - started < 15
        async with httpx.AsyncClient(base_url=url) as http:
            r = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": [
                {"role": "user", "content": "x"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"
    finally:
        stack.stop_processes()
