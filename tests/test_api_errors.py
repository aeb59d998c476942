"""Bad input, overload and auth: OpenAI-shaped errors with the right status, from a live API."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

MODEL = "smollm2-135m-instruct"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code:
        assert error["code"] == code
    return error


@pytest.fixture
def api(make_stack):
    stack = make_stack()
    stack.worker(synthetic_tokens_per_second="0", max_model_len="64")
    return stack.api(max_tokens_cap="50", max_body_bytes="20000")


async def test_bad_requests_get_openai_errors(api):
    async with httpx.AsyncClient(base_url=api) as http:
        r = await http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert_openai_error(r, 400, "invalid_json")
        error = assert_openai_error(await http.post("/v1/chat/completions", json={**CHAT, "temperature": "hot"}), 400)
        assert error["param"] == "temperature"
        assert_openai_error(await http.post("/v1/chat/completions", json={**CHAT, "messages": []}), 400)
        assert_openai_error(await http.post("/v1/chat/completions", json={**CHAT, "n": 2}), 400)
        assert_openai_error(await http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"}), 404,
                            "model_not_found")
        assert_openai_error(await http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 51}), 400,
                            "max_tokens_exceeded")
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 30000}]}
        assert_openai_error(await http.post("/v1/chat/completions", json=big), 413, "request_too_large")
        assert_openai_error(await http.get("/v1/jobs/job-nope"), 404, "job_not_found")
        assert_openai_error(await http.post("/v1/jobs", json={"model": MODEL}), 400)


async def test_prompt_over_the_context_is_a_400_from_the_worker_stream_or_not(api):
    long = {**CHAT, "messages": [{"role": "user", "content": "word " * 70}]}
    async with httpx.AsyncClient(base_url=api, timeout=10) as http:
        error = assert_openai_error(await http.post("/v1/chat/completions", json=long), 400,
                                    "context_length_exceeded")
        assert "maximum context length is 64" in error["message"]
        streamed = await http.post("/v1/chat/completions", json={**long, "stream": True})
        assert_openai_error(streamed, 400, "context_length_exceeded")  # before the first byte
    with pytest.raises(openai.BadRequestError):
        await openai.AsyncOpenAI(base_url=api + "/v1", api_key="x").chat.completions.create(**long)


async def test_queue_full_is_a_429_with_retry_after(make_stack):
    stack = make_stack()
    url = stack.api(max_queue_depth="2")  # no worker: jobs stay queued
    async with httpx.AsyncClient(base_url=url) as http:
        for _ in range(2):
            assert (await http.post("/v1/jobs", json=CHAT)).status_code == 202
        r = await http.post("/v1/jobs", json=CHAT)
        assert_openai_error(r, 429, "queue_full")
        assert int(r.headers["retry-after"]) > 0


async def test_too_many_concurrent_streams_in_one_pod_is_a_429(make_stack):
    stack = make_stack()
    stack.worker(synthetic_tokens_per_second="20")
    url = stack.api(max_concurrent_requests="1")
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        async with http.stream("POST", "/v1/chat/completions", json={**CHAT, "max_tokens": 40, "stream": True}) as r:
            assert r.status_code == 200
            second = await http.post("/v1/chat/completions", json=CHAT)
            assert_openai_error(second, 429, "too_many_requests")
            assert second.headers["retry-after"] == "1"


async def test_a_job_whose_deadline_passes_in_the_queue_expires(make_stack):
    stack = make_stack()
    url = stack.api()
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        job_id = (await http.post("/v1/jobs", json={**CHAT, "timeout": 0.3})).json()["id"]
        await asyncio.sleep(0.5)
        stack.worker(synthetic_tokens_per_second="0")
        for _ in range(100):
            job = (await http.get(f"/v1/jobs/{job_id}")).json()
            if job["status"] != "queued":
                break
            await asyncio.sleep(0.05)
        assert job["status"] == "expired" and job["tokens"] == 0 and job["error"]["code"] == "job_expired"


async def test_api_keys_guard_every_route_and_jobs_belong_to_their_key(make_stack):
    stack = make_stack()
    stack.worker(synthetic_tokens_per_second="0")
    url = stack.api(api_keys="key-a,key-b")
    a = {"Authorization": "Bearer key-a"}
    b = {"Authorization": "Bearer key-b"}
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        assert (await http.get("/health")).status_code == 200
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/v1/jobs"),
                             ("GET", "/stats"), ("GET", "/ready"), ("GET", "/metrics")]:
            assert_openai_error(await http.request(method, path, json=CHAT), 401, "invalid_api_key")
            assert_openai_error(await http.request(method, path, json=CHAT, headers={"Authorization": "Bearer x"}),
                                401)
        job = (await http.post("/v1/jobs", json=CHAT, headers=a, params={"wait": 5})).json()
        assert job["status"] == "succeeded"
        for method, path in [("GET", ""), ("GET", "/events"), ("DELETE", "")]:
            assert_openai_error(await http.request(method, f"/v1/jobs/{job['id']}{path}", headers=b), 404)
        assert (await http.get(f"/v1/jobs/{job['id']}", headers=a)).status_code == 200
        assert [j["id"] for j in (await http.get("/v1/jobs", headers=a)).json()["data"]] == [job["id"]]
        assert (await http.get("/v1/jobs", headers=b)).json()["data"] == []
    ok = openai.AsyncOpenAI(base_url=url + "/v1", api_key="key-b")
    assert (await ok.chat.completions.create(**CHAT)).choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(base_url=url + "/v1", api_key="nope").models.list()


async def test_idempotency_key_returns_the_same_job(make_stack):
    stack = make_stack()
    url = stack.api()
    async with httpx.AsyncClient(base_url=url) as http:
        headers = {"Idempotency-Key": "order-42"}
        first = await http.post("/v1/jobs", json=CHAT, headers=headers)
        again = await http.post("/v1/jobs", json=CHAT, headers=headers)
        other = await http.post("/v1/jobs", json=CHAT, headers={"Idempotency-Key": "order-43"})
        assert first.status_code == 202 and again.json()["id"] == first.json()["id"]
        assert other.json()["id"] != first.json()["id"]
        assert stack.redis.xlen(f"{stack.prefix}jobs:{MODEL}") == 2
