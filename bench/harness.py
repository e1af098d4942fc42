"""Measurement harness shared by `bench.run` (CLI) and the pytest-benchmark files.

What one measurement is
- Inputs: `agem_fast._workloads.make_grads` (random gradients and a flat reference,
  dot < 0 with a wide margin), cloned into `nsets` copies at distinct addresses.
  Each set's gradients are views of one flat buffer (`_workloads.pack_grads`), and
  the floor runs on that buffer and the flat reference: every implementation reads
  and writes the same memory (why, and what it changed: bench/README.md).
  The non-projecting case negates the references (then dot > 0, same margin).
- Every projecting call modifies the gradients: after one projection <g', r> is 0
  (up to rounding, so a repeat may or may not project). So before EVERY call, timed
  or not, the gradients are restored from a saved copy, outside the timed region.
  The restore would leave the gradients in the cache, so a flush follows it: a write
  of a buffer of max(256 MiB, 4x L2) on CUDA, max(64 MiB, 2x the last-level cache)
  on the CPU. Then (CUDA) the device is synchronised, so each timed call starts on an
  idle GPU and host-side launch overhead that the GPU cannot hide is counted.
  Input sets are rotated as well (call i uses set i % nsets).
- CUDA: CUDA events around the call, after `warmup` untimed calls. CPU:
  `time.perf_counter` around the call. Statistics: median, quartiles, min, max.
- The implementations are timed interleaved (round i calls each once, alternating
  the order), so a slow spell of a shared machine hits all of them alike; the ratios
  (t / t_floor, t_avalanche / t) are medians of the per-round ratios.
- Each timing is run twice (all rounds, then all rounds again), and both runs are
  reported.
- Peak extra memory of one call, untimed: CUDA `max_memory_allocated()` minus the
  allocated bytes before the call; CPU: the running sum of the allocation events
  that `torch.profiler(profile_memory=True)` records (c10 CPU allocator, all
  threads of the call), None ("n/a") if the profiler cannot give them.
- Correctness, untimed: after one call the gradients are compared with a float64
  projection of the saved inputs (relative error over all parameters).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import re
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

import agem_fast
from agem_fast import _workloads
from agem_fast._baselines import FlatFloor, avalanche_project_

IMPLS = ("avalanche", "torch", "extension", "floor")
DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# Implementations held to DESIGN section 1's accuracy. The baselines (Avalanche's
# algorithm, the floor) use one fp32 BLAS dot over all parameters, whose error grows
# with the parameter count (about 1e-3 relative at ViT-B/16's 86.6M on a CPU): their
# error is reported, not judged.
CHECKED_IMPLS = ("torch", "extension")
# Relative error vs the float64 projection above which a checked row is flagged.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def elem_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def bytes_per_param(dtype: torch.dtype, projecting: bool) -> int:
    """Lower bound of memory traffic of a two-pass projection (DESIGN section 5)."""
    return (5 if projecting else 2) * elem_size(dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def backend_env(value: Optional[str]):
    """Set AGEM_FAST_BACKEND for the duration (read by agem_fast at every call)."""
    if value is None:
        yield
        return
    old = os.environ.get("AGEM_FAST_BACKEND")
    os.environ["AGEM_FAST_BACKEND"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("AGEM_FAST_BACKEND", None)
        else:
            os.environ["AGEM_FAST_BACKEND"] = old


# ----------------------------------------------------------------------------- devices


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_tag(device: torch.device) -> str:
    """Short file-name tag: 'cpu-amd-epyc-2c', 'gpu-nvidia-h100-80gb-hbm3'."""
    if device.type == "cuda":
        return "gpu-" + slug(torch.cuda.get_device_name(device))
    # "Intel(R) Xeon(R) Processor" -> "intel-xeon": no trademark signs or filler words
    model = re.sub(r"\((r|tm)\)|\b(processor|cpu)\b", " ", _cpu_model(), flags=re.IGNORECASE)
    return f"cpu-{slug(model) or 'cpu'}-{os.cpu_count()}c"


def _last_level_cache_bytes() -> int:
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    text = f.read().strip()
            except OSError:
                continue
            m = re.fullmatch(r"(\d+)([KMG]?)", text)
            if m:
                mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]
                best = max(best, int(m.group(1)) * mult)
    except OSError:
        pass
    return best


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


class Flusher:
    """Evicts the inputs from the cache between calls by writing a large buffer."""

    def __init__(self, device: torch.device):
        if device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (50 << 20)
            nbytes = max(256 << 20, 4 * l2)
        else:
            nbytes = max(64 << 20, 2 * _last_level_cache_bytes())
        self.nbytes = nbytes
        self.buf = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
        self.k = 0

    def __call__(self) -> None:
        self.k = (self.k + 1) % 251
        self.buf.fill_(float(self.k))


# ----------------------------------------------------------------------------- inputs


class InputSet:
    """One gradient set: `params` whose `.grad` are views of `flat_grad`; `refs` views
    of `flat_ref`."""

    def __init__(self, params, refs, flat_ref):
        self.params = params
        self.refs = refs
        self.flat_ref = flat_ref
        self.flat_grad = _workloads.pack_grads(params)

    @property
    def grads(self) -> List[torch.Tensor]:
        return [p.grad for p in self.params]

    def clone(self) -> "InputSet":
        flat = self.flat_ref.clone()
        anchor = torch.empty(1, dtype=flat.dtype, device=flat.device)
        refs, params, off = [], [], 0
        for p, r in zip(self.params, self.refs):
            n = r.numel()
            refs.append(flat.narrow(0, off, n).view(r.shape))
            off += n
            q = anchor.expand(p.shape) if p.dim() else anchor.view(())
            q.grad = p.grad  # InputSet re-homes it into a buffer of its own
            params.append(q)
        return InputSet(params, refs, flat)


def _copy_all(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(list(dst), list(src))
    else:  # pragma: no cover
        for d, s in zip(dst, src):
            d.copy_(s)


class Workload:
    """All inputs of one (device, workload, dtype): `nsets` sets and the saved grads."""

    def __init__(self, name: str, dtype: torch.dtype, device, nsets: int = 1, seed: int = 0):
        self.name = name
        self.dtype = dtype
        self.device = torch.device(device)
        self.shapes = _workloads.shapes(name)
        self.numel = _workloads.numel(self.shapes)
        params, refs = _workloads.make_grads(self.shapes, dtype, self.device, project=True, seed=seed)
        first = InputSet(params, refs, _workloads.flat_buffer(refs))
        self.sets = [first] + [first.clone() for _ in range(max(1, nsets) - 1)]
        self.saved = torch.empty(self.numel, dtype=dtype, device=self.device)
        self.saved_views, off = [], 0
        for g in first.grads:
            n = g.numel()
            self.saved_views.append(self.saved.narrow(0, off, n).view(g.shape))
            off += n
        _copy_all(self.saved_views, first.grads)
        self.projecting = True
        self._expected_coef: Dict[bool, float] = {}

    @property
    def nsets(self) -> int:
        return len(self.sets)

    def set_case(self, projecting: bool) -> None:
        """Projecting: the references as drawn (dot < 0); else negated (dot > 0)."""
        if projecting != self.projecting:
            for s in self.sets:
                s.flat_ref.neg_()
            self.projecting = projecting
        for k in range(self.nsets):
            self.restore(k)

    def restore(self, k: int) -> None:
        _copy_all(self.sets[k].grads, self.saved_views)

    @torch.no_grad()
    def expected_coef(self) -> float:
        """float64 coef of DESIGN section 1 for the saved grads and set 0's refs."""
        if self.projecting not in self._expected_coef:
            dot = torch.zeros((), dtype=torch.float64, device=self.device)
            rr = torch.zeros((), dtype=torch.float64, device=self.device)
            for s, r in zip(self.saved_views, self.sets[0].refs):
                sd, rd = s.reshape(-1).double(), r.reshape(-1).double()
                dot += torch.dot(sd, rd)
                rr += torch.dot(rd, rd)
            d, q = float(dot), float(rr)
            self._expected_coef[self.projecting] = d / q if (d < 0 and q > 0) else 0.0
        return self._expected_coef[self.projecting]

    @torch.no_grad()
    def rel_error(self, outputs: Sequence[torch.Tensor]) -> float:
        """||out - exact|| / ||exact|| over all parameters, exact = float64 projection."""
        coef = self.expected_coef()
        err = torch.zeros((), dtype=torch.float64, device=self.device)
        ref = torch.zeros((), dtype=torch.float64, device=self.device)
        for out, s, r in zip(outputs, self.saved_views, self.sets[0].refs):
            exact = s.double() - coef * r.double()
            err += (out.double() - exact).square().sum()
            ref += exact.square().sum()
        return math.sqrt(float(err) / float(ref)) if float(ref) > 0 else float(err)


