"""bench/fixed_cost.py recovers the fixed and streaming parts of a call's time."""

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for bench/
from bench import fixed_cost  # noqa: E402


def _row(workload, numel, impl, seconds, projecting=True, dtype="fp32"):
    runs = [{"median_s": seconds * (1 + d)} for d in (-0.01, 0.01)]  # median of the runs: seconds
    return {"workload": workload, "numel": numel, "bytes_per_param": 20 if projecting else 8,
            "dtype": dtype, "projecting": projecting, "impl": impl, "runs": runs}


def test_fit_recovers_fixed_and_streaming_parts():
    rng = random.Random(4)
    for _ in range(20):
        f, b = rng.uniform(1e-6, 1e-3), rng.uniform(1e9, 5e12)
        sizes = [rng.uniform(1e6, 1e10) for _ in range(rng.randint(2, 5))]
        got_f, got_b = fixed_cost.fit([(x, f + x / b) for x in sizes])
        assert got_f == pytest.approx(f, rel=1e-6, abs=1e-12)
        assert got_b == pytest.approx(b, rel=1e-6)


def test_fit_needs_two_sizes():
    with pytest.raises(ValueError, match="two different sizes"):
        fixed_cost.fit([(1e6, 1e-3), (1e6, 2e-3)])


def test_fixed_costs_per_impl_and_case_from_the_chosen_workloads():
    sizes = {"resnet18": 11_689_512, "vit_b_16": 86_567_656, "gpt2": 124_439_808, "tiny5000": 500_000}
    truth = {("extension", True): (80e-6, 4e12), ("floor", True): (35e-6, 3.5e12),
             ("extension", False): (70e-6, 4.2e12)}
    rows = []
    for (impl, proj), (f, b) in truth.items():
        for w, n in sizes.items():
            t = f + n * (20 if proj else 8) / b
            rows.append(_row(w, n, impl, t * (5 if w == "tiny5000" else 1), projecting=proj))
    got = fixed_cost.fixed_costs({"rows": rows})  # tiny5000 (made 5x slower) is left out
    assert set(got) == {("fp32", proj, impl) for impl, proj in truth}
    for (impl, proj), (f, b) in truth.items():
        v = got[("fp32", proj, impl)]
        assert v["n"] == 3
        assert v["F"] == pytest.approx(f, rel=1e-3)
        assert v["B"] == pytest.approx(b, rel=1e-3)
        assert v["max_residual"] < 1e-9
    text = fixed_cost.table({"device_name": "X", "rows": rows})
    assert "| fp32 | proj | extension | 80.0 | 4000 | 0.0 |" in text


def test_residual_shows_a_point_off_the_line():
    sizes = {"resnet18": 11_689_512, "vit_b_16": 86_567_656, "gpt2": 124_439_808, "llama_1b": 1_100_048_384}
    rows = [_row(w, n, "floor", 35e-6 + n * 20 / 4e12 + (30e-6 if w == "vit_b_16" else 0.0))
            for w, n in sizes.items()]
    v = fixed_cost.fixed_costs({"rows": rows}, workloads=tuple(sizes))[("fp32", True, "floor")]
    assert v["n"] == 4 and v["max_residual"] > 10e-6
