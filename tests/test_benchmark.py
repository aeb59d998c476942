"""scripts/benchmark.py (metric math, and a real run against a fake SSE server) and
scripts/healthcheck.py (against a stdlib server answering 200 and 503)."""

from __future__ import annotations

import asyncio
import importlib
import json
import math
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

SCRIPTS_DIR = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS_DIR))
benchmark = importlib.import_module("benchmark")

# ----------------------------------------------------------------------------- metric math


def test_percentiles_interpolate_linearly_like_numpy() -> None:
    assert benchmark.percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert benchmark.percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)
    assert benchmark.percentile(list(range(101)), 99) == pytest.approx(99.0)


def test_latency_summary_is_in_milliseconds_and_none_when_empty() -> None:
    summary = benchmark.latency_summary_ms([0.010, 0.020, 0.030])
    assert summary["mean"] == pytest.approx(20.0)
    assert summary["p50"] == pytest.approx(20.0)
    assert summary["p90"] == pytest.approx(28.0)
    assert summary["p99"] == pytest.approx(29.8)
    assert set(benchmark.latency_summary_ms([]).values()) == {None}


def test_a_chunk_of_k_tokens_spreads_its_gap_over_k_itls() -> None:
    assert benchmark.spread_gap(0.09, 3) == pytest.approx([0.03, 0.03, 0.03])
    assert benchmark.spread_gap(0.05, 1) == [0.05]
    assert benchmark.spread_gap(0.05, 0) == [0.05]


def chat_chunk(content: str | None, usage: dict[str, int] | None = None) -> dict[str, Any]:
    delta = {"role": "assistant", "content": content}
    chunk: dict[str, Any] = {"choices": [{"index": 0, "delta": delta}]}
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def test_tracker_measures_from_first_content_chunk_and_prefers_usage() -> None:
    tracker = benchmark.StreamTracker(start_s=10.0)
    tracker.on_chunk(chat_chunk(""), 10.05)  # role-only chunk: not a token
    for at in (10.2, 10.25, 10.3):
        tracker.on_chunk(chat_chunk("word"), at)
    tracker.on_chunk({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 4}}, 10.31)
    record = tracker.finish()
    assert record.success
    assert record.ttft_s == pytest.approx(0.2)
    assert record.itl_s == pytest.approx([0.05, 0.05])
    assert record.latency_s == pytest.approx(0.3)  # trailing usage chunk is not a token
    assert (record.output_tokens, record.prompt_tokens) == (4, 7)
    assert benchmark.time_per_output_token_s(record) == pytest.approx(0.1 / 3)


def test_tracker_spreads_chunks_by_per_chunk_usage() -> None:
    tracker = benchmark.StreamTracker(start_s=0.0)
    for at, running_tokens in ((0.1, 1), (0.3, 3), (0.6, 6)):
        tracker.on_chunk(chat_chunk("x", {"completion_tokens": running_tokens}), at)
    record = tracker.finish()
    assert record.itl_s == pytest.approx([0.1] * 5)
    assert record.output_tokens == 6


def test_tracker_ignores_usage_that_only_the_last_content_chunk_carries() -> None:
    tracker = benchmark.StreamTracker(start_s=0.0)
    tracker.on_chunk({"choices": [{"text": "a"}]}, 0.1)
    tracker.on_chunk({"choices": [{"text": "b"}], "usage": {"completion_tokens": 9}}, 0.2)
    record = tracker.finish()
    assert record.itl_s == pytest.approx([0.1])
    assert record.output_tokens == 9


def test_tracker_counts_chunks_without_usage_and_fails_without_content() -> None:
    tracker = benchmark.StreamTracker(start_s=0.0)
    for at in (0.1, 0.2, 0.3):
        tracker.on_chunk({"choices": [{"text": "t"}]}, at)
    assert tracker.finish().output_tokens == 3
    empty = benchmark.StreamTracker(start_s=0.0)
    empty.on_chunk(chat_chunk(""), 0.1)
    assert not empty.finish().success
    with pytest.raises(benchmark.StreamError):
        empty.on_chunk({"error": {"message": "boom"}}, 0.2)


def test_sse_parser_skips_comments_blanks_and_done() -> None:
    assert benchmark.parse_sse_data(": ping") is None
    assert benchmark.parse_sse_data("") is None
    assert benchmark.parse_sse_data("data: [DONE]") is None
    assert benchmark.parse_sse_data('data: {"a": 1}') == {"a": 1}
    assert benchmark.parse_sse_data('data:{"a": 2}') == {"a": 2}


def make_record(start: float, ttft: float, latency: float, tokens: int, prompt: int) -> Any:
    return benchmark.RequestRecord(
        success=True,
        start_s=start,
        ttft_s=ttft,
        latency_s=latency,
        output_tokens=tokens,
        prompt_tokens=prompt,
        itl_s=[(latency - ttft) / (tokens - 1)] * (tokens - 1),
    )


