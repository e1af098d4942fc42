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


def _evt(name, start, end, device="cpu", cpu_total=0.0, self_total=0.0, device_total=0.0):
    from types import SimpleNamespace

    kind = torch.autograd.DeviceType.CUDA if device == "cuda" else torch.autograd.DeviceType.CPU
    return SimpleNamespace(name=name, device_type=kind, time_range=SimpleNamespace(start=start, end=end),
                           cpu_time_total=cpu_total, self_cpu_time_total=self_total,
                           device_time_total=device_total)


def test_attribute_counts_the_measured_call_alone():
    """The warm-up call of the same profiler session, and the restore/flush work between
    them, must not be charged to the call (the session's first CUDA runtime call carries
    the profiler's own start-up)."""
    events = [
        _evt("warm-up", 0, 300, cpu_total=300, self_total=10),
        _evt("cudaMemsetAsync", 5, 285, cpu_total=280),  # the session's first runtime call
        _evt("cudaLaunchKernel", 290, 295, cpu_total=5),
        _evt("reduce_kernel", 310, 340, device="cuda", device_total=30),  # the warm-up's
        _evt("aten::copy_", 400, 410, cpu_total=10),  # restore, between the two calls
        _evt("fill_kernel", 412, 450, device="cuda", device_total=38),
        _evt("call", 500, 560, cpu_total=60, self_total=40),
        _evt("aten::empty", 505, 507, cpu_total=2),
        _evt("aten::empty", 508, 509, cpu_total=1),
        _evt("cudaMemsetAsync", 510, 513, cpu_total=3),
        _evt("cudaLaunchKernel", 520, 524, cpu_total=4),
        _evt("cudaLaunchKernel", 530, 533, cpu_total=3),
        _evt("cudaDeviceSynchronize", 570, 600, cpu_total=30),  # after the call
        _evt("reduce_kernel", 530, 560, device="cuda", device_total=30),
        _evt("update_kernel", 561, 600, device="cuda", device_total=39),
    ]
    dev, hst = gpu_profile.attribute(events)
    assert dev == {"reduce_kernel": (30, 1), "update_kernel": (39, 1)}
    assert hst == {"the whole call": (60, 1), "the call's own code (no profiled child)": (40, 1),
                   "aten::empty": (3, 2), "cudaMemsetAsync": (3, 1), "cudaLaunchKernel": (7, 2)}


def test_attribute_wants_exactly_one_measured_range():
    with pytest.raises(ValueError, match="expected one 'call' range.*found 0"):
        gpu_profile.attribute([_evt("warm-up", 0, 10)])


def test_attribute_reads_a_real_cpu_profile():
    """The event fields it reads exist on torch.profiler's events (CPU only here)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for label in ("warm-up", "call"):
            with torch.profiler.record_function(label):
                torch.ones(3).add_(1)
    dev, hst = gpu_profile.attribute(prof.events())
    assert dev == {}
    assert hst["aten::add_"][1] == 1 and hst["aten::ones"][1] == 1  # the call's, not the warm-up's
    assert hst["the whole call"][0] >= hst["aten::add_"][0] > 0
