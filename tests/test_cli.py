"""`python -m agem_fast` (the README's main job), `info` and `build` as a user runs them."""

import json
import os
import subprocess
import sys


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "AGEM_FAST_BACKEND"}
    return subprocess.run([sys.executable, "-m", "agem_fast", *args], capture_output=True,
                          text=True, env=env, timeout=900)


def test_default_job_checks_against_float64_and_reports_speed():
    out = _run("--workload", "tiny5000", "--repeats", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[OK]" in out.stdout and "speed-up" in out.stdout and "backend" in out.stdout, out.stdout


def test_info_reports_backend_per_device_and_build_state():
    out = _run("info")
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout)
    assert info["backends"]["cpu"] in ("cpu", "torch")
    assert info["extension"]["status"] in ("loaded", "failed", "disabled")
    if info["extension"]["status"] == "loaded":
        assert info["backends"]["cpu"] == "cpu"
        assert info["extension"]["build_info"]["chunk_elems"] > 0
    else:
        assert info["extension"]["error"]


def test_build_command():
    out = _run("build")
    info = json.loads(_run("info").stdout)
    assert (out.returncode == 0) == (info["extension"]["status"] == "loaded"), out.stdout + out.stderr
