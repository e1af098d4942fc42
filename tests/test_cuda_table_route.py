"""The two ways the CUDA kernels get their tensor table: inside the kernels' parameters
for tables of up to 96 entries, 512 in a CUDA 13 build ("inline", the default), or
copied up from pinned memory ("upload", AGEM_FAST_CUDA_TABLE=upload). The kernels' bodies are shared, so
both routes must give the same bits; the inline route must copy nothing from the host.
The switch itself is checked wherever the extension was built with its CUDA kernels;
the rest needs a GPU."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

import agem_fast
from oracle import check_call, oracle

SMALL, LARGE = 96, 512  # csrc/cuda/agem_cuda.cu kInlineSmall, kInlineLarge (CUDA 13 builds)


@pytest.fixture
def module():
    from agem_fast import _extension

    if not _extension.supports("cpu"):
        pytest.skip("extension unavailable")
    mod = _extension.load()
    if not hasattr(mod, "_set_cuda_table_route"):
        pytest.skip("extension built without its CUDA kernels")
    return mod


@contextlib.contextmanager
def route(mod, name):
    old = mod._cuda_table_route()
    mod._set_cuda_table_route(name)
    try:
        yield
    finally:
        mod._set_cuda_table_route(old)


def test_inline_table_sizes(module):
    sizes = module._cuda_inline_table_sizes()
    assert sizes in ([SMALL], [SMALL, LARGE])
    cuda_major = int(torch.version.cuda.split(".")[0])
    assert (LARGE in sizes) == (cuda_major >= 13)  # the toolkit matches torch's CUDA (the build checks)


def test_route_switch_and_a_bad_name(module):
    old = module._cuda_table_route()
    assert old in ("upload", "inline")
    with route(module, "inline"):
        assert module._cuda_table_route() == "inline"
        with pytest.raises(ValueError, match="'upload' or 'inline'.*'shared'"):
            module._set_cuda_table_route("shared")
        assert module._cuda_table_route() == "inline"  # a bad name changes nothing
    assert module._cuda_table_route() == old


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs on every CPU CI run; GPU time is scarce")
@pytest.mark.parametrize("value, expected", [(" Inline\n", "inline"), ("upload", "upload"), ("", "inline"),
                                             ("bogus", "ValueError")])
def test_environment_sets_the_first_route(module, value, expected):
    code = (
        "from agem_fast import _extension\n"
        "mod = _extension.load()\n"
        "try:\n"
        "    print(mod._cuda_table_route())\n"
        "except ValueError as e:\n"
        "    print('ValueError', e)\n"
    )
    env = dict(os.environ, AGEM_FAST_CUDA_TABLE=value)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == expected, out.stdout
    if expected == "ValueError":
        assert "AGEM_FAST_CUDA_TABLE must be 'upload' or 'inline', got 'bogus'" in out.stdout


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _problem(n, project, seed, holes=True):
    """n parameters of mixed dtypes and sizes (some over a chunk), g steered so that the
    global dot has the wanted sign. With `holes`, every 7th grad is None (its reference
    still an entry of the table) and every 11th reference None (no entry); without,
    the table has exactly n entries."""
    gen = torch.Generator().manual_seed(seed)
    dev = torch.device("cuda")
    params, refs = [], []
    for i in range(n):
        dt = DTYPES[i % len(DTYPES)]
        size = int(torch.randint(1, 40_000 if i % 5 == 0 else 300, (), generator=gen))
        p = torch.empty(size, dtype=dt, device=dev)
        r = None if holes and i % 11 == 3 else torch.randn(size, generator=gen).to(dt).to(dev)
        if not (holes and i % 7 == 5):
            g = torch.randn(size, generator=gen).to(dt).to(dev)
            if r is not None:
                g.add_(r, alpha=-0.8 if project else 0.8)
            p.grad = g
        params.append(p)
        refs.append(r)
    return params, refs


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _run(mod, name, params, refs):
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    copies = [torch.empty_like(p) for p in params]
    for c, g in zip(copies, grads):
        c.grad = g
    with route(mod, name):
        res = agem_fast.project_(copies, refs)
    torch.cuda.synchronize()
    return [c.grad for c in copies], res


@cuda
@pytest.mark.parametrize("n, holes", [(1, False), (40, True), (SMALL, False), (SMALL + 1, False), (300, True),
                                      (LARGE, False), (LARGE + 1, False)])
@pytest.mark.parametrize("project", [True, False])
def test_both_routes_give_the_same_bits(module, monkeypatch, n, holes, project):
    """(Past the largest inline size "inline" falls back to the upload: the same code,
    checked as such; the next test checks which kernels run.)"""
    monkeypatch.setenv("AGEM_FAST_BACKEND", "extension")
    params, refs = _problem(n, project, seed=n, holes=holes)
    up_grads, up = _run(module, "upload", params, refs)
    in_grads, inl = _run(module, "inline", params, refs)
    assert bool(up.projected) == project
    for a, b in zip(up, inl):
        assert torch.equal(_bits(a.view(1)), _bits(b.view(1))) if a.dtype != torch.bool else torch.equal(a, b)
    for a, b in zip(up_grads, in_grads):
        assert (a is None) == (b is None)
        assert a is None or torch.equal(_bits(a), _bits(b))
    before = [None if p.grad is None else p.grad.clone() for p in params]  # and right, not only alike
    check_call(inl, oracle(before, refs), in_grads, before, torch.device("cuda"))


def _profiled(fn):
    """(host-to-device copies, inline-route kernels) that fn ran on the GPU."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return (sum("HtoD" in n for n in names),
            sum("reduce_kernel_inline" in n or "update_kernel_inline" in n for n in names))