# ----------------------------------------------------------------------------- implementations


_AVALANCHE_PLUGIN = None


def real_avalanche_plugin_class():
    """avalanche.training.plugins.AGEMPlugin, or None when avalanche-lib is not importable."""
    global _AVALANCHE_PLUGIN
    if _AVALANCHE_PLUGIN is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from avalanche.training.plugins import AGEMPlugin
            _AVALANCHE_PLUGIN = AGEMPlugin
        except Exception:  # noqa: BLE001 - any import failure means "not installed"
            _AVALANCHE_PLUGIN = False
    return _AVALANCHE_PLUGIN or None


class _ParamsModel:
    """The part of an nn.Module that AGEMPlugin.after_backward uses."""

    def __init__(self, params):
        self._params = params

    def named_parameters(self):
        return ((f"p{i}", p) for i, p in enumerate(self._params))


class _Strategy:
    def __init__(self, params, device):
        self.model = _ParamsModel(params)
        self.device = device


class Impl:
    """One implementation on one Workload: `call(k)` projects set k in place."""

    name = "?"
    env: Optional[str] = None  # AGEM_FAST_BACKEND while it runs

    def __init__(self, wl: Workload):
        self.wl = wl
        self.backend = self.name
        self.skip: Optional[str] = None  # reason, when it cannot run here

    def call(self, k: int) -> None:
        raise NotImplementedError

    def restore(self, k: int) -> None:
        self.wl.restore(k)

    def outputs(self, k: int) -> List[torch.Tensor]:
        return self.wl.sets[k].grads

    def release(self) -> None:
        pass


