"""Plain float64 oracle for the A-GEM projection (DESIGN.md section 1), and the
error model the tests use to compare an implementation against it.

Independent of the package on purpose: nothing here imports agem_fast.

The math
--------
For parameters with gradients g_i (may be None) and references r_i (may be None):

    dot  = sum over i with g_i and r_i present of <g_i, r_i>
    rr   = sum over i with r_i present          of <r_i, r_i>
    coef = dot / (rr + eps)   if dot < 0 and rr + eps > 0   else 0
    g_i <- g_i - coef * r_i   for every i with g_i and r_i present

`oracle()` evaluates this in float64 on the CPU from the exact values the
implementation sees (the inputs already rounded to their dtype), pairing g_i and
r_i in logical (row-major) element order whatever their memory layouts are.

The error model (why the tolerances are what they are)
-------------------------------------------------------
An implementation is allowed to accumulate in fp32 (fp16/bf16/fp32 inputs) or
fp64 (fp64 inputs), and to sum in any fixed order. So:

* Reductions. With RED[a] the relative tolerance of accumulation precision `a`
  (fp64: 1e-12, fp32: see RED_TOL) the bounds are

      |dot_impl - dot|  <= B_dot = sum_i RED[a_i] * sum_k |g_ik * r_ik|
      |rr_impl  - rr |  <= B_rr  = sum_i RED[a_i] * sum_k  r_ik^2

  i.e. the error of `dot` is measured against sum |g r| (the dot itself can
  cancel to anything, including exactly 0; the rounding errors cannot).

* coef. First-order propagation of the two bounds through dot / (rr + eps):

      |coef_impl - coef| <= d_coef = (B_dot + |coef| * B_rr) / (rr + eps)

* The update. g_new = g - coef * r can cancel, so elementwise error is measured
  relative to |g| + |coef * r| (plus the dtype's tiny), never relative to |g_new|:

      |g_impl - g_new| <= 1 ulp_dtype(g_new)                       final rounding
                         + UPD[a] * (|g| + |coef * r|)               fp32/fp64 math
                         + d_coef * |r|                              coef's error
                         + tiny                                      underflow

  where "tiny" is the dtype's smallest subnormal spacing plus the absolute error
  of coef rounded to the compute precision near underflow (2^-150 * |r| for fp32
  math, 2^-1075 * |r| for fp64). It is deliberately not the smallest *normal*
  number: gradual underflow is part of IEEE rounding, and a flush-to-zero
  implementation must not slip through on tiny gradients.

  For fp16/bf16 the first term is "within an ulp of the oracle rounded to that
  dtype"; the second is 4 units of fp32 roundoff (coef rounded to fp32, the
  product, the subtraction), far below an fp16/bf16 ulp unless the result
  cancels.

* Decision. `projected` must equal the oracle's unless |dot| <= B_dot (the sign
  of dot is then not determined by the precision the contract allows). In that
  ambiguous band either answer passes, since the coef and update bounds above
  already cover a coef of ~0.

* Non-finite values follow the formula exactly: where the oracle gives NaN or
  +-Inf the implementation must give the same (NaN matches NaN), and when the
  implementation reports no projection every gradient must be bit-identical to its
  input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

# Relative tolerance of a reduction accumulated in this precision, measured against
# sum |terms| (see the module docstring). fp32: the contract allows fp32 partial
# sums inside a chunk. A BLAS sdot over a 2^17-element piece of fp16-valued squares
# is off by ~1.5e-6 (measured), so 5e-6 leaves a margin while staying 2-3 orders of
# magnitude tighter than fp16/bf16 accumulation would be.
RED_TOL = {torch.float64: 1e-12, torch.float32: 5e-6}
# Relative roundoff of the update arithmetic (coef rounding, product, subtraction).
UPD_TOL = {torch.float64: 4 * 2.0**-53, torch.float32: 4 * 2.0**-24}
# Absolute error of coef once rounded to the compute precision, near underflow.
COEF_UNDERFLOW = {torch.float64: 2.0**-1075, torch.float32: 2.0**-150}

# Significand precision (implicit bit included) and smallest subnormal spacing.
_PRECISION = {
    torch.float16: (11, 2.0**-24),
    torch.bfloat16: (8, 2.0**-133),
    torch.float32: (24, 2.0**-149),
    torch.float64: (53, 2.0**-1074),
}


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision the contract allows for reductions and the update of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def ulp(x64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` at x64 rounded to `dtype` (float64 result, finite x)."""
    p, min_spacing = _PRECISION[dtype]
    xr = x64.to(dtype).to(torch.float64)
    _, e = torch.frexp(xr)  # |xr| = m * 2^e, m in [0.5, 1)
    u = torch.ldexp(torch.ones_like(xr), (e - p).to(torch.int64))
    u = torch.where(xr == 0, torch.full_like(xr, min_spacing), u)
    return torch.clamp(u, min=min_spacing)


