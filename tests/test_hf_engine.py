"""The transformers engine with the real SmolLM2-135M model (one engine for the module)."""

from __future__ import annotations

import asyncio
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from shared.settings import Settings
from worker.engines.base import Delta, EngineRequestError, GenerationRequest, SamplingParams

pytest.importorskip("torch")
pytest.importorskip("transformers")

from worker.engines.hf import TransformersEngine, _Detokenizer
from worker.engines.hf_loader import materialize

pytestmark = pytest.mark.model

MAX_BATCH = 4


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings(max_batch_size=MAX_BATCH, max_model_len=1024)


@pytest.fixture(scope="module")
async def engine(settings: Settings):
    eng = TransformersEngine(settings)
    await eng.start()
    yield eng
    await eng.close()


def chat(text: str, max_tokens: int = 16, **params) -> GenerationRequest:
    return GenerationRequest(
        id=f"t-{time.monotonic_ns()}",
        params=SamplingParams(max_tokens=max_tokens, temperature=params.pop("temperature", 0.0), **params),
        messages=[{"role": "user", "content": text}],
    )


async def collect(engine: TransformersEngine, request: GenerationRequest) -> tuple[str, list[int], list[Delta]]:
    deltas = [d async for d in engine.generate(request)]
    return "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids], deltas


async def test_batched_equals_alone_with_requests_joining_midway(engine):
    prompts = [
        ("Write a short poem about autumn leaves.", 24),
        ("What is the capital of France? Answer in one sentence, then explain why it is famous.", 16),
        ("List five animals that live in the ocean.", 20),
    ]
    alone = [(await collect(engine, chat(p, n)))[1] for p, n in prompts]

    started: list[asyncio.Event] = [asyncio.Event() for _ in prompts]

    async def run(i: int) -> list[int]:
        ids: list[int] = []
        async for d in engine.generate(chat(*prompts[i])):
            ids += d.token_ids
            if len(ids) >= 3:
                started[i].set()
        started[i].set()
        return ids

    first = asyncio.create_task(run(0))
    await started[0].wait()  # the others join a batch that is already decoding
    second = asyncio.create_task(run(1))
    await started[1].wait()
    third = asyncio.create_task(run(2))
    batched = await asyncio.gather(first, second, third)
    assert batched == alone


async def test_resume_continues_exactly(engine):
    prompt = "Tell me a story about a dragon who learns to cook."
    full_text, full_ids, full = await collect(engine, chat(prompt, 20))
    assert full[-1].completion_tokens == 20 and full[-1].finish_reason == "length"
    k = 7
    head_text, head_ids, _ = await collect(engine, chat(prompt, k))
    assert head_ids == full_ids[:k]
    request = chat(prompt, 20)
    request.resume_token_ids = head_ids
    tail_text, tail_ids, tail = await collect(engine, request)
    assert head_ids + tail_ids == full_ids
    assert head_text + tail_text == full_text
    assert tail[-1].completion_tokens == 20
    assert tail[-1].finish_reason == "length"
    assert all(d.prompt_tokens == full[0].prompt_tokens for d in tail)


async def test_resume_already_complete(engine):
    _, ids, _ = await collect(engine, chat("Say hello.", 4))
    request = chat("Say hello.", 4)
    request.resume_token_ids = ids
    deltas = [d async for d in engine.generate(request)]
    assert len(deltas) == 1 and deltas[0].text == "" and deltas[0].completion_tokens == len(ids)
    assert deltas[0].finish_reason in ("length", "stop")


async def test_stop_strings(engine):
    prompt = "Write a short poem about autumn leaves."
    text, _, _ = await collect(engine, chat(prompt, 32))
    assert len(text) > 40, text
    mid = len(text) // 2
    stop = text[mid : mid + 4]  # may straddle token boundaries
    cut = text.index(stop)
    stopped, _, sdeltas = await collect(engine, chat(prompt, 32, stop=["zzz-never", stop]))
    assert stopped == text[:cut]
    assert sdeltas[-1].finish_reason == "stop"
    assert stop not in stopped


