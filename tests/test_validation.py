"""Bad input: a clear ValueError/TypeError naming the parameter index, raised before
any gradient is written.

Every case starts from a valid, strongly projecting problem (g = -r + noise, so a
non-atomic implementation that processed the entries before the bad one would
visibly change their gradients) and breaks entry 2 of 4, never the first.
"""

from __future__ import annotations

import importlib.util
import math
import re
import zlib

import pytest
import torch

import agem_fast
from oracle import assert_bit_identical, bits

SHAPES = [(6, 5), (2, 3, 4, 4), (17,), (3, 3)]
BAD = 2
TOTAL = sum(math.prod(s) for s in SHAPES)


def _vals(gen, shape):
    mag = torch.exp2(torch.rand(shape, generator=gen, dtype=torch.float64) * 4 - 2)
    sign = torch.randint(0, 2, shape, generator=gen).to(torch.float64) * 2 - 1
    return sign * mag


def valid_problem(device, dtypes=None, seed=0):
    """4 params with grads, aligned refs; the projection is certain (dot << 0)."""
    gen = torch.Generator().manual_seed(seed)
    dtypes = dtypes or [torch.float32] * len(SHAPES)
    params, refs = [], []
    for s, dt in zip(SHAPES, dtypes):
        r = _vals(gen, s)
        g = -r + 0.1 * _vals(gen, s)
        p = torch.empty(s, dtype=dt, device=device)
        p.grad = g.to(device=device, dtype=dt)
        params.append(p)
        refs.append(r.to(device=device, dtype=dt))
    return params, refs


def _other(device) -> str:
    """A second device: the CPU when testing on CUDA, else "meta" (no GPU needed)."""
    return "cpu" if torch.device(device).type == "cuda" else "meta"


def _param_on(shape, dev):
    p = torch.empty(shape, device=dev)
    p.grad = torch.ones(shape, device=dev)
    return p


def _typed_param(shape, dtype, device, gen):
    p = torch.zeros(shape, dtype=dtype, device=device)
    if dtype.is_complex:
        p.grad = torch.complex(_vals(gen, shape), _vals(gen, shape)).to(device=device, dtype=dtype)
    else:
        p.grad = torch.randint(1, 9, shape, generator=gen).to(device=device, dtype=dtype)
    return p


# Each builder mutates a valid (params, refs) and returns (params, ref_arg, kwargs, pattern):
# `pattern` (a regex, or a tuple of regexes that must all match) must be found in the
# error message: where (the index) and what is wrong.
IDX = r"(\[2\]|\b(param(eter)?|index|entry|tensor)\s*#?\s*2\b)"


def case_refs_too_short(params, refs, device, gen):
    return params, refs[:3], {}, r"3.*4|4.*3"


def case_refs_too_long(params, refs, device, gen):
    return params, refs + [refs[0].clone()], {}, r"5.*4|4.*5"


def case_refgrad_too_short(params, refs, device, gen):
    rg = agem_fast.ReferenceGradient(params[:3]).capture_(params[:3])
    return params, rg, {}, r"3.*4|4.*3"


def case_numel_mismatch(params, refs, device, gen):
    refs[BAD] = torch.ones(refs[BAD].numel() + 1, device=device)
    return params, refs, {}, (IDX, r"(?i)elements|numel")


def case_numel_mismatch_ref_only(params, refs, device, gen):
    params[BAD].grad = None
    refs[BAD] = torch.ones(refs[BAD].numel() - 1, device=device)
    return params, refs, {}, (IDX, r"(?i)elements|numel")


def case_refgrad_numel_mismatch(params, refs, device, gen):
    other = [torch.empty_like(p) for p in params]
    other[BAD] = torch.empty(params[BAD].numel() + 3, device=device)
    for o in other:
        o.grad = torch.ones_like(o)
    rg = agem_fast.ReferenceGradient(other).capture_(other)
    return params, rg, {}, (IDX, r"(?i)elements|numel")


