"""Fixtures shared by the correctness tests.

backend: "torch" (pure PyTorch fallback) and "extension" (the C++/CUDA kernels),
    selected through AGEM_FAST_BACKEND. The extension variant skips when the
    extension is not available, and fails instead when AGEM_FAST_STRICT=1.
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


@pytest.fixture(params=["torch", "extension"])
def backend(request, monkeypatch):
    name = request.param
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