async def test_max_tokens_gives_length_and_deltas_are_consistent(engine):
    text, ids, deltas = await collect(engine, chat("Write a long essay about the history of Rome.", 5))
    assert deltas[-1].finish_reason == "length"
    assert len(ids) == 5 and deltas[-1].completion_tokens == 5
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert all(d.prompt_tokens > 10 for d in deltas)
    running = 0
    for d in deltas:
        running += len(d.token_ids)
        assert d.completion_tokens == running
    assert text


async def test_completion_prompt_text_and_token_ids(engine):
    params = SamplingParams(max_tokens=8, temperature=0)
    prompt = "One, two, three,"
    text_a, ids_a, deltas_a = await collect(engine, GenerationRequest(id="c1", params=params, prompt=prompt))
    prompt_ids = engine._loaded.tokenizer(prompt)["input_ids"]
    text_b, ids_b, _ = await collect(engine, GenerationRequest(id="c2", params=params, prompt=prompt_ids))
    assert ids_a == ids_b and text_a == text_b
    assert deltas_a[0].prompt_tokens == len(prompt_ids)


async def test_seed_reproducible(engine):
    def req(seed: int) -> GenerationRequest:
        return chat("Invent a name for a new planet.", 16, temperature=1.0, top_p=0.95, seed=seed)

    _, a, _ = await collect(engine, req(1234))
    _, b, _ = await collect(engine, req(1234))
    assert a == b
    # also when sharing the batch with other requests
    (_, c, _), _ = await asyncio.gather(collect(engine, req(1234)), collect(engine, chat("Hi there!", 12)))
    assert c == a
    results = [(await collect(engine, req(seed)))[1] for seed in (1, 2, 3)]
    assert any(r != a for r in results)


async def test_seeded_sampling_resumes_the_same_stream(engine):
    def req() -> GenerationRequest:
        return chat("Describe a sunset.", 14, temperature=0.8, seed=7)

    _, full, _ = await collect(engine, req())
    r = req()
    r.params.max_tokens = 5
    _, head, _ = await collect(engine, r)
    r2 = req()
    r2.resume_token_ids = head
    _, tail, _ = await collect(engine, r2)
    assert head + tail == full


async def test_abort_frees_the_slot(engine):
    assert engine.num_running() == 0
    gens = [engine.generate(chat(f"Write a very long story number {i}.", 400)) for i in range(MAX_BATCH)]
    for g in gens:  # all running
        await g.__anext__()
    queued = engine.generate(chat("Say something short.", 3))
    waiting = asyncio.ensure_future(queued.__anext__())
    await asyncio.sleep(1.0)
    assert not waiting.done(), "a request beyond max_batch_size must wait for a slot"
    assert engine.num_running() == MAX_BATCH + 1
    await gens[0].aclose()
    first = await asyncio.wait_for(waiting, timeout=10)
    assert first.token_ids
    async for _ in queued:
        pass
    for g in gens[1:]:
        await g.aclose()
    for _ in range(100):
        if engine.num_running() == 0:
            break
        await asyncio.sleep(0.05)
    assert engine.num_running() == 0


async def test_cancel_by_task_cancellation_and_while_queued(engine):
    async def consume(request: GenerationRequest) -> None:
        async for _ in engine.generate(request):
            pass

    tasks = [asyncio.create_task(consume(chat(f"Tell a long tale {i}.", 400))) for i in range(MAX_BATCH + 2)]
    await asyncio.sleep(1.5)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for _ in range(100):
        if engine.num_running() == 0:
            break
        await asyncio.sleep(0.05)
    assert engine.num_running() == 0
    _, ids, _ = await collect(engine, chat("Still alive?", 3))
    assert len(ids) == 3


