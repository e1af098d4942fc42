"""Where one projection's time goes on a GPU, for the extension and the flat floor.

    python bench/gpu_profile.py [--workloads resnet18,vit_b_16] [--dtypes fp32,bf16]

Per workload and dtype, for each implementation:
- host: seconds until the call returns (perf_counter, no sync): Python + planning + launches;
- call: CUDA events around the call from an idle GPU after an L2 flush (as bench.run);
- the kernels torch.profiler saw, with their device time (median over the calls).
The difference between `call` and the kernels' sum is launch latency and idle GPU time.
Each call restores the gradients first, so every call projects.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import agem_fast
from agem_fast._baselines import FlatFloor
from agem_fast._workloads import flat_buffer, make_grads, shapes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _profile(name, call, restore, flush, calls):
    host, event = [], []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            restore()
            flush()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            call()
            host.append(time.perf_counter() - t0)
            end.record()
            end.synchronize()
            event.append(start.elapsed_time(end) * 1e-3)
    kernels = {}
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(evt.name, []).append(evt.device_time_total * 1e-6)
    print(f"  {name:9s} host {statistics.median(host) * 1e6:8.1f} us   call {statistics.median(event) * 1e6:8.1f} us")
    for kname, times in sorted(kernels.items(), key=lambda kv: -sum(kv[1])):
        print(f"      {statistics.median(times) * 1e6:8.1f} us x{len(times) // calls:<2d} {kname[:100]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default="resnet18,vit_b_16")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--calls", type=int, default=20)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_profile: no CUDA device")
        return 1
    dev = torch.device("cuda")
    scratch = torch.empty(256 << 20, dtype=torch.uint8, device=dev)  # > L2 of any current GPU

    def flush():
        scratch.fill_(1)

    agem_fast.project_([torch.zeros(1, device=dev)], [torch.zeros(1, device=dev)])  # load/build once
    for wl in args.workloads.split(","):
        for dt in args.dtypes.split(","):
            params, refs = make_grads(shapes(wl), DTYPES[dt], dev, project=True)
            flat = flat_buffer(refs)
            saved = [p.grad.clone() for p in params]

            def restore():
                for p, s in zip(params, saved):
                    p.grad.copy_(s)

            floor = FlatFloor.from_tensors(saved, refs)
            print(f"{wl} {dt}: {len(params)} tensors, {sum(s.numel() for s in saved) / 1e6:.1f}M elements")
            _profile("extension", lambda: agem_fast.project_(params, flat), restore, flush, args.calls)
            _profile("floor", lambda: floor(projects=True), lambda: floor.g.copy_(floor.r).neg_(), flush,
                     args.calls)
            del params, refs, flat, saved, floor
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
