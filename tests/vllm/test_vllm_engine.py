"""VllmEngine on the real SmolLM2 (vLLM's async engine in-process, CPU)."""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest

from tests.vllm.conftest import BATCH, MAX_MODEL_LEN
from worker.engines.base import Delta, EngineRequestError, GenerationRequest, SamplingParams
from worker.engines.vllm_engine import StopMatcher, VllmEngine

pytestmark = pytest.mark.model

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "List five fruits and describe each one.",
    "What is the difference between weather and climate?",
]


def chat(content: str, max_tokens: int = 32, resume: list[int] | None = None, **params: object) -> GenerationRequest:
    return GenerationRequest(
        id="t", params=SamplingParams(max_tokens=max_tokens, temperature=0.0, **params),  # type: ignore[arg-type]
        messages=[{"role": "user", "content": content}], resume_token_ids=resume or [])


async def collect(engine: VllmEngine, request: GenerationRequest) -> list[Delta]:
    deltas = [d async for d in engine.generate(request)]
    assert deltas and deltas[-1].finish_reason is not None
    assert all(d.finish_reason is None for d in deltas[:-1])
    return deltas


def ids(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def text(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


async def wait_idle(engine: VllmEngine, timeout: float = 10) -> None:
    assert engine._llm is not None
    for _ in range(int(timeout / 0.05)):
        if engine.num_running() == 0 and engine._llm.get_num_unfinished_requests() == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"engine not idle: running={engine.num_running()} "
                         f"unfinished={engine._llm.get_num_unfinished_requests()}")


async def test_chat_streams_deltas_with_usage(vllm_engine):
    deltas = await collect(vllm_engine, chat("What is the capital of France?", max_tokens=40))
    assert "Paris" in text(deltas)
    assert deltas[-1].finish_reason == "stop"  # the model ends with <|im_end|>
    assert deltas[-1].completion_tokens == len(ids(deltas))
    assert [d.completion_tokens for d in deltas] == sorted(d.completion_tokens for d in deltas)
    prompt_ids = vllm_engine._prompt_ids(chat("What is the capital of France?"))
    assert all(d.prompt_tokens == len(prompt_ids) for d in deltas)
    assert vllm_engine.tokenizer.decode(ids(deltas), skip_special_tokens=True) == text(deltas)


async def test_completion_text_and_token_ids(vllm_engine):
    req = GenerationRequest(id="c", params=SamplingParams(max_tokens=12, temperature=0.0), prompt="The quick brown fox")
    by_text = await collect(vllm_engine, req)
    assert by_text[-1].finish_reason == "length" and by_text[-1].completion_tokens == 12
    prompt_ids = vllm_engine.tokenizer.encode("The quick brown fox")
    req_ids = GenerationRequest(id="c", params=SamplingParams(max_tokens=12, temperature=0.0), prompt=prompt_ids)
    by_ids = await collect(vllm_engine, req_ids)
    assert ids(by_ids) == ids(by_text) and text(by_ids) == text(by_text)
    assert by_ids[-1].prompt_tokens == len(prompt_ids)


async def test_length_finish(vllm_engine):
    deltas = await collect(vllm_engine, chat(PROMPTS[0], max_tokens=5))
    assert deltas[-1].finish_reason == "length"
    assert len(ids(deltas)) == 5 and deltas[-1].completion_tokens == 5


async def test_greedy_batched_equals_alone(vllm_engine):
    alone = [ids(await collect(vllm_engine, chat(p, max_tokens=24))) for p in PROMPTS]
    together = await asyncio.gather(*(collect(vllm_engine, chat(p, max_tokens=24)) for p in PROMPTS))
    assert [ids(d) for d in together] == alone


async def test_seeded_sampling_is_reproducible(vllm_engine):
    def req() -> GenerationRequest:
        return GenerationRequest(id="s", params=SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=7),
                                 messages=[{"role": "user", "content": "Tell me a joke."}])

    a, b = await asyncio.gather(collect(vllm_engine, req()), collect(vllm_engine, req()))
    assert ids(a) == ids(b)


async def test_resume_continues_an_uninterrupted_run(vllm_engine):
    full = await collect(vllm_engine, chat(PROMPTS[0], max_tokens=30))
    assert full[-1].finish_reason == "length"
    full_ids = ids(full)
    for k in (1, 11, 29):
        resumed = await collect(vllm_engine, chat(PROMPTS[0], max_tokens=30, resume=full_ids[:k]))
        assert full_ids[:k] + ids(resumed) == full_ids
        # one token per delta here (no stop strings), so the earlier text is the first k deltas'
        assert text(full[:k]) + text(resumed) == text(full)
        assert resumed[-1].finish_reason == "length"
        assert resumed[-1].completion_tokens == 30 and resumed[0].completion_tokens == k + 1
        assert resumed[-1].prompt_tokens == full[-1].prompt_tokens


async def test_resume_with_everything_already_generated(vllm_engine):
    deltas = await collect(vllm_engine, chat(PROMPTS[1], max_tokens=3, resume=[1, 2, 3]))
    assert deltas == [Delta("", [], "length", deltas[0].prompt_tokens, 3)]


async def test_stop_string(vllm_engine):
    full = text(await collect(vllm_engine, chat(PROMPTS[2], max_tokens=40)))
    stop = full[10:14]
    assert full.find(stop) == 10, full
    deltas = await collect(vllm_engine, chat(PROMPTS[2], max_tokens=40, stop=["never-there", stop]))
    assert text(deltas) == full[:10]
    assert deltas[-1].finish_reason == "stop"
    await wait_idle(vllm_engine)


