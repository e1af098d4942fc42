"""End-to-end A-GEM timing: Naive vs Avalanche's AGEMPlugin vs agem_fast's AGEMPlugin.

The workload of issue 4: 5 experiences x 800 samples x 784 features (synthetic,
made in process), MLP 784-512-512-10, train_mb_size 32, one epoch per experience,
patterns_per_experience 250, sample_size 256. Every variant trains the same
benchmark from the same seeds inside an Avalanche `Naive` strategy (training only,
no evaluation). The plugins' hooks are wrapped to split their time into memory
sampling, the reference pass (forward + backward + capture, sampling excluded),
the projection and the memory update. The whole comparison runs `--rounds` times
(interleaved) and every round is printed.

    python bench/e2e_plugin.py --out bench/results/e2e_plugin_cpu.json
    python bench/e2e_plugin.py --device cuda --out bench/results/e2e_plugin_cuda.json

On CUDA each run's total is a wall-clock time from a synchronised start to a
synchronised end. The phases stay host times: each hook is timed until it returns,
with no synchronisation added (that would change what is measured), so a hook that
syncs (Avalanche's projection reads its dot product back to decide) also waits there
for the GPU work queued before it, the backward pass included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
import warnings
from collections import defaultdict

import numpy as np
import torch
from torch import nn

warnings.filterwarnings("ignore", message="no QP solver found")
warnings.filterwarnings("ignore", message="No loggers specified")

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, os.path.dirname(HERE))

from avalanche.benchmarks import nc_benchmark  # noqa: E402
from avalanche.benchmarks.utils import (  # noqa: E402
    _make_taskaware_tensor_classification_dataset as make_dataset,
)
from avalanche.training.plugins import AGEMPlugin as AvalancheAGEMPlugin  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin  # noqa: E402
from avalanche.training.supervised import Naive  # noqa: E402

import agem_fast  # noqa: E402
from agem_fast.plugin import AGEMPlugin  # noqa: E402

VARIANTS = ("naive", "avalanche", "agem_fast", "agem_fast_dataset", "floor")
PHASES = ("sampling", "reference", "projection", "memory_update")


def make_benchmark(n_exp, n_per_exp, n_features, seed):
    g = torch.Generator().manual_seed(seed)
    n_classes = 2 * n_exp
    n = n_exp * n_per_exp
    y = torch.arange(n_classes).repeat_interleave(n // n_classes)
    means = torch.randn(n_classes, n_features, generator=g)
    x = means[y] + torch.randn(len(y), n_features, generator=g)
    first = torch.arange(n_classes) * (n // n_classes)
    xt, yt = x[first], y[first]  # one per class: the test stream is unused (no evaluation)
    return nc_benchmark(
        make_dataset(x, y), make_dataset(xt, yt), n_exp, task_labels=False,
        shuffle=False, fixed_class_order=list(range(n_classes)), seed=seed,
    )


def make_model(n_features):
    return nn.Sequential(
        nn.Linear(n_features, 512), nn.ReLU(),
        nn.Linear(512, 512), nn.ReLU(),
        nn.Linear(512, 10),
    )


class FloorPlugin(AGEMPlugin):
    """Lower bound of any exact A-GEM: only the reference forward + backward.

    Same memory and batch sizes as AGEMPlugin, but the batch is a pre-made slice
    (no sampling work), nothing is captured and nothing is projected.
    """

    def before_training_iteration(self, strategy, **kwargs):
        if not self.buffers:
            return
        n = sum(min(len(b), self.sample_size // len(self.buffers)) for b in self.buffers)
        x, y = self._floor_batch
        self.floor_steps = getattr(self, "floor_steps", 0) + 1
        strategy.model.train()
        strategy.optimizer.zero_grad()
        strategy._criterion(strategy.model(x[:n]), y[:n]).backward()
        strategy.optimizer.zero_grad()

    def after_backward(self, strategy, **kwargs):
        pass

    def update_memory(self, dataset, **kwargs):
        super().update_memory(dataset, **kwargs)
        fields = [b.fields for b in self.buffers]
        # (tensor memory lives on the strategy's device already, so the batch does too)
        self._floor_batch = (torch.cat([f[0] for f in fields]), torch.cat([f[1] for f in fields]))


def instrument(plugin, times, counts):
    """Wrap the plugin's hooks on the instance; accumulate seconds per phase."""

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[name] += time.perf_counter() - t0
                counts[name] += 1

        return wrapper

    plugin.sample_from_memory = timed("sampling", plugin.sample_from_memory)
    plugin.before_training_iteration = timed("before_iter", plugin.before_training_iteration)
    plugin.after_backward = timed("projection", plugin.after_backward)
    plugin.after_training_exp = timed("memory_update", plugin.after_training_exp)


def run_variant(variant, args, experiences=None):
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    benchmark = args._benchmark
    model = make_model(args.features)
    plugins, times, counts = [], defaultdict(float), defaultdict(int)
    if variant != "naive":
        if variant == "avalanche":
            plugin = AvalancheAGEMPlugin(args.patterns, args.sample_size)
        elif variant == "floor":
            plugin = FloorPlugin(args.patterns, args.sample_size)
        else:
            memory = "dataset" if variant == "agem_fast_dataset" else "tensor"
            plugin = AGEMPlugin(args.patterns, args.sample_size, memory=memory)
        instrument(plugin, times, counts)
        plugins.append(plugin)
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=args.mb_size,
        train_epochs=1,
        eval_every=-1,
        device=args.device,
        plugins=plugins,
        evaluator=EvaluationPlugin(loggers=[]),
    )
    stream = benchmark.train_stream if experiences is None else benchmark.train_stream[:experiences]
    sync = torch.cuda.synchronize if args.device.type == "cuda" else (lambda: None)
    sync()
    c0, t0 = time.process_time(), time.perf_counter()
    for exp in stream:
        strategy.train(exp, num_workers=0)
    sync()
    total = time.perf_counter() - t0
    cpu = time.process_time() - c0
    split = {
        "sampling": times["sampling"],
        "reference": times["before_iter"] - times["sampling"],
        "projection": times["projection"],
        "memory_update": times["memory_update"],
    }
    steps = getattr(plugins[0], "floor_steps", 0) if variant == "floor" else counts["sampling"]
    return {"total_s": total, "cpu_s": cpu, "split_s": split, "reference_steps": steps}


