"""The build machinery: toolkit discovery, fallback on a failed build, register spills."""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from agem_fast import _build

REPO = Path(__file__).resolve().parents[1]


def _fake_toolkit(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (root / "include" / "cuda.h").write_text("")
    return root


@pytest.mark.parametrize("body", [
    'exec {toolkit}/bin/nvcc "$@"',
    # several nvcc paths: the first that is a real toolkit wins
    '[ -x {tmp}/old/bin/nvcc ] || exec {toolkit}/bin/nvcc "$@"',
], ids=["one_path", "skips_a_non_toolkit_path"])
def test_find_cuda_home_reads_nvcc_wrapper_script(tmp_path, monkeypatch, body):
    toolkit = _fake_toolkit(tmp_path / "opt" / "cuda-x")
    wrapper_dir = tmp_path / "wrapper"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text("#!/bin/sh\n" + body.format(toolkit=toolkit, tmp=tmp_path) + "\n")
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrapper_dir))
    assert _build.find_cuda_home() == str(toolkit)


def test_find_cuda_home_prefers_a_valid_env_var(tmp_path, monkeypatch):
    toolkit = _fake_toolkit(tmp_path / "tk")
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert _build.find_cuda_home() == str(toolkit)
    # An env var that is not a toolkit is ignored, not trusted.
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nothing-here"))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert _build.find_cuda_home() != str(tmp_path / "nothing-here")


def test_build_environment_is_restored(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    before = dict(os.environ)
    with _build.build_environment(with_cuda=_build.want_cuda()[0]):
        if _build.want_cuda()[0]:
            assert os.environ["TORCH_CUDA_ARCH_LIST"] == _build.default_arch_list()
    assert dict(os.environ) == before


@pytest.mark.parametrize("capabilities, expected", [
    ([], "7.5;8.0;9.0+PTX"),                          # no GPU visible
    ([(9, 0)], "7.5;8.0;9.0+PTX"),                    # H100: the same build as without a GPU
    ([(8, 6), (8, 9), (7, 5)], "7.5;8.0;9.0+PTX"),    # sm_80 code runs on 8.6 and 8.9
    ([(10, 0), (12, 0)], "7.5;8.0;9.0+PTX"),          # newer: the sm_90 PTX, JIT-compiled
    ([(7, 0)], "7.0;7.5;8.0;9.0+PTX"),                # older than the list: added
    ([(6, 1), (7, 0), (7, 0)], "7.0;6.1;7.5;8.0;9.0+PTX"),
])
def test_default_arch_list_is_the_same_with_or_without_a_gpu(monkeypatch, capabilities, expected):
    """One build serves a GPU-less login node and the GPU nodes sharing its cache; only a
    GPU the fixed list cannot run adds its architecture."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(capabilities))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capabilities[index])
    assert _build.default_arch_list() == expected


def test_build_info_lists_the_cuda_architectures_built(monkeypatch):
    """`info` says which architectures the CUDA kernels hold: what a "no kernel image is
    available" error is to be compared with."""
    from agem_fast import _extension

    monkeypatch.delenv("AGEM_FAST_BACKEND", raising=False)
    if not _extension.supports("cpu") or not _extension.status()["cuda"]:
        pytest.skip("needs the extension built with its CUDA kernels")
    if _extension.status()["source"] != "jit" or os.environ.get("TORCH_CUDA_ARCH_LIST"):
        pytest.skip("built with an architecture list this test does not know")
    expected = [entry.removesuffix("+PTX") for entry in _build.default_arch_list().split(";")]
    assert _extension.build_info()["cuda_archs"] == sorted(expected, key=float)


_PROBE = """
import warnings, torch, agem_fast
from agem_fast import _extension
p = torch.nn.Parameter(torch.zeros(5)); p.grad = torch.tensor([1., 2., 3., 4., 5.])
r = torch.tensor([-1., -1., -1., -1., -1.])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        p.grad.copy_(torch.tensor([1., 2., 3., 4., 5.]))
        res = agem_fast.project_([p], [r])
print("WARNINGS", sum("could not be built" in str(w.message) for w in caught))
print("MESSAGES", [str(w.message) for w in caught if "could not be built" in str(w.message)])
print("STATUS", _extension.status()["status"])
print("CUDA_ERROR", _extension.status()["cuda_error"])
print("BACKEND", agem_fast._api.backend_for(torch.device("cpu")))
print("GRAD", p.grad.tolist())
"""


def _broken_sources(tmp_path: Path) -> Path:
    src = tmp_path / "csrc"
    for name in _build.CPU_SOURCES + _build.CUDA_SOURCES + ["agem_table.h"]:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text("")
    (src / "agem_ops.cpp").write_text("#error deliberately broken for the fallback test\n")
    return src


def _broken_env(tmp_path, **env):
    full_env = {k: v for k, v in os.environ.items() if k != "AGEM_FAST_BACKEND"}
    full_env.update({"AGEM_FAST_CSRC": str(_broken_sources(tmp_path)), "AGEM_FAST_CUDA": "0",
                     "AGEM_FAST_JIT": "1", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), **env})
    return full_env