def case_grad_on_other_device(params, refs, device, gen):
    params[BAD] = _param_on(SHAPES[BAD], _other(device))
    refs[BAD] = torch.ones(SHAPES[BAD], device=_other(device))
    return params, refs, {}, (IDX, r"(?i)device|\bon (meta|cpu)")


def case_grad_on_other_device_ref_local(params, refs, device, gen):
    params[BAD] = _param_on(SHAPES[BAD], _other(device))
    return params, refs, {}, (IDX, r"(?i)device|\bon (meta|cpu)")


def case_ref_on_other_device(params, refs, device, gen):
    refs[BAD] = torch.ones(SHAPES[BAD], device=_other(device))
    return params, refs, {}, (IDX, r"(?i)device|\bon (meta|cpu)")


def case_ref_only_on_other_device(params, refs, device, gen):
    params[BAD].grad = None
    refs[BAD] = torch.ones(SHAPES[BAD], device=_other(device))
    return params, refs, {}, (IDX, r"(?i)device|\bon (meta|cpu)")


def case_int_grad(params, refs, device, gen):
    params[BAD] = _typed_param(SHAPES[BAD], torch.int32, device, gen)
    return params, refs, {}, (IDX, r"(?i)dtype")


def case_complex_grad(params, refs, device, gen):
    params[BAD] = _typed_param(SHAPES[BAD], torch.complex64, device, gen)
    refs[BAD] = refs[BAD].to(torch.complex64)
    return params, refs, {}, (IDX, r"(?i)dtype")


def case_int_ref(params, refs, device, gen):
    refs[BAD] = torch.randint(1, 9, SHAPES[BAD], generator=gen).to(device)
    return params, refs, {}, (IDX, r"(?i)dtype")


def case_int_ref_only(params, refs, device, gen):
    params[BAD].grad = None
    refs[BAD] = torch.randint(1, 9, SHAPES[BAD], generator=gen).to(device)
    return params, refs, {}, (IDX, r"(?i)dtype")


def case_complex_ref(params, refs, device, gen):
    refs[BAD] = refs[BAD].to(torch.complex64)
    return params, refs, {}, (IDX, r"(?i)dtype")


def case_sparse_grad(params, refs, device, gen):
    p = torch.empty(SHAPES[BAD], device=device)
    p.grad = params[BAD].grad.to_sparse()
    params[BAD] = p
    return params, refs, {}, (IDX, r"(?i)sparse")


def case_overlapping_grad(params, refs, device, gen):
    # every element of this grad is one memory location (as from expand()): it cannot be
    # updated in place, so it must be refused before anything is written
    g = params[BAD].grad.clone()
    p = torch.empty(SHAPES[BAD], device=device)
    p.grad = g.as_strided(g.shape, [0] * g.dim())
    params[BAD] = p
    return params, refs, {}, (IDX, r"(?i)overlap|sharing memory")


def case_partly_overlapping_grad(params, refs, device, gen):
    # rows that share elements: torch can only answer "too hard" for such a view, and the
    # backends would disagree on it (the order of the writes decides), so it is refused
    shape = (3, 6)  # row i starts 4 elements after row i-1: rows share 2 elements
    base = _vals(gen, (30,)).to(device=device, dtype=torch.float32)
    p = torch.empty(shape, device=device)
    p.grad = base.as_strided(shape, (4, 1))
    params[BAD] = p
    refs[BAD] = _vals(gen, shape).to(device=device, dtype=torch.float32)
    return params, refs, {}, (IDX, r"(?i)overlap|sharing memory")


def case_inference_grad(params, refs, device, gen):
    # outside inference mode an inference tensor cannot be written in place: refused
    # up front, not half-way through the update
    p = torch.empty(SHAPES[BAD], device=device)
    with torch.inference_mode():
        p.grad = params[BAD].grad.clone()
    params[BAD] = p
    return params, refs, {}, (IDX, r"(?i)inference")


