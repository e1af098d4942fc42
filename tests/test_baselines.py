"""The benchmark baselines: Avalanche's algorithm re-expressed, and the flat floor."""

import types

import pytest
import torch
from torch import nn

from agem_fast._baselines import FlatFloor, avalanche_project_


class _MultiHead(nn.Module):
    """Trunk + two heads; only one head gets gradients (None grads elsewhere)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.trunk = nn.Linear(32, 64)
        self.head_a = nn.Linear(64, 10)
        self.head_b = nn.Linear(64, 5)
        self.scale = nn.Parameter(torch.ones(()))


def _random_grads(model, gen, none_names=()):
    for name, p in model.named_parameters():
        p.grad = None if name in none_names else torch.randn(p.shape, generator=gen)


def _flat_ref(model, gen):
    total = sum(p.numel() for p in model.parameters())
    return torch.randn(total, generator=gen)


def _avalanche_after_backward(model, ref_flat):
    avalanche_agem = pytest.importorskip("avalanche.training.plugins.agem")
    plugin = avalanche_agem.AGEMPlugin(patterns_per_experience=1, sample_size=1)
    plugin.buffers = [None]  # after_backward only checks that memory is non-empty
    plugin.reference_gradients = ref_flat
    plugin.after_backward(types.SimpleNamespace(model=model, device=ref_flat.device))


def _steer(model, ref_flat, sign):
    """Make <g, r> have `sign` by adding sign * 2 * r to each present grad."""
    off = 0
    for p in model.parameters():
        n = p.numel()
        if p.grad is not None:
            p.grad.add_(ref_flat[off : off + n].view_as(p), alpha=2.0 * sign)
        off += n


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("none_names", [(), ("head_b.weight", "head_b.bias"), ("scale", "conv.bias")])
@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_matches_real_avalanche_plugin(seed, none_names, sign):
    pytest.importorskip("avalanche")
    gen = torch.Generator().manual_seed(seed)
    model_a, model_b = _MultiHead(), _MultiHead()
    _random_grads(model_a, gen, none_names)
    ref = _flat_ref(model_a, gen)
    _steer(model_a, ref, sign)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        pb.grad = None if pa.grad is None else pa.grad.clone()
    before = [None if p.grad is None else p.grad.clone() for p in model_a.parameters()]

    _avalanche_after_backward(model_a, ref.clone())
    projected = avalanche_project_(list(model_b.parameters()), ref.clone())

    assert projected == (sign < 0)
    for pa, pb, b in zip(model_a.parameters(), model_b.parameters(), before):
        if pa.grad is None:
            assert pb.grad is None
            continue
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-6, atol=1e-6)
        if sign > 0:
            assert torch.equal(pb.grad, b)  # untouched when not projecting
        else:
            assert not torch.equal(pb.grad, b)


def test_matches_float64_projection():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen) for s in [(4, 5), (7,), ()]]
    ref = torch.randn(sum(g.numel() for g in grads), generator=gen)
    g_flat = torch.cat([g.reshape(-1) for g in grads]) - 0.5 * ref
    off = 0
    for g in grads:
        g.copy_(g_flat[off : off + g.numel()].view_as(g))
        off += g.numel()
    params = []
    for g in grads:
        p = torch.zeros(g.shape)
        p.grad = g.clone()
        params.append(p)
    assert avalanche_project_(params, ref)
    d, r = g_flat.double(), ref.double()
    expected = d - (d @ r) / (r @ r) * r
    got = torch.cat([p.grad.reshape(-1) for p in params]).double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_channels_last_and_size_check():
    p = torch.zeros(2, 3, 4, 5)
    p.grad = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    ref = -p.grad.reshape(-1).clone()  # dot < 0
    assert avalanche_project_([p], ref)
    torch.testing.assert_close(p.grad, torch.zeros_like(p.grad), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="elements"):
        avalanche_project_([p], torch.randn(7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_low_precision_with_none_grads(dtype):
    a, b = torch.zeros(10, dtype=dtype), torch.zeros(6, dtype=dtype)
    a.grad = torch.randn(10).to(dtype)
    ref = torch.cat([-a.grad.float(), torch.randn(6)]).to(dtype)
    assert avalanche_project_([a, b], ref)
    assert b.grad is None and a.grad.dtype == dtype


def _inputs(gen, shapes, sign):
    refs = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) + sign * 0.5 * r for s, r in zip(shapes, refs)]
    return grads, refs


@pytest.mark.parametrize("projects", [None, True])
def test_flat_floor_projecting(projects):
    gen = torch.Generator().manual_seed(1)
    shapes = [(3, 4), (5,), (2, 2, 2)]
    grads, refs = _inputs(gen, shapes, -1.0)
    floor = FlatFloor.from_tensors(grads, refs)
    g = torch.cat([x.reshape(-1) for x in grads]).double()
    r = torch.cat([x.reshape(-1) for x in refs]).double()
    torch.testing.assert_close(floor.g.double(), g)
    dot = floor(projects=projects)
    assert float(dot) < 0
    expected = g - (g @ r) / (r @ r) * r
    torch.testing.assert_close(floor.g.double(), expected, rtol=1e-5, atol=1e-5)
    assert abs(float(floor.g.double() @ r)) < 1e-3 * float(r @ r)


@pytest.mark.parametrize("projects", [None, False])
def test_flat_floor_not_projecting(projects):
    gen = torch.Generator().manual_seed(2)
    grads, refs = _inputs(gen, [(6,), (3, 3)], +1.0)
    floor = FlatFloor.from_tensors(grads, refs)
    before = floor.g.clone()
    assert float(floor(projects=projects)) > 0
    assert torch.equal(floor.g, before)


def test_flat_floor_reload_and_size_check():
    floor = FlatFloor(10, torch.float32, "cpu")
    with pytest.raises(ValueError, match="loaded"):
        floor.load_([torch.randn(4)], [torch.randn(4)])
    grads, refs = [torch.randn(6), torch.randn(4)], [torch.randn(6), torch.randn(2, 2)]
    floor.load_(grads, refs)
    torch.testing.assert_close(floor.rr, torch.cat([refs[0], refs[1].reshape(-1)]).square().sum())


def test_flat_floor_over_existing_buffers_projects_them_in_place():
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(50, generator=gen)
    r = torch.randn(50, generator=gen)
    g -= 0.5 * r
    g64, r64 = g.double(), r.double()
    floor = FlatFloor.over(g, r)
    assert floor.g.data_ptr() == g.data_ptr() and floor.r.data_ptr() == r.data_ptr()
    torch.testing.assert_close(floor.rr.double(), r64 @ r64, rtol=1e-6, atol=0)
    assert float(floor(projects=True)) < 0
    torch.testing.assert_close(g.double(), g64 - (g64 @ r64) / (r64 @ r64) * r64, rtol=1e-5, atol=1e-5)
    assert torch.equal(r.double(), r64)


@pytest.mark.parametrize("g,r,match", [
    (torch.randn(4), torch.randn(5), "1-D buffers of one size"),
    (torch.randn(2, 2), torch.randn(2, 2), "1-D buffers of one size"),
    (torch.randn(4), torch.randn(4, dtype=torch.float64), "1-D buffers of one size"),
    (torch.randn(8)[::2], torch.randn(4), "contiguous"),
])
def test_flat_floor_over_rejects_mismatched_buffers(g, r, match):
    with pytest.raises(ValueError, match=match):
        FlatFloor.over(g, r)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flat_floor_low_precision(dtype):
    gen = torch.Generator().manual_seed(3)
    grads, refs = _inputs(gen, [(64,), (8, 8)], -1.0)
    grads = [g.to(dtype) for g in grads]
    refs = [r.to(dtype) for r in refs]
    floor = FlatFloor.from_tensors(grads, refs)
    g, r = floor.g.double(), floor.r.double()
    floor(projects=True)
    expected = g - (g @ r) / (r @ r) * r
    err = (floor.g.double() - expected).norm() / expected.norm()
    assert float(err) < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("projects", [None, True])
def test_flat_floor_cuda(projects):
    gen = torch.Generator().manual_seed(4)
    grads, refs = _inputs(gen, [(1000,), (30, 30)], -1.0)
    floor = FlatFloor.from_tensors([g.cuda() for g in grads], [r.cuda() for r in refs])
    g, r = floor.g.double().cpu(), floor.r.double().cpu()
    floor(projects=projects)
    expected = g - (g @ r) / (r @ r) * r
    torch.testing.assert_close(floor.g.double().cpu(), expected, rtol=1e-5, atol=1e-5)
