"""The README's Python examples run as written and do what they say."""

import re
from pathlib import Path

import torch

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_python_examples():
    assert len(_python_blocks()) >= 1


def test_custom_loop_example_projects_against_the_reference():
    block = next(b for b in _python_blocks() if "def train_step" in b)
    ns: dict = {}
    exec(compile(block, "README.md", "exec"), ns)
    gen = torch.Generator().manual_seed(0)
    projected_once = False
    for step in range(8):
        # same inputs, other labels: the memory gradient tends to conflict with the current one
        x = torch.randn(16, 784, generator=gen)
        y = torch.randint(0, 10, (16,), generator=gen)
        x_mem, y_mem = x.clone(), (y + 5) % 10
        model, ref = ns["model"], ns["ref"]
        res = ns["train_step"](x, y, x_mem, y_mem)
        assert set(res._fields) == {"dot", "ref_sq_norm", "coef", "projected"}
        if bool(res.projected):
            projected_once = True
            # After an exact A-GEM projection (eps=0) the gradient is orthogonal to the
            # reference: <g - coef r, r> = dot - dot/rr * rr = 0.
            g_dot_r = sum(torch.dot(p.grad.double().reshape(-1), r.double().reshape(-1))
                          for p, r in zip(model.parameters(), ref.as_list()))
            scale = sum(torch.dot(p.grad.double().reshape(-1).abs(), r.double().reshape(-1).abs())
                        for p, r in zip(model.parameters(), ref.as_list()))
            assert abs(float(g_dot_r)) <= 1e-5 * float(scale)
        else:
            assert float(res.dot) >= 0
    assert projected_once


def test_plugin_custom_loop_example_runs_and_projects(monkeypatch):
    import agem_fast

    block = next(b for b in _python_blocks() if "AGEMPlugin" in b and "Naive" not in b)
    calls = []
    real = agem_fast.project_

    def spy(*args, **kwargs):
        res = real(*args, **kwargs)
        calls.append(bool(res.projected))
        return res

    monkeypatch.setattr(agem_fast, "project_", spy)
    monkeypatch.setattr("agem_fast.plugin.project_", spy, raising=False)
    ns: dict = {}
    exec(compile(block, "README.md", "exec"), ns)
    agem = ns["agem"]
    assert len(agem.buffers) == 3
    # experiences 2 and 3 train against a non-empty memory: 7 steps each
    assert len(calls) == 14, calls
    assert any(calls), "no step projected"
    assert all(torch.isfinite(p).all() for p in ns["model"].parameters())


def test_mixed_precision_example_steps_with_the_unscaled_projection(monkeypatch):
    """The GradScaler example runs as written (on the CPU in bfloat16 when no GPU is
    visible), and every optimizer step applies the float64 projection of the unscaled
    gradient against the unscaled reference: SGD's parameter change over -lr equals it."""
    import agem_fast
    from oracle import oracle

    base = next(b for b in _python_blocks() if "def train_step(" in b)
    amp = next(b for b in _python_blocks() if "GradScaler" in b)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        amp = amp.replace('"cuda"', '"cpu"').replace("torch.float16", "torch.bfloat16")
    ns: dict = {}
    with torch.device(device):
        torch.manual_seed(0)
        exec(compile(base, "README.md", "exec"), ns)
    exec(compile(amp, "README.md", "exec"), ns)
    model, scaler, lr = ns["model"], ns["scaler"], ns["opt"].param_groups[0]["lr"]

    seen = []
    real = agem_fast.project_

    def spy(params, ref, **kwargs):
        params = list(params)
        scale = float(scaler.get_scale())
        seen.append(([p.grad.double() / scale for p in params], [r.double() / scale for r in ref.as_list()]))
        return real(params, ref, **kwargs)

    monkeypatch.setattr(agem_fast, "project_", spy)
    gen = torch.Generator().manual_seed(1)
    n_projected = 0
    for step in range(8):
        x = torch.randn(16, 784, generator=gen).to(device)
        y = torch.randint(0, 10, (16,), generator=gen).to(device)
        x_mem, y_mem = x.clone(), (y + 5) % 10  # other labels: the gradients tend to conflict
        before = [p.detach().double().cpu() for p in model.parameters()]
        scale = float(scaler.get_scale())
        res = ns["train_step_amp"](x, y, x_mem, y_mem)
        if float(scaler.get_scale()) < scale:  # an fp16 overflow: the scaler skipped the step
            assert all(torch.equal(b, p.detach().double().cpu()) for b, p in zip(before, model.parameters()))
            continue
        grads, refs = seen[-1]
        orc = oracle(grads, refs)
        assert bool(res.projected) == orc.projected
        n_projected += orc.projected
        for i, (b, p, want) in enumerate(zip(before, model.parameters(), orc.new_grads)):
            applied = (b - p.detach().double().cpu()) / lr
            torch.testing.assert_close(applied, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()),
                                       msg=lambda m: f"step {step}, params[{i}]: {m}")
    assert n_projected >= 2


def test_avalanche_strategy_snippet_builds_a_strategy_with_the_plugin():
    """The README's swap-the-import snippet runs as written, given the model, optimizer and
    criterion it names (Avalanche's Naive takes them as keywords)."""
    import warnings

    import pytest

    pytest.importorskip("avalanche")
    from agem_fast import AGEMPlugin

    block = next(b for b in _python_blocks() if "AGEMPlugin" in b and "Naive" in b)
    model = torch.nn.Linear(4, 2)
    ns = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
          "criterion": torch.nn.CrossEntropyLoss()}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        exec(compile(block, "README.md", "exec"), ns)
    # Avalanche warns (a UserWarning) when the strategy gets them positionally.
    assert not [w for w in seen if "Positional" in type(w.message).__name__], [str(w.message) for w in seen]
    plugins = [p for p in ns["strategy"].plugins if isinstance(p, AGEMPlugin)]
    assert len(plugins) == 1 and (plugins[0].patterns_per_experience, plugins[0].sample_size) == (250, 256)
