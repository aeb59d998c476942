"""How many cores the transformers engine plans for: affinity, capped by a container's CPU quota."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("torch")

from worker.engines.hf import _cores


def test_a_cgroup_quota_caps_the_cores(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    limit = tmp_path / "cpu.max"
    limit.write_text("150000 100000\n")  # 1.5 CPUs: two threads can use it
    assert _cores(limit) == min(affinity, 2)
    limit.write_text("50000 100000\n")
    assert _cores(limit) == 1
    limit.write_text("max 100000\n")  # no limit
    assert _cores(limit) == affinity
    assert _cores(tmp_path / "absent") == affinity  # cgroup v1 or not Linux
