"""The C++/CUDA backend: loading (prebuilt or JIT), its status, and dispatch to the op."""

from __future__ import annotations

import os
import threading
import warnings
from typing import Optional

import torch

from ._plan import Plan
from ._torch_backend import dense_flat, same_dense_layout

_lock = threading.Lock()


def _new_lock_in_child() -> None:
    # A fork while another thread builds would hand the child this lock held, with no
    # thread of its own left to release it: its first call would wait forever.
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)

_state = {
    "attempted": False,
    "module": None,
    "status": "not loaded",   # not loaded | loaded | failed | disabled
    "source": None,           # "prebuilt" (agem_fast._C) or "jit"
    "cuda": False,
    "error": None,
    "cuda_error": None,       # why the CUDA kernels are missing when only they failed
    "fatal": None,            # the build error, when AGEM_FAST_STRICT=1 made it fatal
    "prebuilt_error": None,   # why an installed agem_fast._C did not load (JIT instead)
}


def _strict() -> bool:
    from ._build import env_flag

    return env_flag("AGEM_FAST_STRICT")


def _forced_torch() -> bool:
    return os.environ.get("AGEM_FAST_BACKEND", "").strip().lower() == "torch"


def load(*, honour_backend_env: bool = True):
    """Load the extension once per process; on failure warn once (or raise if strict).

    With AGEM_FAST_BACKEND=torch nothing is built or loaded, and nothing is recorded:
    the variable is read at every call, so setting it back later brings the extension
    in. Other threads wait while one builds, rather than fall back meanwhile.
    """
    if honour_backend_env and _forced_torch():
        return None
    if _state["attempted"]:
        return _loaded_or_raise()
    with _lock:
        if _state["attempted"]:
            return _loaded_or_raise()
        strict = _strict()  # a malformed value raises here, before anything is recorded
        from ._build import env_flag

        env_flag("AGEM_FAST_JIT")  # ... and so do these (read while building)
        env_flag("AGEM_FAST_CUDA", True)
        try:
            module, source = _import_or_build(strict)
            cuda = bool(module.build_info()["cuda"])
            _register_fake()
        except Exception as exc:  # a compiler error, a missing toolkit, ...
            _state.update(attempted=True, status="failed", error=f"{type(exc).__name__}: {exc}")
            if strict:  # and at every later call too, not a silent fallback
                _state["fatal"] = exc
                return _loaded_or_raise()
            warnings.warn(
                f"agem_fast: the C++/CUDA extension could not be built ({_first_line(exc)}); using the "
                "pure-PyTorch backend. `python -m agem_fast info` shows the full reason; each new "
                "process tries again, which AGEM_FAST_BACKEND=torch avoids.",
                RuntimeWarning, stacklevel=_caller_level())
            return None
        _state.update(module=module, status="loaded", source=source, cuda=cuda)
        _state["attempted"] = True  # last: a thread that sees it sees the whole state
        return module


def _loaded_or_raise():
    exc = _state["fatal"]
    if exc is not None:
        raise RuntimeError(
            "agem_fast: the C++/CUDA extension could not be built (AGEM_FAST_STRICT=1)") from exc
    return _state["module"]


def _import_or_build(strict: bool):
    from . import _build

    if not _build.env_flag("AGEM_FAST_JIT"):
        import importlib
        import importlib.util

        try:  # built by `AGEM_FAST_BUILD_EXT=1 pip install .`
            if importlib.util.find_spec(f"{__package__}._C") is not None:
                return importlib.import_module(f"{__package__}._C"), "prebuilt"
        except ImportError as exc:  # there, but it does not load (built for another torch?)
            _state["prebuilt_error"] = f"{type(exc).__name__}: {exc}"
    if not _build.want_cuda()[0]:
        return _build.jit_load(with_cuda=False), "jit"
    try:
        return _build.jit_load(with_cuda=True), "jit"
    except Exception as cuda_exc:
        if strict:
            raise
        # Maybe only the CUDA part is at fault (toolkit/arch mismatch, ...): the C++
        # kernels alone. If they fail too, the problem is not CUDA's: that error is the one
        # reported, in one warning.
        module = _build.jit_load(with_cuda=False)
        _state["cuda_error"] = f"{type(cuda_exc).__name__}: {cuda_exc}"
        warnings.warn(
            f"agem_fast: the CUDA kernels could not be built ({_first_line(cuda_exc)}); "
            "using the C++ kernels only, CUDA tensors use the pure-PyTorch backend. "
            "`python -m agem_fast info` shows the full reason; each new process tries again, "
            "which AGEM_FAST_CUDA=0 avoids.", RuntimeWarning, stacklevel=_caller_level())
        return module, "jit"


# What a line that says what went wrong contains (a compiler's or linker's diagnostic, a
# shell's "not found"), in order of preference.
_DIAGNOSTICS = ("error:", "undefined reference", "not found", "no such file", "fatal")