def test_run_metrics_throughputs_and_latencies() -> None:
    records = [
        make_record(start=0.0, ttft=0.1, latency=1.0, tokens=10, prompt=100),
        make_record(start=0.5, ttft=0.2, latency=1.5, tokens=20, prompt=50),
        benchmark.RequestRecord(error="HTTP 500: x"),
    ]
    metrics = benchmark.compute_metrics(records, duration_s=2.0)
    assert (metrics["completed"], metrics["errors"]) == (2, 1)
    assert metrics["output_throughput"] == pytest.approx(15.0)
    assert metrics["total_token_throughput"] == pytest.approx(90.0)
    assert metrics["request_throughput"] == pytest.approx(1.0)
    assert metrics["ttft_ms"]["mean"] == pytest.approx(150.0)
    assert metrics["e2e_ms"]["p50"] == pytest.approx(1250.0)
    assert metrics["tpot_ms"]["mean"] == pytest.approx((100.0 + 1300.0 / 19) / 2)
    assert metrics["itl_ms"]["p50"] == pytest.approx(1300.0 / 19)  # 19 of 28 gaps
    assert metrics["max_concurrent_requests"] == 2
    assert benchmark.summarize_errors(records) == [{"message": "HTTP 500: x", "count": 1}]


def test_poisson_arrivals_are_seeded_and_end_at_count_over_rate() -> None:
    assert benchmark.arrival_offsets(4, math.inf, seed=0) == [0.0] * 4
    offsets = benchmark.arrival_offsets(50, 10.0, seed=3)
    assert offsets == benchmark.arrival_offsets(50, 10.0, seed=3)
    assert offsets == sorted(offsets)
    assert offsets[-1] == pytest.approx(5.0)


def test_prompts_are_deterministic_and_sized_in_words() -> None:
    prompt = benchmark.make_prompt(100, seed=1, salt="a", index=0)
    assert prompt == benchmark.make_prompt(100, seed=1, salt="a", index=0)
    assert prompt != benchmark.make_prompt(100, seed=1, salt="a", index=1)
    assert len(prompt.split()) == 100 - benchmark.PROMPT_PREFIX_TOKENS + len(benchmark.PROMPT_PREFIX.split())


def test_payload_sends_optional_fields_only_when_asked() -> None:
    plain = benchmark.build_payload(benchmark.BenchmarkConfig(output_len=5), "m", "hi")
    assert plain["messages"] == [{"role": "user", "content": "hi"}]
    assert plain["max_tokens"] == 5 and plain["stream"] is True
    assert plain["stream_options"] == {"include_usage": True}
    assert "ignore_eos" not in plain and "min_tokens" not in plain
    config = benchmark.BenchmarkConfig(endpoint="completions", ignore_eos=True, min_tokens=True, output_len=5)
    extended = benchmark.build_payload(config, "m", "hi")
    assert (extended["prompt"], extended["ignore_eos"], extended["min_tokens"]) == (
        "hi",
        True,
        5,
    )


def test_cli_pairs_peer_options_and_defaults_request_count() -> None:
    argv = [
        "--concurrency",
        "1",
        "8",
        "--peer-url",
        "http://a:1",
        "--peer-name",
        "vllm",
    ]
    argv += ["--peer-url", "http://b:2", "--peer-model", "other"]
    config = benchmark.config_from_args(benchmark.build_arg_parser().parse_args(argv))
    assert [(p.url, p.name, p.model) for p in config.peers] == [
        ("http://a:1", "vllm", None),
        ("http://b:2", "b:2", "other"),
    ]
    assert [benchmark.request_count(config, c) for c in config.concurrencies] == [
        16,
        32,
    ]
    with pytest.raises(SystemExit):
        benchmark.build_arg_parser().parse_args(["--peer-name", "orphan"])
    rate_config = benchmark.config_from_args(benchmark.build_arg_parser().parse_args(["--request-rate", "4"]))
    assert rate_config.concurrencies == [None]


# ----------------------------------------------------------------------------- fake SSE server

FIRST_TOKEN_DELAY_S = 0.05
TOKEN_INTERVAL_S = 0.02


