#!/usr/bin/env python3
"""What the queue and relay cost, separated from the model's cost, with the synthetic engine.

1. latency  — TTFT and ITL of the synthetic engine called in-process, behind a bare HTTP
               server in one process (scripts/direct_server.py: what serving an engine
               directly costs), and through API + Redis + worker. System minus in-process
               is everything the system adds; system minus direct HTTP is what the queue
               and relay add.
2. relay    — output tokens/s that ONE API process relays across many concurrent streams.
3. scaling  — throughput with 1, 2 and 4 workers on one queue.

    python scripts/bench_overhead.py [--only latency relay scaling] [--json out.json]  (+ out.md: the tables)

Needs a Redis at REDIS_URL (default redis://127.0.0.1:6379/0); uses its own key prefix.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.benchmark import BenchmarkConfig, latency_summary_ms, run_benchmark
from scripts.compare import external
from scripts.stack import ROOT, Stack, free_port
from shared.settings import Settings
from worker.engines.base import GenerationRequest, SamplingParams
from worker.engines.synthetic import SyntheticEngine

MODEL = "smollm2-135m-instruct"
REPORT: list[str] = []  # what say() printed: written as the .md beside --json


def say(text: str) -> None:
    print(text)
    REPORT.append(text)


async def engine_alone(rate: float, concurrency: int, requests: int, output_len: int) -> dict[str, Any]:
    """The synthetic engine's own TTFT and ITL, no queue, no relay."""
    engine = SyntheticEngine(Settings(synthetic_tokens_per_second=rate, max_batch_size=concurrency))
    ttfts: list[float] = []
    itls: list[float] = []
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with slots:
            request = GenerationRequest(f"r{i}", SamplingParams(max_tokens=output_len), prompt=f"prompt {i}")
            start, last = time.perf_counter(), None
            async for _ in engine.generate(request):
                now = time.perf_counter()
                if last is None:
                    ttfts.append(now - start)
                else:
                    itls.append(now - last)
                last = now

    await asyncio.gather(*(one(i) for i in range(requests)))
    return {"ttft_ms": latency_summary_ms(ttfts), "itl_ms": latency_summary_ms(itls)}


def through_system(url: str, concurrency: int, requests: int, output_len: int) -> dict[str, Any]:
    config = BenchmarkConfig(url=url, name="llm-serving", model=MODEL, concurrencies=[concurrency],
                             num_requests=requests, prompt_len=16, output_len=output_len, warmup=2)
    run = asyncio.run(run_benchmark(config))["runs"][0]
    for error in run["error_messages"]:
        print(f"error x{error['count']}: {error['message']}", file=sys.stderr)
    metrics: dict[str, Any] = run["metrics"]
    return metrics


def direct_http(rate: float, concurrency: int, requests: int, output_len: int) -> dict[str, Any]:
    """The same load against the engine behind a bare HTTP server in one process."""
    port = free_port()
    args = [sys.executable, str(ROOT / "scripts" / "direct_server.py"), str(port), str(rate), str(concurrency)]
    with external(args, {}, port) as url:
        return through_system(url, concurrency, requests, output_len)


def stack(workers: int, **env: str) -> Stack:
    s = Stack(Settings().redis_url, f"bench{uuid.uuid4().hex[:6]}:", Path(tempfile.mkdtemp()), **env)
    for i in range(workers):
        s.worker(f"bw{i}")
    return s


