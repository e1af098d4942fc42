"""Markdown, JSON and PNG reports of `bench.harness.run_device` results."""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence

IMPL_ORDER = {"avalanche": 0, "torch": 1, "extension": 2, "floor": 3}
WORKLOAD_ORDER = {"resnet18": 0, "vit_b_16": 1, "gpt2": 2, "llama_1b": 3, "tiny5000": 4}
DTYPE_ORDER = {"fp32": 0, "bf16": 1, "fp16": 2}


def _pair(values: Sequence[Optional[float]], fmt: str) -> str:
    out = [(fmt.format(v) if v is not None and not (isinstance(v, float) and math.isnan(v)) else "–") for v in values]
    return " / ".join(out) if out else "–"


def _runs(row: dict, key: str) -> List[Optional[float]]:
    return [run.get(key) for run in row.get("runs", [])]


def _mib(n: Optional[int]) -> str:
    if n is None:
        return "n/a"
    if n < (1 << 20):
        return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B"
    return f"{n / (1 << 20):.1f} MiB"


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def sorted_rows(rows: Sequence[dict]) -> List[dict]:
    return sorted(
        rows,
        key=lambda r: (
            WORKLOAD_ORDER.get(r["workload"], 99),
            r["workload"],
            DTYPE_ORDER.get(r["dtype"], 9),
            not r["projecting"],
            IMPL_ORDER.get(r["impl"], 9),
        ),
    )


def _lookup(result: dict, workload: str, dtype: str, projecting: bool, impl: str) -> Optional[dict]:
    for r in result["rows"]:
        if (r["workload"], r["dtype"], r["projecting"], r["impl"]) == (workload, dtype, projecting, impl):
            return r if r.get("runs") else None
    return None


def targets(result: dict) -> List[str]:
    """The project's stated targets (issues 2 and 3), evaluated on both runs."""
    lines = []

    def verdict(values, ok):
        vals = [v for v in values if v is not None]
        if not vals:
            return "n/a"
        good = [ok(v) for v in vals]
        return "met" if all(good) else ("not met" if not any(good) else "met in one run only")

    def line(text, row, key, ok, fmt):
        if row is None:
            lines.append(f"- {text}: not measured")
            return
        vals = _runs(row, key)
        tail = f" → {verdict(vals, ok)}" if ok is not None else ""
        lines.append(f"- {text}: {_pair(vals, fmt)}{tail}")

    for wl in ("resnet18", "vit_b_16"):
        line(f"torch backend vs floor, {wl} fp32 projecting (t/t_floor, target ≤ 1.3)",
             _lookup(result, wl, "fp32", True, "torch"), "x_floor", lambda v: v <= 1.3, "{:.2f}×")
    for wl in ("resnet18", "vit_b_16"):
        line(f"extension vs floor, {wl} fp32 projecting (target ≤ 1.15)",
             _lookup(result, wl, "fp32", True, "extension"), "x_floor", lambda v: v <= 1.15, "{:.2f}×")
        line(f"extension speed-up over Avalanche, {wl} fp32 projecting (target ≥ 10)",
             _lookup(result, wl, "fp32", True, "extension"), "speedup_vs_avalanche", lambda v: v >= 10, "{:.1f}×")
    for wl in ("resnet18", "vit_b_16"):
        line(f"Avalanche vs floor, {wl} fp32 projecting (t/t_floor, for reference)",
             _lookup(result, wl, "fp32", True, "avalanche"), "x_floor", None, "{:.1f}×")
    ext, tor = _lookup(result, "tiny5000", "fp32", True, "extension"), _lookup(result, "tiny5000", "fp32", True, "torch")
    if ext and tor:
        vals = []
        for t, e in zip(tor["runs"], ext["runs"]):  # paired per round when the times are there
            tt, et = t.get("times_s") or [], e.get("times_s") or []
            if tt and len(tt) == len(et):
                vals.append(statistics.median(a / b for a, b in zip(tt, et)))
            else:
                vals.append(t["median_s"] / e["median_s"])
        lines.append(f"- extension speed-up over torch backend, tiny5000 fp32 projecting (target ≥ 5): "
                     f"{_pair(vals, '{:.1f}×')} → {verdict(vals, lambda v: v >= 5)}")
    else:
        lines.append("- extension speed-up over torch backend, tiny5000 fp32 projecting (target ≥ 5): not measured")
    if result.get("device_type") == "cuda":
        for wl in ("resnet18", "vit_b_16", "gpt2", "llama_1b"):
            for dt in ("fp32", "bf16", "fp16"):
                r = _lookup(result, wl, dt, True, "extension")
                if r:
                    line(f"extension % of copy bandwidth, {wl} {dt} projecting (target ≥ 85%)",
                         r, "pct_copy_bw", lambda v: v >= 85, "{:.0f}%")
    return lines


