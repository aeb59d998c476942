"""Forward requests to an upstream OpenAI-compatible server (INFERENCE_ENGINE=openai).

Works with anything that speaks the OpenAI streaming API: vLLM's server, TGI,
llama.cpp's server, ``transformers serve``, OpenAI itself. UPSTREAM_URL is the
base URL up to and including ``/v1``; the model name sent upstream is
UPSTREAM_MODEL, or MODEL when that is empty.

* chat → ``POST /chat/completions``, completion → ``POST /completions``, both
  with ``stream: true`` and ``stream_options.include_usage`` (servers that do
  not know it ignore it).
* The upstream batches; this engine only keeps up to MAX_BATCH_SIZE requests in
  flight, over one shared HTTP client whose connection pool has that size.
* Closing or cancelling ``generate`` closes the HTTP response; servers abort
  the generation when the client goes away.
* Errors: a 4xx (except 408 and 429) is the request's fault and becomes an
  :class:`EngineRequestError` with the upstream's message (context length, bad
  parameter, …) so the client gets a 400; 5xx, 408, 429, connection errors and
  streams cut short raise plain exceptions, which the worker retries.

Tokens. The OpenAI API streams text, not token ids. Each streamed chunk that
carries text counts as one token (servers stream one token per chunk), and its
"token id" in the :class:`Delta` is a 31-bit checksum of the chunk's text:
enough for the worker's counting and for resuming, meaningless as a vocabulary
id. The final delta's ``completion_tokens`` and ``prompt_tokens`` are the
upstream's usage figures when it sends them.

Resuming after a takeover (``resume_token_ids``): the chat API cannot continue
from given tokens, so the request is run again from the start and the first
``len(resume_token_ids)`` chunks are skipped (not emitted again); max_tokens
and stop strings then apply to the whole output as in an uninterrupted run.
This is exact only when the upstream regenerates the same tokens, i.e. with
temperature 0 or a fixed seed on a deterministic server. The skipped chunks'
checksums are compared with ``resume_token_ids`` and a divergence is logged (the
client then sees the old beginning followed by the new run's continuation).
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import AsyncIterator
from typing import Any

import httpx

from shared.settings import Settings
from worker.engines.base import Delta, Engine, EngineRequestError, FinishReason, GenerationRequest
from worker.engines.vllm_engine import StopMatcher  # pure Python; vllm itself is imported lazily there

log = logging.getLogger(__name__)

_RETRYABLE_4XX = {408, 429}


class UpstreamError(RuntimeError):
    """The upstream failed in a way that retrying may fix (5xx, dropped stream, …)."""


def chunk_token_id(text: str) -> int:
    """The pseudo token id of one streamed chunk (see the module doc)."""
    return zlib.crc32(text.encode("utf-8")) & 0x7FFFFFFF


def _error_message(body: bytes, status: int) -> tuple[str, str | None, str | None]:
    """(message, param, code) from the error bodies of OpenAI, vLLM, TGI, llama.cpp and FastAPI."""
    try:
        data = json.loads(body)
    except ValueError:
        text = body.decode("utf-8", "replace").strip()
        return text or f"upstream returned HTTP {status}", None, None
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            message = err.get("message") or err.get("detail") or err.get("error")
            if message is not None:
                code = err.get("code")
                return str(message), err.get("param"), str(code) if code is not None else None
        elif isinstance(err, str):
            return err, None, None
        detail = data.get("detail")
        if detail is not None:
            return detail if isinstance(detail, str) else json.dumps(detail), None, None
    return json.dumps(data)[:2000], None, None


def _error_code(message: str, code: str | None) -> str | None:
    lowered = message.lower()
    if "context length" in lowered or "context_length" in lowered or "maximum context" in lowered \
            or "too many tokens" in lowered or "input is too long" in lowered or "exceed_context" in lowered:
        return "context_length_exceeded"
    if code is not None and not code.isdigit():
        return code
    return None


class OpenAIUpstreamEngine(Engine):
    name = "openai"

    def __init__(self, settings: Settings):
        if not settings.upstream_url:
            raise ValueError("INFERENCE_ENGINE=openai needs UPSTREAM_URL (e.g. http://host:8000/v1)")
        self.settings = settings
        self.model = settings.served_model_name
        self.upstream_model = settings.upstream_model or settings.model
        self.max_batch_size = settings.max_batch_size
        self.max_model_len = settings.max_model_len
        self.base_url = settings.upstream_url.rstrip("/")
        self._client: httpx.AsyncClient | None = None
        self._running = 0

    # ── lifecycle ────────────────────────────────────────────────────────────
    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            headers = {"Accept": "text/event-stream"}
            if self.settings.upstream_api_key:
                headers["Authorization"] = f"Bearer {self.settings.upstream_api_key}"
            n = self.max_batch_size
            self._client = httpx.AsyncClient(
                base_url=self.base_url, headers=headers,
                limits=httpx.Limits(max_connections=n + 1, max_keepalive_connections=n + 1),  # +1: health checks
                # read: the upstream may queue us a while before the first token
                timeout=httpx.Timeout(connect=10.0, read=600.0, write=30.0, pool=60.0),
            )
        return self._client

    async def start(self) -> None:
        self._http()
        await self.check_health()
        log.info("openai engine: upstream %s, model %r, %d concurrent requests", self.base_url,
                 self.upstream_model, self.max_batch_size)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def check_health(self) -> None:
        r = await self._http().get("/models", timeout=10.0)
        if r.status_code != 200:
            raise UpstreamError(f"upstream {self.base_url}/models answered HTTP {r.status_code}: {r.text[:300]}")

    def num_running(self) -> int:
        return self._running

    # ── requests ─────────────────────────────────────────────────────────────
    def _body(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        p = request.params
        body: dict[str, Any] = {
            "model": self.upstream_model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
        }
        if p.seed is not None:
            body["seed"] = p.seed
        if p.stop:
            body["stop"] = list(p.stop)
        if request.messages is not None:
            return "/chat/completions", {**body, "messages": request.messages}
        if request.prompt is None:
            raise EngineRequestError("either messages or prompt is required", param="prompt")
        return "/completions", {**body, "prompt": request.prompt}

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        path, body = self._body(request)
        is_chat = request.messages is not None
        skip = list(request.resume_token_ids)
        if request.params.max_tokens <= len(skip):
            yield Delta("", [], "length", 0, len(skip))
            return
        # Stop strings are applied here too: some servers (transformers serve) stop
        # after a stop string but still send it.
        matcher = StopMatcher(request.params.stop)
        chunks = 0  # text chunks seen, skipped ones included
        diverged = False
        finish: FinishReason | None = None
        tail_text, tail_ids = "", list[int]()  # text arriving after the finish chunk
        usage: dict[str, Any] = {}
        self._running += 1
        try:
            async with self._http().stream("POST", path, json=body) as resp:
                if resp.status_code >= 400:
                    raw = await resp.aread()
                    message, param, code = _error_message(raw, resp.status_code)
                    if resp.status_code < 500 and resp.status_code not in _RETRYABLE_4XX:
                        raise EngineRequestError(message, param=param or ("messages" if is_chat else "prompt"),
                                                 code=_error_code(message, code))
                    raise UpstreamError(f"upstream HTTP {resp.status_code}: {message}")
                async for data in _sse_data(resp):
                    if data == "[DONE]":
                        break
                    try:
                        event = json.loads(data)
                    except ValueError:
                        raise UpstreamError(f"upstream sent invalid JSON: {data[:200]!r}") from None
                    if "error" in event:
                        message, _, _ = _error_message(json.dumps(event).encode(), 500)
                        raise UpstreamError(f"upstream error mid-stream: {message}")
                    if event.get("usage"):
                        usage = event["usage"]
                    for choice in event.get("choices") or []:
                        if choice.get("index", 0) != 0:
                            continue
                        text = (choice.get("delta") or {}).get("content") if is_chat else choice.get("text")
                        if text and not matcher.stopped:
                            ids = [chunk_token_id(text)]
                            chunks += 1
                            out = matcher.feed(text)
                            if chunks <= len(skip):  # delivered by the earlier attempt
                                if not diverged and skip[chunks - 1] != ids[0]:
                                    diverged = True
                                    log.warning("request %s: the re-run diverges from the resumed output at "
                                                "token %d (sampling is not deterministic upstream)",
                                                request.id, chunks)
                                out = ""
                            if matcher.stopped:
                                tail_text, tail_ids = tail_text + out, tail_ids + ids
                                finish = "stop"
                                break
                            if finish is None:
                                if chunks > len(skip):
                                    yield Delta(out, ids, None, 0, chunks)
                            else:
                                tail_text, tail_ids = tail_text + out, tail_ids + ids
                        reason = choice.get("finish_reason")
                        if reason and finish is None:
                            finish = "length" if reason == "length" else (
                                "cancelled" if reason in ("abort", "cancelled") else "stop")
                    if matcher.stopped:
                        break  # closes the response: the upstream stops generating
            if finish is None:
                raise UpstreamError("the upstream stream ended without a finish_reason")
            if not matcher.stopped:
                tail_text += matcher.flush()
            completion = chunks if matcher.stopped else max(int(usage.get("completion_tokens") or 0), chunks)
            final = Delta(tail_text, tail_ids, finish, int(usage.get("prompt_tokens") or 0), completion)
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream {self.base_url}{path}: {type(exc).__name__}: {exc}") from exc
        finally:
            self._running -= 1
        yield final


async def _sse_data(resp: httpx.Response) -> AsyncIterator[str]:
    """The ``data`` payloads of a server-sent event stream (multi-line data joined by newlines)."""
    lines: list[str] = []
    async for line in resp.aiter_lines():
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if field == "data":
            lines.append(value[1:] if value.startswith(" ") else value)
    if lines:
        yield "\n".join(lines)


__all__ = ["OpenAIUpstreamEngine", "UpstreamError", "chunk_token_id"]
