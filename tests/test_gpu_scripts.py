"""The GPU machine's scripts, on this machine: a lent GPU is rare and short, so a script
that breaks there wastes it. bench/gpu_check.sh runs its skeleton (the env stage and the
summary) against a stand-in nvidia-smi; both scripts must parse."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [ROOT / "bench" / "gpu_check.sh", ROOT / "bench" / "gpu_wheels.sh"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_gpu_check_env_stage_and_summary(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    smi = fake_bin / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA Stand-in GPU'\n")
    smi.chmod(0o755)
    results = tmp_path / "results"
    env = dict(os.environ, PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}", PYTHON=sys.executable,
               GPU_CHECK_STAGES="env", GPU_CHECK_RESULTS_DIR=str(results))
    env.pop("OUT", None)
    done = subprocess.run(["bash", str(SCRIPTS[0])], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    (folder,) = results.iterdir()
    assert folder.name.startswith("gpu-nvidia-stand-in-gpu-")
    summary = (folder / "summary.md").read_text()
    assert "# GPU check: NVIDIA Stand-in GPU" in summary
    assert "| env | ok |" in summary
    carried = any((ROOT / "build" / "gpu_wheels").glob("*.whl"))  # (bench/gpu_wheels.sh)
    assert ("avalanche: carried, not installed" if carried else "avalanche: not carried") in summary
    assert "NVIDIA Stand-in GPU" in (folder / "nvidia-smi.txt").read_text()
    assert sys.executable in (folder / "env.txt").read_text()