def _first_line(exc: BaseException) -> str:
    """The line of an error that says what went wrong, rather than ninja's progress and
    command lines, shortened for a warning."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    said = [ln for ln in lines if not ln.startswith(("[", "FAILED:", "ninja:"))]
    for key in _DIAGNOSTICS:
        hits = [ln for ln in said if key in ln.lower() and not ln.startswith("collect2")]
        if hits:
            return hits[0][:200]
    return ((lines or [type(exc).__name__])[0])[:200]


def _caller_level() -> int:
    """warnings.warn's stacklevel for the first frame outside agem_fast: the user's call.
    (Under torch < 2.6 project_ is wrapped by torch.compiler.disable: its frame is passed
    over too.)"""
    import sys

    package = os.path.dirname(os.path.abspath(__file__))
    wrapper = getattr(sys.modules.get("torch._dynamo.eval_frame"), "__file__", None)
    frame, level = sys._getframe(1), 1
    while frame is not None and (os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == package
                                 or frame.f_code.co_filename == wrapper):
        frame, level = frame.f_back, level + 1
    return level


_fake_registered = False


def _register_fake() -> None:
    """Shape/device-only implementation, so torch.compile can trace through the op."""
    global _fake_registered
    if _fake_registered:
        return

    @torch.library.register_fake("agem_fast::project_")
    def _(grads, refs, ref_only, eps):
        device = grads[0].device if grads else ref_only[0].device
        f64 = dict(dtype=torch.float64, device=device)
        return (torch.empty((), **f64), torch.empty((), **f64), torch.empty((), **f64),
                torch.empty((), dtype=torch.bool, device=device))

    @torch.library.register_fake("agem_fast::sums")
    def _(grads, refs, ref_only):
        device = grads[0].device if grads else ref_only[0].device
        return torch.empty(2, dtype=torch.float64, device=device)

    @torch.library.register_fake("agem_fast::apply_")
    def _(grads, refs, coef, projected):
        return None

    _fake_registered = True


def supports(device_type: str) -> bool:
    module = load()
    if module is None:
        return False
    return device_type == "cpu" or (device_type == "cuda" and _state["cuda"])


def status() -> dict:
    """Build/load state without triggering a build."""
    state = {k: v for k, v in _state.items() if k not in ("module", "attempted", "fatal")}
    if _forced_torch():
        state.update(status="disabled", error="AGEM_FAST_BACKEND=torch")
    return state


def _prepare(plan: Plan):
    """Lists for the ops. Pairs the kernels cannot walk as flat memory are staged:
    returns (grads, refs, ref_only, copy_back) with copy_back = [(grad, staged copy)]."""
    grads, refs, copy_back = plan.grads, plan.refs, []
    if plan.irregular:
        grads, refs = list(grads), list(refs)
        for k in plan.irregular:
            g, r = grads[k], refs[k]
            if same_dense_layout(g, r):
                continue
            if dense_flat(g) is None:  # g itself has gaps or overlaps: work on a dense copy
                staged = g.contiguous()
                copy_back.append((g, staged))
                grads[k] = g = staged
            refs[k] = torch.empty_like(g).copy_(r)  # r in g's memory order
    ref_only = [r if dense_flat(r) is not None else r.contiguous() for r in plan.ref_only]
    return grads, refs, ref_only, copy_back


def project_plain(params: list, refs, eps: float):
    """The C++ fast path (csrc/agem_python.cpp) for plain, valid calls: the 4-tuple of
    a Projection, or None, with nothing written, when the call needs the planner."""
    # The caller has read AGEM_FAST_BACKEND already (each read of the environment costs
    # about a microsecond, the whole Python side of a call a few).
    fast = getattr(load(honour_backend_env=False), "project_plain", None)  # None: no extension
    return None if fast is None else fast(params, refs, eps)


def project(plan: Plan):
    """The fused op: both passes and the decision, in one call."""
    from ._api import Projection

    grads, refs, ref_only, copy_back = _prepare(plan)
    if not grads and not ref_only:
        zero = torch.zeros((), dtype=torch.float64, device=plan.device)
        return Projection(zero, zero.clone(), zero.clone(),
                          torch.zeros((), dtype=torch.bool, device=plan.device))
    dot, rr, coef, projected = torch.ops.agem_fast.project_(grads, refs, ref_only, plan.eps)
    for g, staged in copy_back:
        g.copy_(staged)
    _bump_versions(plan.grads)
    return Projection(dot, rr, coef, projected)


def sums(plan: Plan) -> torch.Tensor:
    """Pass 1 only: float64 tensor [dot, rr] (for the sharded path)."""
    grads, refs, ref_only, _ = _prepare(plan)
    if not grads and not ref_only:
        return torch.zeros(2, dtype=torch.float64, device=plan.device)
    return torch.ops.agem_fast.sums(grads, refs, ref_only)


def apply(plan: Plan, coef: torch.Tensor, projected: torch.Tensor) -> None:
    """Pass 2 only, gated on the device-side `projected` flag."""
    grads, refs, _, copy_back = _prepare(plan)
    if grads:
        torch.ops.agem_fast.apply_(grads, refs, coef, projected)
    for g, staged in copy_back:
        g.copy_(staged)
    _bump_versions(plan.grads)


def _bump_versions(grads) -> None:
    """What an in-place op does, so autograd can tell that a saved gradient changed: the
    kernels write through data pointers, which autograd does not see."""
    if torch.compiler.is_compiling():
        return  # functionalization tracks the op's declared mutation (Tensor(a!)[])
    for g in grads:
        if not g.is_inference():  # inference tensors have no version counter
            torch.autograd.graph.increment_version(g)


def build_info() -> Optional[dict]:
    module = _state["module"]
    return dict(module.build_info()) if module is not None else None
