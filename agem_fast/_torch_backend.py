"""Pure-PyTorch backend: no compiler, no concatenation, no host sync on CUDA.

On the CPU it works tensor by tensor, small ones in batches: <g,r> and <r,r> summed by
rows (the same bits for any thread count), then g updated in place only if projecting.

Off the CPU a call is bound by the cost of launching kernels, not by memory traffic:
with a few kernels per tensor, ResNet-18's 62 tensors took 4 ms on an H200, four times
Avalanche's own step. There, tensors under 2^23 elements are packed, in groups of one
dtype of at most 2^23 elements, into a scratch buffer with multi-tensor copies
(torch._foreach_copy_), and each group's sums and update are a handful of whole-buffer
ops however many tensors it holds; larger tensors are taken one by one, and so are
pairs whose g and r lie in memory in different orders. The update always runs (no host
sync decides to skip it) and selects with torch.where, as it also does under
torch.compile. Temporaries never grow with the total parameter count: at most a few
times max(largest tensor, 2^23) elements.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import torch

from ._plan import Plan, as_bits

_LOW_PRECISION = (torch.float16, torch.bfloat16)

# On the CPU, <g,r> and <r,r> are summed per row of _ROW elements with torch's own
# reductions (a product into a buffer of _PIECE elements, then one sum per row), and
# the row partials are added in fp64 in index order. Each row is summed whole by one
# thread (torch parallelises a reduction over its output rows, and splits a single
# output's inputs only past its grain size, 32,768), so the bits never depend on the
# thread count, as DESIGN section 1 asks. Not BLAS: sdot splits a long
# vector over threads (its bits change with torch.set_num_threads) and accumulates it
# in a few fp32 lanes; a matmul may round fp32 inputs to bf16/tf32 when
# torch.set_float32_matmul_precision allows it.
_ROW = 1 << 12
_PIECE = 1 << 20
# Tensors of at most _SMALL elements are summed in batches of up to _SMALL_BATCH elements.
_SMALL = _ROW
_SMALL_BATCH = 1 << 16


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
    # Outermost dimension first: contiguous, so a view (dynamo cannot trace storage_offset()).
    return t.permute(dims[::-1]).view(-1)


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
    if n <= _ROW:  # one row. Not vecdot: that is a BLAS dot, threaded from 4,096 fp64 elements
        if g is not None:
            dots.append(torch.sum(torch.mul(g, r, out=buf[:n])))
        sqs.append(torch.sum(torch.mul(r, r, out=buf[:n])))
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
    if len(parts) == 1 and parts[0].dtype == torch.float64:
        return parts[0]  # (on a GPU, each op is a kernel launch)
    stacked = torch.stack(parts)
    if device.type == "cpu":
        return _in_order_sum(stacked)
    return stacked.sum(dtype=torch.float64)


def _sums(plan: Plan, packing: "_Packing | None" = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """fp64 dot and ||r||^2."""
    dots: List[torch.Tensor] = []
    sqs: List[torch.Tensor] = []
    if not _packed_path(plan):
        # One scratch buffer per accumulation dtype, sized once for the largest tensor or
        # batch (at most _PIECE elements): growing it call by call costs fresh pages.
        largest = 0  # (a loop: torch.compile of torch 2.13 cannot trace max(..., default=))
        for r in plan.refs + plan.ref_only:
            largest = max(largest, r.numel())
        size = min(max(largest, _SMALL_BATCH), _PIECE)
        bufs = {}

        def row_sums(g, r, accum=_as_accum):
            r = accum(r)
            buf = bufs.get(r.dtype)
            if buf is None:
                buf = bufs[r.dtype] = torch.empty(size, dtype=r.dtype, device=r.device)
            _row_sums_cpu(None if g is None else accum(g), r, dots, sqs, buf)

        def batch_sums(gs, rs):  # in fp64: a row may span tensors, which add up in fp64
            row_sums(torch.cat(gs) if gs else None, torch.cat(rs), accum=torch.Tensor.double)

        # Small contiguous tensors are summed as batches of one dtype, copied one after the
        # other by torch.cat (a few us per tensor less than a call each); the rest one by one.
        batches = {}  # (dtype, has g) -> ([g pieces], [r pieces], elements)
        for g, r in zip(plan.grads + [None] * len(plan.ref_only), plan.refs + plan.ref_only):
            n = r.numel()
            if n <= _SMALL and r.is_contiguous() and (g is None or g.is_contiguous()):
                key = (r.dtype, g is not None)
                gs, rs, total = batches.get(key) or ([], [], 0)
                if total + n > _SMALL_BATCH:
                    batch_sums(gs, rs)
                    gs, rs, total = [], [], 0
                if g is not None:
                    gs.append(_as_1d(g))
                rs.append(_as_1d(r))
                batches[key] = (gs, rs, total + n)
                continue
            if g is not None and not (g.is_contiguous() and r.is_contiguous()):
                g, r = _flat_pair(g, r)
            row_sums(g, r if r.is_contiguous() else r.contiguous())
        for gs, rs, _ in batches.values():
            batch_sums(gs, rs)
    else:
        _packed_sums(packing or _Packing(plan), dots, sqs)
    return _ordered_sum(dots, plan.device), _ordered_sum(sqs, plan.device)


def decide(dot: torch.Tensor, rr: torch.Tensor, eps: float):
    """coef and projected flag of DESIGN section 1, as device tensors (no sync)."""
    denom = rr + eps if eps else rr
    projected = (dot < 0) & (denom > 0)  # NaN compares False: no projection
    coef = torch.where(projected, dot / denom, torch.zeros_like(dot))
    return coef, projected


def project(plan: Plan):
    from ._api import Projection

    # Both passes share one packing: the tensors copied in last are still in place.
    packing = _Packing(plan) if _packed_path(plan) else None
    dot, rr = _sums(plan, packing)
    coef, projected = decide(dot, rr, plan.eps)
    apply(plan, coef, projected, packing)
    return Projection(dot, rr, coef, projected)


def sums(plan: Plan) -> torch.Tensor:
    """Pass 1 only: float64 tensor [dot, rr] (for the sharded path)."""
    return torch.stack(_sums(plan))


def apply(plan: Plan, coef: torch.Tensor, projected: torch.Tensor,
          packing: "_Packing | None" = None) -> None:
    """Pass 2: g -= coef * r where projected, else every g left bit-identical."""
    if not plan.grads:
        return
    if not _packed_path(plan) and not torch.compiler.is_compiling():
        # On the CPU reading the flag costs nothing, and skipping saves a full pass
        # (but a compiled graph cannot branch on it).
        if bool(projected):
            _update_cpu(plan, float(coef))
    else:
        _update_device(packing or _Packing(plan), coef, projected)


def _shaped_pairs(plan: Plan):
    """(g, r) with r viewed in g's shape (contiguous pairs may come in other shapes)."""
    for g, r in zip(plan.grads, plan.refs):
        yield g, (r if r.shape == g.shape else r.view(g.shape))


