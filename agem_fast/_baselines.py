"""Reference implementations the benchmarks compare against (no Avalanche needed).

- `avalanche_project_`: the algorithm of Avalanche's `AGEMPlugin.after_backward`
  (avalanche-lib 0.6), re-expressed for use without avalanche installed:
  concatenate every gradient (zeros for a None grad) into one new vector, one dot
  with the flat reference, a host-side `if dot < 0` (a device sync on CUDA), a new
  projected vector `g - r * (dot / <r,r>)`, and a copy back into each `.grad`.
  It allocates several parameter-sized buffers per call, which is the point of
  measuring it.
- `FlatFloor`: the memory-bandwidth floor of a two-pass projection. One preallocated
  1-D buffer each for g and r; a call is one `torch.dot` and, when projecting, one
  in-place axpy: 2s bytes per parameter to decide, 3s more to update (s = element
  size). <r,r> is computed once when the reference is loaded, not per call.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch


@torch.no_grad()
def avalanche_project_(params: Iterable[torch.Tensor], ref_flat: torch.Tensor) -> bool:
    """Avalanche's `AGEMPlugin.after_backward` projection; returns whether it projected.

    Same steps and same arithmetic as the plugin (dot in the gradients' dtype,
    `alpha = dot / <r,r>` with no eps, projected vector built in the gradients'
    dtype). Two deliberate differences, both only where the plugin itself would
    fail: a None grad's zeros take `ref_flat`'s dtype (the plugin uses the default
    dtype, which breaks the dot for fp16/bf16 models), and gradients are flattened
    with `reshape` (the plugin's `view(-1)` raises on channels_last gradients).
    """
    params = list(params)
    pieces = [
        p.grad.reshape(-1)
        if p.grad is not None
        else torch.zeros(p.numel(), dtype=ref_flat.dtype, device=ref_flat.device)
        for p in params
    ]
    current = torch.cat(pieces) if pieces else ref_flat.new_empty(0)
    if current.shape != ref_flat.shape:
        raise ValueError(
            f"flat reference has {ref_flat.numel()} elements but the gradients have {current.numel()}"
        )
    dotg = torch.dot(current, ref_flat)
    if dotg < 0:  # host sync, as in the plugin
        alpha2 = dotg / torch.dot(ref_flat, ref_flat)
        grad_proj = current - ref_flat * alpha2
        count = 0
        for p in params:
            n = p.numel()
            if p.grad is not None:
                p.grad.copy_(grad_proj[count : count + n].view_as(p))
            count += n
        return True
    return False


class FlatFloor:
    """One flat buffer each for g and r: one dot, then (if projecting) one axpy.

        floor = FlatFloor(total, torch.float32, "cuda")
        floor.load_(grads, refs)     # copies values in, computes <r,r> once
        floor(projects=True)         # timed: dot + in-place axpy

    `projects=None` decides on the host from the dot (a sync on CUDA, free on the
    CPU), as a real caller of plain torch ops would. `projects=True/False` trusts the
    caller (the benchmark knows its inputs): no sync, exactly 5s (True) or 2s (False)
    bytes per parameter, the bandwidth floor of any two-pass implementation. On CUDA
    the projecting update keeps `coef` on the device (`addcmul_` with a 0-dim tensor).
    """

    def __init__(self, numel: int, dtype: torch.dtype = torch.float32, device="cpu"):
        self.g = torch.empty(int(numel), dtype=dtype, device=device)
        self.r = torch.empty(int(numel), dtype=dtype, device=device)
        self.rr = torch.ones((), dtype=torch.float32, device=device)
        self.last_dot: Optional[torch.Tensor] = None

    @classmethod
    def from_tensors(cls, grads: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> "FlatFloor":
        total = sum(g.numel() for g in grads)
        floor = cls(total, grads[0].dtype if grads else torch.float32, grads[0].device if grads else "cpu")
        return floor.load_(grads, refs)

    @classmethod
    @torch.no_grad()
    def over(cls, g: torch.Tensor, r: torch.Tensor) -> "FlatFloor":
        """A floor on two existing 1-D buffers, not a copy: the benchmark runs it on the
        very memory the implementations read and write (the gradients, re-homed into one
        buffer, and the flat reference)."""
        if g.dim() != 1 or r.shape != g.shape or r.dtype != g.dtype or r.device != g.device:
            raise ValueError(f"FlatFloor.over needs two 1-D buffers of one size, dtype and device; got "
                             f"{tuple(g.shape)} {g.dtype} {g.device} and {tuple(r.shape)} {r.dtype} {r.device}")
        if not (g.is_contiguous() and r.is_contiguous()):
            raise ValueError("FlatFloor.over needs contiguous buffers")
        floor = cls(0, g.dtype, g.device)
        floor.g, floor.r = g, r
        floor.rr = torch.dot(r, r).float()
        return floor

    @torch.no_grad()
    def load_(self, grads: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> "FlatFloor":
        """Copy gradients and references (logical row-major order) into the buffers."""
        offset = 0
        for g, r in zip(grads, refs):
            n = g.numel()
            self.g.narrow(0, offset, n).view(g.shape).copy_(g)
            self.r.narrow(0, offset, n).view(g.shape).copy_(r.reshape(g.shape))
            offset += n
        if offset != self.g.numel():
            raise ValueError(f"loaded {offset} elements into a floor of {self.g.numel()}")
        self.rr = torch.dot(self.r, self.r).float()
        return self

    @torch.no_grad()
    def __call__(self, projects: Optional[bool] = None) -> torch.Tensor:
        dot = torch.dot(self.g, self.r)
        self.last_dot = dot
        if projects is None:
            if dot < 0:  # host decision
                self.g.add_(self.r, alpha=-float(dot.float() / self.rr))
        elif projects:
            if self.g.is_cuda:
                neg_coef = -(dot.float() / self.rr)
                self.g.addcmul_(self.r, neg_coef.to(self.g.dtype))
            else:
                self.g.add_(self.r, alpha=-float(dot.float() / self.rr))
        return dot