@dataclass
class OracleResult:
    dot: float
    rr: float
    coef: float
    projected: bool
    # float64 CPU tensors in the gradient's shape (logical order), None where g is None
    new_grads: List[Optional[torch.Tensor]]
    # error model
    b_dot: float
    b_rr: float
    d_coef: float
    ambiguous: bool
    # per parameter: float64 |g| + |coef r| + d_coef |r| style pieces
    old_grads: List[Optional[torch.Tensor]] = field(default_factory=list)
    refs: List[Optional[torch.Tensor]] = field(default_factory=list)
    dtypes: List[Optional[torch.dtype]] = field(default_factory=list)


def _f64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if t is None:
        return None
    return t.detach().to(device="cpu", dtype=torch.float64).clone()


def oracle(grads: Sequence[Optional[torch.Tensor]], refs: Sequence[Optional[torch.Tensor]],
           eps: float = 0.0) -> OracleResult:
    """DESIGN section 1 in float64.

    `grads[i]` is the gradient of parameter i (or None); `refs[i]` its reference
    (or None), any shape with the parameter's numel, paired in logical row-major
    order. `grads` are read, never written.
    """
    assert len(grads) == len(refs)
    g64 = [_f64(g) for g in grads]
    r64 = []
    for g, r in zip(g64, refs):
        r = _f64(r)
        if r is not None and g is not None:
            r = r.reshape(g.shape)
        r64.append(r)

    dot_terms, rr_terms = [], []
    b_dot = 0.0
    b_rr = 0.0
    dtypes = []
    for g_orig, r_orig, g, r in zip(grads, refs, g64, r64):
        dt = g_orig.dtype if g_orig is not None else (r_orig.dtype if r_orig is not None else None)
        dtypes.append(dt)
        if r is None:
            continue
        tol = RED_TOL[accum_dtype(r_orig.dtype)]
        rr_terms.append(torch.dot(r.reshape(-1), r.reshape(-1)))
        b_rr += tol * float((r * r).sum())
        if g is not None:
            dot_terms.append(torch.dot(g.reshape(-1), r.reshape(-1)))
            b_dot += tol * float((g * r).abs().sum())

    dot = float(torch.stack(dot_terms).sum()) if dot_terms else 0.0
    rr = float(torch.stack(rr_terms).sum()) if rr_terms else 0.0
    denom = rr + eps
    projected = bool(dot < 0 and denom > 0)  # NaN compares False
    if projected:
        coef = float(torch.tensor(dot, dtype=torch.float64) / torch.tensor(denom, dtype=torch.float64))
    else:
        coef = 0.0

    new_grads = []
    for g, r in zip(g64, r64):
        if g is None:
            new_grads.append(None)
        elif r is None or not projected:
            new_grads.append(g.clone())
        else:
            new_grads.append(g - coef * r)

    if math.isfinite(dot) and math.isfinite(rr) and denom > 0:
        d_coef = (b_dot + abs(coef) * b_rr) / denom
    elif math.isfinite(dot) and math.isfinite(rr):
        d_coef = 0.0  # denom == 0: dot == 0 too, coef is exactly 0
    else:
        d_coef = float("nan")
    ambiguous = math.isfinite(dot) and abs(dot) <= b_dot and denom > 0
    if ambiguous:
        # the implementation may land on either side of 0: its |coef| can reach
        # (|dot| + B_dot) / denom <= 2 B_dot / denom while ours is <= B_dot / denom
        d_coef += b_dot / denom
    return OracleResult(dot=dot, rr=rr, coef=coef, projected=projected, new_grads=new_grads,
                        b_dot=b_dot, b_rr=b_rr, d_coef=d_coef, ambiguous=ambiguous,
                        old_grads=g64, refs=r64, dtypes=dtypes)


