"""Validation of `project_` arguments and their normalisation into a `Plan`.

Everything a backend needs is checked here, before any gradient is written, so a
call that raises leaves every gradient exactly as it was.
"""

from __future__ import annotations

import bisect
import math
import numbers
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SUPPORTED_SET = frozenset(SUPPORTED_DTYPES)


@dataclass
class Plan:
    """The normalised problem: aligned (grad, ref) pairs and reference-only tensors.

    `refs[k]` has the numel of `grads[k]`: when both are contiguous they pair up as flat
    memory whatever their shapes; otherwise `refs[k]` has `grads[k]`'s shape and k is
    listed in `irregular`. `ref_only` tensors count in ||r||^2 only.
    """

    device: torch.device
    eps: float
    grads: List[torch.Tensor] = field(default_factory=list)
    refs: List[torch.Tensor] = field(default_factory=list)
    ref_only: List[torch.Tensor] = field(default_factory=list)
    irregular: List[int] = field(default_factory=list)


def check_eps(eps) -> float:
    if type(eps) is float and 0.0 <= eps < math.inf:  # the usual case, first (NaN fails)
        return eps
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):  # (NumPy's floats are Real)
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    try:
        eps = float(eps)
    except OverflowError:  # an int past float's range
        raise ValueError("eps must be finite and >= 0, got an integer too large for a float") from None
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return eps


def _check_tensor(t: torch.Tensor, what: str) -> None:
    if t.layout != torch.strided:
        raise ValueError(f"{what} is sparse ({t.layout}); only dense (strided) tensors are supported")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{what} has unsupported dtype {t.dtype}; supported: float16, bfloat16, float32, float64"
        )


