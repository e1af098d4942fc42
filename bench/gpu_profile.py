"""Where one projection's time goes on a GPU, for the extension and the flat floor.

    python bench/gpu_profile.py [--workloads resnet18,vit_b_16] [--dtypes fp32,bf16]

Per workload and dtype, for each implementation (medians over the calls):
- host: seconds until the call returns (perf_counter, no sync): Python + planning + launches;
- call: CUDA events around the call from an idle GPU after an L2 flush (as bench.run);
- busy: the same, but the GPU is first kept busy (torch.cuda._sleep) for longer than the
  host needs, so every launch is queued before the GPU gets to it: device time alone.
  call - busy is the host time the GPU waited for (what a training step, whose GPU is
  still busy with the backward pass, would mostly hide);
- the kernels and copies torch.profiler saw, with their device time;
- the host-side calls (aten ops, CUDA runtime) that take the most host time per call
  (inflated by the profiler itself: compare them with each other, not with `host`).
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


def _timed(call, restore, flush, calls, busy_cycles=0):
    """Median host seconds and event seconds of `calls` calls (see the module docstring)."""
    host, event = [], []
    for _ in range(calls):
        restore()
        flush()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if busy_cycles:
            torch.cuda._sleep(busy_cycles)  # start is recorded when the GPU gets past this
        start.record()
        t0 = time.perf_counter()
        call()
        host.append(time.perf_counter() - t0)
        end.record()
        end.synchronize()
        event.append(start.elapsed_time(end) * 1e-3)
    return statistics.median(host), statistics.median(event)


def _sleep_cycles(seconds: float) -> int:
    """torch.cuda._sleep cycles that keep the GPU busy for at least `seconds`."""
    cycles = 1 << 20
    while True:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        if start.elapsed_time(end) * 1e-3 >= seconds or cycles >= 1 << 34:
            return cycles
        cycles *= 2


def _profile(name, call, restore, flush, calls):
    host, idle = _timed(call, restore, flush, calls)
    # Busy for 3x the host time plus 1 ms: the whole call is queued before the GPU gets to it.
    _, busy = _timed(call, restore, flush, calls, busy_cycles=_sleep_cycles(3 * host + 1e-3))
    device, host_side = {}, {}
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    profiled = min(calls, 5)  # a profiler session per call: slow to start
    for _ in range(profiled):
        restore()
        flush()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=activities) as prof:  # the call alone
            call()
            torch.cuda.synchronize()
        for evt in prof.events():
            if evt.device_type == torch.autograd.DeviceType.CUDA:
                device.setdefault(evt.name, []).append(evt.device_time_total * 1e-6)
            elif evt.name.startswith(("cuda", "aten::")) and "ynchronize" not in evt.name:
                host_side.setdefault(evt.name, []).append(evt.cpu_time_total * 1e-6)
    print(f"  {name:9s} host {host * 1e6:7.1f} us   call {idle * 1e6:7.1f} us   busy {busy * 1e6:7.1f} us"
          f"   (GPU waited for the host: {(idle - busy) * 1e6:6.1f} us)")
    for kname, times in sorted(device.items(), key=lambda kv: -sum(kv[1])):
        print(f"      {statistics.median(times) * 1e6:8.1f} us x{len(times) / profiled:<4.1f} {kname[:100]}")
    print("    host side, per call (under the profiler; nested calls count in their callers too):")
    per_call = {k: sum(v) / profiled for k, v in host_side.items()}
    for hname, t in sorted(per_call.items(), key=lambda kv: -kv[1])[:12]:
        print(f"      {t * 1e6:8.1f} us x{len(host_side[hname]) / profiled:<4.1f} {hname[:100]}")


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