def device_markdown(result: dict, *, date: str) -> str:
    cb = result.get("copy_bandwidth", [])
    load = result.get("loadavg")
    head = [
        f"## {result['device_name']} ({result['device']})",
        "",
        f"- date: {date}; torch {result['torch']}"
        + (f" (CUDA {result['cuda']})" if result.get("cuda") else "")
        + f"; agem_fast {result['agem_fast']}",
        f"- copy bandwidth (bytes read + written, same run): {_pair([c['gbps'] for c in cb], '{:.1f}')} GB/s "
        "(before / after the table)",
        f"- {result['repeats']} timed calls per measurement after {result['warmup']} warm-up calls, "
        f"each measurement run {result['runs']} times (values shown as run 1 / run 2); gradients restored "
        f"and a {result['flush_bytes'] >> 20} MiB cache-flush buffer written before every call, outside the timing",
        f"- reference passed as: {result.get('ref_form', 'flat')} (Avalanche's flat layout)"
        if result.get("ref_form", "flat") == "flat" else f"- reference passed as: {result.get('ref_form')}",
    ]
    if load:
        head.append(f"- load average (1 min) before / after: {load[0]:.2f} / {load[1]:.2f}")
    head += [
        "",
        "GB/s counts 5s bytes per parameter when projecting, 2s when not (s = element size). "
        "× floor = t / t_floor (lower is better); vs Avalanche = t_avalanche / t (higher is better); both are "
        "medians of per-round ratios (the implementations are timed interleaved, one call each per round). "
        "IQR % = interquartile range / median. rel err = ‖out − exact‖ / ‖exact‖ against a float64 "
        "projection of the same inputs; torch and extension rows are flagged **WRONG** above 1e-4 (fp32), "
        "1e-2 (fp16), 3e-2 (bf16); the baselines' single fp32 dot is reported as it is.",
        "",
        "| workload | dtype | case | impl | backend | median ms | min ms | IQR % | GB/s | % copy BW | × floor | vs Avalanche | peak extra mem | rel err |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines = list(head)
    for r in sorted_rows(result["rows"]):
        wl = f"{r['workload']} ({_millions(r['numel'])}, {r['n_tensors']} t)"
        case = "proj" if r["projecting"] else "no-proj"
        backend = r.get("backend") or "–"
        if backend.startswith("avalanche-lib"):
            backend = "avalanche-lib"
        elif backend.startswith("agem_fast._baselines"):
            backend = "re-expression"
        elif backend.startswith("flat torch.dot"):
            backend = "dot+axpy"
        if not r.get("runs"):
            lines.append(f"| {wl} | {r['dtype']} | {case} | {r['impl']} | {backend} | skipped | | | | | | | | |")
            continue
        med = [x * 1e3 for x in _runs(r, "median_s")]
        mins = [x * 1e3 for x in _runs(r, "min_s")]
        iqr = [100.0 * (run["q3_s"] - run["q1_s"]) / run["median_s"] for run in r["runs"]]
        fmt_ms = "{:.3f}" if max(med) < 10 else "{:.2f}" if max(med) < 100 else "{:.1f}"
        err = r.get("rel_err")
        err_s = "–" if err is None else f"{err:.1e}" + (" **WRONG**" if r.get("check_ok") is False else "")
        lines.append(
            f"| {wl} | {r['dtype']} | {case} | {r['impl']} | {backend} | {_pair(med, fmt_ms)} | {_pair(mins, fmt_ms)} | "
            f"{_pair(iqr, '{:.0f}')} | {_pair(_runs(r, 'gbps'), '{:.1f}')} | "
            f"{_pair(_runs(r, 'pct_copy_bw'), '{:.0f}')} | {_pair(_runs(r, 'x_floor'), '{:.2f}')} | "
            f"{_pair(_runs(r, 'speedup_vs_avalanche'), '{:.1f}')} | {_mib(r.get('peak_extra_bytes'))} | {err_s} |"
        )
    lines += ["", "Targets:", ""] + targets(result)
    if result.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in result["notes"]]
    mem_note = (
        "peak extra mem: torch.cuda.max_memory_allocated() during the call minus memory_allocated() before it."
        if result.get("device_type") == "cuda"
        else "peak extra mem: running sum of the CPU allocator's allocation/free events recorded by "
        "torch.profiler(profile_memory=True) during one call (n/a where the profiler gave none)."
    )
    lines += ["", mem_note, ""]
    return "\n".join(lines)


