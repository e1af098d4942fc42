"""Tests of agem_fast.plugin.AGEMPlugin against Avalanche's AGEMPlugin.

Parity is checked by recording Avalanche's plugin inside a real Avalanche run
(model copy, reference batch, reference gradient, gradients before and after the
projection, Python RNG state before each memory update) and replaying every step
through our plugin from the recorded state. Avalanche's loader draws a seed from the
global torch RNG each time it is (re)built, so two independent runs with equal seeds
do not see the same training batches; replaying from recorded states removes that
difference instead of widening the tolerance.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import os
import pickle
import random
import subprocess
import sys
import textwrap
import types
import unittest
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

avalanche = pytest.importorskip("avalanche")

import numpy as np  # noqa: E402 (comes with avalanche-lib)

from avalanche.benchmarks import nc_benchmark  # noqa: E402
from avalanche.benchmarks.utils import (  # noqa: E402
    _make_taskaware_tensor_classification_dataset as make_dataset,
)
from avalanche.models import MTSimpleMLP, SimpleMLP  # noqa: E402
from avalanche.training.plugins import AGEMPlugin as AvalancheAGEMPlugin  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin  # noqa: E402
from avalanche.training.supervised import AGEM, Naive  # noqa: E402

from agem_fast.plugin import AGEMPlugin, TensorMemory  # noqa: E402

N_FEATURES = 12
N_CLASSES = 10


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is faster and immune to a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- data
def synthetic_tensors(seed, n_train_per_class=40, n_test_per_class=20, noise=1.0):
    """Gaussian class clusters, made in process (nothing downloaded)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(N_CLASSES, N_FEATURES, generator=g) * 2.0

    def draw(n):
        y = torch.arange(N_CLASSES).repeat_interleave(n)
        x = means[y] + noise * torch.randn(len(y), N_FEATURES, generator=g)
        return x, y

    return draw(n_train_per_class), draw(n_test_per_class)


def affine(x):
    """A deterministic train transform (module level: picklable)."""
    return x * 2.0 + 0.5


def make_benchmark(seed=0, task_labels=False, transform=None, **kw):
    (x, y), (xt, yt) = synthetic_tensors(seed, **kw)
    return nc_benchmark(
        make_dataset(x, y),
        make_dataset(xt, yt),
        5,
        task_labels=task_labels,
        shuffle=True,
        seed=seed,
        train_transform=transform,
        eval_transform=transform,
    )


def quiet_evaluator():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No loggers specified"
        return EvaluationPlugin(loggers=[])


# ----------------------------------------------------------------------- recording
class RecordingAvalancheAGEM(AvalancheAGEMPlugin):
    """Avalanche's plugin, recording what every hook saw and produced."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.events = []

    def before_training_iteration(self, strategy, **kwargs):
        if len(self.buffers) == 0:
            return super().before_training_iteration(strategy, **kwargs)
        model_copy = copy.deepcopy(strategy.model)
        batches, rng = [], []
        original = self.sample_from_memory

        def recording_sample():
            mb = original()
            batches.append([t.clone() for t in mb])
            # after the loader's seed draw, before dropout in the reference forward
            rng.append(rng_states())
            return mb

        self.sample_from_memory = recording_sample
        try:
            super().before_training_iteration(strategy, **kwargs)
        finally:
            del self.sample_from_memory
        self.events.append(
            {"kind": "iter", "model": model_copy, "batch": batches[0], "rng": rng[0],
             "ref": self.reference_gradients.clone()}
        )

    def after_backward(self, strategy, **kwargs):
        if len(self.buffers) == 0:
            return super().after_backward(strategy, **kwargs)
        grads = lambda: [None if p.grad is None else p.grad.clone()  # noqa: E731
                         for p in strategy.model.parameters()]
        before = grads()
        super().after_backward(strategy, **kwargs)
        self.events[-1]["before"] = before
        self.events[-1]["after"] = grads()

    def after_training_exp(self, strategy, **kwargs):
        self.events.append(
            {"kind": "exp", "random_state": random.getstate(),
             "dataset": strategy.experience.dataset}
        )
        super().after_training_exp(strategy, **kwargs)


def rng_states():
    """The generators dropout may draw from: the CPU's, and the GPU's when there is one."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state() if torch.cuda.is_available() else None)


def set_rng_states(states):
    cpu, gpu = states
    torch.set_rng_state(cpu)
    if gpu is not None:
        torch.cuda.set_rng_state(gpu)


def record_avalanche_run(benchmark, model, ppe, sample_size, epochs=2, mb=20, seed=0, device="cpu"):
    torch.manual_seed(seed)
    random.seed(seed)
    rec = RecordingAvalancheAGEM(ppe, sample_size)
    strategy = Naive(
        model=model,
        device=device,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=mb,
        train_epochs=epochs,
        plugins=[rec],
        evaluator=quiet_evaluator(),
    )
    for exp in benchmark.train_stream:
        strategy.train(exp, num_workers=0)
    return rec.events


def fake_strategy(model, device="cpu"):
    return SimpleNamespace(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        device=torch.device(device),
        _criterion=nn.CrossEntropyLoss(),
    )


