"""bench/torch_backend_ops.py counts the torch backend's GPU-path ops on meta tensors."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for bench/
from bench import torch_backend_ops  # noqa: E402


@pytest.mark.parametrize("form", ["flat", "list"])
def test_counts_ops_on_meta_tensors(form, monkeypatch):
    monkeypatch.setenv("AGEM_FAST_BACKEND", "torch")
    tiny = torch_backend_ops.count("tiny5000", torch.float32, form)
    assert tiny["tensors"] == 5000 and 0 < tiny["ops"] < 30  # one group: no op per tensor
    resnet = torch_backend_ops.count("resnet18", torch.bfloat16, form)
    assert resnet["tensors"] == 62 and tiny["ops"] < resnet["ops"] < 3 * 62


def test_main_prints_a_row_per_workload_and_dtype(capsys, monkeypatch):
    monkeypatch.setenv("AGEM_FAST_BACKEND", "torch")
    torch_backend_ops.main(["--dtypes", "fp32"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "fp32" in line]
    assert len(rows) == 5
