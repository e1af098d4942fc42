"""Time the torch backend's packed path at several pack limits, side by side.

    python bench/torch_pack_limit.py [--device cuda] [--workloads resnet18,vit_b_16,gpt2]
                                     [--dtypes fp32] [--limits 20,21,22,23] [--calls 15]

Off the CPU the torch backend packs tensors under `_torch_backend._PACK_LIMIT` elements
(2^23) into scratch rows: fewer ops per call (each a kernel launch on a GPU), but more
bytes moved (the copies into and out of the scratch). Which limit is fastest depends on
the GPU's launch cost against its bandwidth, so it is measured, not guessed: each limit
(given as a power of two) is one implementation, timed interleaved with the others in
every round, as `bench.run` times its implementations (gradients restored and the cache
flushed before each call, CUDA events on a GPU). Also: ops per call (counted on meta
tensors of the same shapes, bench/torch_backend_ops.py), the call's peak extra memory and
its relative error against float64 (flagged **WRONG** past bench.run's tolerance).
On the CPU it runs the packed path (`PACKED_ON_CPU`), which the CPU itself never takes:
a check that the script works, not a measurement that matters.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agem_fast import _torch_backend  # noqa: E402
from bench import harness  # noqa: E402
from bench.report import _mib  # noqa: E402
from bench.torch_backend_ops import DTYPES, count  # noqa: E402


class PackLimitImpl(harness.AgemImpl):
    """The torch backend with `_PACK_LIMIT` set to 2^log2 during the call."""

    def __init__(self, wl: harness.Workload, log2: int):
        super().__init__(wl, "torch", "flat")
        self.name = f"2^{log2}"
        self.limit = 1 << log2

    def call(self, k: int) -> None:
        old = _torch_backend._PACK_LIMIT
        _torch_backend._PACK_LIMIT = self.limit
        try:
            super().call(k)
        finally:
            _torch_backend._PACK_LIMIT = old


def _ops(workload: str, dtype: torch.dtype, limit: int) -> int:
    old = _torch_backend._PACK_LIMIT
    _torch_backend._PACK_LIMIT = limit
    try:
        with harness.backend_env("torch"):
            return count(workload, dtype, "flat")["ops"]
    finally:
        _torch_backend._PACK_LIMIT = old


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workloads", default="resnet18,vit_b_16,gpt2")
    p.add_argument("--dtypes", default="fp32")
    p.add_argument("--limits", default="20,21,22,23", help="powers of two, comma-separated")
    p.add_argument("--calls", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    logs = [int(x) for x in args.limits.split(",")]
    flush = harness.Flusher(device)
    old_on_cpu = _torch_backend.PACKED_ON_CPU
    _torch_backend.PACKED_ON_CPU = True  # the packed path on the CPU too (no effect elsewhere)
    print(f"# torch backend, packed path: time per call by pack limit ({harness.device_name(device)})")
    print()
    print(f"torch {torch.__version__}; {args.calls} timed calls after {args.warmup} warm-up calls, the limits "
          "interleaved in every round; gradients restored and the cache flushed before each call, outside the timing")
    print()
    print("| workload | dtype | limit | ops | median ms | IQR % | × best | peak extra mem | rel err |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    try:
        for wl_name in args.workloads.split(","):
            for dt_name in args.dtypes.split(","):
                wl = harness.Workload(wl_name, DTYPES[dt_name], device)
                impls = [PackLimitImpl(wl, k) for k in logs]
                times = harness.time_round_robin(impls, repeats=args.calls, warmup=args.warmup, flush=flush)
                stats = {id(i): harness.summarize(times[id(i)]) for i in impls if not getattr(i, "error", None)}
                best = min((s["median_s"] for s in stats.values()), default=None)
                for impl in impls:
                    if id(impl) not in stats:
                        print(f"| {wl_name} | {dt_name} | {impl.name} | | failed: {impl.error} | | | | |")
                        continue
                    s = stats[id(impl)]
                    checked = harness.check_and_peak(impl)
                    err = checked["rel_err"]
                    wrong = "" if err <= harness.TOLERANCE.get(wl.dtype, 1e-2) else " **WRONG**"
                    iqr = 100 * (s["q3_s"] - s["q1_s"]) / s["median_s"]
                    print(f"| {wl_name} | {dt_name} | {impl.name} | {_ops(wl_name, wl.dtype, impl.limit)} | "
                          f"{s['median_s'] * 1e3:.3f} | {iqr:.0f} | {s['median_s'] / best:.2f} | "
                          f"{_mib(checked['peak_extra_bytes'])} | {err:.1e}{wrong} |")
                del wl, impls
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        _torch_backend.PACKED_ON_CPU = old_on_cpu
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
