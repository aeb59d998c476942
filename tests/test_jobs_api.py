"""The job API for long work: webhooks, priorities, wait, listing, and the llmctl CLI, on a live stack."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from scripts.stack import ROOT
from shared.webhooks import verify
from tests.test_pipeline import MODEL, expected

SECRET = "whsec-test"


class Receiver:
    """A real local HTTP receiver that fails the first ``failures`` deliveries of `completed` with 500."""

    def __init__(self, failures: int):
        self.failures = failures
        self.received: list[tuple[dict[str, str], bytes, int]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                failing = receiver.failures > 0 and json.loads(body)["event"] == "completed"
                status = 500 if failing else 200
                receiver.failures -= failing
                receiver.received.append((dict(self.headers), body, status))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


async def test_webhook_delivers_retries_and_signs(make_stack):
    receiver = Receiver(failures=2)
    stack = make_stack(webhook_secret=SECRET, webhook_backoff="0.2")
    stack.worker(synthetic_tokens_per_second="0")  # runs the arq worker beside the engine loop
    url = stack.api()
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        job = (await http.post("/v1/jobs", json={"model": MODEL, "prompt": "hook me", "max_tokens": 5,
                                                 "webhook": receiver.url,
                                                 "webhook_events": ["started", "completed"]})).json()
        for _ in range(200):
            ok = [r for r in receiver.received if r[2] == 200]
            if len(ok) == 2:
                break
            await asyncio.sleep(0.05)
        assert len(ok) == 2, receiver.received
        events = sorted(json.loads(body)["event"] for _, body, _ in ok)
        assert events == ["completed", "started"]
        for headers, body, _ in receiver.received:
            assert verify(SECRET, headers["X-Webhook-Signature"], body)
            assert not verify("wrong-secret", headers["X-Webhook-Signature"], body)
        completed = next(json.loads(b) for _, b, _ in ok if json.loads(b)["event"] == "completed")
        assert completed["job"]["id"] == job["id"] and completed["job"]["output"] == expected("hook me", 5)
        assert len(receiver.received) == 4  # two failures, then both delivered
        deliveries = (await http.get(f"/v1/jobs/{job['id']}")).json()["webhook"]["deliveries"]
        tries = sorted((d["event"], d["attempt"], d["status"], d["ok"]) for d in deliveries)
        assert tries == [("completed", 1, 500, False), ("completed", 2, 500, False), ("completed", 3, 200, True),
                         ("started", 1, 200, True)]


async def test_higher_lanes_are_always_taken_first(make_stack):
    stack = make_stack()
    url = stack.api()
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        order = ["low", "normal", "high"] * 4
        ids = {}
        for i, priority in enumerate(order):
            r = await http.post("/v1/jobs", json={"model": MODEL, "prompt": f"p{i}", "max_tokens": 2,
                                                  "priority": priority})
            ids[r.json()["id"]] = priority
        stack.worker(synthetic_tokens_per_second="0", max_batch_size="1", priority_aging="600")
        jobs = []
        for job_id in ids:
            for _ in range(200):
                job = (await http.get(f"/v1/jobs/{job_id}")).json()
                if job["status"] == "succeeded":
                    break
                await asyncio.sleep(0.05)
            jobs.append(job)
    started = [ids[j["id"]] for j in sorted(jobs, key=lambda j: j["started_at"])]
    assert started == ["high"] * 4 + ["normal"] * 4 + ["low"] * 4


async def test_a_low_lane_is_not_starved(make_stack):
    stack = make_stack()
    url = stack.api()
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        low = (await http.post("/v1/jobs", json={"model": MODEL, "prompt": "low", "max_tokens": 2,
                                                 "priority": "low"})).json()["id"]
        await asyncio.sleep(1.2)
        highs = [(await http.post("/v1/jobs", json={"model": MODEL, "prompt": f"h{i}", "max_tokens": 2,
                                                    "priority": "high"})).json()["id"] for i in range(3)]
        stack.worker(synthetic_tokens_per_second="0", max_batch_size="1", priority_aging="1")
        r = await http.post("/v1/jobs", json={"model": MODEL, "prompt": "w", "max_tokens": 1}, params={"wait": 10})
        assert r.status_code == 200
        jobs = [(await http.get(f"/v1/jobs/{j}")).json() for j in [low, *highs]]
    assert all(j["status"] == "succeeded" for j in jobs)
    assert jobs[0]["started_at"] < min(j["started_at"] for j in jobs[1:])  # waited past the aging: first


async def test_wait_returns_the_result_or_202(make_stack):
    stack = make_stack()
    stack.worker(synthetic_tokens_per_second="50")
    url = stack.api()
    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        fast = await http.post("/v1/jobs", params={"wait": 5},
                               json={"model": MODEL, "messages": [{"role": "user", "content": "q"}], "max_tokens": 5})
        assert fast.status_code == 200
        assert fast.json()["result"]["choices"][0]["message"]["content"] == expected("q", 5)
        slow = await http.post("/v1/jobs", params={"wait": 0.2}, json={"model": MODEL, "prompt": "s",
                                                                         "max_tokens": 200})
        assert slow.status_code == 202 and slow.json()["status"] in ("queued", "running")


async def test_list_is_newest_first_with_cursor_and_status_filter(make_stack):
    stack = make_stack()
    stack.worker(synthetic_tokens_per_second="200")
    url = stack.api()
    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        ids = []
        for i in range(5):
            r = await http.post("/v1/jobs", params={"wait": 5}, json={"model": MODEL, "prompt": f"{i}",
                                                                       "max_tokens": 2})
            ids.append(r.json()["id"])
        cancelled = (await http.post("/v1/jobs", json={"model": MODEL, "prompt": "c", "max_tokens": 1500,
                                                       "priority": "low"})).json()["id"]
        await http.delete(f"/v1/jobs/{cancelled}")
        first = (await http.get("/v1/jobs", params={"limit": 3})).json()
        assert [j["id"] for j in first["data"]] == [cancelled, ids[4], ids[3]] and first["has_more"]
        second = (await http.get("/v1/jobs", params={"limit": 3, "cursor": first["next_cursor"]})).json()
        assert [j["id"] for j in second["data"]] == [ids[2], ids[1], ids[0]]
        only = (await http.get("/v1/jobs", params={"status": "cancelled"})).json()
        assert [j["id"] for j in only["data"]] == [cancelled]


def llmctl(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "llmctl.py"), "--url", url, *args],
                          capture_output=True, text=True, timeout=60)


def test_llmctl_against_a_live_stack(make_stack):
    stack = make_stack()
    stack.worker(synthetic_tokens_per_second="100")
    url = stack.api()
    out = llmctl(url, "submit", "hello cli", "--max-tokens", "6", "--wait", "10")
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    assert job["status"] == "succeeded" and job["output"] == expected("hello cli", 6)
    streamed = llmctl(url, "stream", job["id"])
    assert streamed.stdout.strip() == expected("hello cli", 6).strip()
    assert "finish_reason=length" in streamed.stderr
    resumed = llmctl(url, "stream", job["id"], "--after", "2")
    assert resumed.stdout == "".join(" " + w for w in expected("hello cli", 6).split()[3:])
    live = llmctl(url, "submit", "stream me", "--max-tokens", "8", "--stream")
    assert live.returncode == 0 and live.stdout == expected("stream me", 8)
    long = json.loads(llmctl(url, "submit", "long", "--max-tokens", "1500").stdout)
    cancelled = llmctl(url, "cancel", long["id"])
    assert json.loads(cancelled.stdout)["status"] == "cancelled"
    listed = llmctl(url, "list", "--limit", "2")
    assert listed.stdout.splitlines()[0].startswith(long["id"]) and "cancelled" in listed.stdout
    assert llmctl(url, "get", job["id"]).returncode == 0
    missing = llmctl(url, "get", "job-missing")
    assert missing.returncode == 1 and "error 404" in missing.stderr


@pytest.mark.parametrize("bad", ["--priority=urgent"])
def test_llmctl_rejects_bad_arguments(bad):
    out = llmctl("http://127.0.0.1:9", "submit", "x", bad)
    assert out.returncode == 2
