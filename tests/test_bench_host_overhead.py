"""bench/host_overhead.py runs: every reference form timed through project_ and the fast path."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for bench/
from bench import host_overhead  # noqa: E402
from agem_fast import _extension  # noqa: E402


def test_times_every_reference_form():
    if getattr(_extension.load(), "project_plain", None) is None:
        pytest.skip("no extension")
    got = host_overhead.measure(3, "cpu", calls=5, reps=2)
    assert set(got) == {"list", "flat", "ReferenceGradient"}
    assert all(total > 0 and plain > 0 for total, plain, _ in got.values())