_FP32_MAX = torch.finfo(torch.float32).max
_FP32_ROUNDS_TO_INF = 2.0 ** 128 - 2.0 ** 103  # FLT_MAX + half an ulp: ties go to even, inf


def _as_fp32_scalar(x: float) -> float:
    """x rounded to fp32's range as the update's fp32 math takes it (torch refuses a finite
    alpha beyond fp32's largest value): to nearest, as the extension's kernels do."""
    if abs(x) <= _FP32_MAX or math.isnan(x):
        return x
    return math.copysign(math.inf if abs(x) >= _FP32_ROUNDS_TO_INF else _FP32_MAX, x)


def _update_cpu(plan: Plan, coef: float) -> None:
    by_dtype = {}  # dtype -> ([g], [r]) of the fp32 and fp64 pairs
    irregular = set(plan.irregular)  # the pairs not both contiguous
    for k, (g, r) in enumerate(_shaped_pairs(plan)):
        if k in irregular and not same_dense_layout(g, r):
            # r copied into g's strides: an elementwise op walking two layouts (say a
            # stride-0 expanded r) rounds some elements by another path depending on how
            # torch splits the work over threads; DESIGN section 1 wants the same bits.
            r = torch.empty_strided(g.size(), g.stride(), dtype=g.dtype, device=g.device).copy_(r)
        if g.dtype in _LOW_PRECISION:  # fp32 math, one rounding
            g.copy_(g.float().sub_(r.float(), alpha=_as_fp32_scalar(coef)))
        else:
            gs, rs = by_dtype.setdefault(g.dtype, ([], []))
            gs.append(g)
            rs.append(r)
    for dtype, (gs, rs) in by_dtype.items():  # g.sub_(r, alpha=coef) in one call per dtype
        alpha = -coef if dtype == torch.float64 else _as_fp32_scalar(-coef)
        torch._foreach_add_(gs, rs, alpha=alpha)


