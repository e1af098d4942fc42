"""A whole training step (forward, backward, project_, optimizer step) captured in a CUDA
graph replays exactly like the same steps run eagerly (the README's recipe)."""

import copy

import pytest
import torch

import agem_fast

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _batches(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 20, generator=gen), torch.randint(0, 5, (32,), generator=gen)) for _ in range(n)]


class _Net(torch.nn.Module):
    """A small MLP plus `extra` logit biases: 4 + extra parameter tensors."""

    def __init__(self, extra):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 5))
        self.extra = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(5)) for _ in range(extra))

    def forward(self, x):
        out = self.body(x)
        for b in self.extra:
            out = out + 0.01 * b  # small: the MLP's gradients still decide the projection
        return out


@pytest.fixture(params=["upload", "inline"])
def table_route(request, backend):
    """How the extension's kernels get their tensor table (tests/test_cuda_table_route.py):
    copied from pinned memory, which a graph must then keep, or as a kernel parameter."""
    if backend != "extension":
        if request.param == "inline":
            pytest.skip("the table route is the extension's")
        yield None
        return
    from agem_fast import _extension

    module = _extension.load()
    old = module._cuda_table_route()
    module._set_cuda_table_route(request.param)
    try:
        yield request.param
    finally:
        module._set_cuda_table_route(old)


# A small and a large tensor table (4 and 300 tensors): on the inline route, the 96- and
# 512-entry kernel parameters; on the upload route, either size is copied from pinned memory.
@pytest.mark.parametrize("extra", [0, 296])
def test_captured_training_step_matches_eager(backend, table_route, extra):
    if backend == "torch-packed":
        pytest.skip("on a GPU the torch backend takes its packed path anyway: the 'torch' case")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = _Net(extra).to(dev)
    eager_model = copy.deepcopy(model)
    loss_fn = torch.nn.CrossEntropyLoss()
    data = _batches(6, 1)
    memory = [(x, (y + 2) % 5) for x, y in data]  # conflicting labels: projections happen

    def make(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        m(torch.zeros(1, 20, device=dev)).sum().backward()  # materialise .grad storage once
        return opt, agem_fast.ReferenceGradient(m.parameters())

    opt, ref = make(model)
    eager_opt, eager_ref = make(eager_model)

    def capture_reference(m, o, r, xm, ym):
        o.zero_grad(set_to_none=False)
        loss_fn(m(xm.to(dev)), ym.to(dev)).backward()
        r.capture_(m.parameters())

    static_x = torch.zeros(32, 20, device=dev)
    static_y = torch.zeros(32, dtype=torch.long, device=dev)

    def step():
        opt.zero_grad(set_to_none=False)
        loss_fn(model(static_x), static_y).backward()
        res = agem_fast.project_(model.parameters(), ref)
        opt.step()
        return res

    # warm-up on a side stream, then capture (parameters restored afterwards)
    snapshot = copy.deepcopy(model.state_dict())
    capture_reference(model, opt, ref, *memory[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_res = step()
    model.load_state_dict(snapshot)

    projected = 0
    for (x, y), (xm, ym) in zip(data, memory):
        capture_reference(model, opt, ref, xm, ym)
        static_x.copy_(x.to(dev))
        static_y.copy_(y.to(dev))
        graph.replay()

        capture_reference(eager_model, eager_opt, eager_ref, xm, ym)
        eager_opt.zero_grad(set_to_none=False)
        loss_fn(eager_model(x.to(dev)), y.to(dev)).backward()
        res = agem_fast.project_(eager_model.parameters(), eager_ref)
        eager_opt.step()

        torch.cuda.synchronize()
        assert bool(static_res.projected) == bool(res.projected)
        projected += bool(res.projected)
        for a, b in zip(model.parameters(), eager_model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert projected > 0, "no step projected: the test would not exercise the update"
