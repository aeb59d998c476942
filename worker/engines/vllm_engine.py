"""vLLM's async engine, in-process (INFERENCE_ENGINE=vllm; runs from .venv-vllm).

vLLM does the continuous batching: every ``generate`` call is one vLLM request,
``max_num_seqs = MAX_BATCH_SIZE`` of them are decoded together, and closing or
cancelling the iterator aborts the request in vLLM at once (its slot and KV
blocks are freed).

Prompts are tokenized here, not by vLLM, so the engine knows the prompt length
before anything runs and can append ``resume_token_ids``:

* chat: the model's chat template (``add_generation_prompt=True``), then the
  tokenizer without extra special tokens;
* completion: text is tokenized like vLLM would (with the tokenizer's special
  tokens), token ids are used as given;
* resume: the already delivered tokens are appended to the prompt and
  ``max_tokens`` is reduced by their count. vLLM's incremental detokenizer
  primes itself with the last prompt tokens, so the new text joins the old
  exactly; prefix caching makes the re-prefill cheap.

Stop strings are matched here rather than by vLLM, over the resumed text plus
the new text, so a stop string that straddles the resume point still stops
(vLLM only looks at its own output). Text that may be the start of a stop
string is held back until it is known not to be one.

``import vllm`` happens in ``start()``: this module imports fine without vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.settings import Settings
from worker.engines.base import (
    BURST_GAP_S,
    BURST_MAX_S,
    Delta,
    Engine,
    EngineRequestError,
    FinishReason,
    GenerationRequest,
    cpu_has_native_bf16,
)

if TYPE_CHECKING:  # pragma: no cover
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)

_DTYPES = {"auto", "float32", "bfloat16", "float16"}
_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "cancelled"}


class StopMatcher:
    """Stop strings over a stream of text deltas, with the minimal hold-back.

    ``context`` is the text of tokens generated before this stream (a resumed
    request's earlier output): a stop string may start in it, and nothing of it
    is emitted again except the suffix the earlier attempt held back.
    """

    def __init__(self, stops: list[str], context: str = ""):
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.context = context[-(self.longest - 1):] if self.longest > 1 else ""
        self.pending = ""  # new text not emitted yet
        self.stopped = False
        # The earlier attempt held back the end of its text that could start a
        # stop string (exactly this suffix, see feed): emit it again unless a
        # stop string completes it.
        held = self._partial_suffix(self.context)
        if held:
            self.context, self.pending = self.context[:-held], self.context[-held:]

    def feed(self, text: str) -> str:
        """Add new text; return what can be emitted now. Sets ``stopped`` on a match."""
        if not self.stops:
            return text
        self.pending += text
        window = self.context + self.pending
        base = len(self.context)
        # The stop string completed first wins (as if checked char by char).
        best: tuple[int, int] | None = None  # (end, start)
        for stop in self.stops:
            i = window.find(stop, max(0, base - len(stop) + 1))
            if i != -1 and (best is None or (i + len(stop), i) < best):
                best = (i + len(stop), i)
        if best is not None:
            hit = best[1]
            self.stopped = True
            out = window[base:hit] if hit > base else ""
            self.pending = ""
            return out
        keep = self._partial_suffix(window)
        keep = min(keep, len(self.pending))
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        tail = self.context + out
        self.context = tail[-(self.longest - 1):] if self.longest > 1 else ""
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _partial_suffix(self, window: str) -> int:
        """Length of the longest suffix of ``window`` that is a proper prefix of a stop string."""
        for k in range(min(self.longest - 1, len(window)), 0, -1):
            suffix = window[-k:]
            if any(stop.startswith(suffix) for stop in self.stops):
                return k
        return 0


def _message_text(content: Any) -> str:
    """OpenAI content: a string, or a list of parts of which the text ones count."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return str(content)


def _kv_cache_gib(model_dir: Path, tokens: int, dtype_bytes: int) -> int:
    """GiB of CPU KV cache for ``tokens`` tokens (at least 1), from the model's config.json."""
    import json

    try:
        cfg = json.loads((model_dir / "config.json").read_text())
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    except (OSError, KeyError, ValueError, TypeError):
        return 4
    per_token = 2 * layers * kv_heads * head_dim * dtype_bytes
    return max(1, math.ceil(tokens * per_token * 1.2 / 2**30))


class VllmEngine(Engine):
    name = "vllm"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.model = settings.served_model_name
        self.max_batch_size = settings.max_batch_size
        self.max_model_len = settings.max_model_len
        self.model_dir: Path | None = None
        self.tokenizer: Any = None
        self.vocab_size = 0
        self._llm: AsyncLLM | None = None
        self._running = 0
        self._burst: asyncio.Event | None = None  # set when the requests of a burst may go in
        self._burst_size = 0

    # ── lifecycle ────────────────────────────────────────────────────────────
    def _dtype(self) -> str:
        dtype = self.settings.dtype if self.settings.dtype in _DTYPES else "auto"
        if dtype != "auto":
            return dtype
        # The materialized checkpoint is float32. On a CPU, bfloat16 pays off only with native
        # bf16 (AVX512-BF16, AMX): measured 158 vs 102 tok/s at 8 streams on Zen 4, while an
        # AVX2-only CPU ran it ~3x slower than float32.
        import torch

        if torch.cuda.is_available() or cpu_has_native_bf16():
            return "bfloat16"
        return "float32"

    def _engine_args(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs

        assert self.model_dir is not None
        return AsyncEngineArgs(
            model=str(self.model_dir),
            tokenizer=str(self.model_dir),
            served_model_name=[self.model],
            dtype=self._dtype(),  # type: ignore[arg-type]
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_batch_size,
            # torch.compile costs 80-110 s of warm-up on this CPU for ~5% more tokens/s.
            enforce_eager=True,
            enable_prefix_caching=True,
            disable_log_stats=True,
            seed=0,
        )

    async def start(self) -> None:
        from worker.engines.hf_loader import materialize

        self.model_dir = await asyncio.to_thread(materialize, self.settings.model, self.settings.model_cache_dir)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("DO_NOT_TRACK", "1")
        # The engine core runs in a child process; fork from a process with
        # threads (redis, to_thread) and a running loop is unsafe.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        dtype_bytes = 4 if self._dtype() == "float32" else 2
        os.environ.setdefault(
            "VLLM_CPU_KVCACHE_SPACE",
            str(_kv_cache_gib(self.model_dir, self.max_batch_size * self.max_model_len, dtype_bytes)),
        )

        from transformers import AutoTokenizer

        self.tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(self.model_dir))
        self.vocab_size = len(self.tokenizer)
        log.info("vllm: loading %s (max_num_seqs=%d, max_model_len=%d, dtype=%s)", self.model_dir,
                 self.max_batch_size, self.max_model_len, self._dtype())
        # Off the event loop: loading takes ~30 s. The thread stores the engine
        # itself (a returned value would stay referenced by the thread pool's
        # future, keeping the engine alive after close()).
        await asyncio.to_thread(self._build)

    def _build(self) -> None:
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        self._llm = AsyncLLM.from_engine_args(self._engine_args(), usage_context=UsageContext.ENGINE_CONTEXT)

    async def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is None:
            return
        # Stop reading outputs first, or the handler reports the engine core's
        # exit as an EngineDeadError.
        handler = getattr(llm, "output_handler", None)
        if handler is not None:
            handler.cancel()
            with contextlib.suppress(BaseException):
                await handler
        await asyncio.to_thread(llm.shutdown)
        del llm
        gc.collect()  # AsyncLLM.__del__ shuts down again; let it do so now, not at exit

    def _engine_input(self, token_ids: list[int]) -> Any:
        """A token prompt rendered the way vLLM wants it (raw prompts are deprecated)."""
        from vllm.inputs import TokensPrompt
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        assert self._llm is not None
        renderer = self._llm.renderer
        parsed = parse_model_prompt(self._llm.model_config, TokensPrompt(prompt_token_ids=token_ids))
        (engine_input,) = renderer.render_cmpl([parsed], renderer.default_cmpl_tok_params)
        return engine_input

    async def check_health(self) -> None:
        if self._llm is None:
            raise RuntimeError("vllm engine not started")
        await self._llm.check_health()

    def num_running(self) -> int:
        return self._running

    # ── requests ─────────────────────────────────────────────────────────────
    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        tok = self.tokenizer
        if request.messages is not None:
            if not request.messages:
                raise EngineRequestError("messages must not be empty", param="messages", code="invalid_prompt")
            messages = [{**m, "content": _message_text(m.get("content"))} for m in request.messages]
            try:
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # jinja errors: roles the template refuses, …
                raise EngineRequestError(f"The chat template rejected the messages: {exc}", param="messages",
                                         code="invalid_prompt") from exc
            return list(tok.encode(text, add_special_tokens=False))
        if isinstance(request.prompt, str):
            return list(tok.encode(request.prompt))
        if request.prompt is None:
            raise EngineRequestError("either messages or prompt is required", param="prompt", code="invalid_prompt")
        ids = list(request.prompt)
        bad = [t for t in ids if not isinstance(t, int) or t < 0 or t >= self.vocab_size]
        if bad:
            raise EngineRequestError(f"token id {bad[0]!r} is out of the vocabulary (size {self.vocab_size})",
                                     param="prompt", code="invalid_prompt")
        return ids

    def _check(self, request: GenerationRequest, prompt_ids: list[int]) -> None:
        param = "messages" if request.messages is not None else "prompt"
        if not prompt_ids:
            raise EngineRequestError("The prompt is empty.", param=param, code="invalid_prompt")
        bad = [t for t in request.resume_token_ids if t < 0 or t >= self.vocab_size]
        if bad:
            raise EngineRequestError(f"resume token id {bad[0]} is out of the vocabulary", param=param)
        max_tokens = request.params.max_tokens
        if len(prompt_ids) + max_tokens > self.max_model_len:
            raise EngineRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the {param}, {max_tokens} for the "
                "completion). Please reduce the length of the prompt or max_tokens.",
                param=param, code="context_length_exceeded")

    async def _gather_burst(self) -> None:
        """An idle engine lets a burst gather before any of it goes in: vLLM then schedules the
        burst's prompts in one step instead of prefilling the first alone (``BURST_GAP_S``)."""
        if self._running:
            return  # steps are running: the request joins the next one
        if self._burst is not None:
            self._burst_size += 1
            await self._burst.wait()
            return
        loop = asyncio.get_running_loop()
        self._burst, self._burst_size = asyncio.Event(), 1
        deadline = loop.time() + BURST_MAX_S
        try:
            while self._burst_size < self.max_batch_size and (left := deadline - loop.time()) > 0:
                seen = self._burst_size
                await asyncio.sleep(min(BURST_GAP_S, left))
                if self._burst_size == seen:
                    break
        finally:
            self._burst.set()
            self._burst = None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        if self._llm is None:
            raise RuntimeError("vllm engine not started")
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind
        from vllm.sampling_params import SamplingParams as VllmSamplingParams

        params = request.params
        prompt_ids = self._prompt_ids(request)
        self._check(request, prompt_ids)
        resumed = list(request.resume_token_ids)
        prompt_tokens = len(prompt_ids)
        completion = len(resumed)
        remaining = params.max_tokens - completion
        if remaining <= 0:
            yield Delta("", [], "length", prompt_tokens, completion)
            return

        context = ""
        stops = [s for s in params.stop if s]
        if stops and resumed:
            longest = max(len(s) for s in stops)
            context = self.tokenizer.decode(resumed[-2 * longest:], skip_special_tokens=True)
        matcher = StopMatcher(stops, context)
        sampling = VllmSamplingParams(
            max_tokens=remaining,
            temperature=params.temperature,
            top_p=params.top_p if 0 < params.top_p <= 1 else 1.0,
            seed=params.seed,
            output_kind=RequestOutputKind.DELTA,
            skip_special_tokens=True,
        )
        request_id = f"{request.id}-{uuid.uuid4().hex[:8]}"
        try:
            engine_input = self._engine_input(prompt_ids + resumed)
        except (VLLMClientError, ValueError) as exc:
            raise EngineRequestError(str(exc), param="messages" if request.messages is not None else "prompt") from exc
        await self._gather_burst()
        stream = self._llm.generate(engine_input, sampling, request_id)
        started = False
        released = False
        self._running += 1

        async def release() -> None:
            """Abort in vLLM if still running (no-op once finished) and give the slot back."""
            nonlocal released
            with contextlib.suppress(Exception):
                await stream.aclose()
            if not released:
                released = True
                self._running -= 1

        try:
            while True:
                try:
                    out = await stream.__anext__()
                except StopAsyncIteration:
                    raise RuntimeError(f"vllm ended request {request_id} without a finish reason") from None
                except (VLLMClientError, ValueError) as exc:
                    if started:
                        raise
                    param = "messages" if request.messages is not None else "prompt"
                    raise EngineRequestError(str(exc), param=param) from exc
                started = True
                o = out.outputs[0]
                ids = list(o.token_ids)
                completion += len(ids)
                text = matcher.feed(o.text)
                finish: FinishReason | None = None
                if matcher.stopped:
                    finish = "stop"
                elif o.finish_reason is not None or out.finished:
                    text += matcher.flush()
                    finish = _FINISH.get(o.finish_reason or "", "cancelled")
                if finish is not None:
                    await release()  # free the slot before handing over the last delta
                    yield Delta(text, ids, finish, prompt_tokens, completion)
                    return
                if text or ids:
                    yield Delta(text, ids, None, prompt_tokens, completion)
        finally:
            await release()