class FakeOpenAI:
    """Streams ``max_tokens`` tokens: the first after 50 ms, then one every 20 ms.

    Model "fake-pairs" sends two tokens per chunk with per-chunk usage, "fake-nousage"
    sends no usage at all, "broken" answers 500.
    """

    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []
        self.client_ports: set[int] = set()
        routes = [
            Route("/v1/models", self.models),
            Route("/v1/chat/completions", self.complete, methods=["POST"]),
            Route("/v1/completions", self.complete, methods=["POST"]),
        ]
        self.app = Starlette(routes=routes)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    async def complete(self, request: Request) -> Response:
        payload = await request.json()
        self.payloads.append(payload)
        if request.client is not None:
            self.client_ports.add(request.client.port)
        if payload["model"] == "broken":
            return JSONResponse({"error": {"message": "engine exploded"}}, status_code=500)
        is_chat = request.url.path.endswith("/chat/completions")
        return StreamingResponse(self.events(payload, is_chat), media_type="text/event-stream")

    async def events(self, payload: dict[str, Any], is_chat: bool) -> AsyncIterator[str]:
        model, max_tokens = payload["model"], payload["max_tokens"]
        tokens_per_chunk = 2 if model == "fake-pairs" else 1
        prompt_text = payload["messages"][0]["content"] if is_chat else payload["prompt"]
        usage = {"prompt_tokens": len(prompt_text.split()), "completion_tokens": 0}
        if is_chat:
            yield sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        await asyncio.sleep(FIRST_TOKEN_DELAY_S)
        while usage["completion_tokens"] < max_tokens:
            count = min(tokens_per_chunk, max_tokens - usage["completion_tokens"])
            usage["completion_tokens"] += count
            chunk = token_chunk(" tok" * count, is_chat)
            if model == "fake-pairs":
                chunk["usage"] = dict(usage)
            yield sse(chunk)
            if usage["completion_tokens"] < max_tokens:
                await asyncio.sleep(TOKEN_INTERVAL_S * count)
        if model != "fake-nousage":
            yield sse({"choices": [], "usage": usage})
        yield "data: [DONE]\n\n"