def case_duplicate_param(params, refs, device, gen):
    params[BAD] = params[BAD - 1]
    return params, refs, {}, (IDX, r"(?i)same tensor|duplicate|once")


def case_duplicate_param_without_grad(params, refs, device, gen):
    # reference-only twice: its <r, r> would be counted twice
    params[BAD - 1].grad = None
    params[BAD] = params[BAD - 1]
    refs[BAD] = refs[BAD - 1].clone()
    return params, refs, {}, (IDX, r"(?i)same tensor|duplicate|once")


def case_duplicate_param_once_without_ref(params, refs, device, gen):
    # written through entry 1, skipped (no reference) as entry 2
    params[BAD] = params[BAD - 1]
    refs[BAD] = None
    return params, refs, {}, (IDX, r"(?i)same tensor|duplicate|once")


def case_duplicate_param_never_written(params, refs, device, gen):
    params[BAD] = params[BAD - 1]
    refs[BAD - 1] = refs[BAD] = None
    return params, refs, {}, (IDX, r"(?i)same tensor|duplicate|once")


def case_ref_is_another_grad(params, refs, device, gen):
    # entry 2's reference is entry 1's gradient: updating params[1].grad first (or last)
    # would change what entry 2 reads, so the result would depend on the order
    p = torch.empty(SHAPES[1], device=device)
    p.grad = _vals(gen, SHAPES[1]).to(device=device, dtype=torch.float32)
    params[1] = p
    refs[1] = -p.grad.clone()
    refs[BAD] = p.grad.view(-1)[: refs[BAD].numel()]
    return params, refs, {}, (IDX, r"(?i)share|overlap|alias")


def _overlapping_grads(params, device, gen, shared):
    """Entries 1 and 2 get gradients cut from one buffer, entry 2's first `shared`
    elements being entry 1's last."""
    buf = _vals(gen, (TOTAL,)).to(device=device, dtype=torch.float32)
    p = torch.empty(SHAPES[1], device=device)
    p.grad = buf[: p.numel()].view(SHAPES[1])
    params[1] = p
    q = torch.empty(SHAPES[BAD], device=device)
    q.grad = buf[p.numel() - shared : p.numel() - shared + q.numel()]
    params[BAD] = q


def case_grads_share_memory(params, refs, device, gen):
    _overlapping_grads(params, device, gen, shared=3)
    return params, refs, {}, (IDX, r"(?i)share|overlap|alias")


def case_grad_without_ref_shares_memory(params, refs, device, gen):
    # entry 2 has no reference, so its gradient must stay as it is; but it overlaps
    # entry 1's gradient, which is updated in place
    _overlapping_grads(params, device, gen, shared=5)
    refs[BAD] = None
    return params, refs, {}, (IDX, r"(?i)share|overlap|alias")


def case_flat_ref_holds_a_grad(params, refs, device, gen):
    flat = torch.cat([r.reshape(-1) for r in refs])
    p = torch.empty(SHAPES[BAD], device=device)
    p.grad = flat[: p.numel()]  # inside entry 0's slice of the flat reference
    params[BAD] = p
    return params, flat, {}, (IDX, r"(?i)share|overlap|alias")


def case_sparse_ref(params, refs, device, gen):
    refs[BAD] = refs[BAD].to_sparse()
    return params, refs, {}, (IDX, r"(?i)sparse")


def case_sparse_flat(params, refs, device, gen):
    flat = torch.cat([r.reshape(-1) for r in refs]).to_sparse()
    return params, flat, {}, r"(?i)sparse"


def case_flat_too_long(params, refs, device, gen):
    flat = torch.cat([r.reshape(-1) for r in refs] + [torch.ones(1, device=device)])
    return params, flat, {}, f"{TOTAL + 1}.*{TOTAL}|{TOTAL}.*{TOTAL + 1}"


