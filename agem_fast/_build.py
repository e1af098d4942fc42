"""Finding the toolchain and compiling the extension (JIT with ninja, or via setup.py)."""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

# The architectures built when TORCH_CUDA_ARCH_LIST is not set, GPU visible or not (with
# none, torch would crash guessing). Every GPU CUDA 13 supports runs one of them: an sm_X.Y
# binary runs on sm_X.Z for Z >= Y, and +PTX lets newer GPUs JIT-compile the sm_90 code.
DEFAULT_ARCH_LIST = "7.5;8.0;9.0+PTX"

CPU_SOURCES = ["agem_ops.cpp", "agem_python.cpp", "cpu/agem_cpu.cpp"]
CUDA_SOURCES = ["cuda/agem_cuda.cu"]

# torch adds its own -std (C++20 for torch 2.14). Apple's clang has no -fopenmp (no OpenMP
# runtime): there only the `omp simd` loops are honoured, and at::parallel_for runs serially.
OPENMP_FLAGS = ["-fopenmp-simd"] if sys.platform == "darwin" else ["-fopenmp"]
OPENMP_LDFLAGS = [] if sys.platform == "darwin" else ["-fopenmp"]
CXX_FLAGS = ["-O3", *OPENMP_FLAGS]
NVCC_FLAGS = ["-O3", "-lineinfo"]


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def env_flag(name: str, default: bool = False) -> bool:
    """A yes/no environment variable: 1/true/yes/on or 0/false/no/off (any case); unset
    or empty means `default`; anything else is an error rather than a silent guess."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name} must be 1/true/yes/on or 0/false/no/off, got {os.environ[name]!r}")


def csrc_dir() -> Path:
    """The C++/CUDA sources: shipped inside the package, or the repository's csrc/."""
    override = os.environ.get("AGEM_FAST_CSRC")
    if override:
        return Path(override)
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "agem_table.h").is_file():
            return candidate
    raise FileNotFoundError(f"agem_fast: C++ sources not found next to {here}")


def _is_toolkit(path: Optional[str]) -> bool:
    nvcc = "nvcc.exe" if os.name == "nt" else "nvcc"
    return bool(path) and os.path.isfile(os.path.join(path, "bin", nvcc)) and os.path.isfile(
        os.path.join(path, "include", "cuda.h"))


def toolkit_version(home: str) -> Optional[tuple]:
    """(major, minor) of the toolkit at `home`, from its cuda.h (no subprocess)."""
    try:
        with open(os.path.join(home, "include", "cuda.h"), errors="ignore") as f:
            match = re.search(r"#define\s+CUDA_VERSION\s+(\d+)", f.read())
    except OSError:
        return None
    if not match:
        return None
    version = int(match.group(1))  # e.g. 13000 for 13.0
    return version // 1000, (version % 1000) // 10


def _torch_cuda_major() -> Optional[int]:
    return int(torch.version.cuda.split(".")[0]) if torch.version.cuda else None


def _by_version(path: str) -> tuple:
    """Sort key of a /usr/local/cuda-X.Y folder: its version as numbers (12.10 > 12.9)."""
    numbers = re.findall(r"\d+", os.path.basename(path))
    return tuple(int(n) for n in numbers)


def find_cuda_home() -> Optional[str]:
    """Root of a CUDA toolkit (holding bin/nvcc and include/cuda.h), or None.

    torch guesses dirname(dirname(which nvcc)), which is wrong when the `nvcc` on PATH is
    a wrapper script outside the toolkit; such a script is read for the real nvcc path.
    """
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if _is_toolkit(candidate):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        parent = os.path.dirname(os.path.dirname(real))
        if _is_toolkit(parent):
            return parent
        try:
            with open(real, "rb") as f:
                head = f.read(1 << 16)
        except OSError:
            head = b"\0"
        if b"\0" not in head:  # a script, not the nvcc binary
            for match in re.finditer(r"(/[^\s'\"`;:$()]+)/bin/nvcc", head.decode(errors="ignore")):
                if _is_toolkit(match.group(1)):
                    return match.group(1)
    # The newest of torch's major version first, then the others, newest first.
    major = _torch_cuda_major()
    versioned = sorted(glob.glob("/usr/local/cuda-*"),
                       key=lambda p: (_by_version(p)[:1] == (major,), _by_version(p)), reverse=True)
    for candidate in ["/usr/local/cuda", *versioned]:
        if _is_toolkit(candidate):
            return candidate
    return None


