"""Command line: `python -m agem_fast [run|info|build]`.

With no arguments it runs the default job: project a ResNet-18-shaped gradient set on
the best device with the best backend, check it against float64, and time it against
Avalanche's algorithm.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, reset, device, repeats: int) -> float:
    """Median wall time of fn() over repeats; reset() (untimed) restores the inputs."""
    times = []
    for i in range(repeats + 2):
        reset()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i >= 2:  # two warm-up calls
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(workload: str, device: str, dtype: str, repeats: int) -> int:
    import agem_fast
    from agem_fast import _baselines, _workloads
    from agem_fast._api import backend_for

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = getattr(torch, dtype)
    shapes = _workloads.shapes(workload)
    params, refs = _workloads.make_grads(shapes, dt, dev, project=True, seed=0)
    flat = _workloads.flat_buffer(refs)
    saved = [p.grad.clone() for p in params]

    def reset():
        for p, g in zip(params, saved):
            p.grad.copy_(g)

    # Correctness: against a float64 computation of the same projection.
    reset()
    res = agem_fast.project_(params, refs)
    dot = sum(torch.dot(g.double().reshape(-1), r.double().reshape(-1)) for g, r in zip(saved, refs))
    rr = sum(torch.dot(r.double().reshape(-1), r.double().reshape(-1)) for r in refs)
    coef = dot / rr
    worst = 0.0
    for p, g, r in zip(params, saved, refs):
        want = g.double() - coef * r.double()
        scale = g.double().abs() + (coef * r.double()).abs()
        worst = max(worst, float(((p.grad.double() - want).abs() / (scale + 1e-30)).max()))
    ok = bool(res.projected) and worst < (1e-5 if dt in (torch.float32, torch.float64) else 2e-2)

    ours = _median_ms(lambda: agem_fast.project_(params, refs), reset, dev, repeats)
    theirs = _median_ms(lambda: _baselines.avalanche_project_(params, flat), reset, dev, repeats)
    n = sum(p.numel() for p in params)
    gbps = 5 * n * refs[0].element_size() / (ours * 1e-3) / 1e9
    print(f"agem_fast {agem_fast.__version__}: A-GEM projection, {workload} shapes "
          f"({len(params)} tensors, {n / 1e6:.1f}M params), {dtype}, {dev}")
    backend = backend_for(dev)
    what = {"cpu": "C++ extension", "cuda": "CUDA extension", "torch": "pure PyTorch"}.get(backend, "")
    print(f"  backend           : {backend} ({what})")
    print(f"  max rel. error    : {worst:.2e} vs float64  [{'OK' if ok else 'FAIL'}]")
    print(f"  agem_fast         : {ours:8.3f} ms/projection  ({gbps:.1f} GB/s effective)")
    print(f"  Avalanche's algo  : {theirs:8.3f} ms/projection")
    print(f"  speed-up          : {theirs / ours:8.2f}x")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agem_fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd")
    p_run = sub.add_parser("run", help="the default job (also what no command runs)")
    sub.add_parser("info", help="backend per device, build status and errors")
    sub.add_parser("build", help="compile the extension now (cached for later runs)")
    job_options = [
        ("--workload", dict(default="resnet18")),
        ("--device", dict(default=None, help="cpu or cuda (default: best available)")),
        ("--dtype", dict(default="float32", choices=["float32", "float16", "bfloat16", "float64"])),
        ("--repeats", dict(type=int, default=20)),
    ]
    # The job's options work before or after `run`: the subcommand's copies default to
    # SUPPRESS, so they never overwrite what was given before it.
    for flag, kwargs in job_options:
        parser.add_argument(flag, **kwargs)
        p_run.add_argument(flag, **{**kwargs, "default": argparse.SUPPRESS})
    args = parser.parse_args(argv)

    if args.cmd == "info":
        from agem_fast import backend_info

        print(json.dumps(backend_info(), indent=2, default=str))
        return 0
    if args.cmd == "build":
        from agem_fast import _build, _extension

        # AGEM_FAST_BACKEND only chooses the backend of a call; `build` builds regardless.
        if _extension.load(honour_backend_env=False) is None:
            print(f"agem_fast: build failed: {_extension.status()['error']}", file=sys.stderr)
            return 1
        info = _extension.build_info()
        print(f"agem_fast: extension ready ({_extension.status()['source']}): {info}")
        if _build.env_flag("AGEM_FAST_REQUIRE_CUDA") and not info["cuda"]:
            why = (_extension.status()["cuda_error"] or _build.want_cuda()[1]
                   or "a prebuilt agem_fast._C without CUDA kernels was loaded (AGEM_FAST_JIT=1 builds them)")
            print(f"agem_fast: AGEM_FAST_REQUIRE_CUDA=1 but the CUDA kernels were not built: {why}",
                  file=sys.stderr)
            return 1
        return 0
    return run(args.workload, args.device, args.dtype, args.repeats)


if __name__ == "__main__":
    sys.exit(main())
