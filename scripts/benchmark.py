#!/usr/bin/env python3
"""Load generator for any OpenAI-compatible server, with vLLM's serving-benchmark metrics.

Metric definitions follow vllm/benchmarks/serve.py:

* TTFT   request sent -> first streamed chunk that carries generated text.
* ITL    gaps between successive content chunks. When the server reports a running
         ``usage.completion_tokens`` on every chunk (vLLM's ``continuous_usage_stats``), a chunk
         that carries k tokens contributes k gaps of ``gap / k`` each; otherwise one gap per chunk.
* TPOT   ``(E2E - TTFT) / (output_tokens - 1)`` per request with more than one output token.
* E2E    request sent -> last content chunk (trailing usage / [DONE] chunks carry no token).
* output tokens   ``usage.completion_tokens`` when reported, else the tokens counted from chunks.
* throughputs     totals over successful requests / wall time of the whole run.

Usage:
    python scripts/benchmark.py --url http://localhost:8000 --model NAME \\
        --concurrency 1 8 32 --prompt-len 256 --output-len 128 --ignore-eos \\
        --peer-url http://localhost:8001 --peer-name vllm --json out.json --chart out.png

Importable: ``await run_benchmark(BenchmarkConfig(...))`` returns the same dict ``--json`` writes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import numpy as np
import orjson

Endpoint = Literal["chat", "completions"]
PERCENTILES: tuple[int, ...] = (50, 90, 99)
MIN_REQUESTS = 16
REQUESTS_PER_CONCURRENCY_SLOT = 4
MAX_ERRORS_REPORTED = 5
ERROR_TEXT_LIMIT = 300

# Common English words that are one token (with their leading space) in GPT-2/Llama-style BPE
# vocabularies, so N words make a prompt of about N tokens.
# fmt: off
PROMPT_WORDS: tuple[str, ...] = (
    "time", "year", "people", "way", "day", "man", "thing", "woman", "life", "child",
    "world", "school", "state", "family", "student", "group", "country", "problem",
    "hand", "part", "place", "case", "week", "company", "system", "program", "question",
    "work", "government", "number", "night", "point", "home", "water", "room", "mother",
    "area", "money", "story", "fact", "month", "lot", "right", "study", "book", "eye",
    "job", "word", "business", "issue", "side", "kind", "head", "house", "service",
    "friend", "father", "power", "hour", "game", "line", "end", "member", "law", "car",
    "city", "name", "team", "minute", "idea", "kid", "body", "back", "parent", "face",
    "others", "level", "office", "door", "health", "person", "art", "war", "history",
    "party", "result", "change", "morning", "reason", "research", "girl", "guy",
    "moment", "air", "teacher", "force", "education", "foot", "boy", "age", "policy",
    "music", "market", "sense", "nation", "plan", "college", "interest", "death",
    "experience", "effect", "class", "control", "care", "field", "development", "role",
    "effort", "rate", "heart", "drug", "show", "leader", "light", "voice", "wife",
    "police", "mind", "price", "report", "decision", "son", "view", "relationship",
    "town", "road", "arm", "difference", "value", "building", "action", "model",
    "season", "society", "tax", "director", "position", "player", "record", "paper",
    "space", "ground", "form", "event", "official", "matter", "center", "couple",
    "site", "project", "activity", "star", "table", "need", "court", "oil", "situation",
    "cost", "industry", "figure", "street", "image", "phone", "data", "picture",
    "practice", "piece", "land", "product", "doctor", "wall", "patient", "worker",
    "news", "test", "movie", "north", "love", "support", "technology", "step", "baby",
    "computer", "type", "attention", "film", "tree", "source", "organization", "hair",
    "window", "evidence", "population", "truth", "song", "training",
)
# fmt: on
PROMPT_PREFIX = "Write a long story that uses these words:"
PROMPT_PREFIX_TOKENS = 9  # the prefix above; chat templates add their own tokens on top


@dataclass
class ServerTarget:
    """One server to benchmark. ``model``/``api_key`` default to the config's."""

    url: str
    name: str
    model: str | None = None
    api_key: str | None = None