def want_cuda() -> tuple[bool, str]:
    """Whether to compile the CUDA kernels, and why not when not."""
    if not env_flag("AGEM_FAST_CUDA", True):
        return False, "disabled by AGEM_FAST_CUDA=0"
    if torch.version.cuda is None:
        return False, "torch is not a CUDA build"
    home = find_cuda_home()
    if home is None:
        given = os.environ.get("CUDA_HOME")
        if given:
            return False, f"no CUDA toolkit found (CUDA_HOME={given} has no bin/nvcc and include/cuda.h)"
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    version = toolkit_version(home)
    torch_major = _torch_cuda_major()
    if version is not None and version[0] != torch_major:
        # Kernels built by another major version would link another CUDA runtime.
        return False, (f"the CUDA toolkit at {home} is {version[0]}.{version[1]} but torch was built "
                       f"with CUDA {torch.version.cuda} (set CUDA_HOME to a {torch_major}.x toolkit)")
    return True, ""


def _runs_on(arch_list: str, major: int, minor: int) -> bool:
    """Whether a build for `arch_list` ("7.5;8.0;9.0+PTX") has code a GPU of compute
    capability major.minor runs."""
    for entry in arch_list.split(";"):
        ptx = entry.endswith("+PTX")
        arch = tuple(int(x) for x in entry.removesuffix("+PTX").split("."))
        if (arch[0] == major and arch[1] <= minor) or (ptx and arch <= (major, minor)):
            return True
    return False


