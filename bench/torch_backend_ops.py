"""Ops per call of the torch backend's GPU path, per workload, counted on meta tensors.

    python bench/torch_backend_ops.py [--dtypes fp32,bf16] [--form flat]

Off the CPU the torch backend packs tensors under 2^23 elements into scratch rows, so
that a call runs a few ops per group of small tensors and per larger tensor, not a few
per tensor. On a GPU every op is at least one kernel launch and costs host time the GPU
may wait for, which is what kept that backend at 4 ms on ResNet-18 on an H200 (about 6
ops per tensor then). This counts the ops `project_` dispatches with that backend
(TorchDispatchMode: a multi-tensor op counts once; views, which launch nothing, are
counted apart) on meta tensors of each workload's real shapes: no memory and no GPU
needed, the same ops as on a GPU.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import agem_fast
from agem_fast import _workloads

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


class OpCounter(TorchDispatchMode):
    """Records dispatched ops: `names` of those that may launch a kernel, and the number
    of `views` (which never do). A multi-tensor op is one op."""

    def __init__(self):
        super().__init__()
        self.names = []
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.is_mutable or not func.is_view:
            self.names.append(func.name())
        else:
            self.views += 1
        return func(*args, **(kwargs or {}))


def count(workload: str, dtype: torch.dtype, form: str) -> dict:
    shapes = _workloads.shapes(workload)
    params = [torch.empty(s, dtype=dtype, device="meta") for s in shapes]
    for p in params:
        p.grad = torch.empty(p.shape, dtype=dtype, device="meta")
    flat = torch.empty(_workloads.numel(shapes), dtype=dtype, device="meta")
    ref = flat if form == "flat" else list(flat.split([p.numel() for p in params]))
    with OpCounter() as counter:
        agem_fast.project_(params, ref)
    return {"tensors": len(params), "ops": len(counter.names), "views": counter.views}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--form", choices=("flat", "list"), default="flat")
    args = ap.parse_args(argv)
    os.environ["AGEM_FAST_BACKEND"] = "torch"
    print(f"torch backend, GPU path: ops dispatched per project_ call (reference passed as {args.form})")
    print("| workload | tensors | dtype | ops | ops per tensor | views |")
    print("|---|---:|---|---:|---:|---:|")
    for name in _workloads.WORKLOADS:
        for d in args.dtypes.split(","):
            c = count(name, DTYPES[d], args.form)
            print(f"| {name} | {c['tensors']} | {d} | {c['ops']} | {c['ops'] / c['tensors']:.2f} | {c['views']} |")


if __name__ == "__main__":
    main()