def latency(args: argparse.Namespace) -> dict[str, Any]:
    rate, out = 100.0, 64
    report: dict[str, Any] = {}
    for conc in (1, 8):
        n = 32 if conc == 1 else 256  # 32 bursts of 8: one burst's luck moves the p50 of fewer
        alone = asyncio.run(engine_alone(rate, conc, n, out))
        direct = direct_http(rate, conc, n, out)
        s = stack(1, synthetic_tokens_per_second=str(rate), max_batch_size=str(conc))
        try:
            system = through_system(s.api(), conc, n, out)
        finally:
            s.stop()
        keys = [(m, p) for m in ("ttft", "itl") for p in ("p50", "p99")]
        added = {f"{m}_{p}_ms": system[f"{m}_ms"][p] - alone[f"{m}_ms"][p] for m, p in keys}
        queue_relay = {f"{m}_{p}_ms": system[f"{m}_ms"][p] - direct[f"{m}_ms"][p] for m, p in keys}
        say(f"\n## Latency added (synthetic {rate:.0f} tok/s per stream, {conc} concurrent streams, {n} requests)")
        say("| | engine in-process | engine behind HTTP | through the system | added by the system "
            "| added by queue + relay |\n|---|---|---|---|---|---|")
        for m, p in keys:
            say(f"| {m.upper()} {p} (ms) | {alone[f'{m}_ms'][p]:.2f} | {direct[f'{m}_ms'][p]:.2f} | "
                f"{system[f'{m}_ms'][p]:.2f} | {added[f'{m}_{p}_ms']:+.2f} | {queue_relay[f'{m}_{p}_ms']:+.2f} |")
        report[f"concurrency_{conc}"] = {"engine_alone": alone, "engine_http": direct, "system": system,
                                         "added": added, "added_by_queue_relay": queue_relay}
    return report


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def lean_streams(url: str, concurrency: int, requests: int, output_len: int) -> dict[str, Any]:
    """A load generator light enough not to be the bottleneck: raw HTTP/1.1 keep-alive connections,
    no JSON parsing; each response is checked to hold exactly ``output_len`` content chunks and [DONE]."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": MODEL, "max_tokens": output_len, "stream": True,
                       "messages": [{"role": "user", "content": "relay"}]}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    todo = list(range(requests))
    tokens = bad = 0

    async def connection() -> None:
        nonlocal tokens, bad
        reader, writer = await asyncio.open_connection(host, int(port))
        while todo:
            todo.pop()
            writer.write(head + body)
            data = b""
            while not (data.endswith(b"0\r\n\r\n") and b"data: [DONE]" in data):  # end of the chunked body
                chunk = await reader.read(65536)
                if not chunk:
                    raise ConnectionError("server closed the connection")
                data += chunk
            count = data.count(b'"delta":{"content":')  # one per token; the role chunk does not match
            tokens += count
            bad += count != output_len
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"total_output_tokens": tokens, "output_throughput": tokens / elapsed, "incomplete": bad,
            "duration_s": elapsed}


def relay(args: argparse.Namespace) -> dict[str, Any]:
    """Tokens/s through one API process; and, since the load generator shares this machine's cores,
    tokens per CPU-second the API spent: what it relays when it has a core to itself."""
    conc, out, workers = args.relay_streams, 256, args.relay_workers
    s = stack(workers, synthetic_tokens_per_second="0", max_batch_size=str(conc // workers + 1),
              max_concurrent_requests=str(conc * 2))
    try:
        url = s.api()
        api_pid = s.procs[-1].popen.pid
        before = cpu_seconds(api_pid)
        system = through_system(url, conc, conc * 2, out)
        api_cpu = cpu_seconds(api_pid) - before
        lean = asyncio.run(lean_streams(url, conc, conc * 2, out))
    finally:
        s.stop()
    per_cpu = system["total_output_tokens"] / api_cpu
    say(f"\n## Relay: one API process, {conc} concurrent streams, {workers} synthetic workers at full speed")
    say(f"output tokens/s relayed: {system['output_throughput']:.0f}  (completed {system['completed']}, "
        f"errors {system['errors']}); the API used {api_cpu:.1f} CPU-s for {system['total_output_tokens']} "
        f"tokens = {per_cpu:.0f} tokens per API CPU-second")
    say(f"with a lean load generator (raw HTTP, no JSON parsing): {lean['output_throughput']:.0f} tokens/s, "
        f"{lean['incomplete']} incomplete responses")
    return {"streams": conc, "workers": workers, "output_tokens_per_s": system["output_throughput"],
            "errors": system["errors"], "api_cpu_s": api_cpu, "tokens_per_api_cpu_s": per_cpu, "lean": lean}


def scaling(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[int, float] = {}
    for workers in (1, 2, 4):
        s = stack(workers, synthetic_tokens_per_second="25", max_batch_size="8")
        try:
            metrics = through_system(s.api(), 32, 96, 48)
        finally:
            s.stop()
        results[workers] = metrics["output_throughput"]
    say("\n## Scaling: synthetic workers (8 slots x 25 tok/s each), 32 concurrent streams")
    say("| workers | output tok/s | vs 1 worker |\n|---|---|---|")
    for workers, tps in results.items():
        say(f"| {workers} | {tps:.0f} | {tps / results[1]:.2f}x |")
    return {"output_tokens_per_s": results, "speedup_4": results[4] / results[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=["latency", "relay", "scaling"],
                        default=["latency", "relay", "scaling"])
    parser.add_argument("--relay-streams", type=int, default=256)
    parser.add_argument("--relay-workers", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    parts = {"latency": latency, "relay": relay, "scaling": scaling}
    report = {name: parts[name](args) for name in args.only}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        args.json.with_suffix(".md").write_text("\n".join(REPORT).lstrip() + "\n")


if __name__ == "__main__":
    main()
