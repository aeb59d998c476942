"""The engine contract: the only thing the worker loop knows of an inference engine.

An engine takes requests, batches them as it likes (continuous batching is its
job) and yields per-request deltas. Cancelling or closing the async iterator that
``generate`` returns aborts the request and frees its batch slot at once.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class GenerationRequest:
    """One generation, as the worker hands it to an engine.

    Exactly one of ``messages`` (chat: the engine applies its chat template) and
    ``prompt`` (completion: text or token ids) is set.

    ``resume_token_ids`` are tokens already delivered to the client by an
    earlier attempt (a worker died mid-generation). The engine continues after
    them: they count toward ``max_tokens`` and stop checks, and their text is
    not emitted again.
    """

    id: str
    params: SamplingParams
    messages: list[dict[str, Any]] | None = None
    prompt: str | list[int] | None = None
    resume_token_ids: list[int] = field(default_factory=list)


FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class Delta:
    """What one engine step produced for one request."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # cumulative, including resume_token_ids


class EngineRequestError(ValueError):
    """The request cannot run on this engine (prompt too long, bad token ids…).

    Reported to the client as a 400 with this message; never retried.
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class Engine(abc.ABC):
    name: str = "base"
    model: str = ""  # the model name the engine serves
    max_batch_size: int = 1
    max_model_len: int = 2048  # context window, prompt + output

    async def start(self) -> None:
        """Load weights, warm up. Called once before any request."""

    async def close(self) -> None:
        """Release resources."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Yield deltas until one carries a finish_reason."""

    async def check_health(self) -> None:
        """Raise if the engine cannot serve."""

    def num_running(self) -> int:
        return 0


# A burst of requests reaches an engine over a few milliseconds (each is enqueued, read and
# tokenized in turn). An idle engine that prefilled the first alone would make the rest wait a
# whole step for it; so it waits while requests keep arriving this close together ...
BURST_GAP_S = 0.003
BURST_MAX_S = 0.020  # ... for at most this long. A lone request pays BURST_GAP_S.


def cpu_has_native_bf16() -> bool:
    """The CPU does bfloat16 dot products natively (AVX512-BF16 or AMX): bf16 math then pays off."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
