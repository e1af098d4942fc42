"""project_ gives the same gradients as the real avalanche AGEMPlugin.after_backward.

The reference gradient is built exactly as AGEMPlugin.before_training_iteration does
(cat of grad.view(-1), zeros for None grads); Avalanche's own after_backward runs on
one copy of the model, agem_fast.project_(model.parameters(), flat_ref) on another.
Avalanche computes everything in fp32 over one concatenated vector, so agreement is
checked with the fp32 error model of oracle.py (errors relative to |g| + |coef r|).
"""

from __future__ import annotations

import copy
import math
import types

import pytest
import torch
from torch import nn

avalanche_plugins = pytest.importorskip("avalanche.training.plugins")

import agem_fast  # noqa: E402
from oracle import assert_bit_identical, oracle  # noqa: E402

AVALANCHE_TOL = 2e-5  # fp32 reductions over ~1e4-1e5 elements by a single BLAS dot


class MultiHead(nn.Module):
    """Shared trunk and several heads; only some heads get gradients."""

    def __init__(self, n_heads=4):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 24))
        self.heads = nn.ModuleList(nn.Linear(24, 5 + h) for h in range(n_heads))


def make_model(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    if kind == "cnn":
        return nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3, bias=False),
                             nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    if kind == "multihead":
        return MultiHead()
    raise AssertionError(kind)


def _rand_like(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    mag = torch.exp2(torch.rand(p.shape, generator=gen) * 6 - 3)
    sign = torch.randint(0, 2, p.shape, generator=gen).float() * 2 - 1
    return (sign * mag * 0.01).to(device=p.device, dtype=p.dtype)


def set_random_grads(model, gen, none_names=(), like=None, alpha=0.0):
    """p.grad = noise (+ alpha * like[name]); None for the names in none_names."""
    for name, p in model.named_parameters():
        if name in none_names:
            p.grad = None
            continue
        g = _rand_like(p, gen)
        if like is not None and like.get(name) is not None:
            g = g + alpha * like[name]
        p.grad = g


def avalanche_reference(model, device) -> torch.Tensor:
    """Exactly AGEMPlugin.before_training_iteration's construction of the reference."""
    return torch.cat([
        p.grad.view(-1) if p.grad is not None else torch.zeros(p.numel(), device=device)
        for n, p in model.named_parameters()
    ])


def run_avalanche(model, reference: torch.Tensor, device) -> None:
    plugin = avalanche_plugins.AGEMPlugin(patterns_per_experience=10, sample_size=10)
    plugin.buffers = [object()]  # non-empty: after_backward only projects with a memory
    plugin.reference_gradients = reference
    strategy = types.SimpleNamespace(model=model, device=device)
    plugin.after_backward(strategy)


def none_pattern(kind: str, names, rnd: torch.Generator, forced):
    """Names of the parameters without gradient: the heads in `forced`, plus each other
    head with probability 1/2 (multi-head models only)."""
    if kind != "multihead":
        return ()
    heads = sorted({int(n.split(".")[1]) for n in names if n.startswith("heads.")})
    chosen = {h for h in heads if h in forced or (h > 2 and bool(torch.rand((), generator=rnd) < 0.5))}
    return tuple(n for n in names if n.startswith("heads.") and int(n.split(".")[1]) in chosen)


CASES = [(kind, seed, alpha) for kind in ("mlp", "cnn", "multihead") for seed in range(8)
         for alpha in (-1.0, 0.0, 1.0)]


@pytest.mark.parametrize("kind,seed,alpha", CASES)
def test_matches_avalanche_after_backward(kind, seed, alpha, backend, device):
    gen = torch.Generator().manual_seed(seed * 7 + int(alpha * 3) + 100)
    model = make_model(kind, seed).to(device)
    names = [n for n, _ in model.named_parameters()]

    # reference phase (some heads without gradient), then Avalanche's flat reference
    # head 0: no reference gradient only; head 1: no current gradient only; head 2: neither
    ref_none = none_pattern(kind, names, gen, forced=(0, 2))
    set_random_grads(model, gen, none_names=ref_none)
    ref_by_name = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    flat_ref = avalanche_reference(model, device)

    # current phase: a different None pattern; alpha < 0 opposes the reference (projects),
    # alpha > 0 agrees with it (no projection), alpha = 0 is independent (either)
    cur_none = none_pattern(kind, names, gen, forced=(1, 2))
    set_random_grads(model, gen, none_names=cur_none, like=ref_by_name, alpha=alpha)

    if kind == "multihead":
        assert ref_none and cur_none and set(ref_none) != set(cur_none)
    model_av = model
    model_af = copy.deepcopy(model)
    for pa, pb in zip(model_av.parameters(), model_af.parameters()):
        pb.grad = None if pa.grad is None else pa.grad.clone()
    before = [None if p.grad is None else p.grad.clone() for p in model_af.parameters()]

    run_avalanche(model_av, flat_ref.clone(), device)
    res = agem_fast.project_(model_af.parameters(), flat_ref)

    # the decision in float64, and its margin against fp32 roundoff
    offsets, refs = 0, []
    for p in model_af.parameters():
        refs.append(flat_ref[offsets:offsets + p.numel()].view(p.shape))
        offsets += p.numel()
    orc = oracle(before, refs)
    s_abs = sum(float((g.double() * r.double()).abs().sum()) for g, r in zip(before, refs) if g is not None)
    clear = abs(orc.dot) > AVALANCHE_TOL * s_abs
    if alpha < 0:
        assert orc.projected and clear
    if alpha > 0:
        assert not orc.projected and clear
    if clear:
        assert bool(res.projected) == orc.projected

    coef = orc.coef
    d_coef = AVALANCHE_TOL * (s_abs + abs(coef) * orc.rr) / orc.rr if orc.rr > 0 else 0.0
    if not clear:
        d_coef += AVALANCHE_TOL * s_abs / orc.rr
    for (name, pa), pb, g0, r in zip(model_av.named_parameters(), model_af.parameters(), before, refs):
        if g0 is None:
            assert pa.grad is None and pb.grad is None, name
            continue
        projected_av = not torch.equal(pa.grad, g0)
        if not bool(res.projected) and not projected_av:
            assert_bit_identical(pb.grad, g0, name)
            assert_bit_identical(pa.grad, g0, name)
            continue
        scale = g0.double().abs() + (coef * r.double()).abs()
        allowed = AVALANCHE_TOL * scale + 2 * d_coef * r.double().abs() + 1e-30
        err = (pa.grad.double() - pb.grad.double()).abs()
        worst = float((err - allowed).max())
        assert worst <= 0, f"{name}: agem_fast and Avalanche differ beyond fp32 tolerance ({worst:.3g})"
    if orc.projected and clear:
        assert any(not torch.equal(pb.grad, g0) for pb, g0 in zip(model_af.parameters(), before)
                   if g0 is not None)


def test_avalanche_plugin_really_projects(device):
    """Guard against a vacuous comparison: the real plugin changes the gradients here."""
    gen = torch.Generator().manual_seed(0)
    model = make_model("mlp", 0).to(device)
    set_random_grads(model, gen)
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    flat_ref = avalanche_reference(model, device)
    set_random_grads(model, gen, like=ref, alpha=-1.0)
    before = [p.grad.clone() for p in model.parameters()]
    run_avalanche(model, flat_ref, device)
    assert all(not torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))