def case_flat_too_short(params, refs, device, gen):
    flat = torch.cat([r.reshape(-1) for r in refs])[:-1]
    return params, flat, {}, f"{TOTAL - 1}.*{TOTAL}|{TOTAL}.*{TOTAL - 1}"


def case_flat_not_1d(params, refs, device, gen):
    flat = torch.cat([r.reshape(-1) for r in refs]).reshape(1, TOTAL)
    return params, flat, {}, r"(?i)1-?d|dim|shape"


def case_ref_dtype_mismatch(params, refs, device, gen):
    refs[BAD] = refs[BAD].double()
    return params, refs, {}, (IDX, r"(?i)dtype")


def case_flat_dtype_mismatch(params, refs, device, gen):
    # params 0, 1 are float64 like the flat vector; params 2, 3 are float32
    for i in (0, 1):
        p = torch.empty(SHAPES[i], dtype=torch.float64, device=device)
        p.grad = params[i].grad.double()
        params[i] = p
        refs[i] = refs[i].double()
    flat = torch.cat([r.double().reshape(-1) for r in refs])
    return params, flat, {}, (IDX, r"(?i)dtype")


def case_refgrad_dtype_mismatch(params, refs, device, gen):
    other = [torch.empty_like(p) for p in params]
    other[BAD] = torch.empty(SHAPES[BAD], dtype=torch.float64, device=device)
    for o in other:
        o.grad = torch.ones_like(o)
    rg = agem_fast.ReferenceGradient(other).capture_(other)
    return params, rg, {}, (IDX, r"(?i)dtype")


def case_non_tensor_param(params, refs, device, gen):
    params[BAD] = [1.0, 2.0]
    return params, refs, {}, (IDX, r"(?i)expected a (torch\.)?tensor")


def case_non_tensor_ref(params, refs, device, gen):
    # A NumPy array where one is installed (torch may be, and run, without NumPy)
    have_numpy = importlib.util.find_spec("numpy") is not None
    refs[BAD] = refs[BAD].cpu().numpy() if device.type == "cpu" and have_numpy else 3.0
    return params, refs, {}, (IDX, r"(?i)expected a (torch\.)?tensor")


def case_scalar_ref(params, refs, device, gen):
    refs[BAD] = 0.5
    return params, refs, {}, (IDX, r"(?i)expected a (torch\.)?tensor")


def case_ref_grad_wrong_type(params, refs, device, gen):
    return params, {"weight": refs[0]}, {}, r"(?i)ref"


def case_eps_negative(params, refs, device, gen):
    return params, refs, {"eps": -1e-3}, r"(?i)eps"


def case_eps_nan(params, refs, device, gen):
    return params, refs, {"eps": float("nan")}, r"(?i)eps"


def case_eps_inf(params, refs, device, gen):
    return params, refs, {"eps": float("inf")}, r"(?i)eps"


def case_eps_string(params, refs, device, gen):
    return params, refs, {"eps": "0.1"}, r"(?i)eps"


def case_eps_none(params, refs, device, gen):
    return params, refs, {"eps": None}, r"(?i)eps"


def case_eps_int_past_float_range(params, refs, device, gen):
    return params, refs, {"eps": 10**400}, r"(?i)eps"


def case_group_not_a_process_group(params, refs, device, gen):
    return params, refs, {"group": "world"}, r"group must be a torch\.distributed\.ProcessGroup, got str"