@dataclass
class BenchmarkConfig:
    url: str = "http://localhost:8000"
    name: str = "main"
    model: str | None = None  # None: the first model listed by each server's /v1/models
    peers: list[ServerTarget] = field(default_factory=list)
    endpoint: Endpoint = "chat"
    concurrencies: list[int | None] = field(default_factory=lambda: [1])  # None = unbounded
    request_rate: float = math.inf  # requests/s, Poisson arrivals; inf = all at once
    num_requests: int | None = None  # None: 4 x concurrency, at least MIN_REQUESTS
    prompt_len: int = 128
    output_len: int = 128
    ignore_eos: bool = False
    min_tokens: bool = False  # send min_tokens = output_len
    continuous_usage: bool = False  # ask for per-chunk usage (vLLM extension)
    temperature: float | None = 0.0
    api_key: str | None = None
    warmup: int = 0
    cooldown_s: float = 0.0
    seed: int = 0
    timeout_s: float = 600.0


@dataclass
class RequestRecord:
    """What one streamed request measured (times in seconds, perf_counter based)."""

    success: bool = False
    error: str = ""
    start_s: float = 0.0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)


# ----------------------------------------------------------------------------- prompts, payloads


def make_prompt(prompt_len: int, seed: int, salt: str, index: int) -> str:
    """Deterministic word salad of about ``prompt_len`` tokens; differs per (seed, salt, index)."""
    rng = random.Random(f"{seed}:{salt}:{index}")
    word_count = max(1, prompt_len - PROMPT_PREFIX_TOKENS)
    words = rng.choices(PROMPT_WORDS, k=word_count)
    return f"{PROMPT_PREFIX} {' '.join(words)}"


def make_prompts(count: int, prompt_len: int, seed: int, salt: str) -> list[str]:
    return [make_prompt(prompt_len, seed, salt, index) for index in range(count)]


def build_payload(config: BenchmarkConfig, model: str, prompt: str) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": model,
        "max_tokens": config.output_len,
        "stream": True,
    }
    if config.endpoint == "chat":
        payload["messages"] = [{"role": "user", "content": prompt}]
    else:
        payload["prompt"] = prompt
    stream_options: dict[str, bool] = {"include_usage": True}
    if config.continuous_usage:
        stream_options["continuous_usage_stats"] = True
    payload["stream_options"] = stream_options
    if config.temperature is not None:
        payload["temperature"] = config.temperature
    if config.ignore_eos:
        payload["ignore_eos"] = True
    if config.min_tokens:
        payload["min_tokens"] = config.output_len
    return payload


def api_base(url: str) -> str:
    """``http://h:p`` or ``http://h:p/v1`` -> ``http://h:p/v1``."""
    base = url.rstrip("/")
    return base if base.endswith("/v1") else f"{base}/v1"


def endpoint_url(url: str, endpoint: Endpoint) -> str:
    path = "chat/completions" if endpoint == "chat" else "completions"
    return f"{api_base(url)}/{path}"


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


# ----------------------------------------------------------------------------- stream parsing


def spread_gap(gap_s: float, token_count: int) -> list[float]:
    """One chunk that brought ``token_count`` tokens after ``gap_s`` -> that many equal ITLs."""
    count = max(1, token_count)
    return [gap_s / count] * count