def replay(events, plugin, device="cpu"):
    """Drive `plugin` through the recorded run; return (n_steps, n_projected)."""
    n_steps = n_projected = 0
    for ev in events:
        if ev["kind"] == "exp":
            random.setstate(ev["random_state"])
            plugin.after_training_exp(
                SimpleNamespace(device=torch.device(device),
                                experience=SimpleNamespace(dataset=ev["dataset"])),
                num_workers=0,
            )
            continue
        model = ev["model"]
        strategy = fake_strategy(model, device)
        got = []
        original = plugin.sample_from_memory

        def recording_sample():
            mb = original()
            got.append(mb)
            set_rng_states(ev["rng"])  # same dropout masks as Avalanche's pass
            return mb

        plugin.sample_from_memory = recording_sample
        try:
            plugin.before_training_iteration(strategy)
        finally:
            del plugin.sample_from_memory
        # identical reference batch (patterns, targets, task labels)
        assert len(got[0]) == len(ev["batch"])
        for ours, theirs in zip(got[0], ev["batch"]):
            assert torch.equal(ours.cpu(), theirs.cpu()), f"reference batch differs at step {n_steps}"
        torch.testing.assert_close(plugin.reference_gradients, ev["ref"], rtol=1e-5, atol=1e-7)
        # same current gradients in, projected gradients out
        for p, g in zip(model.parameters(), ev["before"]):
            p.grad = None if g is None else g.clone()
        plugin.after_backward(strategy)
        projected = False
        for p, want, was in zip(model.parameters(), ev["after"], ev["before"]):
            if want is None:
                assert p.grad is None
                continue
            scale = max(float(was.abs().max()), 1e-12)
            torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-5 * scale)
            projected |= not torch.equal(want, was)
        n_steps += 1
        n_projected += projected
    return n_steps, n_projected


# --------------------------------------------------------------------- step parity
# sample_size 25 with 30 patterns per experience: 25, 12, 8, 6, 5 per experience,
# so the walks end with shorter chunks and wrap around many times.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="no CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("memory", ["tensor", "dataset"])
def test_step_parity_single_head(memory, device):
    benchmark = make_benchmark(seed=1, transform=affine)
    torch.manual_seed(1)
    events = record_avalanche_run(benchmark, SimpleMLP(N_CLASSES, N_FEATURES, 32), 30, 25, device=device)
    ours = AGEMPlugin(30, 25, memory=memory)
    n_steps, n_projected = replay(events, ours, device)
    assert n_steps == 4 * 2 * 4  # experiences 2..5, 2 epochs, 80 patterns / 20
    assert n_projected > 0
    assert len(ours.buffers) == 5 and all(len(b) == 30 for b in ours.buffers)
    if memory == "tensor":
        assert all(isinstance(b, TensorMemory) for b in ours.buffers)
        assert all(b.device.type == device for b in ours.buffers)
    assert ours.reference_gradients.device.type == device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("memory", ["tensor", "dataset"])
def test_step_parity_multi_head_task_labels(memory, device):
    benchmark = make_benchmark(seed=2, task_labels=True)
    torch.manual_seed(2)
    events = record_avalanche_run(benchmark, MTSimpleMLP(N_FEATURES, 32), 30, 25, device=device)
    ours = AGEMPlugin(30, 25, memory=memory)
    n_steps, n_projected = replay(events, ours, device)
    assert n_steps == 32 and n_projected > 0
    # the memory holds every earlier task and routes each sample to its head
    assert ours.buffers[-1][0][-1] == 4
    # the current task's head gets no reference gradient: absent, not zero-filled
    present = ours.reference_gradient.present
    assert not all(present)


def test_reference_gradient_allocated_once():
    benchmark = make_benchmark(seed=3)
    torch.manual_seed(3)
    model = SimpleMLP(N_CLASSES, N_FEATURES, 16, drop_rate=0.0)
    plugin = AGEMPlugin(20, 10)
    strategy = fake_strategy(model)
    strategy.experience = SimpleNamespace(dataset=benchmark.train_stream[0].dataset)
    plugin.after_training_exp(strategy)
    plugin.before_training_iteration(strategy)
    ref = plugin.reference_gradient
    ptrs = [t.data_ptr() for t in ref.as_list()]
    for _ in range(3):
        plugin.before_training_iteration(strategy)
        assert plugin.reference_gradient is ref
        assert [t.data_ptr() for t in ref.as_list()] == ptrs


# ------------------------------------------------------------------- memory rules
def test_memory_selection_uses_random_shuffle_like_avalanche():
    benchmark = make_benchmark(seed=4)
    ds = benchmark.train_stream[0].dataset  # 80 patterns
    ours, theirs = AGEMPlugin(25, 50, memory="dataset"), AvalancheAGEMPlugin(25, 50)
    random.seed(7)
    ours.update_memory(ds)
    after_ours = random.getstate()
    random.seed(7)
    theirs.update_memory(ds)
    assert random.getstate() == after_ours  # the same draws from Python's RNG
    assert torch.equal(torch.stack([ours.buffers[0][i][0] for i in range(25)]),
                       torch.stack([theirs.buffers[0][i][0] for i in range(25)]))


def test_small_experience_is_kept_whole_without_rng_draw():
    x, y = torch.randn(7, 3), torch.arange(7)
    plugin = AGEMPlugin(10, 4)
    random.seed(0)
    state = random.getstate()
    plugin.update_memory(make_dataset(x, y))
    assert random.getstate() == state
    assert torch.equal(plugin.buffers[0].fields[0], x)


def _numbered_dataset(n, task, first, collate_fn=None):
    """n patterns whose features are their number (first, first+1, ...): a batch shows
    exactly which patterns it holds."""
    x = torch.arange(first, first + n, dtype=torch.float32)[:, None].repeat(1, 3)
    return make_dataset(x, torch.arange(n) % 2, task_labels=task, collate_fn=collate_fn)


# Memory sizes where the walks are easy to get wrong: an experience of exactly
# patterns_per_experience patterns (kept whole: no shuffle), a smaller one, and empty
# experiences (still counted in sample_size // n_experiences, as in Avalanche).
@pytest.mark.parametrize("memory", ["tensor", "dataset"])
@pytest.mark.parametrize(
    "sizes, ppe, sample_size",
    [([80, 80, 80], 30, 25), ([30, 30], 30, 25), ([7, 80], 30, 25),
     ([80, 0, 80], 30, 24), ([0, 80], 30, 24)],
    ids=["plain", "exactly_ppe", "smaller_than_ppe", "empty_middle", "empty_first"],
)
def test_reference_batches_match_avalanche_on_edge_memories(memory, sizes, ppe, sample_size):
    ours, theirs = AGEMPlugin(ppe, sample_size, memory=memory), AvalancheAGEMPlugin(ppe, sample_size)
    for k, n in enumerate(sizes):
        ds = _numbered_dataset(n, k, 100 * k)
        random.seed(k)
        theirs.update_memory(ds)
        random.seed(k)
        ours.update_memory(ds)
        if all(len(b) == 0 for b in ours.buffers):
            assert ours.sample_from_memory() is None  # Avalanche's loader raises here
            continue
        for draw in range(12):
            want, got = theirs.sample_from_memory(), ours.sample_from_memory()
            assert len(got) == len(want)
            for a, b in zip(got, want):
                assert torch.equal(a.cpu(), b), f"after experience {k}, draw {draw}: {a} vs {b}"