def default_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST for a build when the user sets none.

    The same fixed list whether or not a GPU is visible, rather than torch's choice of the
    visible GPU's architecture only: a build made on a GPU-less login node then serves the
    GPU nodes that share its cache, and nodes with different GPUs do not rebuild over each
    other. Only a visible GPU that list cannot run (older than sm_75, possible with a CUDA
    12 toolkit) adds its own architecture.
    """
    archs = DEFAULT_ARCH_LIST
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            if not _runs_on(archs, major, minor):
                archs = f"{major}.{minor};{archs}"
    return archs


def _import_cpp_extension():
    """torch.utils.cpp_extension, without its "No CUDA runtime is found" log on GPU-less hosts."""
    import logging

    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


@contextmanager
def build_environment(with_cuda: bool):
    """CUDA_HOME, TORCH_CUDA_ARCH_LIST and ninja on PATH, restored afterwards (only those:
    other threads may change the environment meanwhile)."""
    names = ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST", "PATH")
    saved_env = {name: os.environ.get(name) for name in names}
    home = find_cuda_home()
    if home:  # before torch.utils.cpp_extension is first imported: it guesses at import
        os.environ["CUDA_HOME"] = home
    cpp_extension = _import_cpp_extension()
    saved_home = cpp_extension.CUDA_HOME
    try:
        try:
            import ninja  # the pip package ships the binary; the venv may not be on PATH

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
        if with_cuda:
            cpp_extension.CUDA_HOME = home  # read by torch when it locates nvcc
            if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
                os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list()
        yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        cpp_extension.CUDA_HOME = saved_home


def _sources(with_cuda: bool):
    root = csrc_dir()
    names = CPU_SOURCES + (CUDA_SOURCES if with_cuda else [])
    return [str(root / n) for n in names]


def jit_name(with_cuda: bool) -> str:
    return "agem_fast_ext_cuda" if with_cuda else "agem_fast_ext"


def _libraries(name: str) -> list:
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return glob.glob(os.path.join(_get_build_directory(name, verbose=False), "*.so"))
    except Exception:
        return []


def is_cached(name: str) -> bool:
    return bool(_libraries(name))


def needs_compiling(name: str, sources) -> bool:
    """Whether loading `name` will compile: no library yet, or a source or header newer
    than it (after an upgrade, say). A guess for the notice; ninja decides."""
    libraries = _libraries(name)
    if not libraries:
        return True
    built = min(os.path.getmtime(lib) for lib in libraries)
    files = [*sources, *csrc_dir().glob("*.h")]
    return any(os.path.getmtime(f) > built for f in files)


def jit_load(verbose: bool = False, with_cuda: Optional[bool] = None):
    """Compile (first use only; cached in TORCH_EXTENSIONS_DIR) and import the extension.

    with_cuda=None: compile the CUDA kernels whenever `want_cuda()` says so."""
    if with_cuda is None:
        with_cuda, _ = want_cuda()
    name = jit_name(with_cuda)
    sources = _sources(with_cuda)
    with build_environment(with_cuda):
        from torch.utils import cpp_extension

        def compile_and_import():
            if needs_compiling(name, sources):
                what = "C++ and CUDA" if with_cuda else "C++"
                how_long = "a few minutes" if with_cuda else "about a minute"
                print(f"agem_fast: compiling the {what} extension (once per version, {how_long}; "
                      f"cached in {cpp_extension._get_build_directory(name, verbose=False)})...",
                      file=sys.stderr, flush=True)
            return cpp_extension.load(
                name=name,
                sources=sources,
                extra_cflags=CXX_FLAGS + (["-DAGEM_FAST_WITH_CUDA"] if with_cuda else []),
                extra_cuda_cflags=NVCC_FLAGS + ["-DAGEM_FAST_WITH_CUDA"],
                extra_ldflags=OPENMP_LDFLAGS,
                with_cuda=with_cuda,
                verbose=verbose,
            )

        try:
            return compile_and_import()
        except ImportError as exc:
            # The build is up to date but its library is damaged (truncated, not an ELF
            # file): start that build afresh, once. Other import errors (a missing
            # symbol, say) would come back after a rebuild: they are raised as they are.
            if not (is_cached(name) and _damaged_library(exc)):
                raise
            shutil.rmtree(cpp_extension._get_build_directory(name, verbose=False), ignore_errors=True)
            # torch remembers what it built in this process and would only import again
            versioner = getattr(cpp_extension, "JIT_EXTENSION_VERSIONER", None)
            if versioner is not None:
                versioner.entries.pop(name, None)
            return compile_and_import()


def _damaged_library(exc: ImportError) -> bool:
    text = str(exc).lower()
    return any(s in text for s in ("file too short", "invalid elf header", "elf load command",
                                   "not a dynamic executable", "cannot read file data"))


def extension_for_setup(root: Path):
    """(Extension, BuildExtension) for setup.py: the module agem_fast._C."""
    cpp_extension = _import_cpp_extension()

    with_cuda, _ = want_cuda()
    sources = [str((root / n).relative_to(root.parent)) for n in
               CPU_SOURCES + (CUDA_SOURCES if with_cuda else [])]
    cxx = CXX_FLAGS + (["-DAGEM_FAST_WITH_CUDA"] if with_cuda else [])
    if with_cuda:
        home = find_cuda_home()
        os.environ["CUDA_HOME"] = home
        cpp_extension.CUDA_HOME = home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list()
        ext = cpp_extension.CUDAExtension(
            "agem_fast._C", sources, extra_compile_args={
                "cxx": cxx, "nvcc": NVCC_FLAGS + ["-DAGEM_FAST_WITH_CUDA"]},
            extra_link_args=OPENMP_LDFLAGS)
    else:
        ext = cpp_extension.CppExtension("agem_fast._C", sources, extra_compile_args={"cxx": cxx},
                                         extra_link_args=OPENMP_LDFLAGS)
    return ext, cpp_extension.BuildExtension.with_options(use_ninja=True)
