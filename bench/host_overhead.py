"""Host time of `agem_fast.project_` outside the C++ fast path: the Python side of a call.

    python bench/host_overhead.py [--tensors 62,152] [--device cpu]

Per tensor count and reference form (a list, Avalanche's flat tensor, a
ReferenceGradient), times `project_` and the extension's C++ fast path called directly
with the same arguments, interleaved in one process, on tensors of 4 elements (so the
kernels cost next to nothing). Each of `--reps` rounds times `--calls` calls of each,
back to back. Prints the lower quartile of each over the rounds, and the median over
the rounds of their difference within a round (a drifting machine speed cancels out
better there): what `project_` adds in Python. On CUDA the times are host times (no
sync), the part of a call the GPU may wait for.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import agem_fast
from agem_fast import _extension


def _per_call(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def measure(n_tensors: int, device: str, calls: int, reps: int) -> dict:
    """{form: (project_ s, fast path s, Python side s)} per call (see the docstring)."""
    fast = getattr(_extension.load(), "project_plain", None)
    if fast is None:
        raise SystemExit("host_overhead: the extension (with its C++ fast path) is not available")
    params = [torch.nn.Parameter(torch.zeros(4, device=device)) for _ in range(n_tensors)]
    for p in params:
        p.grad = torch.randn(4, device=device)
    refs = [torch.randn(4, device=device) for _ in range(n_tensors)]
    ref_grad = agem_fast.ReferenceGradient(params).capture_(params)
    forms = {
        "list": (refs, refs),
        "flat": (torch.cat(refs), torch.cat(refs)),
        "ReferenceGradient": (ref_grad, ref_grad.as_list()),
    }
    fns = {}
    for form, (arg, plain_arg) in forms.items():
        fns[(form, "project_")] = lambda arg=arg: agem_fast.project_(params, arg)
        fns[(form, "fast path")] = lambda plain_arg=plain_arg: fast(params, plain_arg, 0.0)
    for fn in fns.values():  # warm-up
        _per_call(fn, max(1, calls // 10))
    samples = {key: [] for key in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            samples[key].append(_per_call(fn, calls))
    q1 = {key: sorted(v)[len(v) // 4] for key, v in samples.items()}
    out = {}
    for form in forms:
        diffs = [a - b for a, b in zip(samples[(form, "project_")], samples[(form, "fast path")])]
        out[form] = (q1[(form, "project_")], q1[(form, "fast path")], statistics.median(diffs))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tensors", default="62,152")
    p.add_argument("--device", default="cpu")
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"host time per call, us ({args.reps} rounds of {args.calls} calls; see the docstring), "
          f"{args.device}, torch threads {torch.get_num_threads()}")
    print("| tensors | reference | project_ | C++ fast path | Python side |")
    print("|---:|---|---:|---:|---:|")
    for n in (int(x) for x in args.tensors.split(",")):
        for form, (total, plain, python) in measure(n, args.device, args.calls, args.reps).items():
            print(f"| {n} | {form} | {total * 1e6:.1f} | {plain * 1e6:.1f} | {python * 1e6:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