async def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(engine, monkeypatch):
    from worker.engines import hf

    facts = " ".join(f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(50))
    long_request = chat(facts + " Which number came first?", 8)
    monkeypatch.setattr(hf, "_PREFILL_TOKEN_BUDGET", 4096)
    _, whole, whole_deltas = await collect(engine, chat(facts + " Which number came first?", 8))
    assert whole_deltas[0].prompt_tokens > 600
    monkeypatch.setattr(hf, "_PREFILL_TOKEN_BUDGET", 96)

    short_tokens_before_long_started = 0
    long_started = asyncio.Event()

    async def short() -> None:
        nonlocal short_tokens_before_long_started
        async for d in engine.generate(chat("Write a long poem about the sea.", 40)):
            if not long_started.is_set():
                short_tokens_before_long_started += len(d.token_ids)

    async def long() -> list[int]:
        ids: list[int] = []
        async for d in engine.generate(long_request):
            long_started.set()
            ids += d.token_ids
        return ids

    short_task = asyncio.create_task(short())
    await asyncio.sleep(0.3)
    chunked = await long()
    await short_task
    assert chunked == whole
    assert short_tokens_before_long_started >= 4  # the running stream kept going during the chunks


async def test_event_loop_stays_responsive(engine):
    lags: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - t - 0.01)

    tick = asyncio.create_task(ticker())
    await asyncio.gather(*(collect(engine, chat(f"Write about the number {i}.", 12)) for i in range(MAX_BATCH)))
    done.set()
    await tick
    assert len(lags) > 10
    # the model runs on its own thread: a tick waits for the GIL, never for a whole model step
    assert sorted(lags)[len(lags) // 2] < 0.03, sorted(lags)


async def test_context_length_exceeded(engine):
    gen = engine.generate(chat("Hello", max_tokens=engine.max_model_len))
    with pytest.raises(EngineRequestError) as err:
        await gen.__anext__()
    assert err.value.code == "context_length_exceeded"
    assert err.value.param == "messages"
    assert str(engine.max_model_len) in str(err.value)

    long_prompt = "word " * (engine.max_model_len + 10)
    gen = engine.generate(GenerationRequest(id="x", params=SamplingParams(max_tokens=1), prompt=long_prompt))
    with pytest.raises(EngineRequestError) as err:
        await gen.__anext__()
    assert err.value.code == "context_length_exceeded" and err.value.param == "prompt"


async def test_bad_token_ids(engine):
    gen = engine.generate(GenerationRequest(id="x", params=SamplingParams(max_tokens=1), prompt=[1, 10**9]))
    with pytest.raises(EngineRequestError) as err:
        await gen.__anext__()
    assert err.value.param == "prompt"


async def test_multibyte_text_never_yields_replacement_chars(engine):
    requests = [
        GenerationRequest(id="zh", params=SamplingParams(max_tokens=40, temperature=0), prompt="中国的首都是北京。"),
        chat("Reply only with five emoji about food, like 🍕🍔🍟.", 30),
        chat("Translate 'good morning, my friend' into Chinese, Japanese and Korean.", 40),
    ]
    outputs = await asyncio.gather(*(collect(engine, r) for r in requests))
    decode = engine._decode_fn
    non_ascii = 0
    for text, ids, deltas in outputs:
        for d in deltas:
            assert "\ufffd" not in d.text, (d, text)
        assert text == decode(ids).rstrip("\ufffd")
        non_ascii += sum(ord(c) > 127 for c in text)
    assert non_ascii > 5


def test_detokenizer_holds_back_split_characters(engine):
    tok = engine._loaded.tokenizer
    decode = engine._decode_fn
    text = "Hi 😀🍕 中文 ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = [decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), "expected the emoji to be split over byte tokens"
    d = _Detokenizer(decode, [], [])
    released = []
    for i in ids:
        d.add(i)
        tokens, chars = d.releasable()
        released.append(d.text[d.sent_chars : chars])
        d.sent_tokens, d.sent_chars = tokens, chars
    d.flush()
    released.append(d.text[d.sent_chars :])
    assert all("\ufffd" not in r for r in released)
    assert "".join(released) == text


def test_detokenizer_holds_back_possible_stop_prefix(engine):
    tok = engine._loaded.tokenizer
    decode = engine._decode_fn
    ids = tok("alpha beta gamma delta", add_special_tokens=False)["input_ids"]
    d = _Detokenizer(decode, [], ["gamma d"])
    cut = None
    for i in ids:
        cut = d.add(i)
        if cut is not None:
            break
        _, chars = d.releasable()
        assert chars <= len("alpha beta "), d.text[:chars]  # "g", "gam"... might start the stop string
    assert cut == len("alpha beta ")


async def test_materialize_is_cached(settings):
    t0 = time.monotonic()
    first = await asyncio.to_thread(materialize, settings.model, settings.model_cache_dir)
    t1 = time.monotonic()
    second = await asyncio.to_thread(materialize, settings.model, settings.model_cache_dir)
    assert first == second
    assert time.monotonic() - t1 < 2.0
    assert (second / "config.json").is_file() and (second / "model.safetensors").is_file()
    assert (second / "tokenizer.json").is_file() or (second / "tokenizer.model").is_file()
    assert t1 - t0 < 60


async def test_materialize_rejects_unknown_models(tmp_path):
    from worker.engines.hf_loader import ModelNotFoundError

    with pytest.raises(ModelNotFoundError):
        materialize("some-org/some-model", tmp_path)
    with pytest.raises(ModelNotFoundError):
        materialize(str(tmp_path), tmp_path)  # a directory without config.json


async def test_health_and_prefix_cache_used(engine):
    await engine.check_health()
    runner = engine._runner
    assert runner.prefix is not None and runner.prefix.hits > 0  # chat prompts share the system preamble
    before = runner.reused_tokens
    prompt = "Summarize the plot of Hamlet in two sentences, please, for a ten year old reader."
    first = await collect(engine, chat(prompt, 6))
    second = await collect(engine, chat(prompt, 6))
    assert first[1] == second[1]
    assert runner.reused_tokens - before >= 2 * 20  # the preamble both times, the whole prompt but one the 2nd


async def test_transformers_forward_fallback(settings, monkeypatch):
    """Architectures without the lean path run transformers' own forward with the slot attention."""
    from worker.engines import hf

    monkeypatch.setattr(hf._FastDecoder, "supports", classmethod(lambda cls, model: False))
    eng = TransformersEngine(settings)
    await eng.start()
    try:
        assert eng._runner is not None and eng._runner.fast is None
        prompts = [("What is the capital of France?", 10), ("Name three fruits.", 14), ("Say hello in French.", 6)]
        alone = [(await collect(eng, chat(p, n)))[1] for p, n in prompts]
        batched = await asyncio.gather(*(collect(eng, chat(p, n)) for p, n in prompts))
        assert [ids for _, ids, _ in batched] == alone
        assert "Paris" in batched[0][0]
    finally:
        await eng.close()


@pytest.mark.parametrize("rows", [1, 3, 8])
async def test_scripted_decode_step_equals_the_python_one(engine, rows):
    """The TorchScript decode layers (no GIL, for the lanes) do exactly the lean forward's math."""
    import torch

    from worker.engines import hf

    fast = engine._runner.fast
    assert fast is not None and fast.script is not None  # CPU, packed weights: the scripted path is on
    results = []
    for script in (fast.script, None):
        cache = hf._SlotCache(len(fast.layers), rows, fast.kv_heads, fast.head_dim, 128, torch.float32,
                              torch.device("cpu"))
        generator = torch.Generator().manual_seed(0)
        for k, v in zip(cache.k, cache.v, strict=True):
            k.normal_(generator=generator)
            v.normal_(generator=generator)
        saved, fast.script = fast.script, script
        try:
            with torch.inference_mode():
                pos = torch.arange(rows) + 40
                ids = torch.arange(rows) * 7 + 3
                logits = fast.forward(hf._Decode(cache, pos, 41 + rows, torch.float32), ids, pos, None)
        finally:
            fast.script = saved
        results.append((logits, cache.k[0].clone(), cache.v[-1].clone()))
    (a, ka, va), (b, kb, vb) = results
    assert torch.equal(a, b) and torch.equal(ka, kb) and torch.equal(va, vb)
