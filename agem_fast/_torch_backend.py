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

# On the CPU, <g,r> and <r,r> are summed per row of _ROW elements with torch's own
# reductions (a product into a buffer of _PIECE elements, then one sum per row), and
# the row partials are added in fp64 in index order. Each row is summed whole by one
# thread (torch parallelises a reduction over its output rows), so the bits never
# depend on the thread count, as DESIGN section 1 asks. Not BLAS: sdot splits a long
# vector over threads (its bits change with torch.set_num_threads) and accumulates it
# in a few fp32 lanes; a matmul may round fp32 inputs to bf16/tf32 when
# torch.set_float32_matmul_precision allows it.
_ROW = 1 << 12
_PIECE = 1 << 20


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


def _row_sums_cpu(g: torch.Tensor | None, r: torch.Tensor, dots: list, sqs: list,
                  buf: torch.Tensor) -> None:
    """Append <g,r> (when g is given) and <r,r> of one contiguous pair to `dots` and
    `sqs` as 0-dim tensors. `buf`: scratch of r's dtype, at least min(numel, _PIECE)."""
    n = r.numel()
    g = g.view(-1) if g is not None else None
    r = r.view(-1)
    if n <= _ROW:  # one row (most tensors of a model)
        if g is not None:
            dots.append(torch.linalg.vecdot(g, r))
        sqs.append(torch.linalg.vecdot(r, r))
        return
    # One partial per row, written in place; then one per tensor, so temporaries never
    # grow with the size of the model.
    n_rows = -(-n // _ROW)
    row_sqs = torch.empty(n_rows, dtype=r.dtype, device=r.device)
    row_dots = torch.empty(n_rows, dtype=r.dtype, device=r.device) if g is not None else None
    for start in range(0, n, _PIECE):
        m = min(_PIECE, n - start)
        first = start // _ROW  # pieces hold whole rows, but for a tensor's last one
        rp = r[start : start + m]
        # <g,r> then <r,r> back to back, so the second read of r hits the cache.
        for out, a in ((row_dots, g), (row_sqs, r)):
            if out is None:
                continue
            prod = torch.mul(a[start : start + m], rp, out=buf[:m])
            full_rows = m // _ROW
            if full_rows:
                torch.sum(prod[: full_rows * _ROW].view(full_rows, _ROW), 1,
                          out=out[first : first + full_rows])
            if full_rows * _ROW < m:  # the tensor's short last row
                torch.sum(prod[full_rows * _ROW :], 0, out=out[first + full_rows])
    if g is not None:
        dots.append(_in_order_sum(row_dots))
    sqs.append(_in_order_sum(row_sqs))


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
    """fp64 dot and ||r||^2 (partials in fp32/fp64, summed in fp64)."""
    dots: List[torch.Tensor] = []
    sqs: List[torch.Tensor] = []
    if plan.device.type == "cpu":
        # One scratch buffer per accumulation dtype, sized once for the largest tensor
        # (at most _PIECE elements): growing it call by call costs fresh pages.
        largest = max((r.numel() for r in plan.refs + plan.ref_only), default=0)
        size = min(max(largest, 1), _PIECE)
        bufs = {}
        for g, r in zip(plan.grads + [None] * len(plan.ref_only), plan.refs + plan.ref_only):
            if g is not None and not (g.is_contiguous() and r.is_contiguous()):
                g, r = _flat_pair(g, r)
            r = _as_accum(r if r.is_contiguous() else r.contiguous())
            buf = bufs.get(r.dtype)
            if buf is None:
                buf = bufs[r.dtype] = torch.empty(size, dtype=r.dtype, device=r.device)
            _row_sums_cpu(None if g is None else _as_accum(g), r, dots, sqs, buf)
    else:  # cuBLAS dots are tree reductions, deterministic for a given device and size
        for g, r in zip(plan.grads, plan.refs):
            gf, rf = _flat_pair(g, r)
            gf, rf = _as_accum(gf), _as_accum(rf)
            dots.append(torch.dot(gf, rf))
            sqs.append(torch.dot(rf, rf))
        for r in plan.ref_only:
            rf = _as_accum(r.reshape(-1))
            sqs.append(torch.dot(rf, rf))
    return _ordered_sum(dots, plan.device), _ordered_sum(sqs, plan.device)


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
