"""`python -m agem_fast` (the README's main job), `info` and `build` as a user runs them."""

import json
import os
import subprocess
import sys


def _run(*args, **extra_env):
    env = {k: v for k, v in os.environ.items() if k != "AGEM_FAST_BACKEND"}
    env.update(extra_env)
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
    if os.environ.get("AGEM_FAST_STRICT") == "1":  # CI: the build must have worked
        assert out.returncode == 0 and info["extension"]["status"] == "loaded", out.stderr[-3000:]


def test_build_ignores_a_forced_torch_backend():
    out = _run("build", AGEM_FAST_BACKEND="torch")
    info = json.loads(_run("info").stdout)
    if info["extension"]["status"] == "loaded":
        assert out.returncode == 0 and "extension ready" in out.stdout, out.stdout + out.stderr


def test_job_options_work_before_and_after_run():
    for args in (["--workload", "tiny5000", "--repeats", "2", "run"],
                 ["run", "--workload", "tiny5000", "--repeats", "2"]):
        out = _run(*args)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "tiny5000 shapes" in out.stdout, (args, out.stdout)


_SWITCH = """
import os, torch, agem_fast
from agem_fast import _extension
from agem_fast._api import backend_for
p = torch.nn.Parameter(torch.zeros(3)); p.grad = torch.tensor([1., 2., 3.])
os.environ["AGEM_FAST_BACKEND"] = "torch"
agem_fast.project_([p], [torch.full((3,), -1.)])
print("FORCED", backend_for(torch.device("cpu")), _extension.status()["status"])
os.environ["AGEM_FAST_BACKEND"] = "auto"
print("AUTO", backend_for(torch.device("cpu")), _extension.status()["status"])
"""


def test_the_backend_variable_can_be_changed_at_run_time():
    """AGEM_FAST_BACKEND is read at every call: forcing the torch backend for a while
    must not keep the extension away afterwards."""
    out = subprocess.run([sys.executable, "-c", _SWITCH], capture_output=True, text=True,
                         timeout=900, env={k: v for k, v in os.environ.items() if k != "AGEM_FAST_BACKEND"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "FORCED torch disabled" in out.stdout, out.stdout
    status = json.loads(_run("info").stdout)["extension"]["status"]
    if status == "loaded":
        assert "AUTO cpu loaded" in out.stdout, out.stdout