class AvalancheImpl(Impl):
    name = "avalanche"

    def __init__(self, wl: Workload, prefer_real: bool = True):
        super().__init__(wl)
        cls = real_avalanche_plugin_class() if prefer_real else None
        if cls is not None:
            self.backend = "avalanche-lib AGEMPlugin.after_backward"
            self.plugins = []
            for s in wl.sets:
                plugin = cls(patterns_per_experience=1, sample_size=1)
                plugin.buffers = [None]  # after_backward only checks len(buffers) > 0
                plugin.reference_gradients = s.flat_ref
                self.plugins.append((plugin, _Strategy(s.params, wl.device)))
        else:
            self.backend = "agem_fast._baselines.avalanche_project_ (avalanche-lib not installed)"
            self.plugins = None

    def call(self, k: int) -> None:
        if self.plugins is not None:
            plugin, strategy = self.plugins[k]
            plugin.after_backward(strategy)
        else:
            s = self.wl.sets[k]
            avalanche_project_(s.params, s.flat_ref)


class AgemImpl(Impl):
    """agem_fast.project_ with AGEM_FAST_BACKEND forced to `env`."""

    def __init__(self, wl: Workload, env: str, ref_form: str = "flat"):
        self.name = "torch" if env == "torch" else "extension"
        self.env = env
        super().__init__(wl)
        self.ref_form = ref_form
        if env == "extension":
            try:
                from agem_fast import _extension

                ok = bool(_extension.supports(wl.device.type))
                status = _extension.status() if hasattr(_extension, "status") else None
            except Exception as exc:  # noqa: BLE001
                ok, status = False, f"{type(exc).__name__}: {exc}"
            if not ok:
                self.skip = f"extension unavailable on {wl.device.type}: {_short_status(status)}"
                return
        with backend_env(env):
            try:
                self.backend = agem_fast._api.backend_for(wl.device)
            except Exception as exc:  # noqa: BLE001
                self.skip = f"backend_for failed: {type(exc).__name__}: {exc}"

    def call(self, k: int) -> None:
        s = self.wl.sets[k]
        agem_fast.project_(s.params, s.flat_ref if self.ref_form == "flat" else s.refs)


