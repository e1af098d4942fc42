"""torch.compile(fullgraph=True) traces project_ without graph breaks, for both backends."""

import pytest
import torch

import agem_fast
from agem_fast import _api
from oracle import bits, check_call, oracle


def _model_and_refs(seed, project, form):
    """The model (grads set), the reference in `form`, and its values as a list (for the oracle)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5))
    model(torch.randn(2, 3, 8, 8, generator=gen)).square().sum().backward()
    sign = -1.0 if project else 1.0
    refs = ref_list = [sign * p.grad + 0.3 * torch.randn(p.shape, generator=gen) for p in model.parameters()]
    if form == "flat":
        refs = torch.cat([r.reshape(-1) for r in refs])
    elif form == "reference":
        saved = [p.grad.clone() for p in model.parameters()]
        for p, r in zip(model.parameters(), refs):
            p.grad = r
        ref = agem_fast.ReferenceGradient(model.parameters()).capture_(model.parameters())
        for p, g in zip(model.parameters(), saved):
            p.grad = g
        refs = ref
    return model, refs, ref_list


@pytest.mark.parametrize("project", [True, False])
@pytest.mark.parametrize("form", ["list", "flat", "reference"])
def test_compiled_matches_eager_and_oracle(backend, project, form):
    torch._dynamo.reset()
    model, refs, ref_list = _model_and_refs(3, project, form)
    params = list(model.parameters())
    before = [p.grad.clone() for p in params]

    eager = agem_fast.project_(params, refs)
    eager_grads = [p.grad.clone() for p in params]
    for p, g in zip(params, before):
        p.grad.copy_(g)

    # Under a torch whose dynamo cannot trace project_, it runs eagerly at a graph break.
    traceable = torch.__version__ >= _api.TRACEABLE_FROM
    compiled = torch.compile(lambda: agem_fast.project_(model.parameters(), refs), fullgraph=traceable)
    res = compiled()
    check_call(res, oracle(before, ref_list), [p.grad for p in params], before, torch.device("cpu"))
    assert bool(res.projected) == project == bool(eager.projected)
    for a, p in zip(eager_grads, params):
        torch.testing.assert_close(p.grad, a, rtol=1e-6, atol=1e-7)
    if backend == "extension":  # the same op in both: bitwise
        for a, p in zip(eager_grads, params):
            assert torch.equal(p.grad, a)


def _compiled(fn):
    """fn compiled as the tests above compile project_ (whole graph where dynamo can trace it)."""
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=torch.__version__ >= _api.TRACEABLE_FROM)


def test_compiled_call_keeps_nan_bits_when_not_projecting(backend, device):
    """A call that does not project leaves each gradient's bits as they were (signalling
    and quiet NaN payloads, fp16/bf16/fp32 in one call; the NaN makes <g, r> NaN: no
    projection). With one exception, which the README states: compiled code writes the
    torch backend's in-place update of an fp16/bf16 gradient back through fp32, so there
    a NaN may come back as another NaN (every other element keeps its bits)."""
    # signalling, quiet, and a negative quiet NaN (0xFE03, 0xFF83, 0xFF800003 as signed ints)
    payloads = {torch.float16: (0x7C01, 0x7E01, -0x01FD), torch.bfloat16: (0x7F81, 0x7FC1, -0x007D),
                torch.float32: (0x7F800001, 0x7FC00001, -0x007FFFFD)}
    ints = {2: torch.int16, 4: torch.int32}
    gen = torch.Generator().manual_seed(11)
    params, refs = [], []
    for dtype, nan_bits in payloads.items():
        g = torch.randn(4, 7, generator=gen).to(dtype)
        raw = g.view(ints[g.element_size()])
        for k, b in enumerate(nan_bits):
            raw.view(-1)[3 * k + 1] = b
        p = torch.empty(4, 7, dtype=dtype, device=device)
        p.grad = g.to(device)
        params.append(p)
        refs.append(torch.randn(4, 7, generator=gen).to(device=device, dtype=dtype))
    before = [bits(p.grad) for p in params]
    assert all(torch.isnan(p.grad).sum() == 3 for p in params)
    res = _compiled(lambda: agem_fast.project_(params, refs))()
    assert not bool(res.projected) and torch.isnan(res.dot)
    for i, (p, b) in enumerate(zip(params, before)):
        after = bits(p.grad)
        if backend != "extension" and p.dtype in (torch.float16, torch.bfloat16):
            nan = torch.isnan(p.grad.cpu())
            assert torch.equal(nan, torch.isnan(b.view(p.dtype))), f"params[{i}] ({p.dtype}): NaNs moved"
            after, b = after[~nan], b[~nan]
        assert torch.equal(after, b), f"params[{i}] ({p.dtype}): the gradient's bits changed"


@pytest.mark.parametrize("form", ["list", "reference"])
def test_compiled_channels_last_gradients(backend, form):
    """Gradients that are not contiguous (a channels_last convnet's) trace too: the check
    for elements sharing memory, which dynamo cannot trace, is skipped under compile as
    the other memory checks are."""
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 2, 3)).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 9, 9, generator=gen).to(memory_format=torch.channels_last)
    model(x).square().sum().backward()
    params = list(model.parameters())
    assert not params[0].grad.is_contiguous()  # channels_last weights get channels_last grads
    ref_list = [-p.grad + 0.3 * torch.randn(p.shape, generator=gen) for p in params]  # projects
    ref_list = [r.contiguous(memory_format=p.grad.dim() == 4 and torch.channels_last or torch.contiguous_format)
                for r, p in zip(ref_list, params)]
    refs = ref_list
    if form == "reference":
        saved = [p.grad for p in params]
        for p, r in zip(params, ref_list):
            p.grad = r.clone()
        refs = agem_fast.ReferenceGradient(params).capture_(params)
        for p, g in zip(params, saved):
            p.grad = g
    before = [p.grad.clone() for p in params]
    res = _compiled(lambda: agem_fast.project_(params, refs))()
    check_call(res, oracle(before, ref_list), [p.grad for p in params], before, torch.device("cpu"))
    assert bool(res.projected)


def test_the_backend_choice_is_marked_constant_as_torch_marks_it():
    """agem_fast marks _backend_for_type itself, to spare `import agem_fast` the import of
    torch._dynamo that torch.compiler.assume_constant_result makes: the marks must match."""
    def marked_by_torch():
        pass

    torch.compiler.assume_constant_result(marked_by_torch)
    assert vars(marked_by_torch), "torch's decorator no longer marks the function itself"
    assert {k: getattr(_api._backend_for_type, k, None) for k in vars(marked_by_torch)} == vars(marked_by_torch)


@pytest.mark.parametrize("backend_env", ["torch", ""], ids=["torch", "default"])
def test_import_and_a_call_leave_torch_dynamo_unimported(tmp_path, backend_env):
    """torch._dynamo takes most of a second to import: only torch.compile should pay it
    (loading the extension and its fake implementations included)."""
    if torch.__version__ < _api.TRACEABLE_FROM:
        pytest.skip("project_ is wrapped in torch.compiler.disable under this torch")
    import os
    import subprocess
    import sys

    probe = ("import sys, torch, agem_fast\n"
             "p = torch.nn.Parameter(torch.zeros(3)); p.grad = torch.tensor([1., 2., 3.])\n"
             "agem_fast.project_([p], [torch.full((3,), -1.)])\n"
             "print('torch._dynamo' in sys.modules)\n")
    env = {**os.environ, "AGEM_FAST_BACKEND": backend_env}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "False"
