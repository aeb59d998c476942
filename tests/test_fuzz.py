"""Fuzz the live API from its own OpenAPI schema (schemathesis): no 5xx, no hang."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_schemathesis_finds_no_server_error_and_no_hang(make_stack):
    stack = make_stack()
    stack.worker(synthetic_tokens_per_second="0", max_batch_size="16")
    url = stack.api(api_keys="fuzz-key", max_tokens_cap="64", stream_validation_wait="0.5")
    st = Path(sys.executable).with_name("st")
    result = subprocess.run(
        [str(st), "run", f"{url}/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", "25", "--request-timeout", "20", "--generation-deterministic",
         "-H", "Authorization: Bearer fuzz-key", "--suppress-health-check", "all", "--no-color"],
        capture_output=True, text=True, timeout=600)
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert "No issues found" in report or "passed" in report, report