def _refs_from_flat(flat: torch.Tensor, params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Split an Avalanche-layout flat vector into per-parameter views (no copy)."""
    if flat.dim() != 1:
        raise ValueError(
            f"ref_grad tensor must be 1-D (Avalanche's flat layout), got shape {tuple(flat.shape)}"
        )
    numels = [_local_numel(p) for p in params]
    total = sum(numels)
    if flat.numel() != total:
        raise ValueError(
            f"flat ref_grad has {flat.numel()} elements but the parameters have {total} in total"
        )
    return list(flat.split(numels))  # views, in one C++ call


# Largest tensor whose element offsets are enumerated to prove it has no overlap.
_OVERLAP_ENUMERATION_LIMIT = 1 << 22


_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """t's memory as integers of its element size. Copies and selects made through it move
    the bits as they are: CUDA copies fp16/bf16 through fp32, and compiled code computes in
    fp32, either of which turns every NaN into the canonical one."""
    return t.view(_SAME_SIZE_INT[t.element_size()])


def _overlaps(t: torch.Tensor) -> bool:
    """True when some elements of t may share memory: updating it in place would then
    depend on the order of the writes (torch's own in-place ops refuse such tensors)."""
    if t.numel() <= 1:
        return False
    check = getattr(torch, "_debug_has_internal_overlap", None)
    verdict = check(t) if check is not None else 2
    if verdict != 2:  # 0: MemOverlap::No, 1: MemOverlap::Yes, 2: TooHard (any gapped view)
        return verdict == 1
    dims = sorted((t.stride(d), t.size(d)) for d in range(t.dim()) if t.size(d) > 1)
    extent = 1  # every dimension stepping over all the smaller ones: provably disjoint
    for stride, size in dims:
        if stride < extent:
            break
        extent = stride * size
    else:
        return False
    if t.numel() > _OVERLAP_ENUMERATION_LIMIT:
        return True  # cannot prove otherwise at a reasonable cost
    offsets = _offsets(dims)
    return torch.unique(offsets).numel() != offsets.numel()


def _offsets(dims) -> torch.Tensor:
    """Every offset sum(i_d * stride_d) over dims [(stride, size), ...], as a CPU tensor."""
    offsets = torch.zeros(1, dtype=torch.int64, device="cpu")  # whatever the default device
    for stride, size in dims:
        step = torch.arange(size, dtype=torch.int64, device="cpu") * stride
        offsets = (offsets.unsqueeze(-1) + step).reshape(-1)
    return offsets


def _local_shard(t: torch.Tensor, what: str, sharded: bool) -> torch.Tensor:
    """A DTensor's local shard (a view: in-place updates reach the DTensor); else t."""
    placements = getattr(t, "placements", None)
    if placements is None or not hasattr(t, "to_local"):
        return t
    if not sharded:
        raise ValueError(f"{what} is a DTensor: pass group= (its mesh's process group) to project_")
    if not all(pl.is_shard() for pl in placements):
        raise ValueError(f"{what} is a DTensor with placements {placements}; only Shard placements "
                         "are supported (a replicated piece would be counted once per rank)")
    return t.to_local()


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _local_numel(p: torch.Tensor) -> int:
    """Elements this rank holds of p (a DTensor parameter holds only its shard)."""
    if type(p) in _PLAIN_TENSOR_TYPES or getattr(p, "placements", None) is None:
        return p.numel()
    return p.to_local().numel()


def param_list(params) -> list:
    """project_'s `params` as a list, read once (a generator cannot be read twice)."""
    if isinstance(params, torch.Tensor):
        return [params]  # a lone tensor is one parameter, not an iterable of rows
    return params if isinstance(params, list) else list(params)


def _span(t: torch.Tensor):
    """The bytes [lo, hi) that t's elements lie within (None when t has none)."""
    if t.numel() == 0:
        return None
    extent = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    lo = t.data_ptr()
    return lo, lo + extent * t.element_size()


def _same_view(g: torch.Tensor, r: torch.Tensor) -> bool:
    """r is g's own memory, element for element (a pair aliased with itself is harmless:
    each element is read before it is written)."""
    if g.data_ptr() != r.data_ptr() or g.dtype != r.dtype or g.numel() != r.numel():
        return False
    if g.is_contiguous() and r.is_contiguous():
        return True
    return g.shape == r.shape and all(
        n == 1 or a == b for n, a, b in zip(g.shape, g.stride(), r.stride()))


def _spans_overlap(grad_spans, ref_spans) -> bool:
    """Cheap filter for _check_no_shared_memory: whether the byte range of a written
    gradient meets that of another one or of a protected tensor. Spans are (lo, hi)."""
    grad_spans.sort()
    for k in range(1, len(grad_spans)):
        if grad_spans[k][0] < grad_spans[k - 1][1]:
            return True  # two gradients (the check decides whether they truly overlap)
    # Now disjoint and sorted: the first gradient ending after a reference begins is the
    # only one that can start before it ends.
    los = [lo for lo, _ in grad_spans]
    his = [hi for _, hi in grad_spans]
    for lo, hi in ref_spans:
        k = bisect.bisect_right(his, lo)
        if k < len(los) and los[k] < hi:
            return True
    return False


# Most contiguous pieces _check_no_shared_memory enumerates before giving up.
_RUN_ENUMERATION_LIMIT = 1 << 24


def _runs(t: torch.Tensor):
    """t's elements as runs of contiguous memory: (start byte of each run, run bytes)."""
    dims = sorted(((st, n) for n, st in zip(t.shape, t.stride()) if n > 1 and st > 0), reverse=True)
    run = 1  # elements; the innermost dimensions merge while they are contiguous
    while dims and dims[-1][0] == run:
        run *= dims.pop()[1]
    size = t.element_size()
    return t.data_ptr() + _offsets(dims) * size, run * size


def _check_no_shared_memory(written, protected) -> None:
    """Refuse a written gradient that shares memory with another one, or with a tensor
    that must not change while pass 2 runs: another parameter's reference (read by pass 2)
    or a gradient that has no reference. The in-place updates would otherwise depend on
    their order. `written`: (gradient, parameter index); `protected`: (tensor, its name).
    Every tensor is cut into its contiguous runs, and the runs are checked all at once."""
    entries = [(g, True, f"params[{i}].grad") for g, i in written] + [
        (t, False, name) for t, name in protected]
    starts, ends, is_written, owner = [], [], [], []
    total = 0
    for k, (t, w, _) in enumerate(entries):
        if t.numel() == 0:
            continue
        s, length = _runs(t)
        total += s.numel()
        if total > _RUN_ENUMERATION_LIMIT:
            raise ValueError(
                f"{entries[k][2]} may share memory with another gradient or reference: their "
                "strides are too irregular to check at a reasonable cost; pass copies")
        starts.append(s)
        ends.append(s + length)
        is_written.append(torch.full(s.shape, w, device="cpu"))
        owner.append(torch.full(s.shape, k, device="cpu"))
    if not starts:
        return
    start, order = torch.sort(torch.cat(starts), stable=True)
    end, w, own = torch.cat(ends)[order], torch.cat(is_written)[order], torch.cat(owner)[order]
    none = torch.tensor([-1], device="cpu")  # below every address (any default device)

    def prior_max(x):  # the largest of x over the runs sorted before each run
        return torch.cat([none, torch.cummax(x, 0).values[:-1]])

    # A run of a written gradient never meets an earlier run of its own (it would overlap
    # itself, refused before), so any earlier written run ending past its start is another's.
    after_written = start < prior_max(torch.where(w, end, -1))
    after_protected = w & (start < prior_max(torch.where(w, -1, end)))
    clash = torch.nonzero(after_written | after_protected)
    if clash.numel() == 0:
        return
    k = int(clash[0])
    mask = (end[:k] > start[k]) & (w[:k] | w[k]) & (own[:k] != own[k])
    j = int(torch.nonzero(mask)[-1])
    a, b = sorted((int(own[k]), int(own[j])))  # written ones come first in `entries`
    name_a, name_b = entries[a][2], entries[b][2]
    if entries[b][1] or name_b.endswith(".grad"):
        raise ValueError(f"{name_a} and {name_b} share memory; a gradient is updated in place, "
                         "so it may not overlap another gradient")
    raise ValueError(f"{name_b} shares memory with {name_a}, which is updated in place; pass a "
                     "copy of the reference (e.g. .clone())")


def make_plan(params: list, ref_grad, eps: float, sharded: bool = False) -> Plan:
    """Validate the tensors and build the Plan. Raises before touching any gradient.

    `params` comes from param_list and `eps` from check_eps (project_ runs both first).
    """
    from ._reference import ReferenceGradient  # local: avoids an import cycle

    first_index = {}
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, expected a torch.Tensor")
        j = first_index.setdefault(id(p), i)
        if j != i:  # its gradient would be counted, and updated, twice
            raise ValueError(f"params[{i}] is the same tensor as params[{j}]; list each parameter once")

    sizes_checked = False
    if isinstance(ref_grad, ReferenceGradient):
        refs: List[Optional[torch.Tensor]] = ref_grad.as_list()
        if len(refs) != len(params):
            raise ValueError(
                f"ReferenceGradient holds {len(refs)} tensors but {len(params)} params were given"
            )
    elif isinstance(ref_grad, torch.Tensor):
        _check_tensor(ref_grad, "ref_grad")
        refs = _refs_from_flat(ref_grad, params)
        sizes_checked = True  # split by the parameters' sizes
    elif isinstance(ref_grad, (list, tuple)):
        refs = list(ref_grad)
        if len(refs) != len(params):
            raise ValueError(f"ref_grad has {len(refs)} entries but {len(params)} params were given")
    else:
        raise TypeError(
            "ref_grad must be a sequence of tensors/None aligned with params, a 1-D flat tensor, "
            f"or an agem_fast.ReferenceGradient; got {type(ref_grad).__name__}"
        )

    # This loop runs once per parameter on every call (5,000+ tensors for some models),
    # so it reads each attribute once and builds error messages only when raising.
    supported, strided = _SUPPORTED_SET, torch.strided
    compiling = torch.compiler.is_compiling()  # dynamo cannot trace is_inference()
    device: Optional[torch.device] = None
    plan_grads, plan_refs, ref_only, irregular = [], [], [], []
    grad_index = []  # the parameter index of each pair (for errors)
    # For the memory-sharing check: byte ranges (lo, hi) of the gradients written and of
    # what must not change meanwhile (references read by pass 2, gradients left alone).
    grad_spans, ref_spans, kept = [], [], []
    flat_form = isinstance(ref_grad, torch.Tensor)
    for i, (p, r) in enumerate(zip(params, refs)):
        g = p.grad
        if g is not None:
            if type(g) is not torch.Tensor:
                g = _local_shard(g, f"params[{i}].grad", sharded)
            g_dtype = g.dtype
            if g.layout is not strided or g_dtype not in supported:
                _check_tensor(g, f"params[{i}].grad")
            g_device = g.device
            if device is None:
                device = g_device
            elif g_device != device:
                raise ValueError(f"params[{i}].grad is on {g_device}, other gradients are on {device}")
        if r is None:
            if g is not None and not compiling:  # left alone: no written gradient may overlap it
                kept.append((g, f"params[{i}].grad"))
                g_span = _span(g)
                if g_span is not None:
                    ref_spans.append(g_span)
            continue
        if type(r) is not torch.Tensor:
            if not isinstance(r, torch.Tensor):
                raise TypeError(f"ref_grad[{i}] is a {type(r).__name__}, expected a torch.Tensor or None")
            r = _local_shard(r, f"ref_grad[{i}]", sharded)
        r_dtype = r.dtype
        if r.layout is not strided or (r_dtype not in supported if g is None else r_dtype is not g_dtype):
            _check_tensor(r, f"ref_grad[{i}]")  # raises for sparse or unsupported dtypes
            raise TypeError(
                f"ref_grad[{i}] has dtype {r_dtype} but params[{i}].grad has {g_dtype}; "
                "a gradient and its reference must share a dtype"
            )
        r_device = r.device
        if device is None:
            device = r_device
        elif r_device != device:
            raise ValueError(f"ref_grad[{i}] is on {r_device}, the gradients are on {device}")
        if g is None:
            if r.numel() != _local_numel(p):
                raise ValueError(
                    f"ref_grad[{i}] has {r.numel()} elements but params[{i}] has {_local_numel(p)}"
                )
            ref_only.append(r)
            continue
        if not compiling and g.is_inference() and not torch.is_inference_mode_enabled():
            raise ValueError(
                f"params[{i}].grad is an inference tensor; it can be updated in place "
                "only inside torch.inference_mode()"
            )
        g_shape = g.shape
        if r.shape != g_shape and not sizes_checked and r.numel() != g.numel():
            raise ValueError(f"ref_grad[{i}] has {r.numel()} elements but params[{i}] has {g.numel()}")
        contiguous = g.is_contiguous() and r.is_contiguous()
        if not contiguous:
            # Both contiguous (the common case) pair up as flat memory whatever their
            # shapes; anything else gets g's shape and is flagged for the backends.
            if not compiling and _overlaps(g):  # (dynamo cannot trace the check)
                raise ValueError(
                    f"params[{i}].grad has elements sharing memory, or strides too irregular "
                    "to prove they do not (e.g. made by expand() or as_strided()); it cannot "
                    "be updated in place"
                )
            irregular.append(len(plan_grads))
            if r.shape != g_shape:
                r = r.reshape(g_shape)  # a view whenever the layout allows, else a copy
        if not compiling:  # the byte ranges written and read, for the check below
            if contiguous:
                g_lo = g.data_ptr()
                g_span = (g_lo, g_lo + g.nbytes)
            else:
                g_span = _span(g)
            if g_span is not None and g_span[0] < g_span[1]:
                grad_spans.append(g_span)
                r_lo = r.data_ptr()
                if g_span[0] == r_lo and _same_view(g, r):
                    # a reference that is its own gradient is harmless: each element is
                    # read before it is written (as g itself, so torch sees full overlap)
                    r = g
                elif not flat_form:  # (a flat reference is one range, added below)
                    ref_spans.append((r_lo, r_lo + r.nbytes) if contiguous else _span(r))
        plan_grads.append(g)
        plan_refs.append(r)
        grad_index.append(i)

    if device is None:
        device = params[0].device if params else torch.device("cpu")
    if not compiling and device.type != "meta":  # fake and meta tensors have no memory
        if flat_form:
            ref_spans.append(_span(ref_grad))
        # (reference-only entries are read in pass 1 only, before any write: never a hazard)
        if _spans_overlap(grad_spans, [s for s in ref_spans if s is not None]):
            _check_no_shared_memory(
                list(zip(plan_grads, grad_index)),
                [(r, f"ref_grad[{i}]") for g, r, i in zip(plan_grads, plan_refs, grad_index)
                 if r is not g] + kept)
    return Plan(device=device, eps=eps, grads=plan_grads, refs=plan_refs, ref_only=ref_only,
                irregular=irregular)