@pytest.mark.parametrize("memory", ["tensor", "dataset"])
def test_a_buffer_appended_by_hand_is_walked_as_avalanche_walks_it(memory):
    """`buffers` is Avalanche's attribute, which users may extend (to preload a memory,
    say). As Avalanche's memory loader, made by update_memory, the walk takes such a
    buffer from the next update_memory on; with memory="tensor" it is then stored as
    tensors, whole."""
    ours, theirs = AGEMPlugin(6, 9, memory=memory), AvalancheAGEMPlugin(6, 9)
    sets = [_numbered_dataset(20, k, 100 * k) for k in range(3)]

    def compare(what, draws=5):
        for draw in range(draws):
            want, got = theirs.sample_from_memory(), ours.sample_from_memory()
            assert len(got) == len(want)
            for a, b in zip(got, want):
                assert torch.equal(a.cpu(), b), f"{what}, draw {draw}: {a} vs {b}"

    for plugin in (theirs, ours):
        random.seed(0)
        plugin.update_memory(sets[0])
        plugin.buffers.append(sets[1].subset(range(4)))
    compare("after the append")
    for plugin in (theirs, ours):
        random.seed(2)
        plugin.update_memory(sets[2])
    assert len(ours.buffers) == 3
    compare("after the next update_memory", draws=8)
    if memory == "tensor":
        assert all(isinstance(b, TensorMemory) for b in ours.buffers)


def _marked_collate(mark):
    def collate(items):
        from torch.utils.data import default_collate

        return [*default_collate(items), torch.full((len(items),), mark)]

    return collate


@pytest.mark.parametrize("memory", ["tensor", "dataset"])
def test_reference_batches_use_the_first_experience_collate_fn(memory):
    """As Avalanche's loader: every reference batch is collated by the collate_fn of
    the first experience's dataset, whatever later experiences carry."""
    ours, theirs = AGEMPlugin(20, 10, memory=memory), AvalancheAGEMPlugin(20, 10)
    for k, mark in enumerate((7, 9)):
        ds = _numbered_dataset(30, 0, 100 * k, collate_fn=_marked_collate(mark))
        for plugin in (theirs, ours):
            random.seed(k)
            plugin.update_memory(ds)
    for _ in range(4):
        want, got = theirs.sample_from_memory(), ours.sample_from_memory()
        assert torch.equal(want[-1], torch.full((10,), 7))  # the first experience's mark
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert torch.equal(a.cpu(), b)