def chunk_text(chunk: Mapping[str, Any]) -> str:
    """Generated text in a chat (``delta``) or completions (``text``) chunk."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    delta = choice.get("delta")
    if isinstance(delta, dict):
        reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
        return (delta.get("content") or "") + reasoning
    return choice.get("text") or ""


class StreamError(Exception):
    """The server put an error object into the stream."""


class StreamTracker:
    """Turns timestamped SSE chunks into TTFT, ITLs, latency and token counts."""

    def __init__(self, start_s: float) -> None:
        self.record = RequestRecord(start_s=start_s)
        self.last_content_s: float | None = None
        self.counted_tokens = 0
        self.has_per_chunk_usage = False  # decided by the first content chunk
        self.usage_tokens_at_last_content = 0
        self.usage_completion_tokens: int | None = None

    def on_chunk(self, chunk: Mapping[str, Any], now_s: float) -> None:
        if chunk.get("error"):
            raise StreamError(str(chunk["error"])[:ERROR_TEXT_LIMIT])
        usage = chunk.get("usage") or {}
        running_tokens = usage.get("completion_tokens")
        if not isinstance(running_tokens, int):
            running_tokens = None
        if chunk_text(chunk):
            self._on_content(now_s, self._take_new_token_count(running_tokens))
        if running_tokens is not None:
            self.usage_completion_tokens = running_tokens
        if isinstance(usage.get("prompt_tokens"), int):
            self.record.prompt_tokens = usage["prompt_tokens"]

    def _take_new_token_count(self, running_tokens: int | None) -> int:
        """Tokens this content chunk brought: from per-chunk usage if the server sends it on
        every content chunk (checked on the first one), else 1."""
        if self.last_content_s is None:
            self.has_per_chunk_usage = running_tokens is not None
        if not self.has_per_chunk_usage or running_tokens is None:
            return 1
        new_tokens = running_tokens - self.usage_tokens_at_last_content
        self.usage_tokens_at_last_content = running_tokens
        return max(1, new_tokens)

    def _on_content(self, now_s: float, token_count: int) -> None:
        if self.last_content_s is None:
            self.record.ttft_s = now_s - self.record.start_s
        else:
            self.record.itl_s.extend(spread_gap(now_s - self.last_content_s, token_count))
        self.last_content_s = now_s
        self.counted_tokens += token_count

    def finish(self) -> RequestRecord:
        record = self.record
        if self.last_content_s is None:
            record.error = "stream ended without any content chunk"
            return record
        record.success = True
        record.latency_s = self.last_content_s - record.start_s
        record.output_tokens = self.usage_completion_tokens or self.counted_tokens
        return record


def parse_sse_data(line: str) -> dict[str, Any] | None:
    """The JSON object on an SSE ``data:`` line; None for comments, blanks and ``[DONE]``."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:") :].strip()
    if not data or data == "[DONE]":
        return None
    parsed = orjson.loads(data)
    return parsed if isinstance(parsed, dict) else None


# ----------------------------------------------------------------------------- sending


async def send_streaming_request(
    client: aiohttp.ClientSession,
    url: str,
    payload: Mapping[str, Any],
    headers: Mapping[str, str],
    fallback_prompt_tokens: int,
    timeout_s: float,
) -> RequestRecord:
    """One streamed request; any failure (HTTP status, transport, bad stream, total time over
    ``timeout_s``) is returned as an unsuccessful record carrying the error message."""
    tracker = StreamTracker(start_s=time.perf_counter())
    tracker.record.prompt_tokens = fallback_prompt_tokens
    try:
        async with asyncio.timeout(timeout_s):
            await read_stream(client, url, payload, headers, tracker)
    except TimeoutError:
        tracker.record.error = f"timed out after {timeout_s:g} s"
    except Exception as exc:  # every failure is a measured error
        tracker.record.error = f"{type(exc).__name__}: {exc}"[:ERROR_TEXT_LIMIT]
    return tracker.record if tracker.record.error else tracker.finish()


async def read_stream(
    client: aiohttp.ClientSession,
    url: str,
    payload: Mapping[str, Any],
    headers: Mapping[str, str],
    tracker: StreamTracker,
) -> None:
    async with client.post(url, json=payload, headers=headers) as response:
        if response.status != 200:
            body = (await response.read()).decode(errors="replace")
            tracker.record.error = f"HTTP {response.status}: {body[:ERROR_TEXT_LIMIT]}"
            return
        async for raw in response.content:  # one line at a time
            chunk = parse_sse_data(raw.decode())
            if chunk is not None:
                tracker.on_chunk(chunk, time.perf_counter())