def _short_status(status) -> str:
    """One line of `_extension.status()`: its state and the first compiler error line."""
    if not isinstance(status, dict):
        return str(status)[:300]
    text = f"status={status.get('status')}"
    err = status.get("error")
    if err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        picked = [ln for ln in lines if "error:" in ln.lower() and len(ln) < 400] or lines[:1]
        text += f"; {picked[0][:300]}"
    return text


class FloorImpl(Impl):
    name = "floor"

    def __init__(self, wl: Workload):
        super().__init__(wl)
        self.backend = "flat torch.dot + axpy on the set's packed gradients and flat reference"
        # The set's own buffers: its gradients' flat buffer and the flat reference.
        self.floors = [FlatFloor.over(s.flat_grad, s.flat_ref) for s in wl.sets]

    def call(self, k: int) -> None:
        self.floors[k](projects=self.wl.projecting)

    def release(self) -> None:
        self.floors = []


def make_impl(name: str, wl: Workload, *, ref_form: str = "flat", prefer_real_avalanche: bool = True) -> Impl:
    if name == "avalanche":
        return AvalancheImpl(wl, prefer_real=prefer_real_avalanche)
    if name == "torch":
        return AgemImpl(wl, "torch", ref_form)
    if name == "extension":
        return AgemImpl(wl, "extension", ref_form)
    if name == "floor":
        return FloorImpl(wl)
    raise ValueError(f"unknown implementation {name!r}; known: {', '.join(IMPLS)}")


# ----------------------------------------------------------------------------- measuring


def summarize(times: Sequence[float]) -> dict:
    ts = sorted(times)
    if len(ts) >= 2:
        q1, _q2, q3 = statistics.quantiles(ts, n=4, method="inclusive")
    else:
        q1 = q3 = ts[0]
    return {
        "median_s": statistics.median(ts),
        "q1_s": q1,
        "q3_s": q3,
        "min_s": ts[0],
        "max_s": ts[-1],
        "n": len(ts),
    }


