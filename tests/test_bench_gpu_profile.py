"""bench/gpu_profile.py: its rate column, its refusal without a GPU, and (on a GPU) a
short run, so that the profile stage of a rare GPU session does not break."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for bench/
from bench import gpu_profile  # noqa: E402


def test_rate_counts_gb_per_s_and_share_of_copy_bandwidth():
    assert gpu_profile.rate(2_000_000_000, 0.5e-3, 8000.0).split() == ["4000", "GB/s", "50%"]
    assert gpu_profile.rate(3_000_000, 1e-6, 4000.0).split() == ["3000", "GB/s", "75%"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU case runs instead")
def test_refuses_without_a_gpu(capsys):
    assert gpu_profile.main(["--calls", "1"]) == 1
    assert "no CUDA device" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_short_profile_on_cuda(capsys):
    assert gpu_profile.main(["--workloads", "resnet18", "--dtypes", "fp32", "--calls", "2"]) == 0
    out = capsys.readouterr().out
    assert "device-to-device copy:" in out
    for row in ("ext upload", "ext inline", "floor"):
        line = next(l for l in out.splitlines() if l.strip().startswith(row))
        assert "GB/s" in line and "busy" in line, line