# ---------------------------------------------------------------------------------
# Off the CPU (and under torch.compile): no host sync, few kernel launches.

# Tests set this to run the packed path on CPU tensors, against the same oracle.
PACKED_ON_CPU = False

# Tensors of fewer elements are packed, in groups of at most this many elements; larger
# ones are taken one by one (a few launches are cheap next to their memory traffic).
# Timed on an H200 at 2^20..2^23 (bench/torch_pack_limit.py): 2^23 was fastest on
# ResNet-18 and ViT-B/16 (1.7x and 1.5x faster than 2^20) and within 2% of 2^20 on GPT-2,
# for a larger scratch (ResNet-18 fp32: 198 MiB extra at peak instead of 35 MiB).
_PACK_LIMIT = 1 << 23


def _packed_path(plan: Plan) -> bool:
    return plan.device.type != "cpu" or PACKED_ON_CPU


class _Group:
    """Small tensors of one dtype, all with a gradient or all reference-only, packed one
    after the other into a scratch row. `grads` and `refs` are 1-D views of their memory
    (both in the same element order), so every slot and its tensor have equal sizes and
    strides: the condition for torch._foreach_copy_'s multi-tensor kernel on a GPU."""

    def __init__(self, dtype: torch.dtype, has_grads: bool):
        self.dtype = dtype
        self.has_grads = has_grads
        self.grads: List[torch.Tensor] = []
        self.refs: List[torch.Tensor] = []
        self.numels: List[int] = []
        self.total = 0
        self.rows: torch.Tensor | None = None  # this group's part of the scratch, [g;] r
        self.g_slots: List[torch.Tensor] = []  # views of the rows, one per tensor
        self.r_slots: List[torch.Tensor] = []

    def add(self, g: torch.Tensor | None, r: torch.Tensor, n: int) -> None:
        if g is not None:
            self.grads.append(as_bits(g))
        self.refs.append(as_bits(r))
        self.numels.append(n)
        self.total += n

    def cut(self, scratch: torch.Tensor) -> None:
        self.rows = scratch[:, : self.total] if self.has_grads else scratch[1:, : self.total]
        self.r_slots = list(torch.split_with_sizes(as_bits(self.rows[-1]), self.numels))
        if self.has_grads:
            self.g_slots = list(torch.split_with_sizes(as_bits(self.rows[0]), self.numels))


