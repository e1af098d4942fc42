"""ReferenceGradient: preallocated storage for the A-GEM reference gradient."""

from __future__ import annotations

from typing import Iterable, List, Optional

import torch

from ._plan import SUPPORTED_DTYPES, _local_shard, as_bits


class ReferenceGradient:
    """Holds one reference tensor per parameter, allocated once.

    Each slot has its parameter's shape, dtype, device and memory layout
    (contiguous, channels_last, ...), so the kernels see a gradient and its reference
    as two flat buffers. When every parameter shares dtype and device, all slots live
    in one buffer; `flat` is that buffer when it is also in Avalanche's layout
    (every slot row-major contiguous), else None.

    `capture_(params)` copies the current gradients in; a None grad marks the slot
    absent and zeroes it (it takes no part in the projection, as Avalanche's zeros would
    not, and `flat` matches Avalanche's concatenation). A slot that is absent again is
    not zeroed again unless something wrote into it since (its version counter says;
    writes that bypass it, through `.data` or NumPy, are not seen): a frozen backbone
    costs no memory traffic per capture.

    A parameter of an integer or bool dtype (a frozen lookup table, say) can never
    have a gradient: its slot is always absent, zeros of the other slots' dtype, so
    `flat` still has Avalanche's layout. So is the slot of a frozen parameter (no
    requires_grad) of a dtype agem_fast does not support (complex, float8); one that
    requires grad is refused here, and a gradient of such a dtype by `capture_`.
    """

    def __init__(self, params: Iterable[torch.Tensor]):
        params = list(params)
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params[{i}] is a {type(p).__name__}, expected a torch.Tensor")
        # A DTensor parameter (FSDP2) holds only its shard here: so does its slot, and
        # project_(..., group=) reads the slots as the shards' references.
        params = [_local_shard(p, f"params[{i}]", sharded=True) for i, p in enumerate(params)]
        for i, p in enumerate(params):
            if p.dtype not in SUPPORTED_DTYPES and _can_have_grad(p) and p.requires_grad:
                raise TypeError(f"params[{i}] has unsupported dtype {p.dtype} and requires grad")
        self._shapes = [tuple(p.shape) for p in params]
        self._slots: List[torch.Tensor] = []
        # What as_list() returns, kept up to date by capture_: project_ reads it at every call.
        self._refs: List[Optional[torch.Tensor]] = [None] * len(params)
        self._buffer: Optional[torch.Tensor] = None
        # Per slot: its version counter when it was last left all zeros, else None.
        self._zeros_at: List[Optional[int]] = [None] * len(params)

        kinds = {(p.dtype, p.device) for p in params if _has_slot(p)}
        if len(kinds) > 1:
            self._slots = [
                torch.empty_like(p, memory_format=torch.preserve_format) if _has_slot(p)
                else torch.zeros(p.shape, device=p.device)  # never present
                for p in params
            ]
            return
        dtype, device = kinds.pop() if kinds else (
            torch.get_default_dtype(), params[0].device if params else torch.device("cpu"))
        total = sum(p.numel() for p in params)
        self._buffer = torch.empty(total, dtype=dtype, device=device)
        offset = 0
        for p in params:
            slot = self._buffer.as_strided(p.shape, _dense_strides_like(p), offset)
            if not _has_slot(p):
                slot.zero_()  # never present
            self._slots.append(slot)
            offset += p.numel()

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def present(self) -> List[bool]:
        """Which slots hold a captured gradient (a copy of the host-side mask)."""
        return [r is not None for r in self._refs]

    def as_list(self) -> List[Optional[torch.Tensor]]:
        """Per-parameter reference tensors, None where the captured grad was None."""
        return list(self._refs)

    @property
    def flat(self) -> Optional[torch.Tensor]:
        """The single 1-D buffer in Avalanche's layout, or None when there is none."""
        if self._buffer is None or not all(s.is_contiguous() for s in self._slots):
            return None
        return self._buffer

    @torch.no_grad()
    def capture_(self, params: Iterable[torch.Tensor]) -> "ReferenceGradient":
        """Copy each `p.grad` into its slot (None grads mark the slot absent)."""
        params = list(params)
        if len(params) != len(self._slots):
            raise ValueError(
                f"ReferenceGradient was built for {len(self._slots)} params, got {len(params)}"
            )
        grads = []
        for i, (p, slot) in enumerate(zip(params, self._slots)):
            g = p.grad
            if g is not None:
                g = _local_shard(g, f"params[{i}].grad", sharded=True)
                if g.layout != torch.strided:
                    raise ValueError(f"params[{i}].grad is sparse ({g.layout})")
                if tuple(g.shape) != self._shapes[i]:
                    raise ValueError(
                        f"params[{i}].grad has shape {tuple(g.shape)}, expected {self._shapes[i]}"
                    )
                if g.device != slot.device:
                    raise ValueError(f"params[{i}].grad is on {g.device}, the reference on {slot.device}")
                if g.dtype not in SUPPORTED_DTYPES:
                    raise TypeError(f"params[{i}].grad has unsupported dtype {g.dtype}")
                if g.dtype != slot.dtype:  # a copy would silently round it
                    raise TypeError(f"params[{i}].grad has dtype {g.dtype}, the reference {slot.dtype}")
            grads.append(g)
        # Absent slots hold zeros, so that `flat` stays Avalanche's layout; one already
        # zeroed and not written since (same version counter) is left as it is. Decided before
        # this call's copies, which bump the counter that a buffer's slots share.
        stale = [
            slot for slot, g, z in zip(self._slots, grads, self._zeros_at)
            if g is None and (z is None or z != _version(slot))
        ]
        # Multi-tensor copy and fill: on CUDA a few kernel launches instead of one per slot.
        # Copied as integers, so a NaN keeps its bits (see as_bits).
        present = [(slot, g) for slot, g in zip(self._slots, grads) if g is not None]
        if present:
            torch._foreach_copy_([as_bits(slot) for slot, _ in present], [as_bits(g) for _, g in present])
        if stale:
            torch._foreach_zero_(stale)
        self._refs = [slot if g is not None else None for slot, g in zip(self._slots, grads)]
        # Read after every write of this call (slots of one buffer share one counter).
        self._zeros_at = [_version(slot) if g is None else None for slot, g in zip(self._slots, grads)]
        return self


def _version(t: torch.Tensor) -> Optional[int]:
    """t's version counter (bumped by every in-place write through torch), or None where
    there is none to trust: an inference tensor, or a traced one under torch.compile."""
    if t.is_inference() or torch.compiler.is_compiling():
        return None
    return t._version


def _can_have_grad(p: torch.Tensor) -> bool:
    """Only floating point and complex tensors can have gradients."""
    return p.is_floating_point() or p.is_complex()


def _has_slot(p: torch.Tensor) -> bool:
    """Whether p's gradient can be captured: the others' slots are always absent."""
    return p.dtype in SUPPORTED_DTYPES


def _dense_strides_like(p: torch.Tensor):
    """Strides of a dense tensor with p's dimension order (preserve_format rules)."""
    if p.is_contiguous() or p.dim() == 0:
        return torch.empty(p.shape, device="meta").stride()
    return torch.empty_like(p, device="meta", memory_format=torch.preserve_format).stride()
