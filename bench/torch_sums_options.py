"""Why the torch backend stays above 1.3x the floor on the CPU (issue 2's target).

Times whole projections whose pass 1 (dot and ||r||^2) is done three ways in plain
PyTorch, all with the shipped pass 2, against the flat dot+axpy floor; and checks
whether each pass 1 gives the same bits for 1 to 4 threads (DESIGN section 1):

- shipped: the torch backend as it is (products into a bounded buffer, summed per row);
- blas_per_tensor: torch.dot(g, r) and torch.dot(r, r) per tensor;
- blas_per_piece: the same per piece of 2^20 elements, so r's second read hits the cache.

    python bench/torch_sums_options.py --workload resnet18 --rounds 15 --threads 2 [--out F.md]

The floor computes <r,r> once when its buffers are loaded, so it reads 2s bytes per
parameter to decide where any implementation that is told only g and r reads at least
that, and a torch-only one, without a fused multiply-reduce, more.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from agem_fast import _plan, _torch_backend as tb, _workloads
from agem_fast._baselines import FlatFloor

PIECE = 1 << 20


def blas_per_tensor(plan):
    dots = [torch.dot(g.view(-1), r.view(-1)) for g, r in zip(plan.grads, plan.refs)]
    sqs = [torch.dot(r.view(-1), r.view(-1)) for r in plan.refs]
    return torch.stack(dots).double().sum(), torch.stack(sqs).double().sum()


def blas_per_piece(plan):
    dots, sqs = [], []
    for g, r in zip(plan.grads, plan.refs):
        g, r = g.view(-1), r.view(-1)
        for start in range(0, r.numel(), PIECE):
            rp = r[start:start + PIECE]
            dots.append(torch.dot(g[start:start + PIECE], rp))
            sqs.append(torch.dot(rp, rp))
    return torch.stack(dots).double().sum(), torch.stack(sqs).double().sum()


PASS1 = {"shipped": tb._sums, "blas_per_tensor": blas_per_tensor, "blas_per_piece": blas_per_piece}


def same_bits_for_1_to_4_threads(fn, plan) -> bool:
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3, 4):
            torch.set_num_threads(threads)
            results.append(torch.stack(fn(plan)))
    finally:
        torch.set_num_threads(old)
    return all(torch.equal(results[0], r) for r in results[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="resnet18")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="also write the table to this Markdown file")
    args = ap.parse_args()

    params, refs = _workloads.make_grads(_workloads.shapes(args.workload))
    flat_ref = _workloads.flat_buffer(refs)
    floor = FlatFloor.over(_workloads.pack_grads(params), flat_ref)  # the same memory for all
    plan = _plan.make_plan(params, flat_ref, 0.0)
    saved = [g.clone() for g in plan.grads]
    flush = torch.empty(16 << 20)  # 64 MiB written before each call: cold caches

    def restore():
        for g, s in zip(plan.grads, saved):
            g.copy_(s)

    def projection(pass1):
        def run():
            dot, rr = pass1(plan)
            coef, projected = tb.decide(dot, rr, 0.0)
            tb.apply(plan, coef, projected)
        return run

    calls = {"floor": lambda: floor(projects=True)}
    calls.update({name: projection(fn) for name, fn in PASS1.items()})
    torch.set_num_threads(args.threads)
    times = {name: [] for name in calls}
    for round_ in range(args.rounds + 1):  # the first round warms up
        order = list(calls.items())
        for name, call in (order if round_ % 2 else order[::-1]):  # alternate the order
            restore()
            flush.fill_(1.0)
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    exact = (sum(torch.dot(g.double().view(-1), r.double().view(-1)) for g, r in zip(saved, plan.refs)),
             sum(torch.dot(r.double().view(-1), r.double().view(-1)) for r in plan.refs))

    lines = [f"# torch backend pass 1 options, {args.workload} fp32, CPU, {args.threads} threads, "
             f"{args.rounds} rounds ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             "| pass 1 | median ms | × floor (per-round median) | same bits for 1-4 threads | rel err dot |",
             "|---|---:|---:|:---:|---:|"]
    floor_t = times["floor"][1:]
    for name, ts in times.items():
        ts = ts[1:]
        ratio = statistics.median(a / b for a, b in zip(ts, floor_t))
        if name == "floor":
            lines.append(f"| floor (flat dot + axpy, <r,r> precomputed) | {statistics.median(ts) * 1e3:.2f} | 1.00 | | |")
            continue
        restore()
        dot, _ = PASS1[name](plan)
        err = abs(float(dot) - float(exact[0])) / abs(float(exact[0]))
        same = same_bits_for_1_to_4_threads(PASS1[name], plan)
        lines.append(f"| {name} | {statistics.median(ts) * 1e3:.2f} | {ratio:.2f} | {'yes' if same else 'no'} | {err:.1e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