def test_reference_pass_runs_in_train_mode():
    class ModeProbe(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = SimpleMLP(N_CLASSES, 3, 8)
            self.modes = []

        def forward(self, x):
            self.modes.append(self.training)
            return self.mlp(x)

    model = ModeProbe().eval()
    plugin = AGEMPlugin(10, 4)
    plugin.update_memory(_numbered_dataset(12, 0, 0))
    plugin.before_training_iteration(fake_strategy(model))
    assert model.modes == [True] and model.training


def test_reference_gradient_is_the_memory_batch_gradient_alone():
    """Gradients left over from the previous step (stale .grad) must not leak into the
    reference: it is the memory batch's gradient alone, here computed independently with
    torch.autograd.grad on the batch the reference pass saw."""
    class InputProbe(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = SimpleMLP(N_CLASSES, 3, 8, drop_rate=0.0)
            self.inputs = []

        def forward(self, x):
            self.inputs.append(x.clone())
            return self.mlp(x)

    torch.manual_seed(4)
    model = InputProbe()
    targets = []

    def criterion(out, y):
        targets.append(y.clone())
        return nn.functional.cross_entropy(out, y)

    strategy = SimpleNamespace(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                               device=torch.device("cpu"), _criterion=criterion)
    plugin = AGEMPlugin(10, 4)
    plugin.update_memory(_numbered_dataset(12, 0, 0))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 100  # what the previous step left behind
    plugin.before_training_iteration(strategy)
    (x,), (y,) = model.inputs, targets
    expected = torch.autograd.grad(nn.functional.cross_entropy(model.mlp(x), y), list(model.parameters()))
    torch.testing.assert_close(plugin.reference_gradients, torch.cat([g.reshape(-1) for g in expected]))


def test_reference_gradients_is_assignable_like_avalanche():
    """Avalanche's `reference_gradients` is a plain attribute; assigning a flat tensor
    makes after_backward project against it, until the next reference pass."""
    torch.manual_seed(0)
    model = SimpleMLP(N_CLASSES, 3, 8)
    params = list(model.parameters())
    ref = torch.randn(sum(p.numel() for p in params))
    # current gradient = noise - reference, so <g, ref> < 0 and the projection happens
    grads, offset = [], 0
    for p in params:
        r = ref[offset:offset + p.numel()].view_as(p)
        grads.append(torch.randn_like(p) * 0.1 - r)
        offset += p.numel()
    out = []
    for plugin in (AvalancheAGEMPlugin(10, 4), AGEMPlugin(10, 4)):
        plugin.update_memory(_numbered_dataset(12, 0, 0))
        plugin.reference_gradients = ref.clone()
        assert torch.equal(plugin.reference_gradients, ref)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        plugin.after_backward(fake_strategy(model))
        out.append([p.grad.clone() for p in params])
    for theirs, ours, before in zip(*out, grads):
        assert not torch.equal(ours, before)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # the next reference pass replaces the assigned tensor
    plugin.before_training_iteration(fake_strategy(model))
    assert plugin.reference_gradients.shape == ref.shape
    assert not torch.equal(plugin.reference_gradients, ref)
    assert plugin.reference_gradients.data_ptr() == plugin.reference_gradient.flat.data_ptr()
    with pytest.raises(TypeError, match="tensor"):
        plugin.reference_gradients = [0.0]


class _WithLookupTable(nn.Module):
    """A model with a frozen integer parameter (it can never have a gradient)."""

    def __init__(self):
        super().__init__()
        self.order = nn.Parameter(torch.arange(N_FEATURES - 1, -1, -1), requires_grad=False)
        self.mlp = SimpleMLP(N_CLASSES, N_FEATURES, 16)

    def forward(self, x):
        return self.mlp(x[:, self.order])


class _WithFrozenComplexGain(nn.Module):
    """A model with a frozen complex parameter (a dtype agem_fast does not support; as it
    is frozen, it never has a gradient)."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.full((N_FEATURES,), 1 + 0.5j, dtype=torch.complex64), requires_grad=False)
        self.mlp = SimpleMLP(N_CLASSES, N_FEATURES, 16)

    def forward(self, x):
        return self.mlp(x * self.gain.real)


@pytest.mark.parametrize("model_cls, seed", [(_WithLookupTable, 8), (_WithFrozenComplexGain, 9)],
                         ids=["integer", "frozen_complex"])
def test_step_parity_with_a_parameter_that_never_has_a_gradient(model_cls, seed):
    """Its reference slot is always absent, as Avalanche's zeros leave it out."""
    benchmark = make_benchmark(seed=seed)
    torch.manual_seed(seed)
    events = record_avalanche_run(benchmark, model_cls(), 30, 25, epochs=1)
    ours = AGEMPlugin(30, 25)
    n_steps, n_projected = replay(events, ours)
    assert n_steps == 16 and n_projected > 0
    assert ours.reference_gradient.present[0] is False


@pytest.mark.parametrize("memory", ["tensor", "dataset"])
def test_more_experiences_than_sample_size_fail_where_avalanche_does(memory):
    """Avalanche stores any number of experiences; its loader fails at the first
    reference batch drawn from more than sample_size of them. Ours stores them too (a
    run whose last experience makes one too many ends normally) and raises a clear
    ValueError at that batch, before anything is changed."""
    ds = make_dataset(torch.randn(8, N_FEATURES), torch.arange(8) % 2)
    theirs, ours = AvalancheAGEMPlugin(5, 2), AGEMPlugin(5, 2, memory=memory)
    for plugin in (theirs, ours):
        for _ in range(3):
            plugin.update_memory(ds)
        assert len(plugin.buffers) == 3
    with pytest.raises(ValueError):
        theirs.sample_from_memory()
    model = SimpleMLP(N_CLASSES, N_FEATURES, 8)
    model.eval()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="3 experiences in memory but sample_size=2"):
        ours.before_training_iteration(fake_strategy(model))
    assert not model.training  # the failing call changed nothing
    for p, g in zip(model.parameters(), before):
        assert torch.equal(p.grad, g)
    assert ours._cursors == [0, 0, 0]


@pytest.mark.parametrize(
    "args, kwargs",
    [((0, 10), {}), ((10, 0), {}), ((10, 10), {"memory": "disk"})],
)
def test_constructor_validation(args, kwargs):
    with pytest.raises(ValueError):
        AGEMPlugin(*args, **kwargs)


def test_dataset_memory_applies_transforms_per_access():
    calls = []

    def counting(x):
        calls.append(1)
        return x

    benchmark = make_benchmark(seed=5, transform=counting)
    for memory, expect_growth in (("tensor", False), ("dataset", True)):
        plugin = AGEMPlugin(10, 10, memory=memory)
        plugin.update_memory(benchmark.train_stream[0].dataset)
        n0 = len(calls)
        plugin.sample_from_memory()
        assert (len(calls) > n0) == expect_growth


def test_reference_gradients_flat_layout_zero_fills_missing():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    extra = nn.Linear(2, 2)  # never used: its grads stay None
    model.add_module("unused", extra)
    plugin = AGEMPlugin(4, 4)
    plugin.update_memory(make_dataset(torch.randn(6, 3), torch.arange(6) % 2))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            return self.m[1](self.m[0](x))

    net = Net()
    strategy = fake_strategy(net)
    plugin.before_training_iteration(strategy)
    flat = plugin.reference_gradients
    assert flat.shape == (sum(p.numel() for p in net.parameters()),)
    assert torch.all(flat[-6:] == 0) and flat[:-6].abs().sum() > 0


# ------------------------------------------------------------ Avalanche strategies
def test_naive_and_agem_strategies_run_without_warnings(monkeypatch):
    benchmark = make_benchmark(seed=6)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        model = SimpleMLP(N_CLASSES, N_FEATURES, 16)
        ours = AGEMPlugin(20, 20)
        strategy = Naive(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
            criterion=nn.CrossEntropyLoss(), train_mb_size=20, plugins=[ours],
            evaluator=quiet_evaluator(),
        )
        for exp in benchmark.train_stream[:3]:
            strategy.train(exp, num_workers=2)  # Avalanche's plugin would warn here
        strategy.eval(benchmark.test_stream[:2])
        # pickling the whole strategy (checkpointing) keeps the memory and positions
        clone = pickle.loads(pickle.dumps(strategy))
        cloned = next(p for p in clone.plugins if isinstance(p, AGEMPlugin))
        assert cloned._cursors == ours._cursors and len(cloned.buffers) == 3
        for a, b in zip(cloned.buffers, ours.buffers):
            assert all(torch.equal(x, y) for x, y in zip(a.fields, b.fields))

        import avalanche.training.supervised.strategy_wrappers as wrappers

        monkeypatch.setattr(wrappers, "AGEMPlugin", AGEMPlugin)
        model = SimpleMLP(N_CLASSES, N_FEATURES, 16)
        agem = AGEM(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
            criterion=nn.CrossEntropyLoss(), patterns_per_exp=20, sample_size=20,
            train_mb_size=20, evaluator=quiet_evaluator(),
        )
        assert any(isinstance(p, AGEMPlugin) for p in agem.plugins)
        for exp in benchmark.train_stream[:3]:
            agem.train(exp)
    assert len(ours.buffers) == 3
    # Not a single warning, wherever raised (Avalanche's own plugin gives three here,
    # one per experience trained with num_workers > 0).
    assert [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in records] == []


def _load_wheel_test_strategies():
    """The avalanche-lib wheel's tests/training/test_strategies.py, loaded by path.

    Our own tests/ directory may shadow the wheel's `tests` package: put the wheel's
    package under that name in sys.modules for the duration, then restore.
    """
    import avalanche as av

    site = os.path.dirname(os.path.dirname(av.__file__))
    root = os.path.join(site, "tests")
    path = os.path.join(root, "training", "test_strategies.py")
    if not os.path.exists(path):
        pytest.skip("this avalanche-lib install does not ship its test suite")
    saved = {k: v for k, v in sys.modules.items() if k == "tests" or k.startswith("tests.")}
    for k in saved:
        del sys.modules[k]
    try:
        spec = importlib.util.spec_from_file_location(
            "tests", os.path.join(root, "__init__.py"), submodule_search_locations=[root]
        )
        pkg = importlib.util.module_from_spec(spec)
        sys.modules["tests"] = pkg
        spec.loader.exec_module(pkg)
        import tests.training.test_strategies as module  # noqa: F811  (the wheel's)

        return module
    finally:
        for k in [k for k in sys.modules if k == "tests" or k.startswith("tests.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_avalanche_own_agem_strategy_test_passes_with_our_plugin(monkeypatch):
    module = _load_wheel_test_strategies()
    import avalanche.training.supervised.strategy_wrappers as wrappers

    created = []

    class Counting(AGEMPlugin):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(wrappers, "AGEMPlugin", Counting)
    result = unittest.TestResult()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module.StrategyTest("test_agem").run(result)
    assert result.wasSuccessful(), result.errors + result.failures
    assert len(created) == 2 and all(len(p.buffers) == 5 for p in created)


# ------------------------------------------------------------------- end to end
def _final_accuracy(plugin, seed):
    benchmark = make_benchmark(seed=100, n_train_per_class=60, n_test_per_class=30, noise=1.5)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    model = SimpleMLP(N_CLASSES, N_FEATURES, 64, drop_rate=0.0)
    strategy = Naive(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=1,
        plugins=[plugin], evaluator=quiet_evaluator(),
    )
    for exp in benchmark.train_stream:
        strategy.train(exp, num_workers=0)
    (_, _), (xt, yt) = synthetic_tensors(100, n_train_per_class=60, n_test_per_class=30, noise=1.5)
    model.eval()
    with torch.no_grad():
        return float((model(xt).argmax(1) == yt).float().mean())


class _LoaderSeedDraw(AGEMPlugin):
    """Ours, plus the one draw from the global torch RNG that Avalanche's memory
    loader makes when its iterator starts (DataLoader base seed), once per memory
    update. Test-only: it makes whole runs comparable seed for seed."""

    def update_memory(self, *args, **kwargs):
        super().update_memory(*args, **kwargs)
        self._fresh_loader = True

    def sample_from_memory(self):
        if getattr(self, "_fresh_loader", False):
            torch.empty((), dtype=torch.int64).random_()
            self._fresh_loader = False
        return super().sample_from_memory()


def test_end_to_end_accuracy_within_avalanche_seed_spread():
    seeds = range(5)
    theirs = [_final_accuracy(AvalancheAGEMPlugin(50, 100), s) for s in seeds]
    ours = [_final_accuracy(AGEMPlugin(50, 100), s) for s in seeds]
    mean_ours = float(np.mean(ours))
    print(f"final accuracy: avalanche {theirs} ours {ours}")
    assert min(theirs) <= mean_ours <= max(theirs), (theirs, ours)
    # A-GEM must actually retain something beyond the last two classes (0.2).
    assert mean_ours > 0.25
    # The runs differ only through the torch RNG stream: with Avalanche's loader
    # seed draw reproduced, whole runs end at Avalanche's accuracy seed for seed.
    for s in seeds[:2]:
        assert abs(_final_accuracy(_LoaderSeedDraw(50, 100), s) - theirs[s]) < 1e-6


# ---------------------------------------------------------------- checkpointing
def _drive(plugin, model, experiences, iters, seed, finish=True):
    """A custom loop: `iters` steps per experience; returns reference and projected grads."""
    strategy = fake_strategy(model)
    out = []
    gen = torch.Generator().manual_seed(seed)
    for ds in experiences:
        for _ in range(iters):
            plugin.before_training_iteration(strategy)
            if plugin.reference_gradient is not None:
                out.append(plugin.reference_gradients.clone())
            idx = torch.randint(len(ds), (8,), generator=gen)
            x = torch.stack([ds[int(i)][0] for i in idx])
            y = torch.stack([torch.as_tensor(ds[int(i)][1]) for i in idx])
            strategy.optimizer.zero_grad()
            strategy._criterion(model(x), y).backward()
            plugin.after_backward(strategy)
            out.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
            strategy.optimizer.step()
        if finish:
            strategy.experience = SimpleNamespace(dataset=ds)
            plugin.after_training_exp(strategy)
    return out


@pytest.mark.parametrize("memory", ["tensor", "dataset"])
@pytest.mark.parametrize("how", ["state_dict", "pickle"])
def test_checkpoint_resume_is_identical(memory, how):
    benchmark = make_benchmark(seed=8, transform=affine)
    exps = [e.dataset for e in benchmark.train_stream]
    torch.manual_seed(0)
    model = SimpleMLP(N_CLASSES, N_FEATURES, 16, drop_rate=0.0)
    plugin = AGEMPlugin(30, 21, memory=memory)
    random.seed(0)
    _drive(plugin, model, exps[:2], 5, seed=0)
    _drive(plugin, model, exps[2:3], 2, seed=0, finish=False)  # stop mid-experience

    buf = io.BytesIO()
    if how == "state_dict":
        torch.save({"plugin": plugin.state_dict(), "model": model.state_dict()}, buf)
        buf.seek(0)
        # memory="tensor" state is plain tensors: loadable with weights_only=True
        ckpt = torch.load(buf, weights_only=memory == "tensor")
        restored = AGEMPlugin(30, 21, memory=memory)
        restored.load_state_dict(ckpt["plugin"])
    else:
        pickle.dump({"plugin": plugin, "model": model.state_dict()}, buf)
        buf.seek(0)
        ckpt = pickle.load(buf)
        restored = ckpt["plugin"]
    model2 = SimpleMLP(N_CLASSES, N_FEATURES, 16, drop_rate=0.0)
    model2.load_state_dict(ckpt["model"])
    assert restored._cursors == plugin._cursors and any(restored._cursors)

    rs = random.getstate()
    a = _drive(plugin, model, exps[2:], 4, seed=1)
    random.setstate(rs)
    b = _drive(restored, model2, exps[2:], 4, seed=1)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert torch.equal(x, y)


class _MarkCollate:
    """`_marked_collate(mark)` as a picklable object (checkpoints pickle it)."""

    def __init__(self, mark):
        self.mark = mark

    def __call__(self, items):
        return _marked_collate(self.mark)(items)


@pytest.mark.parametrize("memory, how", [("dataset", "state_dict"), ("dataset", "pickle"),
                                         ("tensor", "pickle")])
def test_checkpoint_keeps_the_first_experience_collate_fn(memory, how):
    """Resumed, the memory is still collated as Avalanche's loader does it: with the first
    experience's collate_fn, for experiences added after resuming too. (memory="tensor"
    state dicts leave the collate function out, as documented: not checked there.)"""
    exps = [_numbered_dataset(30, 0, 100 * k, collate_fn=_MarkCollate(mark))
            for k, mark in enumerate((7, 9, 11))]
    theirs, ours = AvalancheAGEMPlugin(20, 12), AGEMPlugin(20, 12, memory=memory)
    for plugin in (theirs, ours):
        random.seed(0)
        plugin.update_memory(exps[0])
        plugin.sample_from_memory()  # stop mid-walk
    if how == "state_dict":
        buf = io.BytesIO()
        torch.save(ours.state_dict(), buf)
        buf.seek(0)
        resumed = AGEMPlugin(20, 12, memory=memory)
        resumed.load_state_dict(torch.load(buf, weights_only=False))
    else:
        resumed = pickle.loads(pickle.dumps(ours))
    for draw in range(3):  # the resumed walk goes on where it stopped
        want, got = theirs.sample_from_memory(), resumed.sample_from_memory()
        assert len(got) == len(want)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want)), f"draw {draw}"
    for k in (1, 2):
        for plugin in (theirs, resumed):
            random.seed(k)
            plugin.update_memory(exps[k])
        for draw in range(4):
            want, got = theirs.sample_from_memory(), resumed.sample_from_memory()
            assert torch.equal(want[-1], torch.full((len(want[0]),), 7))  # the first's mark
            assert len(got) == len(want)
            for a, b in zip(got, want):
                assert torch.equal(a.cpu(), b), f"after experience {k}, draw {draw}: {a} vs {b}"


def test_sample_from_empty_memory_and_device_fallback():
    plugin = AGEMPlugin(4, 4)
    assert plugin.sample_from_memory() is None
    plugin.update_memory(make_dataset(torch.randn(6, 3), torch.arange(6) % 2))
    model = nn.Linear(3, 2)
    strategy = fake_strategy(model)
    del strategy.device  # a custom loop without `device`: the model's device is used
    plugin.before_training_iteration(strategy)
    assert plugin.reference_gradients.shape == (8,)


def test_reference_gradient_reallocated_when_parameters_change():
    plugin = AGEMPlugin(4, 4)
    plugin.update_memory(make_dataset(torch.randn(6, 3), torch.arange(6) % 2))
    model = nn.Sequential(nn.Linear(3, 2))
    strategy = fake_strategy(model)
    plugin.before_training_iteration(strategy)
    first = plugin.reference_gradient
    model[0] = nn.Linear(3, 2)  # new parameters (e.g. a new head), same shapes
    strategy.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plugin.before_training_iteration(strategy)
    assert plugin.reference_gradient is not first
    model(torch.randn(2, 3)).sum().backward()
    plugin.after_backward(strategy)


class _CastInput(nn.Module):
    """A linear model that casts its input to its own dtype (survives model.double())."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x.to(self.lin.weight.dtype))


def test_reference_follows_a_model_moved_to_another_dtype():
    """model.double() keeps the Parameter objects but changes their dtype: the plugin
    must reallocate its reference (not round fp64 grads into fp32 slots, nor fail)."""
    gen = torch.Generator().manual_seed(3)
    plugin = AGEMPlugin(4, 4)
    plugin.update_memory(make_dataset(torch.randn(6, 3, generator=gen), torch.arange(6) % 2))
    model = _CastInput()
    strategy = fake_strategy(model)
    plugin.before_training_iteration(strategy)
    first = plugin.reference_gradient
    model.double()
    plugin.before_training_iteration(strategy)
    assert plugin.reference_gradient is not first
    ref = plugin.reference_gradients
    assert ref.dtype == torch.float64
    # a current gradient opposed to the reference: projected exactly as in float64
    noise = torch.randn(ref.numel(), generator=gen, dtype=torch.float64)
    g = -ref + 0.1 * noise * ref.abs().max()
    off = 0
    for p in model.parameters():
        p.grad = g[off:off + p.numel()].view_as(p).clone()
        off += p.numel()
    plugin.after_backward(strategy)
    coef = torch.dot(g, ref) / torch.dot(ref, ref)
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, g - coef * ref, rtol=1e-12, atol=1e-12)


def test_reference_follows_a_model_moved_to_channels_last():
    """model.to(memory_format=channels_last) keeps the Parameter objects but changes
    their strides: the reference slots must follow, so each pair stays flat memory."""
    gen = torch.Generator().manual_seed(4)
    plugin = AGEMPlugin(4, 4)
    plugin.update_memory(make_dataset(torch.randn(6, 2, 5, 5, generator=gen), torch.arange(6) % 2))
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(27, 2))
    strategy = fake_strategy(model)
    plugin.before_training_iteration(strategy)
    model.to(memory_format=torch.channels_last)
    plugin.before_training_iteration(strategy)
    weight_slot = plugin.reference_gradient.as_list()[0]
    assert weight_slot.is_contiguous(memory_format=torch.channels_last)
    assert weight_slot.stride() == model[0].weight.stride()


def test_load_state_dict_rejects_other_configuration():
    plugin = AGEMPlugin(10, 10)
    with pytest.raises(ValueError, match="sample_size"):
        AGEMPlugin(10, 20).load_state_dict(plugin.state_dict())
    with pytest.raises(ValueError, match="memory"):
        AGEMPlugin(10, 10, memory="dataset").load_state_dict(plugin.state_dict())
    with pytest.raises(ValueError):
        plugin.load_state_dict({"buffers": []})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("memory", ["tensor", "dataset"])
def test_memory_follows_strategy_device_after_load_cuda(memory):
    """Memory saved on the CPU moves to the strategy's device on first use."""
    plugin = AGEMPlugin(5, 5, memory=memory)
    plugin.update_memory(make_dataset(torch.randn(6, 3), torch.arange(6) % 2))
    restored = AGEMPlugin(5, 5, memory=memory)
    restored.load_state_dict(plugin.state_dict())
    model = nn.Linear(3, 2).cuda()
    strategy = fake_strategy(model, "cuda")
    restored.before_training_iteration(strategy)
    if memory == "tensor":
        assert restored.buffers[0].device.type == "cuda"
    model(torch.randn(4, 3, device="cuda")).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    restored.after_backward(strategy)
    ref = restored.reference_gradients
    assert ref.device.type == "cuda"
    g = torch.cat([b.reshape(-1) for b in before])
    dot = torch.dot(g, ref)
    want = g - (dot / torch.dot(ref, ref)) * ref if dot < 0 else g
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_memory_stays_put_when_the_strategy_says_cuda_without_index(monkeypatch):
    """strategy.device "cuda" and the memory's cuda:0 are the same place: nothing moves."""
    plugin = AGEMPlugin(5, 5)
    model = nn.Linear(3, 2).cuda()
    strategy = fake_strategy(model, "cuda")
    strategy.experience = SimpleNamespace(dataset=make_dataset(torch.randn(6, 3), torch.arange(6) % 2))
    plugin.after_training_exp(strategy)
    assert plugin.buffers[0].device == torch.device("cuda", torch.cuda.current_device())
    moves = []
    monkeypatch.setattr(TensorMemory, "to", lambda self, device: moves.append(device) or self)
    for _ in range(3):
        plugin.before_training_iteration(strategy)
    assert moves == []


# ------------------------------------------------------------ without Avalanche
README_EXAMPLE = textwrap.dedent(
    """
    import random
    from types import SimpleNamespace

    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from agem_fast.plugin import AGEMPlugin

    torch.manual_seed(0)
    random.seed(0)
    experiences = [
        TensorDataset(torch.randn(200, 20), torch.randint(2 * k, 2 * k + 2, (200,)))
        for k in range(3)
    ]
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 6))
    agem = AGEMPlugin(patterns_per_experience=50, sample_size=64)
    # any object with model, optimizer, device, _criterion (and experience.dataset)
    state = SimpleNamespace(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        device=torch.device("cpu"),
        _criterion=nn.CrossEntropyLoss(),
    )
    for data in experiences:
        for x, y in torch.utils.data.DataLoader(data, batch_size=32, shuffle=True):
            agem.before_training_iteration(state)  # reference gradient on memory
            state.optimizer.zero_grad()
            state._criterion(model(x), y).backward()
            agem.after_backward(state)  # project the gradient in place
            state.optimizer.step()
        state.experience = SimpleNamespace(dataset=data)
        agem.after_training_exp(state)  # store 50 patterns of this experience
    print("experiences in memory:", len(agem.buffers))
    """
)

_BLOCK_AVALANCHE = textwrap.dedent(
    """
    import sys

    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "avalanche" or name.startswith("avalanche."):
                raise ImportError("avalanche blocked for this test")
            return None

    sys.meta_path.insert(0, _Block())
    """
)


def test_import_and_custom_loop_without_avalanche():
    code = _BLOCK_AVALANCHE + textwrap.dedent(
        """
        import agem_fast.plugin as m
        assert not m.HAS_AVALANCHE
        assert not any(k.startswith("avalanche") for k in sys.modules)
        p = m.AGEMPlugin(5, 5)
        for name in m._CALLBACKS:
            if name not in ("before_training_iteration", "after_backward", "after_training_exp"):
                assert getattr(p, name)(None) is None
        """
    ) + README_EXAMPLE
    env = dict(os.environ, AGEM_FAST_BACKEND="torch", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "experiences in memory: 3" in res.stdout


def test_readme_example_runs_with_avalanche_installed():
    ns = {}
    exec(compile(README_EXAMPLE.replace("print(", "_ = ("), "<readme>", "exec"), ns)
    assert len(ns["agem"].buffers) == 3


# ------------------------------------------------- memory="tensor" and its collation
class _Sequences(torch.utils.data.Dataset):
    """Variable-length patterns, as (x, y, task label) items."""

    def __init__(self, lengths, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = [torch.randn(n, generator=g) for n in lengths]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i % 2, 0


def _reference_batches_side_by_side(theirs, ours, exp, seed, n):
    """Each plugin stores `exp` from the same Python seed, then draws n reference
    batches: (Avalanche's, ours) pairs."""
    batches = []
    for plugin in (theirs, ours):
        random.seed(seed)
        plugin.update_memory(exp)
        batches.append([plugin.sample_from_memory() for _ in range(n)])
    return list(zip(*batches))


def _pad_collate(items):
    """Pads every pattern to the longest of its batch: a batch-dependent collate."""
    xs, ys, ts = zip(*items)
    x = torch.zeros(len(xs), max(len(v) for v in xs))
    for k, v in enumerate(xs):
        x[k, : len(v)] = v
    return [x, torch.tensor(ys), torch.tensor(ts)]


def test_tensor_memory_refuses_a_batch_dependent_collate_and_changes_nothing():
    """Slices of one padded batch are not the batches Avalanche collates (padded to the
    longest pattern of each); memory='dataset' gives Avalanche's batches."""
    from avalanche.benchmarks.utils.data import AvalancheDataset

    exp1 = AvalancheDataset([_Sequences([3, 5, 2, 4, 9, 6], 0)], collate_fn=_pad_collate)
    exp2 = AvalancheDataset([_Sequences([7, 1, 12, 3], 1)], collate_fn=_pad_collate)
    ours = AGEMPlugin(10, 4)
    random.seed(3)
    state, torch_state = random.getstate(), torch.get_rng_state()
    with pytest.raises(TypeError, match="depend on the rest of its batch.*memory='dataset'"):
        ours.update_memory(exp1)
    assert ours.buffers == [] and ours._collate_fn is None
    assert random.getstate() == state and torch.equal(torch.get_rng_state(), torch_state)

    theirs, ours = AvalancheAGEMPlugin(10, 4), AGEMPlugin(10, 4, memory="dataset")
    for exp in (exp1, exp2):
        for a, b in _reference_batches_side_by_side(theirs, ours, exp, seed=5, n=3):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


class _WithPaths(torch.utils.data.Dataset):
    """Items with a non-tensor field (a file name) before the task label."""

    def __init__(self, n, seed):
        self.x = torch.randn(n, N_FEATURES, generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i % 2, f"img_{i}.png", 0


def test_tensor_memory_keeps_non_tensor_fields_like_avalanche(tmp_path):
    """Avalanche reads only mb[0], mb[1] and mb[-1]; other fields (file names) pass
    through, and the batches match Avalanche's field for field."""
    from avalanche.benchmarks.utils.data import AvalancheDataset

    exps = [AvalancheDataset([_WithPaths(12, seed)]) for seed in (0, 1)]
    theirs, ours = AvalancheAGEMPlugin(5, 4), AGEMPlugin(5, 4)
    for exp in exps:
        for a, b in _reference_batches_side_by_side(theirs, ours, exp, seed=7, n=4):
            assert len(a) == len(b) == 4
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[3], b[3])
            assert list(a[2]) == list(b[2]) and len(b[2]) == len(b[0])
    # the state dict stays plain data
    torch.save(ours.state_dict(), tmp_path / "state.pt")
    resumed = AGEMPlugin(5, 4)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    ours._cursors = [0, 0]
    resumed._cursors = [0, 0]
    a, b = ours.sample_from_memory(), resumed.sample_from_memory()
    assert torch.equal(a[0], b[0]) and list(a[2]) == list(b[2])


def test_tensor_memory_refuses_a_field_without_one_row_per_pattern_and_changes_nothing():
    from avalanche.benchmarks.utils.data import AvalancheDataset

    def collate(items):
        from torch.utils.data import default_collate

        x, y, t = default_collate(items)
        return [x, y, {"t": t}]

    ds = AvalancheDataset([_Sequences([4] * 8, 0)], collate_fn=collate)
    plugin = AGEMPlugin(5, 4)
    random.seed(1)
    state = random.getstate()
    with pytest.raises(TypeError, match="element 2 of the collated batch"):
        plugin.update_memory(ds)
    assert plugin.buffers == [] and plugin._collate_fn is None and random.getstate() == state


def _noisy(x):
    """A random transform (module level: picklable)."""
    return x + torch.randn_like(x)


@pytest.mark.parametrize("transform, memory, warns", [
    (_noisy, "tensor", True), (_noisy, "dataset", False), (affine, "tensor", False),
])
def test_random_transforms_frozen_by_tensor_memory_are_warned_about_once(transform, memory, warns):
    benchmark = make_benchmark(seed=2, transform=transform)
    plugin = AGEMPlugin(10, 10, memory=memory)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for exp in benchmark.train_stream[:3]:
            plugin.update_memory(exp.dataset)
    ours = [w for w in caught if "random" in str(w.message)]
    assert len(ours) == (1 if warns else 0), [str(w.message) for w in caught]
    if warns:
        assert "memory='dataset'" in str(ours[0].message)


def test_assigned_flat_reference_of_a_mixed_dtype_model_projects_like_avalanche():
    """Avalanche's flat tensors of a model with fp32 and fp64 parameters have the
    promoted dtype; assigning one (even reading it back and assigning it) works."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3).double())
    params = list(model.parameters())
    grads = [torch.randn_like(p) for p in params]
    ref = -torch.cat([g.reshape(-1).double() for g in grads]) + 0.1 * torch.randn(
        sum(p.numel() for p in params), dtype=torch.float64
    )
    out = []
    for plugin in (AvalancheAGEMPlugin(10, 4), AGEMPlugin(10, 4)):
        plugin.update_memory(_numbered_dataset(12, 0, 0))
        plugin.reference_gradients = ref.clone()
        for p, g in zip(params, grads):
            p.grad = g.clone()
        plugin.after_backward(fake_strategy(model))
        out.append([p.grad.clone() for p in params])
    for theirs, ours, before in zip(*out, grads):
        assert ours.dtype == before.dtype and not torch.equal(ours, before)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_avalanche_loader_attributes_say_why_they_are_missing():
    plugin = AGEMPlugin(10, 4)
    for name in ("buffer_dataloader", "buffer_dliter"):
        assert not hasattr(plugin, name)
        with pytest.raises(AttributeError, match="sample_from_memory"):
            getattr(plugin, name)
