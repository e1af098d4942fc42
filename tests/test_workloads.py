"""Benchmark workloads: shape lists match the real models; make_grads keeps its promises."""

import pytest
import torch

from agem_fast import _workloads as w


def _model_shapes(model):
    return [tuple(p.shape) for p in model.parameters()]


@pytest.mark.parametrize("name", ["resnet18", "vit_b_16"])
def test_shapes_match_torchvision(name):
    tv = pytest.importorskip("torchvision")
    with torch.device("meta"):
        model = getattr(tv.models, name)()
    assert w.shapes(name) == _model_shapes(model)


def test_known_totals():
    # Published parameter counts (GPT-2 small with the tied LM head counted once;
    # Llama-3.2-1B with tied embeddings).
    expected = {
        "resnet18": (62, 11_689_512),
        "vit_b_16": (152, 86_567_656),
        "gpt2": (148, 124_439_808),
        "llama_1b": (146, 1_235_814_400),
        "tiny5000": (5000, 500_000),
    }
    assert set(w.WORKLOADS) == set(expected)
    for name, (count, total) in expected.items():
        shapes = w.shapes(name)
        assert len(shapes) == count, name
        assert w.numel(shapes) == total, name
        assert all(isinstance(s, tuple) and all(isinstance(d, int) for d in s) for s in shapes)


def test_unknown_workload():
    with pytest.raises(ValueError, match="unknown workload"):
        w.shapes("resnet1000")


def test_shapes_is_a_fresh_list():
    a = w.shapes("resnet18")
    a.append((1,))
    assert len(w.shapes("resnet18")) == 62


def test_no_torchvision_needed_at_import():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torchvision'] = None\n"
        "from agem_fast import _workloads\n"
        "assert len(_workloads.shapes('vit_b_16')) == 152\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _dot64(params, refs):
    dot = sum(float(torch.dot(p.grad.double().reshape(-1), r.double().reshape(-1))) for p, r in zip(params, refs))
    rr = sum(float(torch.dot(r.double().reshape(-1), r.double().reshape(-1))) for r in refs)
    return dot, rr


SMALL_SHAPE_LISTS = [
    [(3, 4), (5,), ()],
    [()],
    [(1,)],
    [(2, 3, 4, 5)] * 3 + [(7,)],
    w.shapes("tiny5000")[:50],
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape_list", SMALL_SHAPE_LISTS)
@pytest.mark.parametrize("project", [True, False])
def test_make_grads_sign_and_layout(dtype, shape_list, project):
    params, refs = w.make_grads(shape_list, dtype, "cpu", project=project, seed=3)
    assert len(params) == len(refs) == len(shape_list)
    for p, r, s in zip(params, refs, shape_list):
        assert tuple(p.shape) == s and tuple(p.grad.shape) == s and tuple(r.shape) == s
        assert p.grad.dtype == r.dtype == dtype
        assert p.grad.is_contiguous() and r.is_contiguous()
    dot, rr = _dot64(params, refs)
    assert rr > 0
    assert (dot < 0) if project else (dot > 0)
    assert abs(dot) >= 0.1 * rr  # wide margin: no summation order flips the sign
    # no zeros as data
    assert all(bool((p.grad != 0).any()) for p in params if p.numel() > 4)
    # refs are consecutive views of one flat buffer
    flat = w.flat_buffer(refs)
    assert flat.dim() == 1 and flat.numel() == w.numel(shape_list)
    assert flat.data_ptr() == refs[0].data_ptr()
    torch.testing.assert_close(flat, torch.cat([r.reshape(-1) for r in refs]), rtol=0, atol=0)
    # grads are separate allocations
    ptrs = {p.grad.untyped_storage().data_ptr() for p in params}
    assert len(ptrs) == len(params)


def test_make_grads_seeded():
    shapes = w.shapes("resnet18")[:10]
    a_params, a_refs = w.make_grads(shapes, torch.float32, "cpu", seed=7)
    b_params, b_refs = w.make_grads(shapes, torch.float32, "cpu", seed=7)
    c_params, _ = w.make_grads(shapes, torch.float32, "cpu", seed=8)
    for a, b in zip(a_params, b_params):
        assert torch.equal(a.grad, b.grad)
    for a, b in zip(a_refs, b_refs):
        assert torch.equal(a, b)
    assert not torch.equal(a_params[0].grad, c_params[0].grad)


def test_make_grads_projects_with_agem_fast():
    import agem_fast

    params, refs = w.make_grads(w.shapes("resnet18")[:20], torch.float32, "cpu", project=True)
    assert bool(agem_fast.project_(params, w.flat_buffer(refs)).projected)
    params, refs = w.make_grads(w.shapes("resnet18")[:20], torch.float32, "cpu", project=False)
    assert not bool(agem_fast.project_(params, refs).projected)


def test_flat_buffer_falls_back_to_cat():
    refs = [torch.randn(3), torch.randn(2, 2)]
    flat = w.flat_buffer(refs)
    assert torch.equal(flat, torch.cat([refs[0], refs[1].reshape(-1)]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_make_grads_cuda():
    params, refs = w.make_grads(w.shapes("tiny5000")[:100], torch.bfloat16, "cuda", project=True)
    assert params[0].grad.is_cuda and refs[0].is_cuda
    dot, rr = _dot64(params, refs)
    assert dot < -0.1 * rr
