"""The extension's C++ fast path (csrc/agem_python.cpp, `_extension.project_plain`).

Plain valid calls run entirely in C++; anything else must be declined (None) with
nothing written, leaving errors and odd layouts to the Python planner. So:
- every bad input of test_validation is declined and changes nothing;
- valid calls the planner handles by staging (non-contiguous grads, reshapes) are declined;
- plain calls (list, flat and ReferenceGradient forms, None patterns, mixed dtypes,
  channels_last pairs) are taken, and give bitwise the planner's result, which the
  rest of the suite checks against the float64 oracle.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
import torch

import agem_fast
import test_validation as V
from agem_fast import _extension
from agem_fast._api import _project_planned
from oracle import assert_bit_identical, bits, check_call, oracle


@pytest.fixture
def fast(device):
    if not _extension.supports(device.type):
        msg = f"agem_fast extension has no kernels for {device.type}"
        if os.environ.get("AGEM_FAST_STRICT") == "1":
            pytest.fail(msg + " (AGEM_FAST_STRICT=1)")
        pytest.skip(msg)
    return _extension.project_plain


def _fast_refs(ref_arg):
    """What project_ hands to the fast path for each ref_grad form."""
    if isinstance(ref_arg, agem_fast.ReferenceGradient):
        return ref_arg.as_list()
    return list(ref_arg) if isinstance(ref_arg, tuple) else ref_arg


# eps and group= are checked in Python before the fast path is tried (which group= skips):
# those cases never reach it.
BAD_CASES = sorted(name for name in V.CASES if not name.startswith(("eps_", "group_")))


@pytest.mark.parametrize("name", BAD_CASES)
def test_declines_every_bad_input_and_writes_nothing(name, device, fast):
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    params, refs = V.valid_problem(device)
    params, ref_arg, _, _ = V.CASES[name](list(params), list(refs), device, gen)
    grads = [p.grad if isinstance(p, torch.Tensor) else None for p in params]
    before = [None if g is None or g.layout != torch.strided or g.device.type == "meta" else g.clone()
              for g in grads]
    assert fast(params, _fast_refs(ref_arg), 0.0) is None, f"fast path accepted bad input {name!r}"
    for i, (p, g, b) in enumerate(zip(params, grads, before)):
        if b is not None:
            assert p.grad is g
            assert_bit_identical(p.grad, b, f"params[{i}].grad")


def _problem(device, shapes, dtypes, seed, *, memory_format=None):
    gen = torch.Generator().manual_seed(seed)
    params, refs = [], []
    for s, dt in zip(shapes, dtypes):
        r = torch.randn(s, generator=gen, dtype=torch.float64)
        g = -r + 0.3 * torch.randn(s, generator=gen, dtype=torch.float64)
        p = torch.zeros(s, dtype=dt, device=device)
        p.grad = g.to(device=device, dtype=dt)
        r = r.to(device=device, dtype=dt)
        if memory_format is not None and len(s) == 4:
            p.grad = p.grad.contiguous(memory_format=memory_format)
            r = r.contiguous(memory_format=memory_format)
        params.append(p)
        refs.append(r)
    return params, refs


SHAPES = [(64, 3, 7, 7), (64,), (1000, 512), (5,), (0,), (3, 4, 5, 6), (20001,)]


def _plain_cases(device, seed):
    """(name, params, ref_arg) for calls the fast path must take."""
    f32 = [torch.float32] * len(SHAPES)
    mixed = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float32,
             torch.float16, torch.float64]
    params, refs = _problem(device, SHAPES, f32, seed)
    yield "list", params, refs
    params, refs = _problem(device, SHAPES, f32, seed)
    yield "tuple", params, tuple(refs)
    params, refs = _problem(device, SHAPES, f32, seed)
    yield "flat", params, torch.cat([r.reshape(-1) for r in refs])
    params, refs = _problem(device, SHAPES, mixed, seed)
    yield "mixed dtypes", params, refs
    params, refs = _problem(device, SHAPES, f32, seed, memory_format=torch.channels_last)
    yield "channels_last pairs", params, refs
    params, refs = _problem(device, SHAPES, f32, seed)
    params[1].grad = None  # reference-only entry
    refs[3] = None  # gradient left alone
    yield "None on either side", params, refs
    params, refs = _problem(device, SHAPES, f32, seed)
    ref = agem_fast.ReferenceGradient(params).capture_([_with_grad(p, r) for p, r in zip(params, refs)])
    yield "ReferenceGradient", params, ref


def _with_grad(p, g):
    q = torch.zeros_like(p)
    q.grad = g
    return q


@pytest.mark.parametrize("case", range(7))
def test_takes_plain_calls_with_the_planners_result(case, device, fast):
    name, params, ref_arg = list(_plain_cases(device, seed=case))[case]
    if isinstance(ref_arg, agem_fast.ReferenceGradient):
        ref_list = ref_arg.as_list()
    elif isinstance(ref_arg, torch.Tensor):
        ref_list = list(ref_arg.split([p.numel() for p in params]))
    else:
        ref_list = list(ref_arg)
    orc = oracle([p.grad for p in params], ref_list)
    assert orc.projected, "the case must project, or it checks little"
    twins = [torch.zeros_like(p) for p in params]
    for t, p in zip(twins, params):
        t.grad = None if p.grad is None else p.grad.clone(memory_format=torch.preserve_format)
    versions = [None if p.grad is None else p.grad._version for p in params]
    before = [None if t.grad is None else t.grad.clone() for t in twins]

    res = fast(params, _fast_refs(ref_arg), 0.0)
    assert res is not None, f"fast path declined a plain call ({name})"
    with torch.no_grad():
        planned = _project_planned(twins, ref_arg, 0.0, None)

    for a, b, what in zip(res, planned, ("dot", "rr", "coef", "projected")):
        assert_bit_identical(a, b, f"{name}: {what}")
    for i, (p, t) in enumerate(zip(params, twins)):
        if p.grad is not None:
            assert_bit_identical(p.grad, t.grad, f"{name}: params[{i}].grad")
            assert p.grad.stride() == t.grad.stride()
            if ref_list[i] is not None:  # updated in place: autograd must be able to tell
                assert p.grad._version > versions[i], f"{name}: params[{i}].grad version not bumped"
    # right, not only equal to the planner's result (which runs the same kernels)
    check_call(agem_fast.Projection(*res), orc, [p.grad for p in params], before, device)


def _declined_cases(device):
    """Valid calls that need the planner (staging or a reshape): the fast path declines."""
    params, refs = _problem(device, [(6, 5), (4, 4)], [torch.float32] * 2, 0)
    params[0].grad = params[0].grad.t().contiguous().t()  # column-major grad, row-major ref
    yield "pair in different memory orders", params, refs
    params, refs = _problem(device, [(6, 5), (4, 4)], [torch.float32] * 2, 0)
    params[0].grad = torch.zeros(6, 10, device=device)[:, ::2]  # gaps: staged by the planner
    yield "grad with gaps", params, refs
    params, refs = _problem(device, [(6, 5), (4, 4)], [torch.float32] * 2, 0)
    flat = torch.cat([r.reshape(-1) for r in refs])
    yield "flat with a stride", params, torch.stack([flat, flat], 1)[:, 0]
    params, refs = _problem(device, [(6, 5), (4, 4)], [torch.float32] * 2, 0)
    yield "generator of refs", params, (r for r in refs)
    yield "no tensors at all", [], []
    params, refs = _problem("meta", [(6, 5), (4, 4)], [torch.float32] * 2, 0)
    yield "a device without kernels (meta)", params, refs


@pytest.mark.parametrize("case", range(6))
def test_declines_what_the_planner_must_stage(case, device, fast):
    name, params, ref_arg = list(_declined_cases(device))[case]
    before = [None if p.grad.is_meta else bits(p.grad) for p in params]
    assert fast(params, ref_arg, 0.0) is None, f"fast path took {name!r}"
    for p, b in zip(params, before):
        if b is not None:
            assert torch.equal(bits(p.grad), b)


@pytest.mark.parametrize("layout", ["channels_last", "column-major"])
def test_flat_reference_pairs_dense_reordered_grads_in_logical_order(layout, device, fast):
    """A flat reference is Avalanche's layout: each parameter's slice is row-major. A grad
    that is dense but stored in another order (channels_last, column-major) must meet it
    element for element in logical order, whether the fast path takes the call or
    declines it to the planner. The random suite rarely gets here: one gapped grad, or a
    gapped flat reference, anywhere in a case makes the fast path decline the whole call."""
    params, refs = _problem(device, SHAPES, [torch.float32] * len(SHAPES), 11)
    for p in params:
        if layout == "channels_last" and p.grad.dim() == 4:
            p.grad = p.grad.contiguous(memory_format=torch.channels_last)
        elif layout == "column-major" and p.grad.dim() >= 2:
            p.grad = p.grad.permute(*reversed(range(p.grad.dim()))).contiguous().permute(
                *reversed(range(p.grad.dim())))
    assert sum(not p.grad.is_contiguous() for p in params) >= 2
    flat = torch.cat([r.reshape(-1) for r in refs])
    orc = oracle([p.grad for p in params], list(flat.split([p.numel() for p in params])))
    assert orc.projected, "the case must project, or it checks little"
    grads = [p.grad for p in params]
    before = [g.clone() for g in grads]
    res = agem_fast.project_(params, flat)
    assert all(p.grad is g for p, g in zip(params, grads))
    check_call(res, orc, grads, before, device)


def test_project_uses_the_fast_path(device, fast, monkeypatch):
    """project_ must not reach the Python planner for a plain call (its cost is the
    reason the fast path exists), and must for a call that needs it."""
    import agem_fast._api as api

    monkeypatch.setenv("AGEM_FAST_BACKEND", "extension")
    params, refs = _problem(device, SHAPES, [torch.float32] * len(SHAPES), 0)

    def no_planner(*args, **kwargs):
        raise AssertionError("the Python planner ran")

    monkeypatch.setattr(api, "make_plan", no_planner)
    assert bool(agem_fast.project_(params, refs).projected)
    params[2].grad = params[2].grad.t().contiguous().t()  # column-major: the planner stages it
    with pytest.raises(AssertionError, match="planner ran"):
        agem_fast.project_(params, refs)


_DROP_MID_CALL = r"""
import threading, time, torch
from agem_fast import _extension

