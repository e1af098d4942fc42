"""Randomized comparison of agem_fast.project_ against the float64 oracle.

Every case is built from fresh random data (seeded generators or hypothesis); no
test uses all-zero gradients. Gradients and references come in many memory
layouts; views into larger buffers have their surroundings poisoned with NaN and
checked untouched after the call. See oracle.py for the error model.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import List, Optional, Tuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agem_fast
from oracle import assert_bit_identical, bits, check_call, oracle

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
GRAD_LAYOUTS = ("contig", "channels_last", "transposed", "gapped", "offset")
REF_LAYOUTS = GRAD_LAYOUTS + ("flat1d", "flat1d_gapped")  # 1-D refs for any-shape params
REF_FORMS = ("list", "flat", "refgrad")


# ----------------------------------------------------------------------------------
# input construction


def rand_values(gen: torch.Generator, shape, scale: float = 1.0) -> torch.Tensor:
    """float64 values, never zero: random sign * 2^U(-3, 3) * scale."""
    mag = torch.exp2(torch.rand(shape, generator=gen, dtype=torch.float64) * 6 - 3)
    sign = torch.randint(0, 2, shape, generator=gen, dtype=torch.int64).to(torch.float64) * 2 - 1
    return sign * mag * scale


class Poisoned:
    """A view into a larger NaN-filled buffer; `check()` asserts the rest is untouched."""

    def __init__(self, big: torch.Tensor, mask: torch.Tensor, what: str):
        self.big, self.mask, self.what = big, mask, what
        self.before = bits(big)[~mask.cpu()]

    def check(self):
        after = bits(self.big)[~self.mask.cpu()]
        assert torch.equal(after, self.before), f"{self.what}: memory around the view was written"


def materialize(vals: torch.Tensor, dtype, layout: str, device, what: str = "",
                poison: Optional[list] = None) -> torch.Tensor:
    """A tensor of `dtype` on `device` holding `vals` (logical order) in `layout`."""
    shape = tuple(vals.shape)
    d = len(shape)
    if layout == "channels_last" and d in (4, 5):
        fmt = torch.channels_last if d == 4 else torch.channels_last_3d
        t = vals.to(device=device, dtype=dtype).contiguous(memory_format=fmt)
        return t
    if layout == "transposed" and d >= 2:
        perm = list(reversed(range(d)))
        buf = vals.permute(perm).contiguous().to(device=device, dtype=dtype)
        return buf.permute(perm)  # its own inverse
    if layout == "flat1d":
        return vals.reshape(-1).to(device=device, dtype=dtype)
    if layout == "flat1d_gapped":
        return materialize(vals.reshape(-1), dtype, "gapped", device, what, poison)
    if layout == "gapped" or (layout == "transposed" and d < 2):
        big_shape = tuple(2 * s + 1 for s in shape) if d else (5,)
        big = torch.full(big_shape, float("nan"), dtype=dtype, device=device)
        mask = torch.zeros(big_shape, dtype=torch.bool, device=device)
        idx = tuple(slice(1, 1 + 2 * s, 2) for s in shape) if d else (3,)
        view = big[idx]
        view.copy_(vals.to(dtype))
        mask[idx] = True
        if poison is not None:
            poison.append(Poisoned(big, mask, what))
        return view
    if layout == "offset":
        n = vals.numel()
        big = torch.full((n + 3,), float("nan"), dtype=dtype, device=device)
        mask = torch.zeros(n + 3, dtype=torch.bool, device=device)
        mask[1:1 + n] = True
        view = big[1:1 + n].view(shape)
        view.copy_(vals.to(dtype))
        if poison is not None:
            poison.append(Poisoned(big, mask, what))
        return view
    return vals.to(device=device, dtype=dtype).contiguous()


@dataclass
class Spec:
    shape: Tuple[int, ...]
    dtype: torch.dtype
    grad: bool = True
    ref: bool = True
    glayout: str = "contig"
    rlayout: str = "contig"
    scale: float = 1.0
    alpha: Optional[float] = None  # overrides build_case's alpha for this entry


@dataclass
class Case:
    params: List[torch.Tensor]
    ref_arg: object
    grads: List[Optional[torch.Tensor]]       # the .grad objects (None where absent)
    refs: List[Optional[torch.Tensor]]        # reference values as the oracle sees them
    ref_tensors: List[torch.Tensor]           # every tensor the call must not modify
    poison: list
    eps: float


def build_case(specs: List[Spec], seed: int, *, alpha: float = 0.0, ref_form: str = "list",
               eps: float = 0.0, device="cpu", flat_gapped: bool = False) -> Case:
    """g = noise + alpha * r (alpha < 0: projects, > 0: does not, 0: independent)."""
    gen = torch.Generator().manual_seed(seed)
    poison: list = []
    params, grads, refs, ref_vals = [], [], [], []
    for i, s in enumerate(specs):
        r = rand_values(gen, s.shape, s.scale)
        g = rand_values(gen, s.shape, s.scale)
        a = alpha if s.alpha is None else s.alpha
        if s.ref and a:
            g = g + a * r
        pfmt = torch.contiguous_format
        if s.glayout == "channels_last" and len(s.shape) in (4, 5):
            pfmt = torch.channels_last if len(s.shape) == 4 else torch.channels_last_3d
        p = torch.empty(s.shape, dtype=s.dtype, device=device).contiguous(memory_format=pfmt)
        grad = materialize(g, s.dtype, s.glayout, device, f"grad[{i}]", poison) if s.grad else None
        p.grad = grad
        params.append(p)
        grads.append(grad)
        ref_vals.append(r if s.ref else None)

    ref_tensors = []
    if ref_form == "list":
        for i, (s, r) in enumerate(zip(specs, ref_vals)):
            t = None if r is None else materialize(r, s.dtype, s.rlayout, device, f"ref[{i}]", poison)
            refs.append(t)
            if t is not None:
                ref_tensors.append(t)
        ref_arg = list(refs)
    elif ref_form == "flat":
        assert all(r is not None for r in ref_vals), "the flat form has a reference for every param"
        dtypes = {s.dtype for s in specs}
        assert len(dtypes) == 1
        dtype = dtypes.pop()
        flat_vals = torch.cat([r.reshape(-1) for r in ref_vals]) if ref_vals else torch.zeros(0, dtype=torch.float64)
        if flat_gapped:
            flat = materialize(flat_vals, dtype, "gapped", device, "flat", poison)
        else:
            flat = flat_vals.to(device=device, dtype=dtype)
        offset = 0
        for r in ref_vals:
            n = r.numel()
            refs.append(flat[offset:offset + n].view(r.shape) if flat.is_contiguous() else flat[offset:offset + n].reshape(r.shape))
            offset += n
        ref_tensors.append(flat)
        ref_arg = flat
    elif ref_form == "refgrad":
        rg = agem_fast.ReferenceGradient(params)
        saved = [p.grad for p in params]
        for i, (p, s, r) in enumerate(zip(params, specs, ref_vals)):
            p.grad = None if r is None else materialize(r, s.dtype, s.glayout, device)
            refs.append(p.grad)
        rg.capture_(params)
        for p, g in zip(params, saved):
            p.grad = g
        # The oracle gets the tensors handed to capture_, not what it stored: a capture
        # that scrambles the values must fail here, not agree with itself.
        ref_tensors = [t for t in rg.as_list() if t is not None]
        ref_arg = rg
    else:
        raise AssertionError(ref_form)
    return Case(params, ref_arg, grads, refs, ref_tensors, poison, eps)


def run_and_check(case: Case, device, *, params_iter=None):
    """project_ on the case; check everything against the oracle. Returns (res, orc)."""
    orc = oracle(case.grads, case.refs, case.eps)
    before = [None if g is None else g.clone() for g in case.grads]
    ref_bits = [bits(t) for t in case.ref_tensors]
    res = agem_fast.project_(case.params if params_iter is None else params_iter, case.ref_arg,
                             eps=case.eps)
    after = [p.grad for p in case.params]
    for i, (a, g) in enumerate(zip(after, case.grads)):
        assert a is g, f"params[{i}].grad was replaced, not updated in place"
    check_call(res, orc, after, before, device)
    for k, (t, b) in enumerate(zip(case.ref_tensors, ref_bits)):
        assert torch.equal(bits(t), b), f"reference tensor {k} was modified"
    for p in case.poison:
        p.check()
    return res, orc


# ----------------------------------------------------------------------------------
# random structure


def random_shape(rnd: random.Random, max_numel: int) -> Tuple[int, ...]:
    ndim = rnd.choices([0, 1, 2, 3, 4, 5], weights=[1, 4, 4, 2, 4, 1])[0]
    if ndim == 0:
        return ()
    target = math.exp(rnd.uniform(0, math.log(max_numel)))
    side = max(1, round(target ** (1 / ndim)))
    return tuple(rnd.randint(1, max(1, 2 * side - 1)) for _ in range(ndim))


def random_specs(rnd: random.Random, n: int, max_numel: int, *, dtypes=DTYPES, ref_form="list",
                 p_none: float = 0.15) -> List[Spec]:
    uniform = ref_form == "flat" or rnd.random() < 0.4
    one = rnd.choice(dtypes)
    specs = []
    for _ in range(n):
        s = Spec(
            shape=random_shape(rnd, max_numel),
            dtype=one if uniform else rnd.choice(dtypes),
            grad=rnd.random() >= p_none,
            ref=ref_form == "flat" or rnd.random() >= p_none,
            glayout=rnd.choice(GRAD_LAYOUTS),
            rlayout=rnd.choice(REF_LAYOUTS),
            scale=2.0 ** rnd.randint(-3, 3),
        )
        specs.append(s)
    return specs


def random_alpha(rnd: random.Random) -> float:
    return rnd.choice([-1.0, -0.3, -0.05, 0.0, 0.0, 0.05, 0.3, 1.0])


# ----------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("seed", range(40))
def test_random_cases(seed, backend, device):
    rnd = random.Random(seed)
    ref_form = REF_FORMS[seed % 3]
    specs = random_specs(rnd, rnd.randint(1, 40), 3000, ref_form=ref_form)
    eps = rnd.choice([0.0, 0.0, 1e-3, 7.5])
    case = build_case(specs, seed, alpha=random_alpha(rnd), ref_form=ref_form, eps=eps,
                      device=device, flat_gapped=rnd.random() < 0.3)
    run_and_check(case, device)


@pytest.mark.parametrize("seed", range(12))
def test_packed_path_with_a_small_pack_limit(seed, device, monkeypatch):
    """The torch backend's packed path (its path on GPUs; here run on CPU tensors too)
    with a pack limit of 600 elements instead of 2^23, so that random cases of up to
    3,000 elements exercise all of it: tensors over the limit taken one by one (pairs,
    reference-only, not dense in one order), several groups of one dtype, dtypes
    interleaved (a dtype's scratch is reloaded, or reused by pass 2 when pass 1 left the
    right tensors in it)."""
    from agem_fast import _torch_backend

    monkeypatch.setattr(_torch_backend, "_PACK_LIMIT", 600)
    monkeypatch.setattr(_torch_backend, "PACKED_ON_CPU", True)
    monkeypatch.setenv("AGEM_FAST_BACKEND", "torch")
    rnd = random.Random(500 + seed)
    ref_form = REF_FORMS[seed % 3]
    specs = random_specs(rnd, rnd.randint(8, 40), 3000, ref_form=ref_form)
    case = build_case(specs, 500 + seed, alpha=rnd.choice([-1.0, -0.3, 0.3]), ref_form=ref_form,
                      device=device, flat_gapped=rnd.random() < 0.3)
    run_and_check(case, device)


def test_packed_path_runs_the_same_ops_for_any_number_of_tiny_tensors(device, monkeypatch):
    """On a GPU the torch backend's cost is its kernel launches: one per op. Its packed
    path must run the same ops for 40 tensors as for 400 (only views, which launch
    nothing, grow with the count); a few ops per tensor took 4 ms on ResNet-18's 62
    tensors on an H200. Counted with a TorchDispatchMode, which sees each top-level op
    once (a multi-tensor op is one op)."""
    import sys
    from pathlib import Path

    from agem_fast import _torch_backend

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for bench/
    from bench.torch_backend_ops import OpCounter

    monkeypatch.setattr(_torch_backend, "PACKED_ON_CPU", True)
    monkeypatch.setenv("AGEM_FAST_BACKEND", "torch")
    counted = []
    for n in (40, 400):
        params = [torch.empty(3, 4, device=device) for _ in range(n)]
        for p in params:
            p.grad = torch.randn(3, 4, device=device)
        ref = -torch.cat([p.grad.view(-1) for p in params]) + 0.1 * torch.randn(12 * n, device=device)
        params[n // 2].grad = None  # its reference counts in rr only
        with OpCounter() as ops:
            res = agem_fast.project_(params, ref)
        assert bool(res.projected)
        counted.append(ops.names)
    assert counted[0] == counted[1]
    assert len(counted[0]) < 30, counted[0]
    # Copies into the scratch: the reference-only tensors, then the pairs (pass 1); the
    # pairs are still there for pass 2, which only copies the results back.
    assert counted[0].count("aten::_foreach_copy_") == 4, counted[0]


@pytest.mark.parametrize("ref_form", ["list", "reference"])
def test_packed_groups_copy_slot_for_slot(ref_form):
    """On a GPU, torch._foreach_copy_ runs its multi-tensor kernel only when every slot and
    its tensor have equal sizes and strides; otherwise it copies tensor by tensor. So a
    channels_last convnet's gradients, with references in the same layout (a list of
    like tensors, or a ReferenceGradient, which keeps each layout), must be packed as flat
    memory, none of them left to the one-by-one route."""
    from agem_fast import _torch_backend
    from agem_fast._plan import make_plan

    gen = torch.Generator().manual_seed(5)
    shapes = [(16, 3, 3, 3), (16,), (32, 16, 3, 3), (32,), (10, 32 * 9), (10,)]
    params = [torch.empty(s).to(memory_format=torch.channels_last) if len(s) == 4 else torch.empty(s)
              for s in shapes]
    for p in params:
        g = torch.randn(p.shape, generator=gen)
        p.grad = g.to(memory_format=torch.channels_last) if g.dim() == 4 else g
    if ref_form == "list":
        ref = [torch.randn(p.shape, generator=gen).to(memory_format=torch.channels_last)
               if p.dim() == 4 else torch.randn(p.shape, generator=gen) for p in params]
    else:
        ref = agem_fast.ReferenceGradient(params).capture_(params)
    packing = _torch_backend._Packing(make_plan(params, ref, 0.0))
    assert packing.large == []
    assert sum(len(group.refs) for group in packing.groups) == len(params)
    for group in packing.groups:
        for slot, src in list(zip(group.r_slots, group.refs)) + list(zip(group.g_slots, group.grads)):
            assert slot.shape == src.shape and slot.stride() == src.stride()


@pytest.mark.parametrize("route", ["packed", "one_by_one"])
def test_packed_path_sums_in_fp64(route, device, monkeypatch):
    """The packed path accumulates every sum in fp64. fp32 integers whose products are
    exact in fp32 and whose sums (near 2^40) are exact in fp64 but not in fp32: dot and
    rr must come out exact, for tensors packed into a group and for tensors taken alone."""
    from agem_fast import _torch_backend

    monkeypatch.setattr(_torch_backend, "PACKED_ON_CPU", True)
    monkeypatch.setenv("AGEM_FAST_BACKEND", "torch")
    if route == "one_by_one":
        monkeypatch.setattr(_torch_backend, "_PACK_LIMIT", 1)
    gen = torch.Generator().manual_seed(9)
    n = 1 << 18
    params, refs, dot, rr = [], [], 0, 0
    for _ in range(4):
        g = torch.randint(1, 1 << 11, (n,), generator=gen)
        r = -torch.randint(1, 1 << 11, (n,), generator=gen)
        dot += int((g * r).sum())
        rr += int((r * r).sum())
        p = torch.empty(n, device=device)
        p.grad = g.float().to(device)
        params.append(p)
        refs.append(r.float().to(device))
    assert abs(dot) > 1 << 38 and rr > 1 << 38  # far past fp32's 24 bits
    res = agem_fast.project_(params, refs)
    assert float(res.dot) == dot and float(res.ref_sq_norm) == rr


@pytest.mark.parametrize("alpha", [-0.5, 0.5])
@pytest.mark.parametrize("seed", range(2))
def test_300_tensors_mixed(seed, alpha, backend, device):
    rnd = random.Random(1000 + seed)
    specs = random_specs(rnd, 300, 400, ref_form="list")
    res, orc = run_and_check(build_case(specs, 1000 + seed, alpha=alpha, device=device), device)
    assert orc.projected == (alpha < 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_tensor_1e6(dtype, backend, device):
    # one 10^6-element tensor, projecting; the gradient is a view into a larger buffer
    # for half of the dtypes, channels_last for the others (with a contiguous ref)
    layout = "offset" if dtype in (torch.float16, torch.float32) else "channels_last"
    specs = [Spec((10, 100, 25, 40), dtype, glayout=layout, rlayout="contig")]
    res, orc = run_and_check(build_case(specs, 7, alpha=-0.4, device=device), device)
    assert orc.projected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_single_vs_many_tiny(dtype, backend, device):
    """The same 2^17 values as one tensor and as 4096 tensors of 32 (reference passed
    flat): both match the oracle, and they agree on dot and rr."""
    n = 1 << 17
    case_one = build_case([Spec((n,), dtype)], 11, alpha=-0.2, device=device)
    g_vals, r_vals = case_one.grads[0].clone(), case_one.refs[0].clone()
    res_one, orc = run_and_check(case_one, device)
    assert orc.projected
    params = [torch.empty(32, dtype=dtype, device=device) for _ in range(n // 32)]
    for p, g in zip(params, g_vals.split(32)):
        p.grad = g.clone()
    case_many = Case(params, r_vals, [p.grad for p in params], list(r_vals.split(32)),
                     [r_vals], [], 0.0)
    res_many, orc_many = run_and_check(case_many, device)
    # same values: the same sums (up to the oracle's own fp64 summation order)
    assert orc_many.dot == pytest.approx(orc.dot, rel=1e-12) and orc_many.rr == pytest.approx(orc.rr, rel=1e-12)
    for name in ("dot", "ref_sq_norm"):
        a, b = float(getattr(res_one, name)), float(getattr(res_many, name))
        assert abs(a - b) <= 1e-6 * abs(b), (name, a, b)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_hypothesis_cases(data, backend, device):
    n = data.draw(st.integers(1, 8), label="n")
    ref_form = data.draw(st.sampled_from(REF_FORMS), label="ref_form")
    uniform_dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    mixed = ref_form != "flat" and data.draw(st.booleans(), label="mixed")
    specs = []
    for _ in range(n):
        shape = tuple(data.draw(st.lists(st.integers(1, 5), min_size=0, max_size=5), label="shape"))
        specs.append(Spec(
            shape=shape,
            dtype=data.draw(st.sampled_from(DTYPES)) if mixed else uniform_dtype,
            grad=data.draw(st.booleans()) or data.draw(st.booleans()),
            ref=ref_form == "flat" or data.draw(st.booleans()) or data.draw(st.booleans()),
            glayout=data.draw(st.sampled_from(GRAD_LAYOUTS)),
            rlayout=data.draw(st.sampled_from(REF_LAYOUTS)),
            scale=2.0 ** data.draw(st.integers(-4, 4)),
        ))
    alpha = data.draw(st.sampled_from([-2.0, -0.5, -0.1, 0.0, 0.1, 0.5]), label="alpha")
    eps = data.draw(st.sampled_from([0.0, 0.0, 0.25, 100.0]), label="eps")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    case = build_case(specs, seed, alpha=alpha, ref_form=ref_form, eps=eps, device=device,
                      flat_gapped=data.draw(st.booleans(), label="flat_gapped"))
    run_and_check(case, device)


# --- exact special cases -------------------------------------------------------------


def _orthogonal_pairs(gen: torch.Generator, n_pairs: int, shift: int):
    """g = [x0, x0, x1, x1, ...], r = [u0, -u0, u1, -u1, ...]: <g, r> == 0 exactly in any
    summation order (small integers times one power of two: every partial sum exact)."""
    x = torch.randint(1, 9, (n_pairs,), generator=gen).to(torch.float64)
    x = x * (torch.randint(0, 2, (n_pairs,), generator=gen) * 2 - 1)
    u = torch.randint(1, 9, (n_pairs,), generator=gen).to(torch.float64)
    g = torch.stack([x, x], 1).reshape(-1) * 2.0**shift
    r = torch.stack([u, -u], 1).reshape(-1) * 2.0**-shift
    return g, r


@pytest.mark.parametrize("ref_form", ["list", "flat", "refgrad"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dot_exactly_zero_no_projection(dtype, ref_form, backend, device):
    gen = torch.Generator().manual_seed(5)
    shapes = [(3, 4), (2, 3, 4, 5), (7,), (), (1, 2, 6, 6), (301,), (1,)]
    total = sum(math.prod(s) for s in shapes)
    assert total % 2 == 0
    g_all, r_all = _orthogonal_pairs(gen, total // 2, shift=2)
    layouts = ["transposed", "channels_last", "gapped", "contig", "channels_last", "offset", "contig"]
    params, grads, refs = [], [], []
    offset = 0
    for s, lay in zip(shapes, layouts):
        n = math.prod(s)
        g = g_all[offset:offset + n].reshape(s)
        r = r_all[offset:offset + n].reshape(s)
        offset += n
        p = torch.empty(s, dtype=dtype, device=device)
        p.grad = materialize(g, dtype, lay, device)
        params.append(p)
        grads.append(p.grad)
        refs.append(materialize(r, dtype, "transposed" if lay == "contig" else "contig", device))
    if ref_form == "flat":
        ref_arg = torch.cat([r.reshape(-1) for r in refs])
    elif ref_form == "refgrad":
        ref_arg = agem_fast.ReferenceGradient(params)
        for p, r in zip(params, refs):
            p.grad = r.clone(memory_format=torch.preserve_format) if r.shape == p.shape else r.reshape(p.shape)
        ref_arg.capture_(params)
        for p, g in zip(params, grads):
            p.grad = g
    else:
        ref_arg = refs
    before = [g.clone() for g in grads]
    res = agem_fast.project_(params, ref_arg)
    assert float(res.dot) == 0.0
    assert not bool(res.projected)
    assert float(res.coef) == 0.0
    assert float(res.ref_sq_norm) > 0
    orc = oracle(grads, refs)
    assert orc.dot == 0.0 and not orc.projected
    check_call(res, orc, [p.grad for p in params], before, device)


@pytest.mark.parametrize("eps", [0.0, 0.5])
@pytest.mark.parametrize("kind", ["all_refs_none", "zero_refs", "zero_flat"])
def test_rr_zero_no_projection(kind, eps, backend, device):
    gen = torch.Generator().manual_seed(3)
    shapes = [(4, 5), (3,), (2, 3, 2, 2)]
    params = []
    for i, s in enumerate(shapes):
        p = torch.empty(s, device=device)
        p.grad = rand_values(gen, s).to(device=device, dtype=torch.float32)
        params.append(p)
    if kind == "all_refs_none":
        ref_arg = [None] * len(params)
    elif kind == "zero_refs":  # the one place a zero tensor is the point of the test
        ref_arg = [torch.zeros_like(p) for p in params]
    else:
        ref_arg = torch.zeros(sum(p.numel() for p in params), device=device)
    before = [p.grad.clone() for p in params]
    res = agem_fast.project_(params, ref_arg, eps=eps)
    assert float(res.dot) == 0.0 and float(res.ref_sq_norm) == 0.0
    assert float(res.coef) == 0.0 and not math.isnan(float(res.coef))
    assert not bool(res.projected)
    for p, b in zip(params, before):
        assert_bit_identical(p.grad, b)


def _nan_inf_case(kind: str, dtype, device):
    """Three params; the special value sits in params[1] (or its ref)."""
    gen = torch.Generator().manual_seed(17)
    shapes = [(4, 6), (3, 5), (2, 2, 3, 3)]
    r_vals = [rand_values(gen, s).abs() for s in shapes]  # positive references
    g_vals = [-rand_values(gen, s).abs() for s in shapes]  # dot clearly negative
    refs_present = [True, True, True]
    grads_present = [True, True, True]
    nan, inf = float("nan"), float("inf")
    if kind == "nan_in_grad":
        g_vals[1][1, 2] = nan
    elif kind == "nan_in_ref":
        r_vals[1][0, 0] = nan
    elif kind == "nan_in_ref_only":
        grads_present[1] = False
        r_vals[1][2, 4] = nan
    elif kind == "nan_in_grad_without_ref":
        refs_present[1] = False
        g_vals[1][1, 1] = nan
    elif kind == "pos_inf_in_grad":  # dot = +inf: no projection
        g_vals[1][0, 3] = inf
    elif kind == "neg_inf_in_grad":  # dot = -inf, rr finite: coef = -inf
        g_vals[1][2, 1] = -inf
    elif kind == "inf_minus_inf":  # dot = inf - inf = NaN: no projection
        g_vals[1][0, 0] = inf
        g_vals[2][1, 1, 2, 2] = -inf
    elif kind == "inf_in_ref_only":  # rr = inf, dot finite < 0: coef = -0.0, projected
        grads_present[1] = False
        r_vals[1][1, 1] = inf
    elif kind == "inf_in_ref":  # dot = -inf, rr = inf: coef = NaN, projected
        r_vals[1][1, 3] = inf
    else:
        raise AssertionError(kind)
    params, grads, refs = [], [], []
    for s, g, r, gp, rp in zip(shapes, g_vals, r_vals, grads_present, refs_present):
        p = torch.empty(s, dtype=dtype, device=device)
        p.grad = g.to(device=device, dtype=dtype) if gp else None
        params.append(p)
        grads.append(p.grad)
        refs.append(r.to(device=device, dtype=dtype) if rp else None)
    return params, grads, refs


NAN_INF_KINDS = {
    # kind: (projected, dot is nan)
    "nan_in_grad": (False, True),
    "nan_in_ref": (False, True),
    "nan_in_ref_only": (False, False),
    "nan_in_grad_without_ref": (True, False),
    "pos_inf_in_grad": (False, False),
    "neg_inf_in_grad": (True, False),
    "inf_minus_inf": (False, True),
    "inf_in_ref_only": (True, False),
    "inf_in_ref": (True, False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", sorted(NAN_INF_KINDS))
def test_nan_inf(kind, dtype, backend, device):
    params, grads, refs = _nan_inf_case(kind, dtype, device)
    expect_projected, expect_nan_dot = NAN_INF_KINDS[kind]
    orc = oracle(grads, refs)
    assert orc.projected == expect_projected and math.isnan(orc.dot) == expect_nan_dot
    before = [None if g is None else g.clone() for g in grads]
    res = agem_fast.project_(params, refs)
    assert math.isnan(float(res.dot)) == expect_nan_dot
    check_call(res, orc, [p.grad for p in params], before, device)
    if not expect_projected:
        assert float(res.coef) == 0.0  # never NaN when not projecting


def test_memory_sharing_that_is_harmless_is_accepted(backend, device):
    """A reference that is its own gradient (also seen through odd strides of size-1
    dimensions), gradients interleaved in one buffer or cut from it in column blocks,
    references shared between parameters, a reference-only entry overlapping a gradient
    (read before any write): legal, and right."""
    gen = torch.Generator().manual_seed(37)

    def vals(*shape):
        return rand_values(gen, shape).to(device=device, dtype=torch.float32)

    buf, cols, shared_ref = vals(20), vals(6, 12), vals(5)
    shapes = [(10,), (10,), (6,), (5,), (5,), (6, 4), (6, 4), (6, 4), (3, 1, 2), (7,)]
    params = [torch.empty(s, device=device) for s in shapes]
    params[0].grad, params[1].grad = buf[0::2], buf[1::2]  # disjoint, interleaved
    params[2].grad = vals(6)
    params[3].grad = -2 * shared_ref + 0.1 * vals(5)
    params[4].grad = -3 * shared_ref
    for k in range(3):  # column blocks of one buffer
        params[5 + k].grad = cols[:, 4 * k : 4 * k + 4]
    params[8].grad = vals(2, 3).t().unsqueeze(1)  # shape (3, 1, 2)
    g8 = params[8].grad
    refs = [-buf[0::2].clone(), vals(10), params[2].grad, shared_ref, shared_ref,
            -cols[:, 0:4].clone(), vals(6, 4), vals(6, 4),
            g8.as_strided(g8.shape, (1, 7, 3)),  # exactly g8, another stride for the size-1 dim
            buf[3:10]]  # reference-only (params[9] has no gradient), inside params[0..1].grad
    before = [None if p.grad is None else p.grad.clone() for p in params]
    orc = oracle(before, [r.clone() for r in refs])
    assert orc.projected
    res = agem_fast.project_(params, refs)
    check_call(res, orc, [p.grad for p in params], before, device)


def test_large_gapped_views_of_one_buffer_are_accepted(backend):
    """Three 1500 x 1500 column blocks of one buffer (a fused q/k/v weight's gradient):
    disjoint, though too many elements to compare one by one."""
    gen = torch.Generator().manual_seed(41)
    buf = torch.randn(1500, 4500, generator=gen)
    params = [torch.empty(1500, 1500) for _ in range(3)]
    for k, p in enumerate(params):
        p.grad = buf[:, 1500 * k : 1500 * (k + 1)]
    refs = [-p.grad.clone() + 0.1 * torch.randn(1500, 1500, generator=gen) for p in params]
    before = [p.grad.clone() for p in params]
    orc = oracle(before, refs)
    res = agem_fast.project_(params, refs)
    check_call(res, orc, [p.grad for p in params], before, torch.device("cpu"))


@pytest.mark.parametrize("ref_form", REF_FORMS)
def test_autocast_does_not_change_the_precision(ref_form, backend, device):
    """Inside torch.autocast (which runs some reductions in bf16 or fp16) the sums keep
    DESIGN section 1's precision."""
    specs = [Spec((300,), torch.float32), Spec((5000,), torch.float32), Spec((7, 9), torch.float32)]
    case = build_case(specs, 29, alpha=-0.01, ref_form=ref_form, device=device)
    low = torch.bfloat16 if device.type == "cpu" else torch.float16
    with torch.autocast(device.type, dtype=low):
        res, orc = run_and_check(case, device)
    assert orc.projected


@pytest.mark.parametrize("ref_form", ["list", "flat"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_loss_scales_pass_through_exactly(dtype, ref_form, backend, device):
    """A GradScaler multiplies gradients by a power of two. Projecting 2^12 g against
    2^-3 r must give exactly 2^12 times the projection of g against r (coef times 2^15,
    the same decision): every product and sum is then scaled exactly, so the scaled
    gradients need no unscale_ first, even when the reference pass used another scale.
    (fp16 is left out: results in its subnormal range round on a grid that does not scale.)"""
    rnd = random.Random(5)
    specs = random_specs(rnd, 30, 5000, dtypes=(dtype,), ref_form=ref_form)
    plain = build_case(specs, 5, alpha=-0.4, ref_form=ref_form, device=device)
    scaled = build_case(specs, 5, alpha=-0.4, ref_form=ref_form, device=device)
    for g in scaled.grads:
        if g is not None:
            g.mul_(2.0 ** 12)
    for t in scaled.ref_tensors:
        t.mul_(2.0 ** -3)
    res_plain = agem_fast.project_(plain.params, plain.ref_arg)
    res_scaled = agem_fast.project_(scaled.params, scaled.ref_arg)
    assert bool(res_plain.projected) and bool(res_scaled.projected)
    assert float(res_scaled.dot) == float(res_plain.dot) * 2.0 ** 9
    assert float(res_scaled.ref_sq_norm) == float(res_plain.ref_sq_norm) * 2.0 ** -6
    assert float(res_scaled.coef) == float(res_plain.coef) * 2.0 ** 15
    n_checked = 0
    for i, (g_plain, g_scaled) in enumerate(zip(plain.grads, scaled.grads)):
        if g_plain is not None:
            assert_bit_identical(g_scaled, g_plain * 2.0 ** 12, f"grad[{i}]")
            n_checked += 1
    assert n_checked > 10


def test_default_device_does_not_matter(backend):
    """CPU gradients are projected on the CPU whatever torch's default device is."""
    case = build_case([Spec((5000,), torch.float32), Spec((3, 4), torch.float32)], 31, alpha=-0.3)
    orc = oracle(case.grads, case.refs)
    before = [g.clone() for g in case.grads]
    with torch.device("meta"):
        res = agem_fast.project_(case.params, case.ref_arg)
    check_call(res, orc, [p.grad for p in case.params], before, torch.device("cpu"))


def test_default_device_does_not_matter_to_the_shared_memory_check(backend):
    """Column blocks of one buffer share byte ranges without sharing elements: the
    planner's run-by-run check (CPU tensors of its own) decides, whatever the default
    device; and a true overlap is still refused."""
    gen = torch.Generator().manual_seed(8)
    fused = rand_values(gen, (6, 9)).float()
    params = [torch.nn.Parameter(torch.empty(6, 3)) for _ in range(3)]
    for k, p in enumerate(params):
        p.grad = fused[:, 3 * k : 3 * k + 3]  # interleaved rows: overlapping spans
    refs = [rand_values(gen, (6, 3)).float() - 2 * p.grad for p in params]
    orc = oracle([p.grad for p in params], refs)
    before = [p.grad.clone() for p in params]
    with torch.device("meta"):
        res = agem_fast.project_(params, refs)
    check_call(res, orc, [p.grad for p in params], before, torch.device("cpu"))
    params[1].grad = fused[:, 2:5]  # shares column 2 with params[0].grad
    with torch.device("meta"), pytest.raises(ValueError, match="share memory"):
        agem_fast.project_(params, refs)


@pytest.mark.parametrize("ref_form", ["list", "flat", "refgrad"])
def test_empty_params(ref_form, backend):
    if ref_form == "list":
        ref = []
    elif ref_form == "flat":
        ref = torch.zeros(0)
    else:
        ref = agem_fast.ReferenceGradient([])
    res = agem_fast.project_([], ref)
    for name in ("dot", "ref_sq_norm", "coef"):
        t = getattr(res, name)
        assert t.dim() == 0 and float(t) == 0.0
    assert res.projected.dim() == 0 and not bool(res.projected)


def test_all_grads_none_refs_present(backend, device):
    gen = torch.Generator().manual_seed(4)
    params = [torch.empty(s, device=device) for s in [(3, 3), (5,)]]
    refs = [rand_values(gen, p.shape).to(device=device, dtype=torch.float32) for p in params]
    res = agem_fast.project_(params, refs)
    orc = oracle([None, None], refs)
    check_call(res, orc, [p.grad for p in params], [None, None], device)
    assert float(res.ref_sq_norm) > 0 and float(res.dot) == 0.0 and not bool(res.projected)
    assert all(p.grad is None for p in params)


def test_ref_only_param_counts_in_rr(backend, device):
    """coef = dot / (rr_paired + rr_ref_only): a reference-only entry shrinks the step."""
    gen = torch.Generator().manual_seed(8)
    p0, p1 = torch.empty(50, device=device, dtype=torch.float64), torch.empty(30, device=device, dtype=torch.float64)
    r0 = rand_values(gen, (50,)).to(device)
    r1 = rand_values(gen, (30,)).to(device)
    g0 = (rand_values(gen, (50,)) - 2.0 * r0.cpu()).to(device)
    p0.grad = g0.clone()
    res = agem_fast.project_([p0, p1], [r0, r1])
    expected_coef = float(g0 @ r0) / float(r0 @ r0 + r1 @ r1)
    assert float(res.coef) == pytest.approx(expected_coef, rel=1e-12)
    assert float(res.coef) != pytest.approx(float(g0 @ r0) / float(r0 @ r0), rel=1e-3)
    torch.testing.assert_close(p0.grad, g0 - expected_coef * r0, rtol=1e-12, atol=1e-12)
    assert p1.grad is None


@pytest.mark.parametrize("ref_form", ["list", "flat", "refgrad"])
def test_bitwise_reproducible(ref_form, backend, device):
    rnd = random.Random(99)
    specs = random_specs(rnd, 60, 5000, ref_form=ref_form, dtypes=(torch.float32,) if ref_form == "flat" else DTYPES)
    outs = []
    for _ in range(2):
        case = build_case(specs, 99, alpha=-0.3, ref_form=ref_form, device=device)
        res = agem_fast.project_(case.params, case.ref_arg)
        outs.append((res, [None if p.grad is None else bits(p.grad) for p in case.params]))
    (r1, g1), (r2, g2) = outs
    for name in ("dot", "ref_sq_norm", "coef", "projected"):
        assert torch.equal(bits(getattr(r1, name)), bits(getattr(r2, name))), name
    assert bool(r1.projected)
    for a, b in zip(g1, g2):
        assert (a is None and b is None) or torch.equal(a, b)


def test_params_as_generator(backend, device):
    """`params` may be any iterable, e.g. model.parameters() (consumed once)."""
    rnd = random.Random(21)
    specs = random_specs(rnd, 12, 200, ref_form="list")
    case = build_case(specs, 21, alpha=-0.5, device=device)
    run_and_check(case, device, params_iter=(p for p in case.params))


@pytest.mark.parametrize("ref_form", ["list", "flat"])
def test_zero_numel_params(ref_form, backend, device):
    specs = [Spec((3, 4), torch.float32), Spec((0,), torch.float32), Spec((2, 0, 3), torch.float32),
             Spec((5,), torch.float32)]
    run_and_check(build_case(specs, 2, alpha=-0.5, ref_form=ref_form, device=device), device)


@pytest.mark.parametrize("eps_factor", [0.01, 1.0, 1e3])
def test_eps_scales_coef(eps_factor, backend, device):
    specs = [Spec((40, 30), torch.float64), Spec((7,), torch.float64, grad=False),
             Spec((2, 3, 4, 5), torch.float64, glayout="channels_last")]
    probe = build_case(specs, 31, alpha=-0.8, device=device)
    rr = oracle(probe.grads, probe.refs).rr
    case = build_case(specs, 31, alpha=-0.8, eps=eps_factor * rr, device=device)
    res, orc = run_and_check(case, device)
    assert float(res.coef) == pytest.approx(orc.dot / (rr * (1 + eps_factor)), rel=1e-10)


def test_projection_is_global_not_per_layer(backend, device):
    """Layer 0 is aligned with its reference, layer 1 opposed; the total is negative.
    A per-layer projection would leave layer 0 alone; the global one moves it too."""
    gen = torch.Generator().manual_seed(41)
    r0 = rand_values(gen, (64,)).to(device)
    r1 = rand_values(gen, (64,)).to(device)
    g0 = (0.1 * r0.cpu()).to(device)
    g1 = (-1.0 * r1.cpu()).to(device)
    p0, p1 = torch.empty(64, device=device, dtype=torch.float64), torch.empty(64, device=device, dtype=torch.float64)
    p0.grad, p1.grad = g0.clone(), g1.clone()
    res = agem_fast.project_([p0, p1], [r0, r1])
    assert bool(res.projected)
    assert not torch.equal(p0.grad, g0)
    orc = oracle([g0, g1], [r0, r1])
    check_call(res, orc, [p0.grad, p1.grad], [g0, g1], device)


# subnormal magnitudes (all elements of the second tensor), per dtype
SUBNORMAL_SCALE = {torch.float16: 2.0**-19, torch.bfloat16: 2.0**-131, torch.float32: 2.0**-140,
                   torch.float64: 2.0**-1040}


@pytest.mark.parametrize("dtype", DTYPES)
def test_subnormal_gradients_are_not_flushed(dtype, backend, device):
    """A normal pair fixes coef ~ -1; a second pair made only of subnormals is updated
    with gradual underflow (checked at the dtype's subnormal spacing). Flush-to-zero or
    denormals-are-zero arithmetic fails this."""
    tiny = SUBNORMAL_SCALE[dtype]
    specs = [Spec((64,), dtype), Spec((3, 5), dtype, scale=tiny, glayout="transposed", alpha=0.0),
             Spec((4, 4), dtype, scale=tiny, grad=True, ref=False)]
    case = build_case(specs, 23, alpha=-1.0, device=device)
    g1 = case.grads[1].double().cpu().clone()
    assert bool((g1.abs() < torch.finfo(dtype).tiny).all()) and bool((g1 != 0).all())
    res, orc = run_and_check(case, device)
    assert orc.projected
    changed = case.grads[1].double().cpu() != g1
    assert bool(changed.any()), "subnormal gradients were not updated"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_subnormal_gradients_count_in_dot(dtype, backend, device):
    """Gradients made only of subnormals against large references: every product is a
    normal number, so the dot (and the decision) must see them."""
    tiny = SUBNORMAL_SCALE[dtype]
    gen = torch.Generator().manual_seed(29)
    r = rand_values(gen, (40, 6), 2.0**20)
    g = -r.sign() * rand_values(gen, (40, 6), tiny).abs()
    p = torch.empty(40, 6, dtype=dtype, device=device)
    p.grad = g.to(device=device, dtype=dtype)
    assert bool((p.grad != 0).all())
    ref = r.to(device=device, dtype=dtype)
    before = p.grad.clone()
    orc = oracle([p.grad], [ref])
    assert orc.dot < 0 and orc.projected
    res = agem_fast.project_([p], [ref])
    check_call(res, orc, [p.grad], [before], device)


@pytest.mark.parametrize("route", ["packed", "one_by_one"])
@pytest.mark.parametrize("dtype,nan_bits", [(torch.float16, 0x7C01), (torch.bfloat16, 0x7F81),
                                            (torch.float32, 0x7F800001)])
def test_device_update_keeps_nan_bits_when_not_projecting(dtype, nan_bits, route, device, monkeypatch):
    """The torch backend's device update (used on GPUs and under torch.compile) always
    runs and selects with torch.where; not projecting, every gradient must keep its bits,
    a signalling NaN's payload included (a round trip through fp32 would quiet it, as
    the H200 showed for a fp16 NaN: in the update once, and in CUDA's _foreach_copy_ of
    fp16/bf16 into and out of the scratch later). For a tensor packed into the scratch
    and for one taken alone (as tensors past the pack limit are)."""
    from agem_fast import _torch_backend
    from agem_fast._plan import make_plan

    if route == "one_by_one":
        monkeypatch.setattr(_torch_backend, "_PACK_LIMIT", 1)

    int_type = {2: torch.int16, 4: torch.int32}[torch.empty((), dtype=dtype).element_size()]
    g = torch.randn(4, 5).to(dtype)
    g.view(int_type)[1, 2] = nan_bits  # exponent all ones, quiet bit clear: a signalling NaN
    g = g.to(device)
    p = torch.empty(4, 5, dtype=dtype, device=device)
    p.grad = g
    before = bits(g).clone()
    assert torch.isnan(g[1, 2])
    plan = make_plan([p], [torch.randn(4, 5).to(device=device, dtype=dtype)], 0.0)
    coef = torch.tensor(-0.5, dtype=torch.float64, device=device)
    _torch_backend._update_device(_torch_backend._Packing(plan), coef, torch.tensor(False, device=device))
    assert p.grad is g and torch.equal(bits(p.grad), before), "the gradient's bits changed"


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_cpu_bitwise_identical_for_any_thread_count(threads, backend):
    """DESIGN section 1: the same bits whatever torch.set_num_threads says. Sizes from a
    few elements to a little over 2^20 (the torch backend's CPU piece; BLAS would split a
    long dot over threads from about 8K elements on), with odd tails, every dtype, a
    reference-only entry and a non-dense pair."""
    if backend == "torch-packed":
        pytest.skip("the GPU path: deterministic run to run on one device, not across CPU thread counts")
    specs = [Spec((300_001,), torch.float32), Spec((5, 7), torch.float16), Spec((70_000,), torch.float64),
             Spec((4096 * 3 + 5,), torch.bfloat16), Spec((33, 1000), torch.float32, glayout="transposed"),
             Spec((9000,), torch.float32, grad=False), Spec((1_100_003,), torch.float32)]
    case = build_case(specs, 5, alpha=-0.4, device="cpu")
    saved = [None if p.grad is None else p.grad.clone() for p in case.params]
    old = torch.get_num_threads()
    outs = []
    try:
        for n in (1, threads):
            torch.set_num_threads(n)
            for p, g in zip(case.params, saved):
                if g is not None:
                    p.grad.copy_(g)
            res = agem_fast.project_(case.params, case.ref_arg)
            outs.append((res, [None if p.grad is None else bits(p.grad) for p in case.params]))
    finally:
        torch.set_num_threads(old)
    (r1, g1), (r2, g2) = outs
    assert bool(r1.projected)
    for name in ("dot", "ref_sq_norm", "coef", "projected"):
        assert torch.equal(bits(getattr(r1, name)), bits(getattr(r2, name))), name
    for i, (a, b) in enumerate(zip(g1, g2)):
        assert (a is None and b is None) or torch.equal(a, b), f"params[{i}].grad"


@pytest.mark.parametrize("sizes", [(4096,), (4095,), (4097,), (1024,) * 4, (8192,), (1 << 16,)],
                         ids=lambda s: "+".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_bitwise_identical_for_any_thread_count_at_row_sizes(sizes, dtype, backend):
    """The sizes where the torch backend's CPU sums change shape: one row (4,096 elements:
    a CPU BLAS dot splits exactly that many fp64 elements over threads, so the one-row sums
    must not be BLAS), several rows, a batch of small tensors filling one row, a full batch."""
    if backend == "torch-packed":
        pytest.skip("the GPU path: deterministic run to run on one device, not across CPU thread counts")
    case = build_case([Spec((n,), dtype) for n in sizes], 7, alpha=-0.4, device="cpu")
    saved = [p.grad.clone() for p in case.params]
    old = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for p, g in zip(case.params, saved):
                p.grad.copy_(g)
            res = agem_fast.project_(case.params, case.ref_arg)
            outs.append([bits(res.dot), bits(res.ref_sq_norm)] + [bits(p.grad) for p in case.params])
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_bitwise_identical_for_any_thread_count_with_a_broadcast_reference(dtype, backend):
    """A reference made by expand() (stride 0 along a row) is read as it is by an
    elementwise update, which rounds some elements by another path when torch splits
    the rows over threads differently (2 of 48,516 bits differed, found by a randomized
    campaign): the update must not depend on the thread count there either."""
    if backend == "torch-packed":
        pytest.skip("the GPU path: deterministic run to run on one device, not across CPU thread counts")
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(311, 1, generator=gen).to(dtype).expand(311, 156)
    g0 = (-0.5 * r.double() + torch.randn(311, 156, generator=gen, dtype=torch.float64)).to(dtype)
    old = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            p = torch.empty(311, 156, dtype=dtype)
            p.grad = g0.clone()
            res = agem_fast.project_([p], [r])
            assert bool(res.projected)
            outs.append(bits(p.grad))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_bitwise_identical_for_any_thread_count_over_many_chunks(dtype, backend):
    """DESIGN section 1: the partials of many chunks (the extension's 16K-element chunks,
    the torch backend's rows) are added in one fixed order, whatever the thread count.
    The test above cannot see a reduction regrouped by thread: its partials are mostly
    fp32 values of one magnitude, whose fp64 sum is exact in any order. Here every
    tensor spans several chunks and has its own scale (2^-20 .. 2^20), so any regrouping
    of the fp64 additions changes the last bits of dot and rr."""
    if backend == "torch-packed":
        pytest.skip("the GPU path: deterministic run to run on one device, not across CPU thread counts")
    rnd = random.Random(23)
    specs = [Spec((3 * (1 << 14) + rnd.randint(1, 5000),), dtype, scale=2.0 ** rnd.randint(-20, 20))
             for _ in range(12)]
    specs.append(Spec((2 * (1 << 14) + 3,), dtype, grad=False, scale=2.0 ** 10))  # reference-only
    case = build_case(specs, 31, alpha=-0.4, device="cpu")
    orc = oracle(case.grads, case.refs, case.eps)
    saved = [None if p.grad is None else p.grad.clone() for p in case.params]
    old = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3, 4):
            torch.set_num_threads(n)
            for p, g in zip(case.params, saved):
                if g is not None:
                    p.grad.copy_(g)
            res = agem_fast.project_(case.params, case.ref_arg)
            if n == 1:
                check_call(res, orc, [p.grad for p in case.params], saved, "cpu")
            outs.append([bits(getattr(res, name)) for name in ("dot", "ref_sq_norm", "coef")]
                        + [bits(p.grad) for p in case.params if p.grad is not None])
    finally:
        torch.set_num_threads(old)
    assert bool(res.projected)
    for n, out in zip((2, 3, 4), outs[1:]):
        for k, (a, b) in enumerate(zip(outs[0], out)):
            assert torch.equal(a, b), f"{n} threads: output {k} differs from 1 thread"


def test_coef_beyond_fp32_range_updates_like_the_extension(backend):
    """dot ~ -1 over rr ~ 1e-40 (an fp64 pair) gives coef ~ -8e39, past fp32's range. The
    fp32 and bf16 updates take coef rounded to their fp32 math (DESIGN section 1), -inf,
    as the extension's kernels do; the fp64 one takes it whole. Nothing raises (the torch
    backend's scalar alpha used to: 'value cannot be converted to type float')."""
    p64, p32, p16 = torch.empty(2, dtype=torch.float64), torch.empty(3), torch.empty(2, dtype=torch.bfloat16)
    p64.grad = torch.tensor([1e20, 3.0], dtype=torch.float64)
    p32.grad = torch.tensor([5.0, 1.0, -2.0])
    p16.grad = torch.tensor([3.0, 1.0], dtype=torch.bfloat16)
    refs = [torch.tensor([-1e-20, 0.5e-20], dtype=torch.float64), torch.tensor([0.0, 1e-30, -1e-30]),
            torch.tensor([1e-30, -1e-30], dtype=torch.bfloat16)]
    res = agem_fast.project_([p64, p32, p16], refs)
    assert bool(res.projected) and float(res.coef) < -3.5e38
    coef = float(res.coef)
    want64 = torch.tensor([1e20, 3.0], dtype=torch.float64) - coef * refs[0]  # fp64: the whole coef
    torch.testing.assert_close(p64.grad, want64, rtol=1e-12, atol=0)
    c32 = torch.tensor(coef, dtype=torch.float64).float()  # -inf
    for p, r, g in ((p32, refs[1], [5.0, 1.0, -2.0]), (p16, refs[2], [3.0, 1.0])):
        want = (torch.tensor(g).float() - c32 * r.float()).to(p.grad.dtype)
        assert torch.equal(bits(p.grad), bits(want)), (p.grad, want)


FP32_MAX = torch.finfo(torch.float32).max


@pytest.mark.parametrize("magnitude,as_fp32", [
    (FP32_MAX + 2.0 ** 102, FP32_MAX),                     # past FLT_MAX by a quarter ulp
    (2.0 ** 128 - 2.0 ** 103 - 2.0 ** 75, FP32_MAX),       # just below the midpoint
    (2.0 ** 128 - 2.0 ** 103, math.inf),                   # the midpoint: ties to even
], ids=["quarter_ulp", "below_midpoint", "midpoint"])
def test_coef_just_past_fp32_range_rounds_to_nearest(magnitude, as_fp32, backend, device):
    """A coef past FLT_MAX by less than half an ulp rounds to FLT_MAX in the fp32 update,
    from the midpoint on to an infinity, on every device (the CPU kernels used to take
    anything past FLT_MAX as an infinity, the CUDA ones rounded). dot is -magnitude
    exactly (an fp64 pair against a reference of 1), rr is 1 (2^-100 elements square to
    nothing next to it); the fp32 and bf16 products with 2^-100 are then exact, so
    fused multiply-adds round alike."""
    assert torch.tensor(-magnitude, dtype=torch.float64).float().item() == -as_fp32  # IEEE
    tiny = 2.0 ** -100
    p64 = torch.empty(1, dtype=torch.float64, device=device)
    p32 = torch.empty(3, device=device)
    p16 = torch.empty(2, dtype=torch.bfloat16, device=device)
    p64.grad = torch.tensor([-magnitude], dtype=torch.float64, device=device)
    p32.grad = torch.tensor([5.0, 1.0, -2.0], device=device)
    p16.grad = torch.tensor([3.0, 1.0], dtype=torch.bfloat16, device=device)
    refs = [torch.tensor([1.0], dtype=torch.float64, device=device),
            torch.tensor([0.0, tiny, -tiny], device=device),
            torch.tensor([tiny, -tiny], dtype=torch.bfloat16, device=device)]
    res = agem_fast.project_([p64, p32, p16], refs)
    assert bool(res.projected) and float(res.coef) == -magnitude and float(res.ref_sq_norm) == 1.0
    c32 = -as_fp32
    for p, r, g in ((p32, [0.0, tiny, -tiny], [5.0, 1.0, -2.0]), (p16, [tiny, -tiny], [3.0, 1.0])):
        want = [x - c32 * y for x, y in zip(g, r)]  # fp64 math on exact fp32 products
        want = torch.tensor(want, dtype=torch.float64).float().to(p.grad.dtype)
        # exactly, NaN payloads aside (-inf * 0 makes the platform's default NaN)
        torch.testing.assert_close(p.grad.cpu(), want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("route", ["plain", "planned", "staged"])
def test_updated_grads_have_their_version_bumped(route, backend, device):
    """Every route writes the grads the way an in-place op does, so autograd can tell
    a saved gradient was modified: the C++ fast path, the planner's ops, and pairs the
    planner stages (grad and reference in different memory orders)."""
    from agem_fast._api import _project_planned

    specs = [Spec((6, 5), torch.float32), Spec((4, 4), torch.float32), Spec((7,), torch.float32)]
    if route == "staged":
        specs[0].glayout = "transposed"
    case = build_case(specs, 8, alpha=-0.5, device=device)
    before = [p.grad._version for p in case.params]
    if route == "planned":
        with torch.no_grad():
            res = _project_planned(case.params, case.ref_arg, 0.0, None)
    else:
        res = agem_fast.project_(case.params, case.ref_arg)
    assert bool(res.projected)
    for i, (p, v) in enumerate(zip(case.params, before)):
        assert p.grad._version > v, f"params[{i}].grad was written without a version bump"


def test_cpu_sums_ignore_the_float32_matmul_precision(backend):
    """torch.set_float32_matmul_precision("medium") lets fp32 matmuls round their inputs
    to bf16 on CPUs that have it; the sums must not go through such a path (the same
    bits as under "highest", and the oracle's accuracy)."""
    specs = [Spec((300_001,), torch.float32), Spec((64, 70), torch.float32), Spec((9,), torch.float32)]
    case = build_case(specs, 6, alpha=-0.4, device="cpu")
    saved = [p.grad.clone() for p in case.params]
    old = torch.get_float32_matmul_precision()
    outs = []
    try:
        for precision in ("highest", "medium"):
            torch.set_float32_matmul_precision(precision)
            for p, g in zip(case.params, saved):
                p.grad.copy_(g)
            res = agem_fast.project_(case.params, case.ref_arg)
            outs.append((res, [bits(p.grad) for p in case.params]))
    finally:
        torch.set_float32_matmul_precision(old)
    (r1, g1), (r2, g2) = outs
    for name in ("dot", "ref_sq_norm", "coef"):
        assert torch.equal(bits(getattr(r1, name)), bits(getattr(r2, name))), name
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    exact = oracle(saved, case.refs)
    assert abs(float(r2.dot) - exact.dot) <= 1e-6 * abs(exact.dot)
    assert abs(float(r2.ref_sq_norm) - exact.rr) <= 1e-6 * exact.rr


CHUNK_ELEMS = 16384  # the extension's chunk (build_info()["chunk_elems"])


@pytest.mark.parametrize("n_tensors,size", [(10, 100), (10, 5000), (1, 10 * CHUNK_ELEMS + 17)],
                         ids=["small_tensors", "multi_row_tensors", "one_tensor_of_many_chunks"])
def test_fp32_sums_never_span_two_tensors(n_tensors, size, backend):
    """DESIGN section 1: fp32 accumulation inside a chunk, fp64 across chunks and
    tensors. Each tensor's (or, for the single big tensor, each chunk's) <g,r> here is
    about -5e37 (fits fp32) and the total about -5e38, past fp32's largest value; one
    further tensor adds a dot a million times smaller. Summing chunks or tensors in
    fp32 would overflow to -inf (coef NaN, every gradient NaN) and lose the small
    tensor's share."""
    if backend == "extension":
        assert agem_fast.backend_info()["extension"]["build_info"]["chunk_elems"] == CHUNK_ELEMS
    gen = torch.Generator().manual_seed(23)
    per_elem = 5e37 / min(size, CHUNK_ELEMS)  # |g_i r_i|: about -5e37 per tensor or chunk
    params, refs = [], []
    for _ in range(n_tensors):
        r = (torch.rand(size, generator=gen, dtype=torch.float64) + 0.5) * math.sqrt(per_elem)
        p = torch.zeros(size)
        p.grad = (-r).float()
        params.append(p)
        refs.append(r.float())
    p = torch.zeros(size)
    p.grad = torch.randn(size, generator=gen) * 1e-3
    params.append(p)
    refs.append(torch.randn(size, generator=gen))
    before = [p.grad.clone() for p in params]
    orc = oracle(before, refs)
    res = agem_fast.project_(params, refs)
    assert math.isfinite(float(res.dot)) and math.isfinite(float(res.ref_sq_norm)), res
    check_call(res, orc, [p.grad for p in params], before, "cpu")


def test_cuda_work_is_queued_on_the_current_stream(backend, device):
    """project_ queues everything on the current stream: run on a side stream while the
    default stream is kept busy, its results (read back on the side stream, which waits
    for nothing else) must already be the projection. Work queued on the default stream
    would still be waiting behind the sleep."""
    if device.type != "cuda":
        pytest.skip("streams are CUDA's")
    gen = torch.Generator().manual_seed(21)
    params, refs = [], []
    for shape in [(3000,), (40, 50), (7,)]:
        g = rand_values(gen, shape)
        p = torch.empty(shape, device=device)
        p.grad = g.to(device=device, dtype=torch.float32)
        params.append(p)
        refs.append((-g + 0.5 * rand_values(gen, shape)).to(device=device, dtype=torch.float32))  # projects
    before = [p.grad.cpu() for p in params]
    orc = oracle(before, [r.cpu() for r in refs])
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    torch.cuda._sleep(int(2e8))  # the default stream: busy for about 0.1 s
    with torch.cuda.stream(side):
        res = agem_fast.project_(params, refs)
        res_cpu = type(res)(*(t.cpu() for t in res))  # each copy waits for the side stream only
        after = [p.grad.cpu() for p in params]
    torch.cuda.synchronize()
    assert bool(res_cpu.projected)
    check_call(res_cpu, orc, after, before, torch.device("cpu"))