def _run_probe(tmp_path, **env):
    return subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                          env=_broken_env(tmp_path, **env), timeout=600)


@pytest.mark.parametrize("strict", ["0", "1"])
def test_info_reports_instead_of_raising_when_the_forced_backend_is_missing(tmp_path, strict):
    env = _broken_env(tmp_path, AGEM_FAST_BACKEND="extension", AGEM_FAST_STRICT=strict)
    out = subprocess.run([sys.executable, "-m", "agem_fast", "info"], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout)
    assert info["extension"]["status"] == "failed"
    assert info["backends"]["cpu"].startswith("error:"), info["backends"]
    assert "deliberately broken" in info["extension"]["error"]
    assert (info["extension"]["load_error"] is not None) == (strict == "1")


@pytest.mark.parametrize("value, expected", [
    (None, True), ("1", True), ("true", True), ("Yes", True), (" on ", True),
    ("0", False), ("false", False), ("NO", False), ("off", False), ("", True), ("  ", True),
])
def test_env_flags_accept_the_usual_spellings(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("AGEM_FAST_CUDA", raising=False)
    else:
        monkeypatch.setenv("AGEM_FAST_CUDA", value)
    assert _build.env_flag("AGEM_FAST_CUDA", True) is expected
    if not expected:
        assert _build.want_cuda() == (False, "disabled by AGEM_FAST_CUDA=0")


@pytest.mark.parametrize("value", ["2", "maybe", "enabled"])
def test_env_flags_refuse_anything_else(monkeypatch, value):
    monkeypatch.setenv("AGEM_FAST_STRICT", value)
    with pytest.raises(ValueError, match="AGEM_FAST_STRICT"):
        _build.env_flag("AGEM_FAST_STRICT")


def test_a_cached_build_that_does_not_import_is_rebuilt_once(tmp_path, monkeypatch):
    """A damaged library in the extension cache (ninja sees it up to date, the import
    fails) is deleted and built again, instead of failing in every process."""
    from torch.utils import cpp_extension

    build_dir = tmp_path / "agem_fast_ext"
    build_dir.mkdir()
    (build_dir / "agem_fast_ext.so").write_bytes(b"")
    calls = []

    def fake_load(**kwargs):
        calls.append(build_dir.exists())
        if len(calls) == 1:
            raise ImportError("agem_fast_ext.so: file too short")
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: str(build_dir))
    assert _build.jit_load(with_cuda=False) == "module"
    assert calls == [True, False]  # the second attempt started from an empty cache
    # a library that is still damaged after a fresh build is an error, not a loop
    def always_fails(message):
        def load(**kwargs):
            calls.append(1)
            build_dir.mkdir(exist_ok=True)
            (build_dir / "agem_fast_ext.so").write_bytes(b"")
            raise ImportError(message)

        return load

    calls.clear()
    monkeypatch.setattr(cpp_extension, "load", always_fails("agem_fast_ext.so: file too short"))
    with pytest.raises(ImportError, match="too short"):
        _build.jit_load(with_cuda=False)
    assert len(calls) == 2
    # an import error a rebuild cannot cure is raised at once, without a rebuild
    calls.clear()
    monkeypatch.setattr(cpp_extension, "load", always_fails("undefined symbol: _ZN3c10foo"))
    with pytest.raises(ImportError, match="undefined symbol"):
        _build.jit_load(with_cuda=False)
    assert len(calls) == 1 and build_dir.exists()


