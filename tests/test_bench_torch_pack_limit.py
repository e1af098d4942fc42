"""bench/torch_pack_limit.py times the torch backend's packed path at several pack limits."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for bench/
from agem_fast import _torch_backend  # noqa: E402
from bench import torch_pack_limit  # noqa: E402


def test_rows_per_limit_checked_and_the_module_state_restored(capsys):
    limit, on_cpu = _torch_backend._PACK_LIMIT, _torch_backend.PACKED_ON_CPU
    torch_pack_limit.main(["--device", "cpu", "--workloads", "tiny5000", "--limits", "10,20",
                           "--calls", "2", "--warmup", "1"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| tiny5000 ")]
    assert [r[2].strip() for r in rows] == ["2^10", "2^20"]
    ops = [int(r[3]) for r in rows]
    assert ops[0] > 10 * ops[1]  # 2^10: about 500 groups of 10 tensors; 2^20: one group
    for r in rows:
        assert float(r[4]) > 0 and "WRONG" not in r[8]
        assert float(r[8]) < 1e-5  # rel. error of fp32 against float64
    assert (_torch_backend._PACK_LIMIT, _torch_backend.PACKED_ON_CPU) == (limit, on_cpu)


def test_each_impl_runs_the_packed_path_at_its_own_limit(monkeypatch):
    seen = []
    real = _torch_backend._Packing.__init__

    def spy(self, plan):
        seen.append((_torch_backend._PACK_LIMIT, plan.device.type))
        real(self, plan)

    monkeypatch.setattr(_torch_backend._Packing, "__init__", spy)
    monkeypatch.setattr(_torch_backend, "PACKED_ON_CPU", True)
    wl = torch_pack_limit.harness.Workload("tiny5000", torch.float32, "cpu")
    impl = torch_pack_limit.PackLimitImpl(wl, 12)
    with torch_pack_limit.harness.backend_env(impl.env):  # as the timing loop does
        impl.call(0)
    assert seen and all(s == (1 << 12, "cpu") for s in seen)
    assert _torch_backend._PACK_LIMIT == 1 << 23