def time_round_robin(
    impls: Sequence[Impl], *, repeats: int, warmup: int, flush: Callable[[], None]
) -> Dict[int, List[float]]:
    """Per-call seconds of every implementation, interleaved: round i times each once.

    Interleaving (forward order in even rounds, reverse in odd ones) exposes all
    implementations to the same machine state, so the paired ratio t_impl[i] /
    t_floor[i] stays meaningful on a shared, noisy machine. Before every call, timed
    or not: restore the gradients and (timed) flush the cache, outside the timing;
    on CUDA also synchronise, then CUDA events around the call. Returns
    {id(impl): times}; an implementation that raises gets its exception stored
    under `impl.error` and is dropped from later rounds.
    """
    if not impls:
        return {}
    device = impls[0].wl.device
    n = impls[0].wl.nsets
    cuda = device.type == "cuda"
    live = list(impls)
    pending: Dict[int, list] = {id(i): [] for i in impls}

    def one(impl: Impl, k: int, timed: bool):
        with backend_env(impl.env):
            impl.restore(k)
            if not timed:
                impl.call(k)
                return None
            flush()
            if cuda:
                torch.cuda.synchronize(device)
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                impl.call(k)
                end.record()
                return (start, end)
            t0 = time.perf_counter()
            impl.call(k)
            return time.perf_counter() - t0

    def guarded(impl: Impl, k: int, timed: bool):
        try:
            r = one(impl, k, timed)
        except Exception as exc:  # noqa: BLE001
            impl.error = f"{type(exc).__name__}: {exc}"
            live.remove(impl)
            return
        if timed:
            pending[id(impl)].append(r)

    for i in range(warmup):
        for impl in list(live):
            guarded(impl, i % n, False)
    sync(device)
    for i in range(repeats):
        order = list(live) if i % 2 == 0 else list(reversed(live))
        for impl in order:
            guarded(impl, i % n, True)
    sync(device)
    out: Dict[int, List[float]] = {}
    for impl in impls:
        vals = pending[id(impl)]
        out[id(impl)] = [s.elapsed_time(e) * 1e-3 for s, e in vals] if cuda else list(vals)
    return out


