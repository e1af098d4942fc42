"""Validation of `project_` arguments and their normalisation into a `Plan`.

Everything a backend needs is checked here, before any gradient is written, so a
call that raises leaves every gradient exactly as it was.
"""

from __future__ import annotations

import bisect
import math
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
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    eps = float(eps)
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
    offsets = _element_offsets(t)
    return torch.unique(offsets).numel() != offsets.numel()


def _element_offsets(t: torch.Tensor, base: int = 0) -> torch.Tensor:
    """The memory offset (in elements, from `base`) of every element of t, as a CPU tensor."""
    offsets = torch.full((), base, dtype=torch.int64, device="cpu")  # whatever the default device
    for size, stride in zip(t.shape, t.stride()):
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


def _is_dense(t: torch.Tensor) -> bool:
    lo, hi = _span(t)
    return hi - lo == t.numel() * t.element_size()


def _share_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b, whose spans overlap, have some memory in common. Exact for dense
    tensors and for small strided views of one element size; otherwise assumes they do."""
    if _is_dense(a) and _is_dense(b):
        return True  # two dense ranges that overlap share bytes
    size = a.element_size()
    delta = b.data_ptr() - a.data_ptr()
    if (b.element_size() != size or delta % size
            or a.numel() + b.numel() > _OVERLAP_ENUMERATION_LIMIT):
        return True  # cannot prove otherwise at a reasonable cost
    return bool(torch.isin(_element_offsets(a), _element_offsets(b, delta // size)).any())


def _same_view(g: torch.Tensor, r: torch.Tensor) -> bool:
    """r is g's own memory, element for element (a pair aliased with itself is harmless:
    each element is read before it is written)."""
    if g.data_ptr() != r.data_ptr() or g.dtype != r.dtype or g.numel() != r.numel():
        return False
    return (g.is_contiguous() and r.is_contiguous()) or (
        g.shape == r.shape and g.stride() == r.stride())


def _spans_overlap(grad_spans, ref_spans) -> bool:
    """Cheap filter for _check_no_shared_memory: whether the byte range of a gradient
    meets that of another gradient or of a reference. Spans are (lo, hi) bytes."""
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


def _check_no_shared_memory(grads, grad_index, refs, ref_index) -> None:
    """Refuse gradients that share memory with another gradient or with another
    parameter's reference: pass 2 updates them in place one after another, so the result
    would depend on the order of the writes."""
    events = []  # (lo, hi, is_grad, parameter index, tensor)
    for g, i in zip(grads, grad_index):
        span = _span(g)
        if span is not None:
            events.append((span[0], span[1], True, i, g))
    for r, i in zip(refs, ref_index):
        span = _span(r)
        if span is not None:
            events.append((span[0], span[1], False, i, r))
    if len(events) < 2:
        return
    events.sort(key=lambda e: e[0])
    active_grads: list = []  # entries whose span may still overlap what comes next
    active_refs: list = []
    for ev in events:
        lo, _, is_grad, i, t = ev
        active_grads = [e for e in active_grads if e[1] > lo]
        others = active_grads
        if is_grad:
            active_refs = [e for e in active_refs if e[1] > lo]
            others = active_grads + active_refs
        for _, _, other_is_grad, j, u in others:
            if not is_grad and j == i and _same_view(u, t):
                continue
            if is_grad and not other_is_grad and j == i and _same_view(t, u):
                continue
            if not _share_elements(t, u):
                continue
            if is_grad and other_is_grad:
                a, b = sorted((i, j))
                raise ValueError(
                    f"params[{a}].grad and params[{b}].grad share memory; each gradient is "
                    "updated in place, so no two may overlap"
                )
            gi, rj = (i, j) if is_grad else (j, i)
            raise ValueError(
                f"ref_grad[{rj}] shares memory with params[{gi}].grad, which is updated in "
                "place; pass a copy of the reference (e.g. .clone())"
            )
        (active_grads if is_grad else active_refs).append(ev)


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
    grad_index, ref_only_index = [], []  # the parameter index of each entry (for errors)
    grad_spans, ref_spans = [], []  # (lo, hi) bytes, for the memory-sharing check
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
            ref_only_index.append(i)
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
            if _overlaps(g):
                raise ValueError(
                    f"params[{i}].grad has elements sharing memory, or strides too irregular "
                    "to prove they do not (e.g. made by expand() or as_strided()); it cannot "
                    "be updated in place"
                )
            irregular.append(len(plan_grads))
            if r.shape != g_shape:
                r = r.reshape(g_shape)  # a view whenever the layout allows, else a copy
        plan_grads.append(g)
        plan_refs.append(r)
        grad_index.append(i)
        if not compiling:  # the byte ranges written and read, for the check below
            g_span = (g.data_ptr(), g.data_ptr() + g.nbytes) if contiguous else _span(g)
            if g_span is not None and g_span[0] < g_span[1]:
                grad_spans.append(g_span)
                # a reference that is its own gradient is harmless; a flat one is one range
                if not (flat_form or (g_span[0] == r.data_ptr() and _same_view(g, r))):
                    ref_spans.append((r.data_ptr(), r.data_ptr() + r.nbytes) if contiguous else _span(r))

    if device is None:
        device = params[0].device if params else torch.device("cpu")
    if not compiling and device.type != "meta":  # fake and meta tensors have no memory
        if flat_form:
            ref_spans.append(_span(ref_grad))
        else:
            ref_spans += [_span(r) for r in ref_only]
        if _spans_overlap(grad_spans, [s for s in ref_spans if s is not None]):
            _check_no_shared_memory(plan_grads, grad_index, plan_refs + ref_only,
                                    grad_index + ref_only_index)
    return Plan(device=device, eps=eps, grads=plan_grads, refs=plan_refs, ref_only=ref_only,
                irregular=irregular)