def token_chunk(text: str, is_chat: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "delta": {"content": text}} if is_chat else {"index": 0, "text": text}
    return {"choices": [choice]}


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[str, FakeOpenAI]]:
    fake = FakeOpenAI()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(fake.app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "fake server did not start"
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", fake
    server.should_exit = True
    thread.join(timeout=5)


def fake_config(url: str, **overrides: Any) -> Any:
    fields: dict[str, Any] = {
        "url": url,
        "model": "fake",
        "concurrencies": [4],
        "num_requests": 8,
        "output_len": 8,
    }
    return benchmark.BenchmarkConfig(**(fields | overrides))


def assert_fake_timings(metrics: dict[str, Any]) -> None:
    expected_e2e_ms = 1000 * (FIRST_TOKEN_DELAY_S + 7 * TOKEN_INTERVAL_S)
    assert 0.8 * FIRST_TOKEN_DELAY_S * 1000 <= metrics["ttft_ms"]["p50"] < 3 * FIRST_TOKEN_DELAY_S * 1000
    assert 0.8 * TOKEN_INTERVAL_S * 1000 <= metrics["itl_ms"]["mean"] < 2 * TOKEN_INTERVAL_S * 1000
    assert 0.8 * TOKEN_INTERVAL_S * 1000 <= metrics["tpot_ms"]["p50"] < 2 * TOKEN_INTERVAL_S * 1000
    assert 0.9 * expected_e2e_ms <= metrics["e2e_ms"]["p50"] < 2 * expected_e2e_ms


@pytest.mark.asyncio
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
async def test_run_against_fake_server(fake_server: tuple[str, FakeOpenAI], endpoint: str) -> None:
    url, fake = fake_server
    fake.client_ports.clear()
    results = await benchmark.run_benchmark(fake_config(url, endpoint=endpoint))
    (run,) = results["runs"]
    metrics = run["metrics"]
    assert (metrics["completed"], metrics["errors"]) == (8, 0)
    assert metrics["total_output_tokens"] == 64
    prompt_words = len(benchmark.make_prompt(128, 0, "x", 0).split())
    assert metrics["total_input_tokens"] == 8 * prompt_words  # from usage.prompt_tokens
    assert_fake_timings(metrics)
    assert metrics["max_concurrent_requests"] == 4
    assert len(fake.client_ports) <= 4  # keep-alive pool sized to the concurrency
    # 8 requests, 4 at a time, ~0.19 s each: ~0.4 s, so ~20 req/s and ~160 output tok/s
    assert 8 <= metrics["request_throughput"] <= 22
    assert metrics["output_throughput"] == pytest.approx(64 / metrics["duration_s"])
    assert "ignore_eos" not in fake.payloads[-1]


@pytest.mark.asyncio
async def test_run_spreads_multi_token_chunks_and_counts_without_usage(
    fake_server: tuple[str, FakeOpenAI],
) -> None:
    url, _ = fake_server
    config = fake_config(
        url,
        model="fake-pairs",
        peers=[benchmark.ServerTarget(url=url, name="no-usage", model="fake-nousage")],
    )
    pairs, no_usage = (await benchmark.run_benchmark(config))["runs"]
    assert pairs["metrics"]["total_output_tokens"] == no_usage["metrics"]["total_output_tokens"] == 64
    assert_fake_timings(pairs["metrics"])
    assert_fake_timings(no_usage["metrics"])
    assert no_usage["server"] == "no-usage"


@pytest.mark.asyncio
async def test_run_reports_errors_and_discovers_the_model(
    fake_server: tuple[str, FakeOpenAI],
) -> None:
    url, fake = fake_server
    fake.payloads.clear()
    peers = [
        benchmark.ServerTarget(url=url, name="discovered"),
        benchmark.ServerTarget(url=url, name="broken", model="broken"),
    ]
    config = fake_config(url, model=None, peers=peers, ignore_eos=True, num_requests=4)
    runs = (await benchmark.run_benchmark(config))["runs"]
    assert [run["model"] for run in runs] == ["fake", "fake", "broken"]
    assert all(payload["ignore_eos"] is True for payload in fake.payloads)
    broken = runs[-1]
    assert (broken["metrics"]["completed"], broken["metrics"]["errors"]) == (0, 4)
    assert broken["error_messages"] == [{"message": broken["error_messages"][0]["message"], "count": 4}]
    assert broken["error_messages"][0]["message"].startswith("HTTP 500:")
    assert "engine exploded" in broken["error_messages"][0]["message"]


@pytest.mark.asyncio
async def test_requests_over_the_total_timeout_are_errors(fake_server: tuple[str, FakeOpenAI]) -> None:
    url, _ = fake_server
    (run,) = (await benchmark.run_benchmark(fake_config(url, num_requests=4, timeout_s=0.1)))["runs"]
    assert (run["metrics"]["completed"], run["metrics"]["errors"]) == (0, 4)
    assert run["error_messages"] == [{"message": "timed out after 0.1 s", "count": 4}]


def test_cli_writes_table_json_and_chart(
    fake_server: tuple[str, FakeOpenAI],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, _ = fake_server
    json_path, chart_path = tmp_path / "out.json", tmp_path / "out.png"
    argv = [
        "--url",
        url,
        "--name",
        "ours",
        "--model",
        "fake",
        "--concurrency",
        "1",
        "2",
        "--requests",
        "2",
    ]
    argv += [
        "--output-len",
        "3",
        "--peer-url",
        url,
        "--peer-name",
        "theirs",
        "--warmup",
        "1",
    ]
    argv += ["--json", str(json_path), "--chart", str(chart_path)]
    assert benchmark.main(argv) == 0
    table_rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| ours", "| theirs"))]
    assert len(table_rows) == 4
    saved = json.loads(json_path.read_text())
    assert saved["config"]["request_rate"] == "inf"
    assert [(r["server"], r["concurrency"]) for r in saved["runs"]] == [
        ("ours", 1),
        ("ours", 2),
        ("theirs", 1),
        ("theirs", 2),
    ]
    assert chart_path.read_bytes().startswith(b"\x89PNG")


# ----------------------------------------------------------------------------- healthcheck


class HealthHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status, body = (200, b"ok") if self.path == "/health" else (503, b'{"ready": false}')
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any, **kwargs: Any) -> None:
        return  # keep test output quiet


@pytest.fixture(scope="module")
def health_server_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), HealthHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def run_healthcheck(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(SCRIPTS_DIR / "healthcheck.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=20, check=False)


def test_healthcheck_passes_on_200(health_server_url: str) -> None:
    result = run_healthcheck("--url", health_server_url)
    assert result.returncode == 0
    assert result.stdout.startswith("OK") and len(result.stdout.splitlines()) == 1


def test_healthcheck_fails_on_503_and_when_unreachable(health_server_url: str) -> None:
    not_ready = run_healthcheck("--url", health_server_url, "--ready")
    assert not_ready.returncode == 1
    assert "503" in not_ready.stdout and "/ready" in not_ready.stdout
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    unreachable = run_healthcheck("--url", f"http://127.0.0.1:{closed_port}", "--timeout", "2")
    assert unreachable.returncode == 1
    assert unreachable.stdout.startswith("FAIL")


def test_compare_summary_gives_batching_ratio_and_share_of_the_peer():
    from scripts.compare import summary

    def run(server: str, conc: int, tps: float) -> dict[str, Any]:
        return {"server": server, "concurrency": conc, "metrics": {"output_throughput": tps}}

    runs = [run("ours", 1, 30.0), run("ours", 8, 135.0), run("vllm", 1, 15.0), run("vllm", 8, 60.0)]
    assert summary(runs) == ["ours: 8 streams = 4.50x one stream; 225.0% of vllm at 8",
                             "vllm: 8 streams = 4.00x one stream"]
