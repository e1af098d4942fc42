"""CMakeLists.txt builds the same sources against libtorch, and C++ can call the op."""

import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from agem_fast import _build

REPO = Path(__file__).resolve().parents[1]


def _cuda_hints():
    """A CUDA build of libtorch makes find_package(Torch) look for the toolkit and nvrtc."""
    if torch.version.cuda is None:
        return []
    home = _build.find_cuda_home()
    if home is None:
        pytest.skip("libtorch is a CUDA build but no CUDA toolkit was found")
    version = _build.toolkit_version(home)
    if version is not None and str(version[0]) != torch.version.cuda.split(".")[0]:
        # its CMake config looks for what that toolkit has (CUDA 13 has no nvToolsExt, say)
        pytest.skip(f"libtorch is a CUDA {torch.version.cuda} build, the toolkit CUDA {version[0]}.{version[1]}")
    hints = [f"-DCUDA_TOOLKIT_ROOT_DIR={home}", f"-DCUDAToolkit_ROOT={home}",
             f"-DCMAKE_CUDA_COMPILER={home}/bin/nvcc"]
    if not glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")):
        # a minimal toolkit: use the nvrtc that the torch wheel depends on
        import nvidia  # namespace package of the CUDA runtime wheels

        found = [p for d in nvidia.__path__ for p in glob.glob(os.path.join(d, "*", "lib", "libnvrtc.so*"))
                 if "builtins" not in p and ".alt." not in p]
        if found:
            hints.append(f"-DCUDA_nvrtc_LIBRARY={found[0]}")
    return hints


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
@pytest.mark.parametrize("with_cuda", [False, True], ids=["cpu_only", "with_gpu_kernels"])
def test_cmake_builds_and_cpp_calls_the_op(tmp_path, with_cuda):
    """The C++ example calls the op on CPU tensors; the CUDA variant must also compile and
    link the CUDA kernels (no GPU is needed for that)."""
    if with_cuda and not _build.want_cuda()[0]:
        pytest.skip("needs a CUDA build of libtorch and a CUDA toolkit")
    build = tmp_path / "build"
    configure = ["cmake", "-S", str(REPO), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", *_cuda_hints(),
                 f"-DAGEM_FAST_WITH_CUDA={'ON' if with_cuda else 'OFF'}"]
    out = subprocess.run(configure, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    out = subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)],
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(
        [str(Path(torch.__file__).parent / "lib"), os.environ.get("LD_LIBRARY_PATH", "")])}
    run = subprocess.run([str(build / "agem_fast_example")], capture_output=True, text=True,
                         timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "dot=-6 rr=3 coef=-2 projected=1 g=[-1, 0, 1]"
    if with_cuda:  # the kernels are in the library
        symbols = subprocess.run(["nm", "-C", str(build / "libagem_fast_ops.so")],
                                 capture_output=True, text=True, timeout=120).stdout
        assert "reduce_kernel" in symbols and "update_kernel" in symbols