def _as_1d(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor as 1-D (no new view when it is 1-D already)."""
    return t if t.dim() == 1 else t.view(-1)


class _Packing:
    """The tensors of one call as the packed path walks them: `large` (g or None, r)
    one by one, the others in `groups`, which share one scratch of two rows per dtype
    (as long as that dtype's longest group). Deterministic: the same lists, the same
    walk. Temporaries never grow with the total parameter count."""

    def __init__(self, plan: Plan):
        self.large: List[tuple] = []
        self.groups: List[_Group] = []
        irregular = set(plan.irregular)
        limit = _PACK_LIMIT
        open_groups = {}
        entries = zip(plan.grads + [None] * len(plan.ref_only), plan.refs + plan.ref_only)
        for k, (g, r) in enumerate(entries):
            n = r.numel()
            # Flat memory: both contiguous (whatever their shapes), or dense in one order
            # (channels_last, say); anything else is taken one by one.
            if g is None:
                gf, rf = None, _as_1d(r) if r.is_contiguous() else dense_flat(r)
            elif k not in irregular:
                gf, rf = _as_1d(g), _as_1d(r)
            elif same_dense_layout(g, r):
                gf, rf = dense_flat(g), dense_flat(r)
            else:
                rf = None
            if n >= limit or rf is None:
                self.large.append((g, r))
                continue
            key = (r.dtype, g is not None)
            group = open_groups.get(key)
            if group is None or group.total + n > limit:
                group = open_groups[key] = _Group(r.dtype, g is not None)
                self.groups.append(group)
            group.add(gf, rf, n)
        # Reference-only groups first: pass 1 then ends on groups pass 2 needs, and
        # pass 2 finds the last of them still in the scratch.
        self.groups.sort(key=lambda group: group.has_grads)
        longest = {}
        for group in self.groups:
            longest[group.dtype] = max(longest.get(group.dtype, 0), group.total)
        scratch = {dt: torch.empty(2, n, dtype=dt, device=plan.device) for dt, n in longest.items()}
        for group in self.groups:
            group.cut(scratch[group.dtype])
        self._loaded = {}  # dtype -> the group whose tensors that scratch holds

    def load(self, group: _Group) -> None:
        """Copy group's tensors into its scratch rows, unless they are there already."""
        if self._loaded.get(group.dtype) is group:
            return
        torch._foreach_copy_(group.r_slots, group.refs)
        if group.has_grads:
            torch._foreach_copy_(group.g_slots, group.grads)
        self._loaded[group.dtype] = group


def _packed_sums(packing: _Packing, dots: list, sqs: list) -> None:
    """Append the partial <g,r> and <r,r> (fp64 0-dim tensors) of every large tensor and
    every group to `dots` and `sqs`. Products of fp16/bf16 are taken in fp32 (exactly)
    and every sum is accumulated in fp64; on a GPU a reduction of a given size is
    deterministic."""
    for g, r in packing.large:  # (not torch.dot: a CPU BLAS sums in fp32, in few lanes)
        if g is not None:
            gf, rf = _flat_pair(g, r)
            rf = _as_accum(rf)
            dots.append((_as_accum(gf) * rf).sum(dtype=torch.float64))
        else:
            rf = _as_accum(r.reshape(-1))
        sqs.append((rf * rf).sum(dtype=torch.float64))
    for group in packing.groups:
        packing.load(group)
        rows = _as_accum(group.rows)
        sums = (rows * rows[-1]).sum(1, dtype=torch.float64)  # [<g,r>,] <r,r>
        if group.has_grads:
            dots.append(sums[0])
        sqs.append(sums[-1])


def _update_device(packing: _Packing, coef: torch.Tensor, projected: torch.Tensor) -> None:
    """Pass 2 without a host sync: the update always runs, and torch.where keeps g's bits
    when not projecting (0 * inf in r would otherwise turn g into NaN). Both branches of
    the where are in g's dtype: a round trip through fp32 could change a NaN's bits."""
    neg_coef = {}  # -coef in each dtype the update computes in (fp32, or fp64 for fp64)

    def select_update(g, r):  # g <- g - coef * r if projected, in place
        acc = torch.float64 if g.dtype == torch.float64 else torch.float32
        if acc not in neg_coef:
            neg_coef[acc] = -coef.to(acc)
        if g.dtype in _LOW_PRECISION:  # fp32 math, rounded once
            new = torch.addcmul(g.float(), r.float(), neg_coef[acc]).to(g.dtype)
        else:
            new = torch.addcmul(g, r, neg_coef[acc])
        torch.where(projected, new, g, out=g)

    for g, r in packing.large:
        if g is not None:
            select_update(g, r if r.shape == g.shape else r.view(g.shape))
    # Last group first: pass 1 left its tensors in the scratch.
    for group in reversed(packing.groups):
        if group.has_grads:
            packing.load(group)
            g_row, r_row = group.rows
            select_update(g_row, r_row)
            torch._foreach_copy_(group.grads, group.g_slots)