CASES = {name[len("case_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_raises_and_changes_nothing(name, backend, device):
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    params, refs = valid_problem(device)
    params, ref_arg, kwargs, pattern = CASES[name](list(params), list(refs), device, gen)

    # what must survive: every grad object, its bits, and every reference
    grads = [p.grad if isinstance(p, torch.Tensor) else None for p in params]
    g_bits = [None if g is None or g.is_sparse or g.device.type == "meta" else bits(g) for g in grads]
    if isinstance(ref_arg, agem_fast.ReferenceGradient):
        ref_list = [t for t in ref_arg.as_list() if t is not None]
    elif isinstance(ref_arg, torch.Tensor):  # the flat form
        ref_list = [ref_arg]
    else:
        ref_list = ref_arg if isinstance(ref_arg, list) else []
    r_bits = [bits(r) if isinstance(r, torch.Tensor) and r.layout == torch.strided and r.device.type != "meta"
              else None for r in ref_list]

    with pytest.raises((ValueError, TypeError)) as info:
        agem_fast.project_(params, ref_arg, **kwargs)
    msg = str(info.value)
    for pat in (pattern if isinstance(pattern, tuple) else (pattern,)):
        assert re.search(pat, msg), f"message does not say what/where: {msg!r} (wanted /{pat}/)"

    for i, (p, g, b) in enumerate(zip(params, grads, g_bits)):
        if not isinstance(p, torch.Tensor):
            continue
        assert p.grad is g, f"params[{i}].grad was replaced"
        if b is not None:
            assert torch.equal(bits(p.grad), b), f"params[{i}].grad changed by a call that raised"
    for i, (r, b) in enumerate(zip(ref_list, r_bits)):
        if b is not None:
            assert torch.equal(bits(r), b), f"ref_grad[{i}] changed by a call that raised"


def test_valid_problem_projects(backend, device):
    """Sanity of the fixture itself: unbroken, it projects and changes every gradient,
    so the atomicity checks above are meaningful."""
    params, refs = valid_problem(device)
    before = [p.grad.clone() for p in params]
    res = agem_fast.project_(params, refs)
    assert bool(res.projected)
    for p, b in zip(params, before):
        assert not torch.equal(p.grad, b)


@pytest.mark.parametrize("name", ["flat_dtype_mismatch", "refgrad_dtype_mismatch", "sparse_grad"])
def test_earlier_entries_are_valid(name, backend, device):
    """The cases that rebuild entries keep entries 0, 1 valid: fixing entry 2 makes the
    call succeed (so the error really is about entry 2)."""
    gen = torch.Generator().manual_seed(1)
    params, refs = valid_problem(device)
    params, ref_arg, kwargs, _ = CASES[name](list(params), list(refs), device, gen)
    if name == "flat_dtype_mismatch":
        for i in (2, 3):
            p = torch.empty(SHAPES[i], dtype=torch.float64, device=device)
            p.grad = params[i].grad.double()
            params[i] = p
    elif name == "refgrad_dtype_mismatch":
        ref_arg = agem_fast.ReferenceGradient(params).capture_(params)
    else:
        params[BAD].grad = params[BAD].grad.to_dense()
    res = agem_fast.project_(params, ref_arg, **kwargs)
    assert res.dot.dim() == 0


def test_bad_entry_first_is_also_rejected(backend, device):
    """Error at index 0 names index 0 (the index is the real one, not a constant)."""
    params, refs = valid_problem(device)
    refs[0] = torch.ones(refs[0].numel() + 1, device=device)
    with pytest.raises(ValueError, match=r"\[0\]|\b0\b"):
        agem_fast.project_(params, refs)
    params, refs = valid_problem(device)
    refs[3] = refs[3].double()
    with pytest.raises(TypeError, match=r"\[3\]|\b3\b"):
        agem_fast.project_(params, refs)


def test_eps_accepts_any_real_number():
    """NumPy's float32 is a numbers.Real like a Python float: the same eps, the same coef."""
    np = pytest.importorskip("numpy")
    coefs = []
    for eps in (0.25, np.float32(0.25), np.float64(0.25)):
        params, refs = valid_problem(torch.device("cpu"))
        coefs.append(float(agem_fast.project_(params, refs, eps=eps).coef))
    assert coefs[0] == coefs[1] == coefs[2] != 0.0
