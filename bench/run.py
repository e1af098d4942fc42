"""Benchmark CLI: one table per device (DESIGN.md section 7).

    python -m bench.run                     # CPU (+ CUDA when present), default workloads
    python -m bench.run --quick             # CPU: resnet18, vit_b_16, tiny5000, fewer repeats
    python -m bench.run --devices cuda --dtypes fp32,bf16,fp16
    python bench/run.py --workloads resnet18 --impls torch,floor --no-write

Implementations: avalanche (the real AGEMPlugin.after_backward when avalanche-lib is
installed, else agem_fast._baselines.avalanche_project_), torch (agem_fast.project_
with AGEM_FAST_BACKEND=torch), extension (AGEM_FAST_BACKEND=extension; its rows are
skipped with a note when the extension is not available on the device), floor (one
flat dot + axpy on preallocated buffers). Results go to bench/results/ as
<device-tag>-<date>.json / .md / .png, and bench/results/INDEX.md is regenerated.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import harness, report  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"

DEFAULTS = {
    # device type: workloads, dtypes, repeats, warmup, sets
    "cpu": (("resnet18", "vit_b_16", "gpt2", "tiny5000"), ("fp32",), 15, 2, 1),
    "cuda": (("resnet18", "vit_b_16", "gpt2", "llama_1b", "tiny5000"), ("fp32", "bf16", "fp16"), 30, 5, 3),
}
QUICK = {
    "cpu": (("resnet18", "vit_b_16", "tiny5000"), ("fp32",), 7, 1, 1),
    "cuda": (("resnet18", "vit_b_16", "gpt2", "llama_1b", "tiny5000"), ("fp32", "bf16", "fp16"), 10, 3, 2),
}


def _csv(text: str):
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=_csv, default=None,
                   help="comma list of cpu,cuda (default: cpu, plus cuda when available)")
    p.add_argument("--workloads", type=_csv, default=None,
                   help="comma list of " + ",".join(harness._workloads.WORKLOADS)
                   + " (default CPU: resnet18,vit_b_16,gpt2,tiny5000; CUDA: all)")
    p.add_argument("--dtypes", type=_csv, default=None, help="comma list of fp32,bf16,fp16 (default CPU fp32, CUDA all)")
    p.add_argument("--all-dtypes", action="store_true", help="fp32,bf16,fp16 on the CPU too")
    p.add_argument("--impls", type=_csv, default=list(harness.IMPLS), help="comma list of " + ",".join(harness.IMPLS))
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (CPU 15, CUDA 30; --quick: 7, 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (CPU 2, CUDA 5)")
    p.add_argument("--runs", type=int, default=2, help="times each measurement is repeated (noise; default 2)")
    p.add_argument("--sets", type=int, default=None, help="input sets rotated between calls (CPU 1, CUDA 3; fewer when memory is short)")
    p.add_argument("--quick", action="store_true",
                   help="fewer repeats; CPU workloads resnet18,vit_b_16,tiny5000 (a few minutes on 2 cores)")
    p.add_argument("--ref-form", choices=("flat", "list"), default="flat",
                   help="reference passed to project_ as Avalanche's flat tensor (default) or a per-parameter list")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder (default bench/results)")
    p.add_argument("--name", default=None, help="file name stem (default <device-tags>-<UTC date>)")
    p.add_argument("--no-write", action="store_true", help="print the tables only")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG chart")
    p.add_argument("--readme", type=Path, nargs="+", default=None, metavar="JSON",
                   help="write these results' summary tables into README.md (between the bench markers)")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="measure nothing: rewrite the .md (and .png) of an existing results JSON")
    args = p.parse_args(argv)
    if args.render:
        return args
    if args.devices is None:
        args.devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for d in args.devices:
        if d not in ("cpu", "cuda"):
            p.error(f"unknown device {d!r}")
        if d == "cuda" and not torch.cuda.is_available():
            p.error("--devices cuda but torch.cuda.is_available() is False")
    for impl in args.impls:
        if impl not in harness.IMPLS:
            p.error(f"unknown implementation {impl!r}")
    for w in args.workloads or []:
        if w not in harness._workloads.WORKLOADS:
            p.error(f"unknown workload {w!r}")
    for d in args.dtypes or []:
        if d not in harness.DTYPES:
            p.error(f"unknown dtype {d!r}")
    return args


def render(path: Path, plot: bool = True) -> int:
    """Re-render the Markdown (and PNG) of a results JSON with the current report code."""
    import json

    data = json.loads(path.read_text())
    results = [report.normalize(r) for r in data["results"]]
    md = report.markdown(results, date=data["date"], command=data.get("command", ""))
    path.with_suffix(".md").write_text(md)
    if plot:
        report.plot(results, path.with_suffix(".png"))
    if path.resolve().parent == RESULTS_DIR.resolve():
        report.write_index(RESULTS_DIR)
    print(md)
    return 0


def readme(paths) -> int:
    """Regenerate README.md's performance tables from results JSONs (never typed by hand)."""
    import json

    repo = Path(__file__).resolve().parents[1]
    sources = []
    for path in paths:
        data = json.loads(path.read_text())
        results = [report.normalize(r) for r in data["results"]]
        source = path.resolve().relative_to(repo).with_suffix(".md").as_posix()
        sources.append((results, data["date"], source, data.get("results", [{}])[0].get("ref_form")))
    report.update_readme(repo / "README.md", report.readme_sections(sources))
    print(f"README.md updated from {', '.join(map(str, paths))}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.readme:
        return readme(args.readme)
    if args.render:
        return render(args.render, plot=not args.no_plot)
    if args.threads:
        torch.set_num_threads(args.threads)
    now = _dt.datetime.now(_dt.timezone.utc)
    date = now.strftime("%Y-%m-%d %H:%M UTC")
    results = []
    for dev in args.devices:
        table = QUICK if args.quick else DEFAULTS
        workloads, dtypes, repeats, warmup, sets = table[dev]
        workloads = args.workloads or list(workloads)
        if args.dtypes:
            dtypes = args.dtypes
        elif args.all_dtypes:
            dtypes = list(harness.DTYPES)
        load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        res = harness.run_device(
            dev, workloads, dtypes, args.impls,
            repeats=args.repeats or repeats, warmup=args.warmup if args.warmup is not None else warmup,
            sets=args.sets or sets, runs=args.runs, seed=args.seed, ref_form=args.ref_form,
        )
        load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        if load0 is not None:
            res["loadavg"] = [load0, load1]
        results.append(res)
    command = "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv)
    md = report.markdown(results, date=date, command=command.strip())
    print(md)
    if args.no_write:
        return 0
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or ("_".join(r["device_tag"] for r in results) + "-" + now.strftime("%Y%m%d-%H%M"))
    payload = {"date": date, "command": command.strip(), "results": results}
    report.write_json(out / f"{stem}.json", payload)
    (out / f"{stem}.md").write_text(md)
    written = [f"{stem}.json", f"{stem}.md"]
    if not args.no_plot and report.plot(results, out / f"{stem}.png"):
        written.append(f"{stem}.png")
    if out.resolve() == RESULTS_DIR.resolve():
        report.write_index(out)
    harness.log(f"wrote {', '.join(str(out / w) for w in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