def arrival_offsets(count: int, request_rate: float, seed: int) -> list[float]:
    """Send times (s after start): Poisson arrivals scaled to end at count/rate, as vLLM does."""
    if math.isinf(request_rate) or count == 0:
        return [0.0] * count
    gaps = np.random.default_rng(seed).exponential(1.0 / request_rate, size=count)
    offsets = np.cumsum(gaps)
    offsets *= (count / request_rate) / offsets[-1]
    return [float(offset) for offset in offsets]


async def run_with_limits(
    send: Callable[[int], Awaitable[RequestRecord]],
    count: int,
    concurrency: int | None,
    offsets: Sequence[float],
) -> list[RequestRecord]:
    """Call ``send(i)`` for every i, at its arrival offset, at most ``concurrency`` at a time."""
    semaphore = asyncio.Semaphore(concurrency) if concurrency else None
    start = time.perf_counter()

    async def send_at_arrival(index: int) -> RequestRecord:
        delay = start + offsets[index] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if semaphore is None:
            return await send(index)
        async with semaphore:
            return await send(index)

    return list(await asyncio.gather(*(send_at_arrival(i) for i in range(count))))


# ----------------------------------------------------------------------------- metrics


def percentile(values: Sequence[float], percent: float) -> float:
    """Linear-interpolation percentile (numpy's default, as vLLM uses)."""
    return float(np.percentile(np.asarray(values, dtype=float), percent))


def latency_summary_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """mean / std / p50 / p90 / p99 in milliseconds; all None when there is no sample."""
    keys = ["mean", "std", *(f"p{p}" for p in PERCENTILES)]
    if not values_s:
        return dict.fromkeys(keys, None)
    values_ms = np.asarray(values_s, dtype=float) * 1000.0
    summary: dict[str, float | None] = {
        "mean": float(values_ms.mean()),
        "std": float(values_ms.std()),
    }
    for p in PERCENTILES:
        summary[f"p{p}"] = percentile(values_ms.tolist(), p)
    return summary


def per_second(amount: float, duration_s: float) -> float:
    return amount / duration_s if duration_s > 0 else 0.0


def time_per_output_token_s(record: RequestRecord) -> float | None:
    """TPOT: decode time over the tokens after the first; None with fewer than 2 tokens."""
    if record.output_tokens <= 1:
        return None
    return (record.latency_s - record.ttft_s) / (record.output_tokens - 1)


def peak_concurrency(records: Sequence[RequestRecord]) -> int:
    """Most requests in flight at once (half-open [start, start + E2E) intervals)."""
    events = [(r.start_s, 1) for r in records] + [(r.start_s + r.latency_s, -1) for r in records]
    in_flight = peak = 0
    for _, delta in sorted(events):
        in_flight += delta
        peak = max(peak, in_flight)
    return peak


def compute_metrics(records: Sequence[RequestRecord], duration_s: float) -> dict[str, Any]:
    ok = [r for r in records if r.success]
    total_output = sum(r.output_tokens for r in ok)
    total_input = sum(r.prompt_tokens for r in ok)
    tpots = [tpot for r in ok if (tpot := time_per_output_token_s(r)) is not None]
    return {
        "completed": len(ok),
        "errors": len(records) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "mean_output_tokens": total_output / len(ok) if ok else 0.0,
        "request_throughput": per_second(len(ok), duration_s),
        "output_throughput": per_second(total_output, duration_s),
        "total_token_throughput": per_second(total_input + total_output, duration_s),
        "ttft_ms": latency_summary_ms([r.ttft_s for r in ok]),
        "tpot_ms": latency_summary_ms(tpots),
        "itl_ms": latency_summary_ms([gap for r in ok for gap in r.itl_s]),
        "e2e_ms": latency_summary_ms([r.latency_s for r in ok]),
        "max_concurrent_requests": peak_concurrency(ok),
    }


