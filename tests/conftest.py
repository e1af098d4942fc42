"""Fixtures shared by the correctness tests.

backend: "torch" (pure PyTorch fallback), "torch-packed" (its GPU path, run on CPU
    tensors) and "extension" (the C++/CUDA kernels), selected through AGEM_FAST_BACKEND.
    The extension variant skips when the extension is not available, and fails instead
    when AGEM_FAST_STRICT=1.
device:  "cpu" always; "cuda" skipped when no GPU is visible.
"""

from __future__ import annotations

import os

import pytest
import torch


def _extension_supports(device_type: str) -> bool:
    from agem_fast import _extension

    return bool(_extension.supports(device_type))


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device(request.param)


@pytest.fixture(params=["torch", "torch-packed", "extension"])
def backend(request, monkeypatch):
    name = request.param
    if name == "torch-packed":
        # The torch backend's GPU path (tensors packed into scratch rows, no host sync),
        # run on CPU tensors so that it meets the same oracle on every CPU run. On a GPU
        # it is what "torch" runs anyway.
        if "device" in request.fixturenames and request.getfixturevalue("device").type != "cpu":
            pytest.skip("off the CPU the torch backend always takes its packed path")
        from agem_fast import _torch_backend

        monkeypatch.setattr(_torch_backend, "PACKED_ON_CPU", True)
        monkeypatch.setenv("AGEM_FAST_BACKEND", "torch")
        return name
    if name == "extension":
        device_type = "cpu"
        if "device" in request.fixturenames:
            device_type = request.getfixturevalue("device").type
        # may compile the extension on first use (minutes): only here, never at import
        if not _extension_supports(device_type):
            msg = f"agem_fast extension has no kernels for {device_type}"
            if os.environ.get("AGEM_FAST_STRICT") == "1":
                pytest.fail(msg + " (AGEM_FAST_STRICT=1)")
            pytest.skip(msg)
    monkeypatch.setenv("AGEM_FAST_BACKEND", name)
    return name


@pytest.fixture
def rng():
    """A seeded torch.Generator (tests that need several seeds make their own)."""
    return torch.Generator().manual_seed(1234)
