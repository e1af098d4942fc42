"""bench/report.py's target verdicts: 'met' only when every run meets the target."""

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for bench/
from bench import report  # noqa: E402


def _result(x_floor_runs):
    row = {"device": "cpu", "workload": "resnet18", "dtype": "fp32", "projecting": True, "impl": "torch",
           "runs": [{"median_s": 1.0, "x_floor": v} for v in x_floor_runs]}
    return {"device_type": "cpu", "rows": [row]}


def _torch_resnet_line(result):
    return next(line for line in report.targets(result) if line.startswith("- torch backend vs floor, resnet18"))


@pytest.mark.parametrize("sides, verdict", [
    ((-1, -1), "met"),
    ((-1, +1), "met in one run only"),
    ((+1, -1), "met in one run only"),
    ((+1, +1), "not met"),
])
def test_verdict_needs_every_run(sides, verdict):
    bound = float(re.search(r"target ≤ ([0-9.]+)", _torch_resnet_line(_result([1.0]))).group(1))
    line = _torch_resnet_line(_result([bound * (1 + 0.1 * s) for s in sides]))
    assert line.endswith(f"→ {verdict}"), line