def summarize_errors(records: Sequence[RequestRecord]) -> list[dict[str, Any]]:
    """The first few distinct error messages, in order of appearance, with their counts."""
    counts: dict[str, int] = {}
    for record in records:
        if not record.success:
            counts[record.error] = counts.get(record.error, 0) + 1
    return [{"message": m, "count": c} for m, c in list(counts.items())[:MAX_ERRORS_REPORTED]]


def record_summary(record: RequestRecord) -> dict[str, Any]:
    return {
        "success": record.success,
        "ttft_ms": record.ttft_s * 1000.0,
        "e2e_ms": record.latency_s * 1000.0,
        "output_tokens": record.output_tokens,
        "prompt_tokens": record.prompt_tokens,
        "error": record.error or None,
    }


# ----------------------------------------------------------------------------- runs


def request_count(config: BenchmarkConfig, concurrency: int | None) -> int:
    if config.num_requests is not None:
        return config.num_requests
    if concurrency:
        return max(MIN_REQUESTS, REQUESTS_PER_CONCURRENCY_SLOT * concurrency)
    if math.isinf(config.request_rate):
        return 2 * MIN_REQUESTS
    return max(MIN_REQUESTS, math.ceil(10 * config.request_rate))  # ~10 s of arrivals


def make_client(pool_size: int, timeout_s: float) -> aiohttp.ClientSession:
    """HTTP/1.1 keep-alive pool with one connection per in-flight request; no proxies.

    aiohttp, as vLLM's serving benchmark: it spends under half the CPU per streamed chunk of
    httpx (measured: 136 vs 297 us a token), CPU that a load generator on the server's own
    machine takes from the server under test."""
    connector = aiohttp.TCPConnector(limit=pool_size, limit_per_host=pool_size)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(30.0, timeout_s), sock_read=timeout_s)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False,
                                 json_serialize=lambda obj: orjson.dumps(obj).decode())


async def discover_model(target: ServerTarget, timeout_s: float) -> str:
    """The first model id listed by the server's /v1/models."""
    async with make_client(1, timeout_s) as client:
        async with client.get(f"{api_base(target.url)}/models", headers=auth_headers(target.api_key)) as response:
            response.raise_for_status()
            models = (await response.json()).get("data") or []
    if not models:
        raise RuntimeError("the server lists no model")
    return str(models[0]["id"])


async def send_all(
    client: aiohttp.ClientSession,
    target: ServerTarget,
    model: str,
    config: BenchmarkConfig,
    prompts: Sequence[str],
    concurrency: int | None,
    offsets: Sequence[float],
) -> list[RequestRecord]:
    url = endpoint_url(target.url, config.endpoint)
    headers = auth_headers(target.api_key)

    async def send(index: int) -> RequestRecord:
        payload = build_payload(config, model, prompts[index])
        return await send_streaming_request(client, url, payload, headers, config.prompt_len, config.timeout_s)

    return await run_with_limits(send, len(prompts), concurrency, offsets)


async def run_one_load_point(
    target: ServerTarget, model: str, config: BenchmarkConfig, concurrency: int | None
) -> tuple[list[RequestRecord], float]:
    """Warm up (results dropped), then send this run's requests; returns records and wall time."""
    count = request_count(config, concurrency)
    prompts = make_prompts(count, config.prompt_len, config.seed, salt=f"run-c{concurrency}")
    offsets = arrival_offsets(count, config.request_rate, config.seed)
    async with make_client(concurrency or count, config.timeout_s) as client:
        if config.warmup > 0:
            warmup_prompts = make_prompts(config.warmup, config.prompt_len, config.seed, f"warmup-c{concurrency}")
            no_delays = [0.0] * config.warmup
            await send_all(client, target, model, config, warmup_prompts, concurrency, no_delays)
        started = time.perf_counter()
        records = await send_all(client, target, model, config, prompts, concurrency, offsets)
        return records, time.perf_counter() - started


def describe_run(
    target: ServerTarget,
    model: str,
    config: BenchmarkConfig,
    concurrency: int | None,
    records: Sequence[RequestRecord],
    duration_s: float,
) -> dict[str, Any]:
    return {
        "server": target.name,
        "url": target.url,
        "model": model,
        "endpoint": config.endpoint,
        "concurrency": concurrency,
        "request_rate": config.request_rate,
        "num_requests": len(records),
        "metrics": compute_metrics(records, duration_s),
        "error_messages": summarize_errors(records),
        "requests": [record_summary(record) for record in records],
    }