_STUB_MODULE = """
#include <pybind11/pybind11.h>
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", []() { return 42; }); }
"""

_LOAD_STUB = """
from agem_fast import _build
print("ANSWER", _build.jit_load(with_cuda=False).answer())
"""


def test_a_damaged_cached_library_is_really_rebuilt(tmp_path):
    """With torch's own cpp_extension.load (which remembers what it built in the process
    and would only import again): a truncated library in the cache is built afresh and
    loads, in the same process. Stub sources keep the compile to seconds."""
    src = tmp_path / "csrc"
    for name in _build.CPU_SOURCES:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text("")
    (src / "agem_python.cpp").write_text(_STUB_MODULE)
    env = {k: v for k, v in os.environ.items() if k != "AGEM_FAST_BACKEND"}
    env.update(AGEM_FAST_CSRC=str(src), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))

    def load():
        return subprocess.run([sys.executable, "-c", _LOAD_STUB], capture_output=True, text=True,
                              env=env, timeout=600)

    first = load()
    assert "ANSWER 42" in first.stdout, first.stderr[-3000:]
    assert "compiling the C++ extension" in first.stderr  # the notice, for a first build
    (library,) = (tmp_path / "ext" / "agem_fast_ext").glob("*.so")
    library.write_bytes(b"")
    second = load()
    assert "ANSWER 42" in second.stdout, second.stderr[-3000:]
    assert library.stat().st_size > 0
    third = load()  # up to date: no notice
    assert "ANSWER 42" in third.stdout and "compiling" not in third.stderr, third.stderr
    os.utime(src / "agem_ops.cpp")  # a newer source (an upgrade): rebuilt, with the notice
    fourth = load()
    assert "ANSWER 42" in fourth.stdout and "compiling the C++ extension" in fourth.stderr


def test_the_warning_names_the_line_that_says_what_went_wrong():
    from agem_fast._extension import _first_line

    ninja = RuntimeError(
        "Error building extension 'agem_fast_ext': [1/4] /nonexistent/c++ -MMD -MF agem_ops.o.d "
        "-DTORCH_EXTENSION_NAME=agem_fast_ext -isystem /x/include -c /x/agem_ops.cpp -o agem_ops.o\n"
        "FAILED: agem_ops.o\n/nonexistent/c++ -MMD -MF agem_ops.o.d -c /x/agem_ops.cpp\n"
        "/bin/sh: 1: /nonexistent/c++: not found\nninja: build stopped: subcommand failed.\n")
    assert _first_line(ninja) == "/bin/sh: 1: /nonexistent/c++: not found"
    linker = RuntimeError(
        "Error building extension 'x': [3/3] c++ a.o b.o -shared -o x.so\nFAILED: x.so\n"
        "/usr/bin/ld: a.o: in function `f':\na.cpp:(.text+0x5): undefined reference to `g()'\n"
        "collect2: error: ld returned 1 exit status\n")
    assert "undefined reference to `g()'" in _first_line(linker)
    compiler = RuntimeError("[1/2] c++ -c a.cpp\nFAILED: a.o\na.cpp:3:2: error: #error broken\n")
    assert _first_line(compiler) == "a.cpp:3:2: error: #error broken"
    assert _first_line(ValueError("plain message")) == "plain message"


def test_the_fallback_warning_points_at_the_callers_line(monkeypatch):
    import agem_fast

    def build(strict):
        raise RuntimeError("compiler missing")

    _fresh_loader(monkeypatch, build)
    monkeypatch.setenv("AGEM_FAST_STRICT", "0")  # (CI sets it)
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    with pytest.warns(RuntimeWarning, match="compiler missing") as caught:
        agem_fast.project_([p], [-torch.ones(3)])
    assert [w.filename for w in caught] == [__file__]


@pytest.mark.parametrize("name", ["AGEM_FAST_JIT", "AGEM_FAST_CUDA"])
def test_a_malformed_build_flag_is_an_error_at_every_call(monkeypatch, name):
    def build(strict):
        raise AssertionError("not reached: the flag is checked first")

    ext = _fresh_loader(monkeypatch, build)
    monkeypatch.setenv(name, "2")
    for _ in range(2):
        with pytest.raises(ValueError, match=name):
            ext.load()
    assert ext.status()["status"] != "failed"


