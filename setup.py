"""Packaging. Pure Python by default: the extension is JIT-built at first use.

`AGEM_FAST_BUILD_EXT=1 pip install --no-build-isolation .` compiles it now instead,
as the module `agem_fast._C` (CUDA kernels included when torch is a CUDA build and a
CUDA toolkit is found).
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class build_py_with_sources(build_py):
    """Ship csrc/ inside the package so a non-editable install can JIT-build too."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "agem_fast" / "csrc"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(ROOT / "csrc", target)


cmdclass = {"build_py": build_py_with_sources}
ext_modules = []
build_ext_flag = os.environ.get("AGEM_FAST_BUILD_EXT", "0").strip().lower()
if build_ext_flag not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
    raise SystemExit(f"AGEM_FAST_BUILD_EXT must be 1 or 0, got {build_ext_flag!r}")
if build_ext_flag in ("1", "true", "yes", "on"):
    import sys

    sys.path.insert(0, str(ROOT))
    try:
        import torch  # noqa: F401
    except ImportError:
        raise SystemExit(
            "AGEM_FAST_BUILD_EXT=1 compiles against the installed torch, which pip's isolated "
            "build environment does not have: install torch first, then run "
            "`AGEM_FAST_BUILD_EXT=1 pip install --no-build-isolation .`")
    from agem_fast._build import extension_for_setup

    ext, build_ext = extension_for_setup(ROOT / "csrc")
    ext_modules.append(ext)
    cmdclass["build_ext"] = build_ext

setup(cmdclass=cmdclass, ext_modules=ext_modules)
