"""Tests that need vLLM: run inside .venv-vllm (`make test-vllm`).

Collected only where vLLM is importable, so a plain `pytest tests` in the main
venv skips the directory instead of failing on imports.
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator

import pytest

if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_*.py"]

BATCH = 4
MAX_MODEL_LEN = 512


@pytest.fixture(scope="session")
async def vllm_engine() -> AsyncIterator[object]:
    """One in-process vLLM engine on the real SmolLM2 for the whole session (~40 s to start)."""
    from shared.settings import Settings
    from worker.engines.vllm_engine import VllmEngine

    # float32: these tests compare outputs token for token (batched vs alone, resumed vs uninterrupted);
    # vLLM in bfloat16, its default on CPUs with native bf16, is not batch-invariant.
    engine = VllmEngine(Settings(inference_engine="vllm", max_batch_size=BATCH, max_model_len=MAX_MODEL_LEN,
                                 dtype="float32"))
    await engine.start()
    yield engine
    await engine.close()
