"""Fit each implementation's time per call as an intercept plus a streaming part.

    python bench/fixed_cost.py bench/results/gpu-nvidia-h200-20261126-0108/bench-cuda.json

For each (dtype, case, implementation) of a `bench.run` result, fits

    t = F + bytes / B        (least squares over the workloads, median of the runs)

where bytes counts 5s per parameter when projecting and 2s when not, as the tables do.
B is the speed at which the implementation streams its data once the size grows; F is
the intercept: the time beyond streaming at B, extrapolated from the sizes fitted.
F is not what a small call costs: host work and device work overlap (a call takes
about max(host time, time to its first launch + device time)), so a call too small to
keep the GPU busy longer than the host takes costs its host time, and the fit says
nothing of it (`bench/gpu_profile.py` measures host and device time directly). The
workloads also differ in tensor count. By default the fit takes ResNet-18, ViT-B/16
and GPT-2 (`--workloads` chooses others: F moves by several us when llama_1b joins),
and the table shows the largest residual so that a poor fit is visible.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Dict, List, Sequence, Tuple

DEFAULT_WORKLOADS = ("resnet18", "vit_b_16", "gpt2")


def fit(points: Sequence[Tuple[float, float]]) -> Tuple[float, float]:
    """Least-squares (F, B) of t = F + x / B over (x bytes, t seconds) points."""
    if len(points) < 2 or len({x for x, _ in points}) < 2:
        raise ValueError("a fit needs at least two different sizes")
    n = len(points)
    mx = sum(x for x, _ in points) / n
    mt = sum(t for _, t in points) / n
    slope = sum((x - mx) * (t - mt) for x, t in points) / sum((x - mx) ** 2 for x, _ in points)
    return mt - slope * mx, (1.0 / slope if slope > 0 else float("inf"))


def fixed_costs(result: dict, workloads: Sequence[str] = DEFAULT_WORKLOADS) -> Dict[tuple, dict]:
    """{(dtype, projecting, impl): {"F": s, "B": bytes/s, "n": points, "max_residual": s}}."""
    points: Dict[tuple, List[Tuple[float, float]]] = {}
    for row in result["rows"]:
        if row["workload"] not in workloads:
            continue
        medians = [run["median_s"] for run in row["runs"] if run and run.get("median_s") is not None]
        if not medians:
            continue
        key = (row["dtype"], row["projecting"], row["impl"])
        points.setdefault(key, []).append((row["numel"] * row["bytes_per_param"], statistics.median(medians)))
    out = {}
    for key, pts in points.items():
        if len({x for x, _ in pts}) >= 2:
            f, b = fit(pts)
            worst = max(abs(t - (f + x / b)) for x, t in pts)
            out[key] = {"F": f, "B": b, "n": len(pts), "max_residual": worst}
    return out


def table(result: dict, workloads: Sequence[str] = DEFAULT_WORKLOADS) -> str:
    lines = [f"{result.get('device_name', result.get('device', '?'))}: t = F + bytes / B over "
             f"{', '.join(workloads)}", "",
             "| dtype | case | impl | F (us) | B (GB/s) | largest residual (us) |", "|---|---|---|---:|---:|---:|"]
    for (dtype, projecting, impl), v in sorted(fixed_costs(result, workloads).items(),
                                              key=lambda kv: (kv[0][0], not kv[0][1], kv[0][2])):
        lines.append(f"| {dtype} | {'proj' if projecting else 'no-proj'} | {impl} | "
                     f"{v['F'] * 1e6:.1f} | {v['B'] / 1e9:.0f} | {v['max_residual'] * 1e6:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json", nargs="+", help="bench.run result files")
    p.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS))
    args = p.parse_args(argv)
    for path in args.json:
        with open(path) as f:
            payload = json.load(f)
        for result in payload["results"]:
            print(table(result, args.workloads.split(",")))
            print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
