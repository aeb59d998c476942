"""End to end on the real model: SmolLM2-135M-Instruct behind API + worker + Redis, via the openai client."""

from __future__ import annotations

import pytest

from tests import e2e_checks

pytestmark = [pytest.mark.model, pytest.mark.slow]


@pytest.fixture
def model_stack(make_stack):
    stack = make_stack()
    stack.worker("hf", inference_engine="transformers", wait=240, max_batch_size="8")
    return stack, stack.api()


async def test_real_model_streams_and_answers(model_stack):
    _, url = model_stack
    await e2e_checks.streams_and_answers(e2e_checks.client(url))


async def test_real_model_concurrent_greedy_requests_match_sequential(model_stack):
    """Batching must not change greedy output."""
    _, url = model_stack
    await e2e_checks.batching_keeps_greedy_output(e2e_checks.client(url))


async def test_real_model_context_overflow_is_a_400(model_stack):
    _, url = model_stack
    await e2e_checks.context_overflow_is_a_400(e2e_checks.client(url, timeout=60))