def test_toolkits_are_found_by_version_and_a_major_mismatch_is_refused(tmp_path, monkeypatch):
    if torch.version.cuda is None:
        pytest.skip("needs a CUDA build of torch")
    major = int(torch.version.cuda.split(".")[0])
    roots = {}
    for version in (f"{major - 1}.8", f"{major}.2", f"{major}.10", f"{major + 1}.0"):
        root = _fake_toolkit(tmp_path / f"cuda-{version}")
        a, b = version.split(".")
        (root / "include" / "cuda.h").write_text(f"#define CUDA_VERSION {int(a) * 1000 + int(b) * 10}\n")
        roots[version] = root
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "no-nvcc-here"))
    real_glob = _build.glob.glob
    monkeypatch.setattr(_build.glob, "glob", lambda pattern: [str(r) for r in roots.values()]
                        if pattern == "/usr/local/cuda-*" else real_glob(pattern))
    monkeypatch.setattr(_build, "_is_toolkit", lambda path: bool(path) and Path(path) in roots.values())
    # the newest of torch's major version (10 > 2 as numbers, not as text)
    assert _build.find_cuda_home() == str(roots[f"{major}.10"])
    assert _build.toolkit_version(str(roots[f"{major}.10"])) == (major, 10)
    monkeypatch.setenv("CUDA_HOME", str(roots[f"{major - 1}.8"]))
    ok, why = _build.want_cuda()
    assert not ok and f"is {major - 1}.8 but torch was built with CUDA {torch.version.cuda}" in why
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nothing"))
    monkeypatch.setattr(_build, "_is_toolkit", lambda path: False)
    ok, why = _build.want_cuda()
    assert not ok and f"CUDA_HOME={tmp_path / 'nothing'} has no bin/nvcc" in why


def test_build_environment_leaves_other_variables_alone(monkeypatch):
    """Only what it sets is restored: a variable another thread sets meanwhile stays."""
    monkeypatch.delenv("AGEM_FAST_TEST_OTHER", raising=False)
    with _build.build_environment(with_cuda=_build.want_cuda()[0]):
        os.environ["AGEM_FAST_TEST_OTHER"] = "set meanwhile"
    assert os.environ.pop("AGEM_FAST_TEST_OTHER") == "set meanwhile"


@pytest.mark.parametrize("cuda", ["0", "1"])
def test_failed_build_warns_once_and_falls_back(tmp_path, cuda):
    """A broken C++ source: one warning, naming the compiler's error, whether or not the
    CUDA kernels were wanted too (a failed CUDA build is retried without CUDA, and that
    failing as well is not CUDA's fault)."""
    out = _run_probe(tmp_path, AGEM_FAST_STRICT="0", AGEM_FAST_CUDA=cuda)
    assert out.returncode == 0, out.stderr
    assert "WARNINGS 1" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "deliberately broken" in out.stdout, out.stdout
    assert "each new process tries again, which AGEM_FAST_BACKEND=torch avoids" in out.stdout
    assert "CUDA_ERROR None" in out.stdout, out.stdout
    assert "STATUS failed" in out.stdout
    assert "BACKEND torch" in out.stdout
    # dot = -15, rr = 5, coef = -3: g + 3 r = g - 3, computed by the fallback.
    assert "GRAD [-2.0, -1.0, 0.0, 1.0, 2.0]" in out.stdout


def test_failed_build_raises_when_strict(tmp_path):
    out = _run_probe(tmp_path, AGEM_FAST_STRICT="1")
    assert out.returncode != 0
    assert "could not be built" in out.stderr


def _nvcc():
    home = _build.find_cuda_home()
    if torch.version.cuda is None or home is None:
        pytest.skip("needs a CUDA build of torch and a CUDA toolkit")
    return os.path.join(home, "bin", "nvcc"), home