def markdown(rounds, variants):
    lines = []
    for r, res in enumerate(rounds, 1):
        base = res["naive"]["total_s"] if "naive" in res else None
        av = res["avalanche"]["total_s"] if "avalanche" in res else None
        lines.append(f"\nRound {r}\n")
        lines.append(
            "| variant | total s | x naive | x avalanche | process CPU s | sampling s "
            "| reference pass s | projection s | memory update s | ref steps |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for v in variants:
            row = res[v]
            t = row["total_s"]
            sp = row["split_s"]
            lines.append(
                f"| {v} | {t:.3f} | {t / base:.2f} | {t / av:.2f} | {row['cpu_s']:.3f} | "
                f"{sp['sampling']:.3f} | {sp['reference']:.3f} | {sp['projection']:.3f} | "
                f"{sp['memory_update']:.3f} | {row['reference_steps']} |"
                if base and av else f"| {v} | {t:.3f} | | | | | | | | |"
            )
    return "\n".join(lines)


def phase_medians(rounds, variants):
    """Median seconds per phase; "rest" is the strategy's own training outside the hooks."""
    lines = ["", "Median seconds per phase (rest: the run outside the plugin's hooks)", "",
             "| variant | " + " | ".join(PHASES) + " | rest | total |",
             "|---|" + "---:|" * (len(PHASES) + 2)]
    for v in variants:
        cols = [float(np.median([r[v]["split_s"][p] for r in rounds])) for p in PHASES]
        rest = float(np.median([r[v]["total_s"] - sum(r[v]["split_s"].values()) for r in rounds]))
        total = float(np.median([r[v]["total_s"] for r in rounds]))
        lines.append(f"| {v} | " + " | ".join(f"{c:.3f}" for c in cols + [rest, total]) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "e2e_plugin.json"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--experiences", type=int, default=5)
    ap.add_argument("--samples", type=int, default=800, help="samples per experience")
    ap.add_argument("--features", type=int, default=784)
    ap.add_argument("--mb-size", type=int, default=32)
    ap.add_argument("--patterns", type=int, default=250)
    ap.add_argument("--sample-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where the strategy trains")
    args = ap.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose from {VARIANTS}")
    args._benchmark = make_benchmark(args.experiences, args.samples, args.features, args.seed)

    # Warm-up (not timed): allocator, BLAS, backend choice (may build the extension).
    for v in variants:
        run_variant(v, args, experiences=2)

    rounds = []
    for r in range(args.rounds):
        res = {}
        for v in variants:
            res[v] = run_variant(v, args)
        rounds.append(res)
        if "avalanche" in res and "agem_fast" in res:
            ratio = res["agem_fast"]["total_s"] / res["avalanche"]["total_s"]
            print(f"round {r + 1}: agem_fast / avalanche = {ratio:.3f}", flush=True)

    table = markdown(rounds, variants)
    if len(rounds) > 1 and "avalanche" in variants:
        med = {v: float(np.median([r[v]["total_s"] for r in rounds])) for v in variants}
        low = {v: float(np.min([r[v]["total_s"] for r in rounds])) for v in variants}
        cpu = {v: float(np.median([r[v]["cpu_s"] for r in rounds])) for v in variants}
        # Paired: each round's ratio to Avalanche in that same round (robust to drift).
        paired = {v: [r[v]["total_s"] / r["avalanche"]["total_s"] for r in rounds] for v in variants}
        lines = ["", f"Over {len(rounds)} rounds", "",
                 "| variant | median total s | x avalanche | min total s | x avalanche "
                 "| median process CPU s | x avalanche | per-round x avalanche: median (min-max) |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [
            f"| {v} | {med[v]:.3f} | {med[v] / med['avalanche']:.2f} | {low[v]:.3f} | "
            f"{low[v] / low['avalanche']:.2f} | {cpu[v]:.3f} | {cpu[v] / cpu['avalanche']:.2f} | "
            f"{np.median(paired[v]):.3f} ({min(paired[v]):.2f}-{max(paired[v]):.2f}) |"
            for v in variants
        ]
        table += "\n" + "\n".join(lines) + "\n" + phase_medians(rounds, variants)
    device = args.device
    env = {
        "torch": torch.__version__,
        "agem_fast": agem_fast.__version__,
        "backend": agem_fast._api.backend_for(device),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    where = env.get("gpu", "cpu")
    print(f"\nA-GEM end to end on {where} ({env['threads']} CPU threads, backend {env['backend']}): "
          f"{args.experiences} exp x {args.samples} x {args.features}, "
          f"MLP {args.features}-512-512-10, mb {args.mb_size}, "
          f"patterns {args.patterns}, sample {args.sample_size}")
    print(table)
    config = {k: str(v) if k == "device" else v for k, v in vars(args).items() if not k.startswith("_")}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"config": config, "env": env, "rounds": rounds, "markdown": table}, f, indent=2)
    md_path = os.path.splitext(args.out)[0] + ".md"
    with open(md_path, "w") as f:
        f.write(table.lstrip() + "\n")
    print(f"\nwrote {args.out} and {md_path}")


if __name__ == "__main__":
    main()
