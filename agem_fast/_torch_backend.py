"""Pure-PyTorch backend: no compiler, no concatenation, no host sync on CUDA.

Per tensor pair it reads g and r for <g,r> and <r,r>, then (only if projecting)
updates g in place. Temporaries are at most one tensor's worth (fp16/bf16 upcasts)
and, on the CPU, two accumulators of at most 2^19 lanes: never proportional to the
total parameter count.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

from ._plan import Plan

_LOW_PRECISION = (torch.float16, torch.bfloat16)

# On the CPU, <g,r> and <r,r> are accumulated elementwise into two accumulator vectors
# of at most _TILE lanes (fp32; fp64 for fp64 inputs): element k of a tensor's tile adds
# g*r (and r*r) to lane k with one addcmul_, so each lane sees the same additions in the
# same order whatever the thread count (an elementwise op computes each element once,
# and torch's vector and scalar loops round it alike: checked by
# test_cpu_bitwise_identical_for_any_thread_count). Each row of _ROW lanes is then summed
# by one thread (torch parallelises a reduction over its output rows) and the row sums
# are added in fp64 in index order. Each tile is read once from memory for <g,r>, and
# its second read of r for <r,r> hits the cache. Not BLAS: sdot splits a long vector
# over threads (its bits change with torch.set_num_threads), and a matmul may round fp32
# inputs to bf16/tf32 when torch.set_float32_matmul_precision allows it.
_ROW = 1 << 12
_TILE = 1 << 19


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


def _in_order_sum(x: torch.Tensor) -> torch.Tensor:
    """fp64 sum of a CPU tensor's elements in index order: a 1-D cumsum is one sequential
    scan, where torch.sum may split a long vector over threads."""
    return x.reshape(-1).double().cumsum(0)[-1]


def _ordered_sum(parts: List[torch.Tensor], device: torch.device) -> torch.Tensor:
    """fp64 sum of 0-dim partials in list order (on a GPU, a reduction of a given size
    is deterministic)."""
    if not parts:
        return torch.zeros((), dtype=torch.float64, device=device)
    stacked = torch.stack(parts)
    if device.type == "cpu":
        return _in_order_sum(stacked)
    return stacked.sum(dtype=torch.float64)


def _sums(plan: Plan) -> Tuple[torch.Tensor, torch.Tensor]:
    """fp64 dot and ||r||^2 (fp32/fp64 partials, summed in fp64)."""
    if plan.device.type == "cpu":
        return _sums_cpu(plan)
    # cuBLAS dots are tree reductions, deterministic for a given device and size
    dots: List[torch.Tensor] = []
    sqs: List[torch.Tensor] = []
    for g, r in zip(plan.grads, plan.refs):
        gf, rf = _flat_pair(g, r)
        gf, rf = _as_accum(gf), _as_accum(rf)
        dots.append(torch.dot(gf, rf))
        sqs.append(torch.dot(rf, rf))
    for r in plan.ref_only:
        rf = _as_accum(r.reshape(-1))
        sqs.append(torch.dot(rf, rf))
    return _ordered_sum(dots, plan.device), _ordered_sum(sqs, plan.device)


def _sums_cpu(plan: Plan) -> Tuple[torch.Tensor, torch.Tensor]:
    """Lane accumulation of the comment on _TILE above."""
    pairs = list(zip(plan.grads, plan.refs)) + [(None, r) for r in plan.ref_only]
    # Accumulators sized once for the largest tensor (whole rows, at most _TILE lanes).
    largest = max((r.numel() for _, r in pairs), default=0)
    lanes = min(-(-max(largest, 1) // _ROW) * _ROW, _TILE)
    acc = {}  # accumulation dtype -> (2, lanes): row 0 <g,r>, row 1 <r,r>
    for g, r in pairs:
        if g is not None:
            g, r = _flat_pair(g, r)
        else:
            r = r.reshape(-1)
        kind = torch.float64 if r.dtype == torch.float64 else torch.float32
        if kind not in acc:
            acc[kind] = torch.zeros(2, lanes, dtype=kind)
        dot_lanes, sq_lanes = acc[kind]
        n = r.numel()
        for start in range(0, n, lanes):
            m = min(lanes, n - start)
            rt = r[start : start + m]
            if g is not None:  # fp16/bf16 tiles are widened to the fp32 lanes
                dot_lanes[:m].addcmul_(g[start : start + m], rt)
            sq_lanes[:m].addcmul_(rt, rt)
    dot = torch.zeros((), dtype=torch.float64)
    rr = torch.zeros((), dtype=torch.float64)
    for lanes_of_kind in acc.values():
        row_sums = lanes_of_kind.view(2, -1, _ROW).sum(2)
        dot = dot + _in_order_sum(row_sums[0])
        rr = rr + _in_order_sum(row_sums[1])
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
