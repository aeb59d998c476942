"""Inference engines behind one contract (see base.py); built by name."""

from __future__ import annotations

from shared.settings import Settings
from worker.engines.base import Engine


def build_engine(settings: Settings) -> Engine:
    """Import lazily: the vllm and torch stacks are heavy and optional."""
    name = settings.inference_engine
    if name == "synthetic":
        from worker.engines.synthetic import SyntheticEngine

        return SyntheticEngine(settings)
    if name == "transformers":
        from worker.engines.hf import TransformersEngine

        return TransformersEngine(settings)
    if name == "vllm":
        from worker.engines.vllm_engine import VllmEngine

        return VllmEngine(settings)
    if name == "openai":
        from worker.engines.openai_engine import OpenAIUpstreamEngine

        return OpenAIUpstreamEngine(settings)
    raise ValueError(f"unknown INFERENCE_ENGINE {name!r}")
