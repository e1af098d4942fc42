"""The GPU machine's scripts, on this machine: a lent GPU is rare and short, so a script
that breaks there wastes it. bench/gpu_check.sh runs its skeleton (the env stage and the
summary) against a stand-in nvidia-smi; both scripts must parse."""

import os
import shutil
import subprocess
import sys
import tarfile
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
    results, out = tmp_path / "results", tmp_path / "out"
    out.mkdir()
    # packlimit cannot fit a 1 s budget: it must be recorded as not run, and the call pass
    env = dict(os.environ, PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}", PYTHON=sys.executable,
               GPU_CHECK_STAGES="env,packlimit", GPU_CHECK_BUDGET="1", GPU_CHECK_RESULTS_DIR=str(results),
               OUT=str(out))
    done = subprocess.run(["bash", str(SCRIPTS[0])], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    (folder,) = results.iterdir()
    assert folder.name.startswith("gpu-nvidia-stand-in-gpu-")
    summary = (folder / "summary.md").read_text()
    assert "# GPU check: NVIDIA Stand-in GPU" in summary
    assert "| env | ok |" in summary
    assert "| packlimit | not run: out of time budget |" in summary
    # what the device tool brings back: the summary, nvidia-smi and the whole folder
    assert (out / "summary.md").read_text() == summary
    assert (out / "nvidia-smi.txt").is_file()
    (tarball,) = out.glob("gpu-check-nvidia-stand-in-gpu-*.tar.gz")
    with tarfile.open(tarball) as tar:
        assert f"{folder.name}/env.txt" in tar.getnames()
    carried = any((ROOT / "build" / "gpu_wheels").glob("*.whl"))  # (bench/gpu_wheels.sh)
    assert ("avalanche: carried, not installed" if carried else "avalanche: not carried") in summary
    assert "NVIDIA Stand-in GPU" in (folder / "nvidia-smi.txt").read_text()
    assert sys.executable in (folder / "env.txt").read_text()
