"""agem_fast: fused, exact A-GEM gradient projection for PyTorch.

    import agem_fast
    res = agem_fast.project_(model.parameters(), ref_grad)

See README.md for the semantics, backends and the Avalanche plugin.
"""

from ._api import Projection, project_
from ._info import backend_info
from ._reference import ReferenceGradient

__version__ = "0.1.0"

__all__ = ["project_", "Projection", "ReferenceGradient", "AGEMPlugin", "backend_info", "__version__"]


def __getattr__(name):
    # Lazy: the plugin imports Avalanche when it is installed, which takes seconds.
    if name == "AGEMPlugin":
        from .plugin import AGEMPlugin

        return AGEMPlugin
    raise AttributeError(f"module 'agem_fast' has no attribute {name!r}")
