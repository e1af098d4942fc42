"""Where one projection's time goes on a GPU, for the extension and the flat floor.

    python bench/gpu_profile.py [--workloads resnet18,vit_b_16,gpt2] [--dtypes fp32,bf16]

Per workload and dtype, for each implementation (medians over the calls):
- host: seconds until the call returns (perf_counter, no sync): Python + planning + launches;
- call: CUDA events around the call from an idle GPU after an L2 flush (as bench.run);
- busy: the same, but the GPU is first kept busy (torch.cuda._sleep) for longer than the
  host needs, so every launch is queued before the GPU gets to it: device time alone.
  call - busy is the host time the GPU waited for (what a training step, whose GPU is
  still busy with the backward pass, would mostly hide);
- the kernels and copies torch.profiler saw, with their device time;
- the host-side calls (aten ops, CUDA runtime) that take the most host time per call
  (inflated by the profiler itself: compare them with each other, not with `host`),
  each profiled call preceded by a warm-up call in the same profiler session.
Both times are also given as a rate, counting 5s bytes per parameter (every call
projects), and as a percentage of the device-to-device copy bandwidth measured at the
start of the same run (bench.harness.copy_bandwidth), as bench.run's tables count them.
Each call restores the gradients first, so every call projects. The extension is
profiled once per way its kernels can get the tensor table (`--routes`: copied up from
pinned memory, or inside the kernels' parameters; see csrc/cuda/agem_cuda.cu).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, as a script too

import agem_fast  # noqa: E402
from agem_fast._baselines import FlatFloor  # noqa: E402
from agem_fast._workloads import flat_buffer, make_grads, shapes  # noqa: E402
from bench.harness import bytes_per_param, copy_bandwidth  # noqa: E402

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


def rate(nbytes: int, seconds: float, copy_gbps: float) -> str:
    """`nbytes` moved in `seconds`, as GB/s and as a share of the copy bandwidth."""
    gbps = nbytes / seconds / 1e9
    return f"{gbps:6.0f} GB/s {100 * gbps / copy_gbps:3.0f}%"


def _profile(name, call, restore, flush, calls, nbytes, copy_gbps):
    host, idle = _timed(call, restore, flush, calls)
    # Busy for 3x the host time plus 1 ms: the whole call is queued before the GPU gets to it.
    _, busy = _timed(call, restore, flush, calls, busy_cycles=_sleep_cycles(3 * host + 1e-3))
    device, host_side = {}, {}  # name -> per-session sums (seconds) and counts
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    for _ in range(min(calls, 5)):  # a profiler session per call: slow to start
        with torch.profiler.profile(activities=activities) as prof:
            # A warm-up call first, in the same session: the profiler charges a session's
            # first CUDA runtime call with its own start-up (about 280 us on the H200),
            # which would otherwise land on the call measured.
            for label in ("warm-up", "call"):
                restore()
                flush()
                torch.cuda.synchronize()
                with torch.profiler.record_function(label):
                    call()
                torch.cuda.synchronize()
        dev, hst = attribute(prof.events())
        for mine, per_session in ((dev, device), (hst, host_side)):
            for key, (us, n) in mine.items():
                per_session.setdefault(key, []).append((us * 1e-6, n))
    print(f"  {name:10s} host {host * 1e6:7.1f} us   call {idle * 1e6:7.1f} us ({rate(nbytes, idle, copy_gbps)})"
          f"   busy {busy * 1e6:7.1f} us ({rate(nbytes, busy, copy_gbps)})"
          f"   (GPU waited for the host: {(idle - busy) * 1e6:6.1f} us)")
    print("    device, per call (median of the profiled calls):")
    _print_top(device, limit=None)
    print("    host side, per call (under the profiler; nested calls count in their callers too):")
    _print_top(host_side, limit=12)


def attribute(events, label: str = "call"):
    """The device work and the host-side calls of the profiled range `label` alone, as
    ({kernel or copy: (us, count)}, {host call: (us, count)}): host events that start
    inside the range, device events that start after it starts (the profiler puts GPU
    timestamps on the host's clock; the warm-up's kernels ended before the range began)."""
    marks = [e for e in events if e.name == label and e.device_type == torch.autograd.DeviceType.CPU]
    if len(marks) != 1:
        raise ValueError(f"gpu_profile: expected one {label!r} range in the profile, found {len(marks)}")
    mark = marks[0]
    start, end = mark.time_range.start, mark.time_range.end
    dev = {}
    hst = {"the whole call": (mark.cpu_time_total, 1),
           # Python, C++ planning: whatever no op or CUDA runtime call below it accounts for
           "the call's own code (no profiled child)": (mark.self_cpu_time_total, 1)}
    for evt in events:
        if evt is mark:
            continue
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            if evt.time_range.start >= start:
                _add(dev, evt.name, evt.device_time_total)
        elif (start <= evt.time_range.start <= end and evt.name.startswith(("cuda", "aten::"))
              and "ynchronize" not in evt.name):
            _add(hst, evt.name, evt.cpu_time_total)
    return dev, hst


def _add(sums: dict, name: str, us: float) -> None:
    total, count = sums.get(name, (0.0, 0))
    sums[name] = (total + us, count + 1)


def _print_top(per_session: dict, limit) -> None:
    """Each name's median over the sessions of its summed time, with its count per call."""
    rows = [(statistics.median(t for t, _ in v), statistics.median(n for _, n in v), name)
            for name, v in per_session.items()]
    for t, n, name in sorted(rows, reverse=True)[:limit]:
        print(f"      {t * 1e6:8.1f} us x{n:<4g} {name[:100]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default="resnet18,vit_b_16,gpt2")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--routes", default="upload,inline", help="CUDA table routes to profile the extension with")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_profile: no CUDA device")
        return 1
    dev = torch.device("cuda")
    scratch = torch.empty(256 << 20, dtype=torch.uint8, device=dev)  # > L2 of any current GPU

    def flush():
        scratch.fill_(1)

    agem_fast.project_([torch.zeros(1, device=dev)], [torch.zeros(1, device=dev)])  # load/build once
    copy_gbps = copy_bandwidth(dev)["gbps"]
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s (bytes read + written); rates below count "
          "5s bytes per parameter")
    from agem_fast import _extension

    module = _extension.load()
    routes = args.routes.split(",") if hasattr(module, "_set_cuda_table_route") else [None]
    default_route = module._cuda_table_route() if routes != [None] else None
    inline_max = module._cuda_inline_table_sizes()[-1] if routes != [None] else 0  # larger: uploaded
    for wl in args.workloads.split(","):
        for dt in args.dtypes.split(","):
            params, refs = make_grads(shapes(wl), DTYPES[dt], dev, project=True)
            flat = flat_buffer(refs)
            saved = [p.grad.clone() for p in params]

            def restore():
                for p, s in zip(params, saved):
                    p.grad.copy_(s)

            floor = FlatFloor.from_tensors(saved, refs)
            nbytes = sum(bytes_per_param(s.dtype, projecting=True) * s.numel() for s in saved)
            print(f"{wl} {dt}: {len(params)} tensors, {sum(s.numel() for s in saved) / 1e6:.1f}M elements")
            for route in routes:
                if route == "inline" and len(params) > inline_max:
                    print(f"  ext inline: not run, {len(params)} tensors > {inline_max} (the table is uploaded)")
                    continue
                if route is not None:
                    module._set_cuda_table_route(route)
                _profile(f"ext {route}" if route else "extension", lambda: agem_fast.project_(params, flat),
                         restore, flush, args.calls, nbytes, copy_gbps)
            _profile("floor", lambda: floor(projects=True), lambda: floor.g.copy_(floor.r).neg_(), flush,
                     args.calls, nbytes, copy_gbps)
            if default_route is not None:
                module._set_cuda_table_route(default_route)
            del params, refs, flat, saved, floor
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
