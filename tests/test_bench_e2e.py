"""bench/e2e_plugin.py on a tiny workload: every variant trains, and the hook timers
count what they claim (one reference step per training iteration once memory exists)."""

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("avalanche")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for bench/
import agem_fast  # noqa: E402
from bench import e2e_plugin  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:No loggers specified"),
    pytest.mark.filterwarnings("ignore:no QP solver found"),
]


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")),
])
def test_e2e_script_runs_every_variant_and_counts_reference_steps(tmp_path, capsys, device):
    out = tmp_path / "e2e.json"
    # 3 experiences of 64 samples, batches of 16: 4 iterations each; the first
    # experience has no memory yet, so 2 x 4 = 8 reference steps.
    e2e_plugin.main([
        "--rounds", "2", "--experiences", "3", "--samples", "64", "--features", "12",
        "--mb-size", "16", "--patterns", "10", "--sample-size", "12", "--out", str(out),
        "--device", device,
    ])
    result = json.loads(out.read_text())
    assert result["config"]["device"] == device
    assert result["env"]["backend"] == agem_fast._api.backend_for(torch.device(device))
    assert len(result["rounds"]) == 2
    for rnd in result["rounds"]:
        assert set(rnd) == set(e2e_plugin.VARIANTS)
        for variant, row in rnd.items():
            assert row["reference_steps"] == (0 if variant == "naive" else 8), variant
            assert set(row["split_s"]) == set(e2e_plugin.PHASES)
            assert row["total_s"] > sum(row["split_s"].values()) >= 0
    md = (tmp_path / "e2e.md").read_text()
    assert "Median seconds per phase" in md and "| agem_fast |" in md
    assert "agem_fast / avalanche" in capsys.readouterr().out