CHECKED_IMPLS = ("torch", "extension")


def normalize(result: dict) -> dict:
    """Apply the current judging rule to an older result (baselines are not judged)."""
    for r in result.get("rows", []):
        if r["impl"] not in CHECKED_IMPLS and r.get("check_ok") is False:
            r["check_ok"] = None
            if (r.get("note") or "").startswith("WRONG RESULT"):
                r["note"] = None
    result["notes"] = [
        n for n in result.get("notes", [])
        if not ("WRONG RESULT" in n and any(f" {impl}: WRONG" in n for impl in ("avalanche", "floor")))
    ]
    return result


def markdown(results: Sequence[dict], *, date: str, command: str = "") -> str:
    parts = [f"# agem_fast projection benchmark, {date}", ""]
    if command:
        parts += [f"Command: `{command}`", ""]
    for res in results:
        parts.append(device_markdown(res, date=date))
    return "\n".join(parts)


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")


def plot(results: Sequence[dict], path: Path) -> bool:
    """Bar chart: speed-up over Avalanche per workload (fp32 and each dtype on CUDA), projecting."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - matplotlib is optional
        return False
    panels = []
    for res in results:
        for dt in ("fp32", "bf16", "fp16"):
            if any(r["dtype"] == dt and r.get("runs") for r in res["rows"]):
                panels.append((res, dt))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    impls = [("torch", "#4c72b0"), ("extension", "#dd8452"), ("floor", "#55a868")]
    for ax, (res, dt) in zip(axes[0], panels):
        wls = [w for w in WORKLOAD_ORDER if _lookup(res, w, dt, True, "avalanche")]
        width = 0.8 / len(impls)
        for j, (impl, color) in enumerate(impls):
            vals = []
            for w in wls:
                r = _lookup(res, w, dt, True, impl)
                sp = [v for v in _runs(r, "speedup_vs_avalanche") if v] if r else []
                vals.append(math.exp(sum(map(math.log, sp)) / len(sp)) if sp else 0.0)
            xs = [i + (j - 1) * width for i in range(len(wls))]
            bars = ax.bar(xs, vals, width, label=impl, color=color)
            for b, v in zip(bars, vals):
                if v:
                    ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(wls)))
        ax.set_xticklabels(wls, rotation=20)
        ax.set_yscale("log")
        ax.set_ylabel("speed-up over Avalanche (×, projecting)")
        ax.set_title(f"{res['device_name'][:40]}\n{dt}, projecting (geometric mean of the runs)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_index(results_dir: Path) -> None:
    """results/INDEX.md: every committed result, newest first, with its headline numbers."""
    entries = []
    # Top-level CPU runs, and the benchmark of each GPU folder from bench/gpu_check.sh.
    for p in sorted([*results_dir.glob("*.json"), *results_dir.glob("gpu-*/bench-*.json")]):
        try:
            data = json.loads(p.read_text())
        except Exception:  # noqa: BLE001
            continue
        results = data.get("results") if isinstance(data, dict) else None
        for res in results if isinstance(results, list) else []:
            if not isinstance(res, dict) or "rows" not in res:
                continue  # another tool's JSON (e.g. bench/e2e_plugin.py)
            head = []
            for wl in ("resnet18", "vit_b_16"):
                for impl in ("torch", "extension"):
                    r = _lookup(res, wl, "fp32", True, impl)
                    if r:
                        head.append(f"{impl} {wl} fp32 proj {_pair(_runs(r, 'x_floor'), '{:.2f}')}× floor")
            stem = p.relative_to(results_dir).with_suffix("").as_posix()
            entries.append((data.get("date", ""), stem, res.get("device_name", "?"), "; ".join(head)))
    entries.sort(reverse=True)
    lines = ["# Benchmark results", "",
             "Generated by `python -m bench.run`; newest first. Each entry has a .json (all numbers), "
             "a .md (the tables) and, where matplotlib was installed, a .png.", "",
             "| date | file | device | headline (run 1 / run 2) |", "|---|---|---|---|"]
    for date, stem, dev, head in entries:
        lines.append(f"| {date} | [{stem}]({stem}.md) | {dev} | {head or '–'} |")
    (results_dir / "INDEX.md").write_text("\n".join(lines) + "\n")


README_BEGIN = "<!-- bench:begin (generated by `python -m bench.run --readme RESULT.json`) -->"
README_END = "<!-- bench:end -->"


def _ms(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def readme_sections(sources) -> str:
    """Compact per-device tables for README.md, one block per results file: median ms per
    implementation (run 1 / run 2), the extension's ratio to the floor and its speed-ups.
    `sources`: (normalized results, date, path of the .md, reference form) tuples."""
    out = [README_BEGIN, ""]
    for results, date, source, ref_form in sources:
        out += [f"Measured {date}, reference passed as `{ref_form}`; full tables and the command: "
                f"[{source}]({source}).", ""]
        for res in results:
            out += _readme_table(res)
    out.append(README_END)
    return "\n".join(out)


def _readme_table(res: dict) -> List[str]:
    out = [f"**{res['device_name']}** ({res['device']}), torch {res['torch']}", "",
           "| workload | dtype | case | Avalanche ms | torch ms | extension ms | floor ms "
           "| extension × floor | extension vs Avalanche | extension vs torch |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    seen = set()
    for row in sorted_rows(res["rows"]):
        key = (row["workload"], row["dtype"], row["projecting"])
        if key in seen:
            continue
        seen.add(key)
        cells = {impl: _lookup(res, *key, impl) for impl in ("avalanche", "torch", "extension", "floor")}
        ms = {impl: " / ".join(_ms(run["median_s"] * 1e3) for run in r["runs"]) if r else "n/a"
              for impl, r in cells.items()}
        ext = cells["extension"]
        x_floor = _pair([run.get("x_floor") for run in ext["runs"]], "{:.2f}") if ext else "n/a"
        vs_ava = _pair([run.get("speedup_vs_avalanche") for run in ext["runs"]], "{:.1f}") if ext else "n/a"
        vs_torch = "n/a"
        if ext and cells["torch"]:
            vs_torch = " / ".join(f"{t['median_s'] / e['median_s']:.1f}"
                                  for t, e in zip(cells["torch"]["runs"], ext["runs"]))
        case = "proj" if row["projecting"] else "no-proj"
        out.append(f"| {row['workload']} | {row['dtype']} | {case} | {ms['avalanche']} | {ms['torch']} "
                   f"| {ms['extension']} | {ms['floor']} | {x_floor} | {vs_ava} | {vs_torch} |")
    out.append("")
    return out


def update_readme(readme: Path, section: str) -> None:
    text = readme.read_text()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < 0:
        raise ValueError(f"{readme} has no {README_BEGIN!r} ... {README_END!r} markers")
    readme.write_text(text[:begin] + section + text[end + len(README_END):])