def test_cuda_kernels_have_no_register_spills(tmp_path):
    nvcc, home = _nvcc()
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    cmd = [nvcc, "-c", str(REPO / "csrc" / "cuda" / "agem_cuda.cu"), "-o", str(tmp_path / "k.o"),
           "-gencode=arch=compute_75,code=sm_75", "-gencode=arch=compute_80,code=sm_80",
           "-gencode=arch=compute_90,code=sm_90", "-O3", "-std=c++20", "-Xptxas", "-v", "--expt-relaxed-constexpr",
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
           "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
           "-DAGEM_FAST_WITH_CUDA", "--compiler-options", "-fPIC", *includes]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    report = out.stdout + out.stderr
    functions = re.findall(r"Compiling entry function '(\w+)'", report)
    for kernel in ("reduce_kernel", "update_kernel", "reduce_kernel_inline", "update_kernel_inline"):
        assert any(re.search(rf"{len(kernel)}{kernel}[EI]", f) for f in functions), (kernel, functions)  # mangled
    assert len(re.findall(r"for 'sm_(75|80|90)'", report)) >= 12, report[-2000:]  # 4 kernels, 3 archs
    assert "ptxas warning" not in report, report[-4000:]  # e.g. a launch bound an arch cannot meet
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert spills, report[-2000:]
    assert all(s == "0" and l == "0" for s, l in spills), report[-4000:]


def _repo_copy(tmp_path: Path) -> Path:
    """The tracked sources in a scratch folder: builds there leave nothing in the repo."""
    dst = tmp_path / "repo"
    shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "results", "*.so"))
    return dst


def test_sdist_carries_every_kernel_source(tmp_path):
    import tarfile

    src = _repo_copy(tmp_path)
    out = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")],
                         capture_output=True, text=True, cwd=src, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (sdist,) = (tmp_path / "dist").glob("agem_fast-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for source in _build.CPU_SOURCES + _build.CUDA_SOURCES + ["agem_table.h", "agem_ops.h"]:
        assert f"csrc/{source}" in names, sorted(names)


@pytest.mark.parametrize("with_cuda", [False, True], ids=["cpp", "cuda"])
def test_setup_py_prebuilds_the_extension_when_asked(tmp_path, with_cuda):
    """AGEM_FAST_BUILD_EXT=1 compiles agem_fast._C into the wheel, and it is used; with a
    CUDA torch and toolkit the wheel's module holds the CUDA kernels too (setup.py's own
    CUDAExtension path, GPU-less here: the default architecture list must stand in)."""
    import zipfile

    if with_cuda and not _build.want_cuda()[0]:
        pytest.skip("needs a CUDA build of torch and a CUDA toolkit")
    env = {**os.environ, "AGEM_FAST_BUILD_EXT": "1", "AGEM_FAST_CUDA": "1" if with_cuda else "0"}
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                          "-q", "-w", str(tmp_path / "wheel"), str(_repo_copy(tmp_path))],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("agem_fast-*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
        names = z.namelist()
    assert any(n.startswith("agem_fast/_C") and n.endswith(".so") for n in names), names
    assert "agem_fast/csrc/cuda/agem_cuda.cu" in names  # sources ship for a later JIT build
    probe = ("import torch, agem_fast\nfrom agem_fast import _extension\n"
             "p = torch.nn.Parameter(torch.zeros(3)); p.grad = torch.tensor([1., 2., 3.])\n"
             "res = agem_fast.project_([p], [torch.full((3,), -1.)])\n"
             "print(_extension.status()['source'], _extension.build_info()['cuda'], float(res.coef),"
             " p.grad.tolist())\n"
             "print(_extension.build_info().get('cuda_archs'))\n")
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("AGEM_FAST_")}
    run_env.update(PYTHONPATH=str(tmp_path / "site"), TORCH_EXTENSIONS_DIR=str(tmp_path / "no-jit"))
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env=run_env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    archs = "['7.5', '8.0', '9.0']" if with_cuda else "None"  # the default list, 7.5;8.0;9.0+PTX
    assert run.stdout.strip() == f"prebuilt {with_cuda} -2.0 [-1.0, 0.0, 1.0]\n{archs}", run.stdout
    if not with_cuda:
        # What `pip install agem_fast` users get (no prebuilt module): a JIT build from the
        # sources shipped inside the installed package.
        run_env.update(AGEM_FAST_JIT="1", AGEM_FAST_CUDA="0", TORCH_EXTENSIONS_DIR=str(tmp_path / "jit"))
        probe += "from agem_fast import _build\nprint(_build.csrc_dir())\n"
        run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             env=run_env, cwd=tmp_path, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.split() == ["jit", "False", "-2.0", "[-1.0,", "0.0,", "1.0]", "None",
                                      str(tmp_path / "site" / "agem_fast" / "csrc")], run.stdout