def peak_extra_bytes(fn: Callable[[], None], device: torch.device) -> Optional[int]:
    """Peak memory allocated during fn() beyond what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    try:
        from torch.profiler import ProfilerActivity, profile

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events = [e for e in events if e.device_type() == torch.autograd.DeviceType.CPU] or events
        running = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            running += int(e.nbytes())
            peak = max(peak, running)
        return int(peak)
    except Exception:  # noqa: BLE001 - report n/a rather than a wrong number
        return None


def check_and_peak(impl: Impl) -> dict:
    """One untimed call from restored inputs: peak extra memory and rel. error."""
    wl = impl.wl
    with backend_env(impl.env):
        impl.restore(0)
        sync(wl.device)
        peak = peak_extra_bytes(lambda: impl.call(0), wl.device)
    err = wl.rel_error(impl.outputs(0))
    if impl.name in CHECKED_IMPLS:
        ok: Optional[bool] = bool(err <= TOLERANCE.get(wl.dtype, 1e-2))
    else:  # the baselines are measured as they are: their error is reported, not judged
        ok = None
    return {"peak_extra_bytes": peak, "rel_err": err, "check_ok": ok}


def copy_bandwidth(device: torch.device, *, nbytes: Optional[int] = None, repeats: int = 10) -> dict:
    """Device-to-device (CPU: memory-to-memory) copy bandwidth, bytes read + written."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    nbytes = min(nbytes, free_memory_bytes(device) // 4)
    src = torch.randint(0, 1 << 20, (nbytes // 4,), dtype=torch.int32, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            dst.copy_(src)
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) * 1e-3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    st = summarize(times)
    moved = 2 * src.numel() * 4
    st.update({"bytes_moved": moved, "gbps": moved / st["median_s"] / 1e9})
    return st


def choose_nsets(device: torch.device, numel: int, dtype: torch.dtype, requested: int, impls: Sequence[str]) -> int:
    """How many input sets fit: each set = grads + refs (the floor runs on them)."""
    buf = numel * elem_size(dtype)
    per_set = 2 * buf
    fixed = buf * (1 + (3 if "avalanche" in impls else 0))  # saved copy + Avalanche temporaries
    budget = int(free_memory_bytes(device) * 0.8) - fixed
    fit = budget // per_set if per_set else requested
    return int(max(1, min(requested, fit)))


def fits_in_memory(device: torch.device, numel: int, dtype: torch.dtype, impls: Sequence[str]) -> bool:
    buf = numel * elem_size(dtype)
    need = buf * (3 + (3 if "avalanche" in impls else 0))
    return need < free_memory_bytes(device) * 0.85


def measure_case(
    wl: Workload,
    projecting: bool,
    impl_names: Sequence[str],
    *,
    repeats: int,
    warmup: int,
    flush: Callable[[], None],
    runs: int = 2,
    ref_form: str = "flat",
) -> List[dict]:
    """All implementations on one workload/dtype/case: rows with `runs` timings each."""
    wl.set_case(projecting)
    base = {
        "device": str(wl.device),
        "workload": wl.name,
        "n_tensors": len(wl.shapes),
        "numel": wl.numel,
        "dtype": DTYPE_NAMES.get(wl.dtype, str(wl.dtype)),
        "projecting": projecting,
        "bytes_per_param": bytes_per_param(wl.dtype, projecting),
        "nsets": wl.nsets,
    }
    active: List[tuple] = []  # (row, impl) of the implementations that ran once
    rows: List[dict] = []
    for name in impl_names:
        row = dict(base, impl=name, runs=[], note=None)
        try:
            impl = make_impl(name, wl, ref_form=ref_form)
        except Exception as exc:  # noqa: BLE001
            row.update(backend=None, note=f"setup failed: {type(exc).__name__}: {exc}")
            rows.append(row)
            continue
        row["backend"] = impl.backend
        if impl.skip:
            row["note"] = impl.skip
            rows.append(row)
            impl.release()
            continue
        try:
            row.update(check_and_peak(impl))
        except Exception as exc:  # noqa: BLE001
            row["note"] = f"call failed: {type(exc).__name__}: {exc}"
            rows.append(row)
            impl.release()
            continue
        if row["check_ok"] is False:
            row["note"] = f"WRONG RESULT: rel. error {row['rel_err']:.3g} vs float64"
        rows.append(row)
        active.append((row, impl))
    for run in range(runs):
        t0 = time.perf_counter()
        times = time_round_robin([impl for _row, impl in active], repeats=repeats, warmup=warmup, flush=flush)
        msg = []
        for row, impl in active:
            if getattr(impl, "error", None):
                row["note"] = f"timing failed: {impl.error}"
            ts = times.get(id(impl)) or []
            if len(ts) < repeats:
                continue
            st = summarize(ts)
            st["times_s"] = ts
            row["runs"].append(st)
            msg.append(f"{row['impl']} {st['median_s'] * 1e3:.3f}")
        log(
            f"  {wl.device.type} {wl.name} {base['dtype']} {'proj' if projecting else 'noproj'} run {run + 1} "
            f"medians ms: {', '.join(msg)} ({time.perf_counter() - t0:.1f} s)"
        )
    for _row, impl in active:
        impl.release()
    wl.set_case(True)
    return rows


def _paired(run: dict, other: dict) -> float:
    """Median over rounds of t[i] / t_other[i] (both timed in the same round)."""
    a, b = run.get("times_s") or [], other.get("times_s") or []
    if len(a) == len(b) and a:
        return statistics.median(x / y for x, y in zip(a, b))
    return run["median_s"] / other["median_s"]


def derive(rows: List[dict], copy_runs: Sequence[dict]) -> None:
    """Per run: GB/s, % of copy bandwidth, t / t_floor and t_avalanche / t (in place).

    The ratios are paired: the median over rounds of the per-round ratio (the
    implementations are timed interleaved, round by round); the ratios of the
    medians are kept as *_of_medians.
    """
    groups: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["device"], r["workload"], r["dtype"], r["projecting"]), {})[r["impl"]] = r
    for group in groups.values():
        floor, aval = group.get("floor"), group.get("avalanche")
        for r in group.values():
            for i, run in enumerate(r["runs"]):
                t = run["median_s"]
                run["gbps"] = r["numel"] * r["bytes_per_param"] / t / 1e9
                if i < len(copy_runs) and copy_runs[i]:
                    run["pct_copy_bw"] = 100.0 * run["gbps"] / copy_runs[i]["gbps"]
                if floor and i < len(floor["runs"]):
                    run["x_floor"] = _paired(run, floor["runs"][i])
                    run["x_floor_of_medians"] = t / floor["runs"][i]["median_s"]
                if aval and i < len(aval["runs"]):
                    # median of t_avalanche / t, not 1 / median(t / t_avalanche): with an even
                    # number of rounds those differ (the mean of the middle two vs its harmonic)
                    run["speedup_vs_avalanche"] = _paired(aval["runs"][i], run)
                    run["speedup_vs_avalanche_of_medians"] = aval["runs"][i]["median_s"] / t


