"""Public entry point `project_` and the per-device backend choice."""

from __future__ import annotations

import contextlib
import os
from typing import Iterable, NamedTuple

import torch

from . import _extension, _torch_backend
from ._plan import check_eps, make_plan, param_list
from ._reference import ReferenceGradient


class Projection(NamedTuple):
    """Result of one projection: 0-dim tensors on the gradients' device.

    dot, ref_sq_norm and coef are float64; projected is bool. Nothing is read back
    to the host: `bool(res.projected)` is the caller's choice to sync.
    """

    dot: torch.Tensor
    ref_sq_norm: torch.Tensor
    coef: torch.Tensor
    projected: torch.Tensor


def _forced_backend() -> str:
    value = os.environ.get("AGEM_FAST_BACKEND", "auto").strip().lower() or "auto"
    if value not in ("auto", "torch", "extension"):
        raise ValueError(f"AGEM_FAST_BACKEND must be 'auto', 'torch' or 'extension', got {value!r}")
    return value


def backend_for(device: torch.device) -> str:
    """Name of the backend a call on `device` uses: 'cuda', 'cpu' or 'torch'."""
    return _backend_for_type(device.type)


def _assume_constant_result(fn):
    """What torch.compiler.assume_constant_result does, without the import of torch._dynamo
    it makes (0.8 s, most of `import agem_fast`): mark the function for dynamo, which reads
    the mark when it traces a call. tests/test_compile.py checks that both mark alike."""
    fn._dynamo_marked_constant = True
    return fn


# torch.compile evaluates this once at trace time (it may build the extension, which no
# graph can trace) and bakes the answer into the graph.
@_assume_constant_result
def _backend_for_type(device_type: str) -> str:
    forced = _forced_backend()
    if forced == "torch":
        return "torch"
    if device_type in ("cpu", "cuda") and _extension.supports(device_type):
        return device_type
    if forced == "extension":
        raise RuntimeError(
            f"AGEM_FAST_BACKEND=extension but the extension has no kernels for {device_type}: "
            f"{_extension.status()}"
        )
    return "torch"


def project_(params: Iterable[torch.Tensor], ref_grad, *, eps: float = 0.0, group=None) -> Projection:
    """A-GEM projection of every `p.grad` in place against the reference gradient.

    dot  = sum_i <g_i, r_i>,  rr = sum_i <r_i, r_i>  (reference-only entries included)
    coef = dot / (rr + eps) if dot < 0 and rr + eps > 0 else 0;  g_i -= coef * r_i

    `ref_grad` is a sequence aligned with `params` (tensors or None), a 1-D tensor in
    Avalanche's flat layout, or a `ReferenceGradient`. Returns a `Projection` of 0-dim
    device tensors; no host sync. Raises ValueError/TypeError, naming the parameter
    index, before any gradient is written.
    """
    eps = check_eps(eps)
    params = param_list(params)
    if group is not None and not torch.compiler.is_compiling():
        _check_group(group)
    if group is None and not torch.compiler.is_compiling() and _forced_backend() != "torch":
        # Plain valid calls are planned and run in C++ (microseconds per parameter less).
        refs = ref_grad._refs if isinstance(ref_grad, ReferenceGradient) else ref_grad
        result = _extension.project_plain(params, list(refs) if type(refs) is tuple else refs, eps)
        if result is not None:
            return Projection(*result)
    with torch.no_grad():
        return _project_planned(params, ref_grad, eps, group)


# Oldest torch whose dynamo traces project_: those of 2.4 and 2.5 stop at the planner (id()
# of a tensor, list.sort with a key), and 2.4's cannot functionalize the extension's op
# either. Under them compiled code calls project_ eagerly: a graph break, which
# fullgraph=True refuses.
TRACEABLE_FROM = "2.6"
if torch.__version__ < TRACEABLE_FROM:
    project_ = torch.compiler.disable(project_)


def _check_group(group) -> None:
    """Before any work: a wrong group= would otherwise fail only at the all-reduce."""
    import torch.distributed as dist

    if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")


def _project_planned(params: list, ref_grad, eps: float, group) -> Projection:
    """project_ through the Python planner: every check, every layout, any backend."""
    plan = make_plan(params, ref_grad, eps, sharded=group is not None)
    # Autocast would run some of the torch backend's reductions in bf16/fp16: the
    # precision DESIGN section 1 fixes must not depend on the caller's context.
    with _no_autocast(plan.device.type):
        return _run_plan(plan, group)


def _no_autocast(device_type: str):
    if _autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


@_assume_constant_result  # the dynamo of torch 2.6 (at least) cannot trace the check itself
def _autocast_available(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type)


def _run_plan(plan, group) -> Projection:
    if backend_for(plan.device) == "torch":
        backend = _torch_backend
    else:
        backend = _extension
    if group is None:
        return backend.project(plan)
    # Each rank holds a shard: sum the partial (dot, rr) over the group (one small
    # collective, stream-ordered, no host sync), then decide and update locally.
    import torch.distributed as dist

    sums = backend.sums(plan)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    dot, rr = sums[0], sums[1]
    coef, projected = _torch_backend.decide(dot, rr, plan.eps)
    backend.apply(plan, coef, projected)
    return Projection(dot, rr, coef, projected)