@cuda
def test_inline_route_copies_no_table_from_the_host(module, monkeypatch):
    monkeypatch.setenv("AGEM_FAST_BACKEND", "extension")
    sizes = module._cuda_inline_table_sizes()
    # tables of exactly each inline size (and one entry more, which takes the next size)
    problems = [_problem(n, True, seed=n, holes=False) for k in sizes for n in (k, k + 1)]
    with route(module, "inline"):
        for ps, rs in problems:
            agem_fast.project_(ps, rs)  # warm-up (and occupancy queries), outside the profiles
        for ps, rs in problems:
            fits = len(ps) <= sizes[-1]
            assert _profiled(lambda: agem_fast.project_(ps, rs)) == ((0, 2) if fits else (1, 0)), len(ps)
    with route(module, "upload"):
        ps, rs = problems[0]
        assert _profiled(lambda: agem_fast.project_(ps, rs)) == (1, 0)


@cuda
def test_inline_route_on_a_side_stream_and_in_a_graph(module, monkeypatch):
    monkeypatch.setenv("AGEM_FAST_BACKEND", "extension")
    params, refs = _problem(12, True, seed=3)
    saved = [None if p.grad is None else p.grad.clone() for p in params]
    expected, _ = _run(module, "upload", params, refs)
    side = torch.cuda.Stream()
    with route(module, "inline"):
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            agem_fast.project_(params, refs)
        torch.cuda.current_stream().wait_stream(side)
        for p, e in zip(params, expected):
            assert (p.grad is None) == (e is None) and (e is None or torch.equal(p.grad, e))

        graph = torch.cuda.CUDAGraph()
        for p, s in zip(params, saved):
            if s is not None:
                p.grad.copy_(s)
        agem_fast.project_(params, refs)  # warm-up outside the capture
        with torch.cuda.graph(graph):
            agem_fast.project_(params, refs)
        for _ in range(3):  # each replay from the saved gradients gives the same bits
            for p, s in zip(params, saved):
                if s is not None:
                    p.grad.copy_(s)
            graph.replay()
            torch.cuda.synchronize()
            for p, e in zip(params, expected):
                assert e is None or torch.equal(p.grad, e)