def run_device(
    device,
    workloads: Sequence[str],
    dtypes: Sequence[str],
    impl_names: Sequence[str],
    *,
    repeats: int,
    warmup: int,
    sets: int,
    runs: int = 2,
    seed: int = 0,
    ref_form: str = "flat",
) -> dict:
    """The full table for one device: rows, copy bandwidth of both runs, notes."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    started = time.time()
    notes: List[str] = []
    log(f"== {device}: {device_name(device)}")
    flush = Flusher(device)
    copy_runs = [copy_bandwidth(device)]
    log(f"  copy bandwidth (run 1): {copy_runs[0]['gbps']:.1f} GB/s")
    rows: List[dict] = []
    for name in workloads:
        for dname in dtypes:
            dtype = DTYPES[dname]
            numel = _workloads.numel(_workloads.shapes(name))
            if not fits_in_memory(device, numel, dtype, impl_names):
                notes.append(f"{name} {dname}: skipped, does not fit in the free memory of {device}")
                log("  " + notes[-1])
                continue
            nsets = choose_nsets(device, numel, dtype, sets, impl_names)
            t0 = time.perf_counter()
            wl = Workload(name, dtype, device, nsets=nsets, seed=seed)
            log(f"  {name} {dname}: {numel:,} params in {len(wl.shapes)} tensors, {nsets} input set(s) "
                f"({time.perf_counter() - t0:.1f} s to draw)")
            for projecting in (True, False):
                rows += measure_case(wl, projecting, impl_names, repeats=repeats, warmup=warmup,
                                     flush=flush, runs=runs, ref_form=ref_form)
            del wl
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    copy_runs.append(copy_bandwidth(device))
    log(f"  copy bandwidth (run 2): {copy_runs[1]['gbps']:.1f} GB/s")
    derive(rows, copy_runs)
    for r in rows:
        if r.get("note"):
            n = f"{r['workload']} {r['dtype']} {'proj' if r['projecting'] else 'noproj'} {r['impl']}: {r['note']}"
            if r["impl"] == "extension" and "unavailable" in r["note"]:
                n = f"extension rows skipped: {r['note']}"
            if n not in notes:
                notes.append(n)
    try:
        info = agem_fast.backend_info()
    except Exception as exc:  # noqa: BLE001
        info = {"error": f"{type(exc).__name__}: {exc}"}
    return {
        "device": str(device),
        "device_type": device.type,
        "device_name": device_name(device),
        "device_tag": device_tag(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "agem_fast": getattr(agem_fast, "__version__", "?"),
        "backend_info": _jsonable(info),
        "cuda_table_route": _cuda_table_route() if device.type == "cuda" else None,
        "flush_bytes": flush.nbytes,
        "repeats": repeats,
        "warmup": warmup,
        "runs": runs,
        "ref_form": ref_form,
        "copy_bandwidth": copy_runs,
        "rows": rows,
        "notes": notes,
        "seconds": time.time() - started,
    }


def _cuda_table_route() -> Optional[str]:
    """How the extension's CUDA kernels got their tensor table (AGEM_FAST_CUDA_TABLE)."""
    try:
        from agem_fast import _extension

        module = _extension.load()
        return module._cuda_table_route() if hasattr(module, "_cuda_table_route") else None
    except Exception as exc:  # noqa: BLE001 - recorded, never fatal to a benchmark
        return f"{type(exc).__name__}: {exc}"


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)