# ----------------------------------------------------------------------------------
# comparison helpers


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of t (same shape, integer dtype), for bit-identity checks."""
    size = t.element_size()
    int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
    return t.detach().view(int_dtype).cpu().clone()


def assert_bit_identical(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    ba, bb = bits(a), bits(b)
    if not torch.equal(ba, bb):
        n = int((ba != bb).sum())
        raise AssertionError(f"{what}: {n} of {a.numel()} elements changed (expected bit-identical)")


def _close_scalar(actual: float, expected: float, tol: float) -> bool:
    if math.isnan(expected):
        return math.isnan(actual)
    if math.isinf(expected):
        return actual == expected
    if not math.isfinite(actual):
        return False
    if math.isnan(tol):
        return actual == expected
    return abs(actual - expected) <= tol


def _same_device(actual: torch.device, expected) -> bool:
    expected = torch.device(expected)
    if actual.type != expected.type:
        return False
    if expected.index is None:  # "cuda" means the current device
        if expected.type == "cuda":
            return actual.index == torch.cuda.current_device()
        return True
    return actual.index == expected.index


def check_scalars(res, orc: OracleResult, device: torch.device) -> None:
    """Fields of a Projection: 0-dim tensors on `device`, values per the error model."""
    names = ("dot", "ref_sq_norm", "coef", "projected")
    assert tuple(res._fields) == names, res._fields
    for name in names:
        t = getattr(res, name)
        assert isinstance(t, torch.Tensor), f"{name} is {type(t).__name__}"
        assert t.dim() == 0, f"{name} has shape {tuple(t.shape)}"
        assert _same_device(t.device, device), f"{name} on {t.device}, expected {device}"
    for name in ("dot", "ref_sq_norm", "coef"):
        assert getattr(res, name).dtype == torch.float64, f"{name} is {getattr(res, name).dtype}"
    assert res.projected.dtype == torch.bool, res.projected.dtype

    dot, rr, coef = float(res.dot), float(res.ref_sq_norm), float(res.coef)
    projected = bool(res.projected)
    tiny = 1e-300
    assert _close_scalar(dot, orc.dot, orc.b_dot + tiny), f"dot {dot!r} vs oracle {orc.dot!r} (bound {orc.b_dot:.3g})"
    assert _close_scalar(rr, orc.rr, orc.b_rr + tiny), f"rr {rr!r} vs oracle {orc.rr!r} (bound {orc.b_rr:.3g})"
    if not orc.ambiguous:
        assert projected == orc.projected, (
            f"projected={projected}, oracle says {orc.projected} (dot={orc.dot!r}, rr={orc.rr!r})")
    if not projected:
        assert coef == 0.0, f"coef {coef!r} but not projected"
    else:
        assert _close_scalar(coef, orc.coef, orc.d_coef * (1 + 1e-9) + tiny), (
            f"coef {coef!r} vs oracle {orc.coef!r} (bound {orc.d_coef:.3g})")


def check_grad(actual: torch.Tensor, before: torch.Tensor, orc: OracleResult, i: int,
               projected: bool) -> None:
    """Gradient i after the call, against the oracle (`before` is a clone of its input)."""
    what = f"params[{i}].grad"
    assert actual.dtype == before.dtype and actual.shape == before.shape, what
    r = orc.refs[i]
    if not projected or r is None:
        assert_bit_identical(actual, before, what)
        return
    dtype = actual.dtype
    a = actual.detach().to("cpu", torch.float64)
    exp = orc.new_grads[i]
    g = orc.old_grads[i]
    coef = orc.coef
    exp_rounded = exp.to(dtype).to(torch.float64)
    finite = torch.isfinite(exp_rounded)
    # non-finite expectations: exact (NaN matches NaN, Inf matches the same Inf)
    nf = ~finite
    if nf.any():
        ea, ee = a[nf], exp_rounded[nf]
        same = (ea == ee) | (torch.isnan(ea) & torch.isnan(ee))
        assert bool(same.all()), f"{what}: non-finite mismatch, got {ea[~same][:5].tolist()} expected {ee[~same][:5].tolist()}"
    if finite.any():
        acc = accum_dtype(dtype)
        d_coef = orc.d_coef if math.isfinite(orc.d_coef) else 0.0
        with torch.no_grad():
            scale = g.abs() + (coef * r).abs()
            allowed = (ulp(torch.where(finite, exp, torch.zeros_like(exp)), dtype)
                       + UPD_TOL[acc] * scale + (d_coef + COEF_UNDERFLOW[acc]) * r.abs()
                       + _PRECISION[dtype][1])
            err = (a - exp).abs()
            bad = finite & ~(err <= allowed)
        if bad.any():
            idx = bad.nonzero()[0].tolist()
            k = tuple(idx)
            raise AssertionError(
                f"{what} ({dtype}): {int(bad.sum())} of {a.numel()} elements out of tolerance; "
                f"first at {k}: got {a[k].item()!r}, oracle {exp[k].item()!r}, g={g[k].item()!r}, "
                f"r={r[k].item()!r}, coef={coef!r}, allowed {allowed[k].item():.3g}")


def check_call(res, orc: OracleResult, grads_after: Sequence[Optional[torch.Tensor]],
               grads_before: Sequence[Optional[torch.Tensor]], device) -> None:
    """Everything a call must satisfy: Projection fields and every gradient."""
    check_scalars(res, orc, device)
    projected = bool(res.projected)
    for i, (ga, gb) in enumerate(zip(grads_after, grads_before)):
        if gb is None:
            assert ga is None, f"params[{i}].grad was None and became a tensor"
            continue
        assert ga is not None, f"params[{i}].grad became None"
        check_grad(ga, gb, orc, i, projected)
