"""Benchmark the transformers engine alone (no Redis, no API): output tokens per second.

    python scripts/bench_engine.py                      # batch 1, 8, 32; 64 output tokens each
    python scripts/bench_engine.py --batch 8 --repeat 3 --tokens 64
    python scripts/bench_engine.py --dtype float32       # compare with plain float32 weights

For each batch size B, B chat requests (greedy unless --temperature) (different prompts, ~40 prompt
tokens each) are started at once with max_tokens=--tokens; the prompts ask for
long essays so generation runs to max_tokens, and the tokens actually produced
are what is counted.
Prints the total output tok/s (wall clock from first submit to last token,
prefill included), the decode-only rate, time to first token, and per-stream rate.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.settings import Settings
from worker.engines.base import GenerationRequest, SamplingParams
from worker.engines.hf import TransformersEngine

TOPICS = [
    "the history of Rome",
    "how rainbows form",
    "the water cycle",
    "why cats purr",
    "how airplanes fly",
    "the life of bees",
    "volcanoes",
    "the moon landing",
    "photosynthesis",
    "the ocean tides",
    "how computers work",
    "the Great Wall of China",
    "dinosaurs",
    "the solar system",
    "how vaccines work",
    "the invention of paper",
]


def make_requests(batch: int, tokens: int, run: int, temperature: float, top_p: float) -> list[GenerationRequest]:
    reqs = []
    for i in range(batch):
        topic = TOPICS[i % len(TOPICS)]
        content = f"Write a long, detailed essay about {topic}." + (" Be thorough." * (i % 3))
        reqs.append(
            GenerationRequest(
                id=f"bench-{run}-{i}",
                params=SamplingParams(max_tokens=tokens, temperature=temperature, top_p=top_p, seed=run * 1000 + i),
                messages=[{"role": "user", "content": content}],
            )
        )
    return reqs


async def one(engine: TransformersEngine, req: GenerationRequest, t0: float) -> tuple[int, float, float]:
    first = None
    n = 0
    async for delta in engine.generate(req):
        if first is None and delta.token_ids:
            first = time.perf_counter() - t0
        n = delta.completion_tokens
    return n, first or 0.0, time.perf_counter() - t0


async def bench(engine: TransformersEngine, batch: int, args: argparse.Namespace) -> None:
    rates = []
    for run in range(args.repeat):
        reqs = make_requests(batch, args.tokens, run, args.temperature, args.top_p)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(engine, r, t0) for r in reqs))
        wall = time.perf_counter() - t0
        total = sum(n for n, _, _ in results)
        ttft = max(f for _, f, _ in results)
        decode_rate = (total - batch) / max(1e-9, wall - ttft)
        per_stream = statistics.mean(n / max(1e-9, end - f) for n, f, end in results)
        rates.append(total / wall)
        print(
            f"batch {batch:3d} run {run}: {total:5d} tokens in {wall:6.2f} s = {total / wall:7.1f} tok/s total "
            f"(decode {decode_rate:6.1f} tok/s, last first-token {ttft:5.2f} s, {per_stream:5.1f} tok/s per stream)",
            flush=True,
        )
    print(f"batch {batch:3d}: best {max(rates):.1f} tok/s, median {statistics.median(rates):.1f} tok/s", flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dtype", default=None, help="override DTYPE (auto, float32, bfloat16, float16)")
    parser.add_argument("--load-in-8bit", action="store_true")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    args = parser.parse_args()
    overrides: dict = {"max_batch_size": max(args.batch)}
    if args.dtype:
        overrides["dtype"] = args.dtype
    if args.load_in_8bit:
        overrides["load_in_8bit"] = True
    engine = TransformersEngine(Settings(**overrides))
    t0 = time.perf_counter()
    await engine.start()
    print(f"engine started in {time.perf_counter() - t0:.1f} s", flush=True)
    try:
        for batch in args.batch:
            await bench(engine, batch, args)
    finally:
        await engine.close()


if __name__ == "__main__":
    asyncio.run(main())