async def test_stop_string_straddling_the_resume_point(vllm_engine):
    """The stop string starts in the tokens of the earlier attempt and ends in new ones."""
    full = await collect(vllm_engine, chat(PROMPTS[3], max_tokens=40))
    full_text, full_ids = text(full), ids(full)
    # a token boundary b with a stop string around it that occurs nowhere earlier
    for k in range(3, len(full) - 3):
        b = len(text(full[:k]))
        stop = full_text[b - 2:b + 2]
        if len(stop) == 4 and full_text.find(stop) == b - 2 and len(full[k].text) >= 2:
            break
    else:
        pytest.skip(f"no suitable token boundary in {full_text!r}")
    plain = await collect(vllm_engine, chat(PROMPTS[3], max_tokens=40, stop=[stop]))
    assert text(plain) == full_text[:b - 2] and plain[-1].finish_reason == "stop"
    # what the interrupted attempt had delivered for its first k tokens (stop prefixes held back)
    delivered, n = "", 0
    for d in plain:
        if n + len(d.token_ids) > k:
            break
        delivered, n = delivered + d.text, n + len(d.token_ids)
    assert n == k
    resumed = await collect(vllm_engine, chat(PROMPTS[3], max_tokens=40, stop=[stop], resume=full_ids[:k]))
    assert delivered + text(resumed) == text(plain)
    assert resumed[-1].finish_reason == "stop"


async def test_context_length_exceeded_before_any_delta(vllm_engine):
    long = "hello " * (MAX_MODEL_LEN + 10)
    with pytest.raises(EngineRequestError) as err:
        await anext(vllm_engine.generate(chat(long)))
    assert err.value.code == "context_length_exceeded"
    # prompt fits, prompt + max_tokens does not
    prompt_len = len(vllm_engine._prompt_ids(chat(PROMPTS[0])))
    with pytest.raises(EngineRequestError) as err:
        await anext(vllm_engine.generate(chat(PROMPTS[0], max_tokens=MAX_MODEL_LEN - prompt_len + 1)))
    assert err.value.code == "context_length_exceeded"
    ok = await collect(vllm_engine, chat(PROMPTS[0], max_tokens=MAX_MODEL_LEN - prompt_len))
    assert ok[-1].finish_reason in ("stop", "length")


async def test_bad_token_ids_are_request_errors(vllm_engine):
    req = GenerationRequest(id="x", params=SamplingParams(max_tokens=4), prompt=[1, 2, 10**9])
    with pytest.raises(EngineRequestError):
        await anext(vllm_engine.generate(req))
    req = GenerationRequest(id="x", params=SamplingParams(max_tokens=4), prompt="")
    with pytest.raises(EngineRequestError):
        await anext(vllm_engine.generate(req))


async def test_closing_the_generator_aborts_and_frees_the_slot(vllm_engine):
    await wait_idle(vllm_engine)
    gen = vllm_engine.generate(chat(PROMPTS[0], 400))
    first = await anext(gen)
    await anext(gen)
    assert first.finish_reason is None
    assert vllm_engine.num_running() == 1
    await gen.aclose()
    await wait_idle(vllm_engine, timeout=2)


async def test_cancelling_the_consumer_aborts(vllm_engine):
    await wait_idle(vllm_engine)
    started = asyncio.Event()

    async def consume() -> None:
        async with contextlib.aclosing(vllm_engine.generate(chat(PROMPTS[1], 400))) as gen:
            async for _ in gen:
                started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_idle(vllm_engine, timeout=2)


async def test_batch_is_full_again_after_aborts(vllm_engine):
    """Abort BATCH long requests mid-way; BATCH new ones then run side by side."""
    gens = [vllm_engine.generate(chat(p, 400)) for p in PROMPTS[:BATCH]]
    for g in gens:
        await anext(g)
    assert vllm_engine.num_running() == BATCH
    for g in gens:
        await g.aclose()
    await wait_idle(vllm_engine, timeout=2)
    results = await asyncio.wait_for(
        asyncio.gather(*(collect(vllm_engine, chat(p, max_tokens=8)) for p in PROMPTS[:BATCH])), 60)
    assert all(r[-1].finish_reason in ("stop", "length") for r in results)
    await wait_idle(vllm_engine)


def test_stop_matcher_random_against_char_by_char():
    def reference(stops: list[str], s: str) -> str:
        for e in range(1, len(s) + 1):
            starts = [e - len(x) for x in stops if s[:e].endswith(x)]
            if starts:
                return s[:min(starts)]
        return s

    rng = random.Random(3)
    for _ in range(3000):
        s = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 16)))
        stops = ["".join(rng.choice("ab c") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(len(s) + 1), k=min(len(s) + 1, rng.randint(0, 5))))
        m, out = StopMatcher(stops), ""
        for a, b in zip([0, *cuts], [*cuts, len(s)], strict=True):
            out += m.feed(s[a:b])
            if m.stopped:
                break
        else:
            out += m.flush()
        assert out == reference(stops, s), (stops, s, cuts)
        # resumed after k chars: what the first attempt emitted + what the resumed one emits
        k = rng.randint(0, len(s))
        if reference(stops, s[:k]) != s[:k]:
            continue
        first = StopMatcher(stops).feed(s[:k])
        second = StopMatcher(stops, context=s[:k])
        rest = second.feed(s[k:])
        if not second.stopped:
            rest += second.flush()
        assert first + rest == reference(stops, s), (stops, s, k)
