"""Pure-PyTorch backend: no compiler, no concatenation, no host sync on CUDA.

Per tensor pair it reads g and r for <g,r> and <r,r>, then (only if projecting)
updates g in place. Temporaries are at most one tensor's worth (fp16/bf16 upcasts),
never proportional to the total parameter count.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

from ._plan import Plan

_LOW_PRECISION = (torch.float16, torch.bfloat16)

# CPU dot products run over pieces of this many elements: BLAS sdot accumulates long
# vectors in a few fp32 lanes (relative error ~1e-5 at 2M elements of one sign);
# summing 2^17-element partials in fp64 keeps it within ~2e-6 (measured on 10^6
# elements) for a few microseconds of call overhead per piece.
_CPU_PIECE = 1 << 17


def dense_flat(t: torch.Tensor) -> torch.Tensor | None:
    """1-D view of `t`'s memory in storage order, if `t` is non-overlapping and dense."""
    if t.is_contiguous():
        return t.view(-1)
    dims = sorted(range(t.dim()), key=lambda d: t.stride(d))
    expected = 1
    for d in dims:
        if t.size(d) != 1 and t.stride(d) != expected:
            return None
        expected *= t.size(d)
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def same_dense_layout(g: torch.Tensor, r: torch.Tensor) -> bool:
    """True when g and r can be walked as two flat buffers in the same element order."""
    if g.is_contiguous() and r.is_contiguous():  # the common case, decided cheaply
        return True
    if g.numel() <= 1:
        return True
    sizes = g.shape
    for d in range(g.dim()):
        if sizes[d] != 1 and g.stride(d) != r.stride(d):
            return False
    return dense_flat(g) is not None


def _flat_pair(g: torch.Tensor, r: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if same_dense_layout(g, r):
        return dense_flat(g), dense_flat(r)
    return g.reshape(-1), r.reshape(-1)  # logical order; copies only for this one tensor


def _as_accum(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in _LOW_PRECISION else x


def _pieces(*flats: torch.Tensor, piece):
    if piece is None or flats[0].numel() <= piece:
        return (flats,)
    return zip(*(f.split(piece) for f in flats))


def _sums(plan: Plan) -> Tuple[torch.Tensor, torch.Tensor]:
    """fp64 dot and ||r||^2 (per-tensor partials in fp32/fp64, summed in fp64)."""
    piece = _CPU_PIECE if plan.device.type == "cpu" else None  # cuBLAS dots are tree reductions
    dots: List[torch.Tensor] = []
    sqs: List[torch.Tensor] = []
    for g, r in zip(plan.grads, plan.refs):
        gf, rf = _flat_pair(g, r)
        for gp, rp in _pieces(_as_accum(gf), _as_accum(rf), piece=piece):
            # <g,r> then <r,r> back to back, so the second read of r mostly hits cache.
            dots.append(torch.dot(gp, rp))
            sqs.append(torch.dot(rp, rp))
    for r in plan.ref_only:
        for (rp,) in _pieces(_as_accum(r.reshape(-1)), piece=piece):
            sqs.append(torch.dot(rp, rp))
    zero = torch.zeros((), dtype=torch.float64, device=plan.device)
    dot = torch.stack(dots).sum(dtype=torch.float64) if dots else zero
    rr = torch.stack(sqs).sum(dtype=torch.float64) if sqs else zero.clone()
    return dot, rr


def decide(dot: torch.Tensor, rr: torch.Tensor, eps: float):
    """coef and projected flag of DESIGN section 1, as device tensors (no sync)."""
    denom = rr + eps
    projected = (dot < 0) & (denom > 0)  # NaN compares False: no projection
    coef = torch.where(projected, dot / denom, torch.zeros_like(dot))
    return coef, projected


def project(plan: Plan):
    from ._api import Projection

    dot, rr = _sums(plan)
    coef, projected = decide(dot, rr, plan.eps)
    apply(plan, coef, projected)
    return Projection(dot, rr, coef, projected)


def sums(plan: Plan) -> torch.Tensor:
    """Pass 1 only: float64 tensor [dot, rr] (for the sharded path)."""
    return torch.stack(_sums(plan))


def apply(plan: Plan, coef: torch.Tensor, projected: torch.Tensor) -> None:
    """Pass 2: g -= coef * r where projected, else every g left bit-identical."""
    if not plan.grads:
        return
    if plan.device.type == "cpu" and not torch.compiler.is_compiling():
        # On the CPU reading the flag costs nothing, and skipping saves a full pass
        # (but a compiled graph cannot branch on it).
        if bool(projected):
            _update_cpu(plan, float(coef))
    else:
        _update_device(plan, coef, projected)


def _shaped_pairs(plan: Plan):
    """(g, r) with r viewed in g's shape (contiguous pairs may come in other shapes)."""
    for g, r in zip(plan.grads, plan.refs):
        yield g, (r if r.shape == g.shape else r.view(g.shape))


def _update_cpu(plan: Plan, coef: float) -> None:
    for g, r in _shaped_pairs(plan):
        if g.dtype in _LOW_PRECISION:
            g.copy_(g.float().sub_(r.float(), alpha=coef))  # fp32 math, one rounding
        else:
            g.sub_(r, alpha=coef)


def _update_device(plan: Plan, coef: torch.Tensor, projected: torch.Tensor) -> None:
    # Without a host sync the update always runs; torch.where keeps g bit-identical
    # when not projecting (0 * inf in r would otherwise turn g into NaN).
    coef32 = coef.float()
    for g, r in _shaped_pairs(plan):
        c = coef if g.dtype == torch.float64 else coef32
        new = (_as_accum(g) - c * _as_accum(r)).to(g.dtype)
        # Both branches in g's dtype: a round trip through fp32 could change the bits
        # of a NaN that must stay as it was.
        g.copy_(torch.where(projected, new, g))