async def benchmark_server(target: ServerTarget, config: BenchmarkConfig) -> list[dict[str, Any]]:
    """Every load point of ``config`` against one server, in order."""
    try:
        model = target.model or config.model or await discover_model(target, config.timeout_s)
    except Exception as exc:  # reported as the runs' errors
        failure = RequestRecord(error=f"model discovery failed: {type(exc).__name__}: {exc}")
        return [
            describe_run(target, "?", config, c, [failure] * request_count(config, c), 0.0)
            for c in config.concurrencies
        ]
    runs = []
    for index, concurrency in enumerate(config.concurrencies):
        if index and config.cooldown_s > 0:
            await asyncio.sleep(config.cooldown_s)
        log(f"[{target.name}] {target.url} model={model} concurrency={concurrency or 'unbounded'} ...")
        records, duration_s = await run_one_load_point(target, model, config, concurrency)
        run = describe_run(target, model, config, concurrency, records, duration_s)
        log(f"[{target.name}]   {run_brief(run)}")
        runs.append(run)
    return runs


def server_targets(config: BenchmarkConfig) -> list[ServerTarget]:
    main_target = ServerTarget(url=config.url, name=config.name, model=config.model, api_key=config.api_key)
    peers = [
        ServerTarget(
            url=peer.url,
            name=peer.name,
            model=peer.model or config.model,
            api_key=peer.api_key or config.api_key,
        )
        for peer in config.peers
    ]
    return [main_target, *peers]


def coerce_config(config: BenchmarkConfig | Mapping[str, Any]) -> BenchmarkConfig:
    if isinstance(config, BenchmarkConfig):
        return config
    fields = dict(config)
    fields["peers"] = [p if isinstance(p, ServerTarget) else ServerTarget(**p) for p in fields.get("peers", [])]
    return BenchmarkConfig(**fields)


