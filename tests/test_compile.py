"""torch.compile(fullgraph=True) traces project_ without graph breaks, for both backends."""

import pytest
import torch

import agem_fast
from oracle import check_call, oracle


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

    compiled = torch.compile(lambda: agem_fast.project_(model.parameters(), refs), fullgraph=True)
    res = compiled()
    check_call(res, oracle(before, ref_list), [p.grad for p in params], before, torch.device("cpu"))
    assert bool(res.projected) == project == bool(eager.projected)
    for a, p in zip(eager_grads, params):
        torch.testing.assert_close(p.grad, a, rtol=1e-6, atol=1e-7)
    if backend == "extension":  # the same op in both: bitwise
        for a, p in zip(eager_grads, params):
            assert torch.equal(p.grad, a)
