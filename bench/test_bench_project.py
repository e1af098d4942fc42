"""pytest-benchmark microbenchmarks of one projection call.

    pytest bench/                                   # CPU (and CUDA when present)
    pytest bench/ --benchmark-only --benchmark-columns=median,iqr,rounds
    AGEM_BENCH_WORKLOADS=resnet18,vit_b_16,gpt2 AGEM_BENCH_DTYPES=fp32,bf16 pytest bench/

The normal test suite (`pytest`, testpaths = tests) does not collect these.
Each round: gradients restored from a saved copy and the cache flushed in
pytest-benchmark's `setup` (untimed), then one call timed. On CUDA the target ends
with torch.cuda.synchronize() (pytest-benchmark times on the host); `python -m
bench.run` is the CUDA-event timing with the full table.

Environment: AGEM_BENCH_WORKLOADS (default resnet18,tiny5000), AGEM_BENCH_DTYPES
(default fp32), AGEM_BENCH_DEVICES (default cpu, plus cuda when available),
AGEM_BENCH_ROUNDS (default 5).
"""

from __future__ import annotations

import os

import pytest
import torch

from bench import harness


def _env_list(name, default):
    return [x.strip() for x in os.environ.get(name, default).split(",") if x.strip()]


WORKLOADS = _env_list("AGEM_BENCH_WORKLOADS", "resnet18,tiny5000")
DTYPES = _env_list("AGEM_BENCH_DTYPES", "fp32")
DEVICES = _env_list("AGEM_BENCH_DEVICES", "cpu,cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = int(os.environ.get("AGEM_BENCH_ROUNDS", "5"))

_CACHE: dict = {}


def _workload(device, name, dtype_name):
    """One Workload alive at a time (the big ones do not fit many times over)."""
    key = (device, name, dtype_name)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = harness.Workload(name, harness.DTYPES[dtype_name], device, nsets=1)
    return _CACHE[key]


_FLUSH: dict = {}


def _flusher(device):
    if device not in _FLUSH:
        _FLUSH[device] = harness.Flusher(torch.device(device))
    return _FLUSH[device]


@pytest.mark.parametrize("impl_name", harness.IMPLS)
@pytest.mark.parametrize("projecting", [True, False], ids=["proj", "noproj"])
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("device", DEVICES)
def test_project(benchmark, device, workload, dtype_name, projecting, impl_name):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    wl = _workload(device, workload, dtype_name)
    wl.set_case(projecting)
    impl = harness.make_impl(impl_name, wl)
    if impl.skip:
        pytest.skip(impl.skip)
    dev = wl.device
    flush = _flusher(device)
    benchmark.group = f"{device} {workload} {dtype_name} {'proj' if projecting else 'noproj'}"
    benchmark.extra_info.update(
        backend=impl.backend, numel=wl.numel, bytes_per_param=harness.bytes_per_param(wl.dtype, projecting)
    )

    def setup():
        impl.restore(0)
        flush()
        harness.sync(dev)

    def target():
        impl.call(0)
        harness.sync(dev)

    try:
        with harness.backend_env(impl.env):
            result = harness.check_and_peak(impl)
            assert result["check_ok"] is not False, f"rel. error {result['rel_err']:.3g} vs float64"
            benchmark.extra_info["peak_extra_bytes"] = result["peak_extra_bytes"]
            benchmark.pedantic(target, setup=setup, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    finally:
        impl.release()
        wl.set_case(True)
    median = benchmark.stats.stats.median if benchmark.stats else None
    if median:
        benchmark.extra_info["gbps"] = wl.numel * harness.bytes_per_param(wl.dtype, projecting) / median / 1e9
