"""How far apart equal buffers stream on this machine (why the floor shares memory).

Allocates `--buffers` pairs of equal 1-D fp32 buffers and times `torch.dot` on each pair
in turn, caches flushed before each call, for `--rounds` rounds; prints each pair's
median. On the 2-core VM the slowest pair's median was 1.09-1.22x the fastest's over
four runs, and a pair keeps its speed for its whole life: a benchmark that gives its
floor buffers of its own compares against a floor that is faster or slower by chance.

    python bench/buffer_spread.py --numel 12000000 --buffers 8 --rounds 15 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=12_000_000)
    ap.add_argument("--buffers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pairs = [(torch.randn(args.numel), torch.randn(args.numel)) for _ in range(args.buffers)]
    flush = torch.empty(16 << 20)  # 64 MiB
    times = [[] for _ in pairs]
    for _ in range(args.rounds):
        for i, (g, r) in enumerate(pairs):
            flush.fill_(1.0)
            start = time.perf_counter()
            torch.dot(g, r)
            times[i].append(time.perf_counter() - start)
    medians = [statistics.median(t) * 1e3 for t in times]
    print("median ms per pair: " + " ".join(f"{m:.2f}" for m in medians))
    print(f"slowest / fastest: {max(medians) / min(medians):.2f}")


if __name__ == "__main__":
    main()
