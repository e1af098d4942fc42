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

    block = next(b for b in _python_blocks() if "AGEMPlugin" in b)
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
