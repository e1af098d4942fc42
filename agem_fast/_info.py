"""backend_info(): which backend each device uses, and the extension's build state."""

from __future__ import annotations

import os

import torch


def backend_info() -> dict:
    """Backend per visible device, build status and (after a failed build) why.

    Loads the extension if it is not loaded yet, which compiles it on first use.
    """
    from . import __version__, _build, _extension
    from ._api import backend_for

    def backend_or_why(device: torch.device) -> str:
        try:
            return backend_for(device)
        except Exception as exc:  # e.g. AGEM_FAST_BACKEND=extension with no kernels
            return f"error: {exc}"

    try:
        _extension.load()
    except (RuntimeError, ValueError) as exc:  # AGEM_FAST_STRICT=1 (or malformed): report it
        load_error = f"{type(exc).__name__}: {exc}"
    else:
        load_error = None
    devices = {"cpu": backend_or_why(torch.device("cpu"))}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            devices[f"cuda:{i}"] = backend_or_why(torch.device("cuda", i))
    try:
        with_cuda, why_not = _build.want_cuda()
    except ValueError as exc:  # a malformed AGEM_FAST_CUDA
        with_cuda, why_not = False, str(exc)
    return {
        "agem_fast": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cuda_home": _build.find_cuda_home(),
        "cuda_kernels_wanted": with_cuda if with_cuda else f"no ({why_not})",
        "forced_backend": os.environ.get("AGEM_FAST_BACKEND", "auto"),
        "extension": {**_extension.status(), "build_info": _extension.build_info(),
                      "load_error": load_error},
        "backends": devices,
    }