_CUDA_FAIL_PROBE = """
import warnings, torch, agem_fast
from agem_fast import _extension
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    _extension.load()
print("WARNINGS", [str(w.message) for w in caught if "could not be built" in str(w.message)])
s = _extension.status()
print("STATUS", s["status"], s["cuda"], bool(s["cuda_error"]))
print("BACKEND", agem_fast._api.backend_for(torch.device("cpu")))
"""


def test_failed_cuda_build_keeps_the_cpu_kernels(tmp_path):
    if not _build.want_cuda()[0]:
        pytest.skip("needs a CUDA build of torch and a CUDA toolkit")
    import shutil

    src = tmp_path / "csrc"
    shutil.copytree(REPO / "csrc", src)
    (src / "cuda" / "agem_cuda.cu").write_text("#error deliberately broken CUDA source\n")
    env = {**os.environ, "AGEM_FAST_CSRC": str(src), "AGEM_FAST_JIT": "1", "AGEM_FAST_STRICT": "0",
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    env.pop("AGEM_FAST_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", _CUDA_FAIL_PROBE], capture_output=True, text=True,
                         env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "WARNINGS ['agem_fast: the CUDA kernels could not be built" in out.stdout, out.stdout
    assert "each new process tries again, which AGEM_FAST_CUDA=0 avoids.']" in out.stdout
    assert "STATUS loaded False True" in out.stdout, out.stdout
    assert "BACKEND cpu" in out.stdout, out.stdout


def test_threads_wait_for_a_running_build(monkeypatch):
    """While one thread builds, another asking for the extension waits for that build
    instead of falling back to the torch backend in the meantime."""
    import threading
    import time

    from agem_fast import _extension

    class Module:
        @staticmethod
        def build_info():
            return {"cuda": False}

    building = threading.Event()

    def slow_build(strict):
        building.set()
        time.sleep(1.0)
        return Module, "jit"

    _fresh_loader(monkeypatch, slow_build)
    builder = threading.Thread(target=_extension.load)
    builder.start()
    assert building.wait(10)
    assert _extension.load() is Module  # not None: it waited for the build
    builder.join()
    assert _extension.status()["status"] == "loaded"


_FORK_PROBE = """
import os, signal, threading, time
from agem_fast import _extension

class Module:
    @staticmethod
    def build_info():
        return {"cuda": False}

def slow_build(strict):
    building.set()
    time.sleep(3)
    return Module, "jit"

_extension._import_or_build = slow_build
_extension._register_fake = lambda: None
building = threading.Event()
builder = threading.Thread(target=_extension.load)
builder.start()
assert building.wait(20)
pid = os.fork()  # while the builder thread holds the loader's lock
if pid == 0:
    signal.alarm(20)  # a child stuck on the inherited lock dies of SIGALRM
    os._exit(0 if _extension.load() is Module else 3)
_, status = os.waitpid(pid, 0)
builder.join()
print("CHILD", os.waitstatus_to_exitcode(status), "PARENT", _extension.load() is Module)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_process_forked_during_a_build_can_load(tmp_path):
    """A fork while a thread builds (a DataLoader starting its workers, say) must not hand
    the child a held lock that nothing would release: the child builds (here: loads) on
    its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGEM_FAST_")}
    out = subprocess.run([sys.executable, "-c", _FORK_PROBE], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "CHILD 0 PARENT True", out.stdout + out.stderr[-2000:]


def _fresh_loader(monkeypatch, build):
    from agem_fast import _extension

    monkeypatch.delenv("AGEM_FAST_BACKEND", raising=False)
    monkeypatch.setattr(_extension, "_import_or_build", build)
    monkeypatch.setattr(_extension, "_register_fake", lambda: None)  # no real ops here
    monkeypatch.setattr(_extension, "_state", {**_extension._state, "attempted": False, "module": None,
                                               "fatal": None})
    return _extension


def test_a_malformed_strict_flag_is_an_error_at_every_call(monkeypatch):
    """Not one error and then a silent fallback: the value is refused before anything
    is built or recorded."""
    def build(strict):
        raise RuntimeError("compiler missing")

    ext = _fresh_loader(monkeypatch, build)
    monkeypatch.setenv("AGEM_FAST_STRICT", "2")
    for _ in range(2):
        with pytest.raises(ValueError, match="AGEM_FAST_STRICT"):
            ext.load()
    assert ext.status()["status"] != "failed"


def test_a_module_that_fails_after_import_is_one_failed_build(monkeypatch, recwarn):
    class Broken:
        @staticmethod
        def build_info():
            raise AttributeError("no build_info")

    calls = []

    def build(strict):
        calls.append(1)
        return Broken, "jit"

    ext = _fresh_loader(monkeypatch, build)
    monkeypatch.setenv("AGEM_FAST_STRICT", "0")
    assert ext.load() is None and ext.load() is None
    assert calls == [1] and ext.status()["status"] == "failed"
    assert sum("could not be built" in str(w.message) for w in recwarn) == 1


def test_a_strict_failed_build_raises_at_every_call(monkeypatch):
    """AGEM_FAST_STRICT=1: not one error and then a silent fallback to the torch backend."""
    calls = []

    def build(strict):
        calls.append(1)
        raise RuntimeError("compiler missing")

    ext = _fresh_loader(monkeypatch, build)
    monkeypatch.setenv("AGEM_FAST_STRICT", "1")
    for _ in range(3):
        with pytest.raises(RuntimeError, match="AGEM_FAST_STRICT") as info:
            ext.load()
        assert "compiler missing" in str(info.value.__cause__)
    assert calls == [1] and ext.status()["status"] == "failed"


def test_apple_clang_gets_no_openmp_runtime_flags(monkeypatch):
    """Apple's clang refuses -fopenmp (no runtime): the kernels are built with
    -fopenmp-simd only (checked here with GCC: the suite passes on such a build)."""
    import importlib

    monkeypatch.setattr(sys, "platform", "darwin")
    try:
        darwin = importlib.reload(_build)
        assert "-fopenmp" not in darwin.CXX_FLAGS and "-fopenmp-simd" in darwin.CXX_FLAGS
        assert darwin.OPENMP_LDFLAGS == []
    finally:
        monkeypatch.undo()
        importlib.reload(_build)
    assert "-fopenmp" in _build.CXX_FLAGS and _build.OPENMP_LDFLAGS == ["-fopenmp"]


def test_a_prebuilt_module_that_does_not_load_is_reported(monkeypatch):
    """An installed agem_fast._C that fails to import (built for another torch, say) is
    passed over for a JIT build, and `info` can say why."""
    import importlib.abc

    from agem_fast import _extension

    class Damaged(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "agem_fast._C":
                raise ImportError("agem_fast/_C.so: undefined symbol: _ZN3c10foo")
            return None

    monkeypatch.delitem(sys.modules, "agem_fast._C", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Damaged(), *sys.meta_path])
    monkeypatch.delenv("AGEM_FAST_JIT", raising=False)
    monkeypatch.setattr(_extension, "_state", {**_extension._state, "prebuilt_error": None})
    monkeypatch.setattr(_build, "want_cuda", lambda: (False, "test"))
    monkeypatch.setattr(_build, "jit_load", lambda with_cuda: "jit module")
    assert _extension._import_or_build(strict=False) == ("jit module", "jit")
    assert "undefined symbol" in _extension._state["prebuilt_error"]


def test_the_warning_skips_ninja_progress_and_failed_lines():
    """A keyword inside ninja's command line (a -D define here) is not the diagnostic."""
    from agem_fast._extension import _first_line

    exc = RuntimeError(
        "Error building extension 'x':\n[1/2] c++ -DMSG='\"error: x\"' -c a.cpp -o a.o\n"
        "FAILED: a.o\n/bin/sh: 1: c++: not found\nninja: error: build stopped: subcommand failed.\n")
    assert _first_line(exc) == "/bin/sh: 1: c++: not found"