torch.set_num_threads(1)  # the kernels on one core, the dropping thread on the other
fast = _extension.load().project_plain  # loaded first: loading lets the thread run early
n = 1 << 26  # 256 MiB a tensor: each is its own mmap, unmapped the moment it is freed
for attempt in range(3):
    p = torch.nn.Parameter(torch.empty(n))  # never touched: no pages
    p.grad = torch.ones(n)
    refs = [torch.full((n,), -1.0)]
    dropped = []

    def drop():
        time.sleep(0.01)
        p.grad = None  # the caller's last references to the gradient and the reference
        refs.clear()
        dropped.append(time.perf_counter())

    thread = threading.Thread(target=drop)
    thread.start()
    res = fast([p], refs, 0.0)
    end = time.perf_counter()
    thread.join()
    assert res is not None, "declined"
    assert float(res[0]) == -n and float(res[1]) == n and bool(res[3]), res  # read valid memory
    if dropped[0] < end:
        print("dropped mid-call")
        break
else:
    print("never dropped mid-call: the call held the GIL all along?")
"""


def test_memory_outlives_references_dropped_mid_call():
    """The fast path runs its kernels without the GIL, so another thread may drop the
    caller's last references meanwhile: the extension must hold the memory itself. In a
    subprocess: a read or write of freed (unmapped) memory kills it."""
    if not _extension.supports("cpu"):
        pytest.skip("agem_fast extension has no CPU kernels")
    run = subprocess.run([sys.executable, "-c", _DROP_MID_CALL], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout}\n{run.stderr[-3000:]}"
    assert "dropped mid-call" in run.stdout, run.stdout