async def run_benchmark(config: BenchmarkConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Benchmark the main server then every peer with the same prompts and settings.

    Returns ``{"name", "started_at", "finished_at", "config", "runs": [...]}``; each run holds
    server, url, model, concurrency, request_rate, num_requests, metrics, error_messages, requests.
    """
    config = coerce_config(config)
    started_at = utc_now()
    runs: list[dict[str, Any]] = []
    for index, target in enumerate(server_targets(config)):
        if index and config.cooldown_s > 0:
            await asyncio.sleep(config.cooldown_s)
        runs.extend(await benchmark_server(target, config))
    redacted = asdict(config) | {"api_key": "***" if config.api_key else None}
    redacted["peers"] = [p | {"api_key": "***" if p["api_key"] else None} for p in redacted["peers"]]
    return {
        "name": config.name,
        "started_at": started_at,
        "finished_at": utc_now(),
        "config": redacted,
        "runs": runs,
    }


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- reporting


def format_number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.1f}"


def format_latency(summary: Mapping[str, float | None]) -> str:
    """``mean / p50 / p90 / p99`` in one table cell."""
    return " / ".join(format_number(summary[key]) for key in ("mean", "p50", "p90", "p99"))


def format_rate(request_rate: float) -> str:
    return "inf" if math.isinf(request_rate) else f"{request_rate:g}"


def run_brief(run: Mapping[str, Any]) -> str:
    metrics = run["metrics"]
    return (
        f"{metrics['completed']}/{run['num_requests']} ok in {metrics['duration_s']:.1f} s, "
        f"{metrics['output_throughput']:.1f} out tok/s, TTFT p50 {format_number(metrics['ttft_ms']['p50'])} ms"
    )


TABLE_HEADER = (
    "| server | concurrency | rate | ok | errors | req/s | output tok/s | total tok/s "
    "| TTFT ms mean/p50/p90/p99 | TPOT ms mean/p50/p90/p99 | ITL ms mean/p50/p90/p99 "
    "| E2E ms mean/p50/p90/p99 |"
)


def table_row(run: Mapping[str, Any]) -> str:
    metrics = run["metrics"]
    cells = [
        run["server"],
        str(run["concurrency"] or "unbounded"),
        format_rate(run["request_rate"]),
        str(metrics["completed"]),
        str(metrics["errors"]),
        f"{metrics['request_throughput']:.2f}",
        format_number(metrics["output_throughput"]),
        format_number(metrics["total_token_throughput"]),
        *(format_latency(metrics[key]) for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")),
    ]
    return "| " + " | ".join(cells) + " |"


def markdown_table(runs: Sequence[Mapping[str, Any]]) -> str:
    separator = "|" + "---|" * TABLE_HEADER.count(" | ") + "---|"
    return "\n".join([TABLE_HEADER, separator, *(table_row(run) for run in runs)])


def error_report(runs: Sequence[Mapping[str, Any]]) -> str:
    lines = []
    for run in runs:
        for error in run["error_messages"]:
            where = f"{run['server']} c={run['concurrency'] or 'unbounded'}"
            lines.append(f"- {where}: {error['count']}x {error['message']}")
    return "\n".join(lines)


def json_safe(value: Any) -> Any:
    """Infinite floats become the string "inf" so the file is strict JSON."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def write_json(results: Mapping[str, Any], path: Path) -> None:
    path.write_text(json.dumps(json_safe(results), indent=2, allow_nan=False) + "\n")


def chart_x_axis(runs: Sequence[Mapping[str, Any]]) -> tuple[str, Callable[[Mapping[str, Any]], float]]:
    """Request rate when every run was rate-limited only, else the concurrency limit
    (an unbounded run at infinite rate sends everything at once: its request count)."""
    if runs and all(r["concurrency"] is None and not math.isinf(float(r["request_rate"])) for r in runs):
        return "request rate (req/s)", lambda run: float(run["request_rate"])
    return "concurrency", lambda run: float(run["concurrency"] or run["num_requests"])


def plot_server_lines(
    axes_pair: Sequence[Any], runs: Sequence[Mapping[str, Any]], x_of: Callable[[Mapping[str, Any]], float]
) -> None:
    throughput_axes, ttft_axes = axes_pair
    for server in dict.fromkeys(run["server"] for run in runs):
        server_runs = sorted((r for r in runs if r["server"] == server), key=x_of)
        xs = [x_of(r) for r in server_runs]
        throughput = [r["metrics"]["output_throughput"] for r in server_runs]
        ttft = [r["metrics"]["ttft_ms"]["p50"] for r in server_runs]
        throughput_axes.plot(xs, throughput, marker="o", label=server)
        ttft_axes.plot(xs, [math.nan if v is None else v for v in ttft], marker="o", label=server)


def style_axes(axes: Any, xs: Sequence[float], xlabel: str, ylabel: str) -> None:
    ticks = sorted(set(xs))
    if ticks and ticks[0] > 0 and ticks[-1] / ticks[0] >= 8:
        axes.set_xscale("log", base=2)
    axes.set_xticks(ticks, [f"{x:g}" for x in ticks])
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_ylim(bottom=0)
    axes.grid(True, alpha=0.3)
    axes.legend()


def write_chart(results: Mapping[str, Any], path: Path) -> None:
    """Output tok/s and TTFT p50 versus concurrency (or request rate), one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    xlabel, x_of = chart_x_axis(runs)
    figure, axes_pair = plt.subplots(1, 2, figsize=(12, 4.5))
    plot_server_lines(axes_pair, runs, x_of)
    xs = [x_of(run) for run in runs]
    style_axes(axes_pair[0], xs, xlabel, "output tokens/s")
    style_axes(axes_pair[1], xs, xlabel, "TTFT p50 (ms)")
    config = results["config"]
    figure.suptitle(
        f"{results['name']}: {config['endpoint']}, prompt {config['prompt_len']} / output {config['output_len']} tokens"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ----------------------------------------------------------------------------- CLI


class PeerOption(argparse.Action):
    """``--peer-url`` starts a peer; ``--peer-name/-model/-api-key`` set the latest one."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        peers: list[dict[str, str]] = list(getattr(namespace, self.dest, None) or [])
        if self.const == "url":
            peers.append({"url": str(values)})
        elif not peers:
            parser.error(f"{option_string} must come after a --peer-url")
        else:
            peers[-1][str(self.const)] = str(values)
        setattr(namespace, self.dest, peers)


def optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://localhost:8000", help="main server base URL")
    parser.add_argument("--name", default="main", help="main server's name in table, JSON and chart")
    parser.add_argument("--model", help="model name (default: first model of each server's /v1/models)")
    for option, part in (
        ("--peer-url", "url"),
        ("--peer-name", "name"),
        ("--peer-model", "model"),
        ("--peer-api-key", "api_key"),
    ):
        parser.add_argument(
            option,
            dest="peers",
            action=PeerOption,
            const=part,
            metavar=part.upper(),
            help="repeatable; per peer",
        )
    parser.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        help="max requests in flight; one run per value",
    )
    parser.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="Poisson arrivals/s (inf = all at once)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        help=f"requests per run (default 4 x concurrency, >= {MIN_REQUESTS})",
    )
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt length in tokens (approx.)")
    parser.add_argument("--output-len", type=int, default=128, help="max_tokens")
    parser.add_argument("--ignore-eos", action="store_true", help='send "ignore_eos": true')
    parser.add_argument("--min-tokens", action="store_true", help="send min_tokens = output-len")
    parser.add_argument(
        "--continuous-usage",
        action="store_true",
        help="ask for usage on every chunk (vLLM)",
    )
    parser.add_argument("--temperature", type=optional_float, default=0.0, help='"none" = do not send')
    parser.add_argument("--api-key", help="Bearer token (peers too, unless --peer-api-key)")
    parser.add_argument("--warmup", type=int, default=0, help="unmeasured requests before each run")
    parser.add_argument("--cooldown", type=float, default=0.0, help="seconds of pause between runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request total timeout, seconds")
    parser.add_argument("--json", type=Path, help="write config and per-run metrics here")
    parser.add_argument("--chart", type=Path, help="write a PNG chart here")
    return parser


def config_from_args(args: argparse.Namespace) -> BenchmarkConfig:
    concurrencies: list[int | None] = list(args.concurrency or [])
    if not concurrencies:
        concurrencies = [None] if not math.isinf(args.request_rate) else [1]
    peers = [
        ServerTarget(
            url=p["url"],
            name=p.get("name") or urlsplit(p["url"]).netloc,
            model=p.get("model"),
            api_key=p.get("api_key"),
        )
        for p in args.peers or []
    ]
    return BenchmarkConfig(
        url=args.url, name=args.name, model=args.model, peers=peers, endpoint=args.endpoint,
        concurrencies=concurrencies, request_rate=args.request_rate, num_requests=args.requests,
        prompt_len=args.prompt_len, output_len=args.output_len, ignore_eos=args.ignore_eos,
        min_tokens=args.min_tokens, continuous_usage=args.continuous_usage, temperature=args.temperature,
        api_key=args.api_key, warmup=args.warmup, cooldown_s=args.cooldown, seed=args.seed, timeout_s=args.timeout,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 1 when some run completed no request."""
    args = build_arg_parser().parse_args(argv)
    results = asyncio.run(run_benchmark(config_from_args(args)))
    print(markdown_table(results["runs"]))
    if errors := error_report(results["runs"]):
        print(f"\nErrors (first {MAX_ERRORS_REPORTED} distinct per run):\n{errors}")
    if args.json:
        write_json(results, args.json)
        log(f"wrote {args.json}")
    if args.chart:
        write_chart(results, args.chart)
        log(f"wrote {args.chart}")
    return 0 if all(run["metrics"]["completed"] for run in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
