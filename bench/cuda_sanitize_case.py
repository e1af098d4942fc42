"""A small CUDA projection workload for compute-sanitizer (memcheck, racecheck).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
        --error-exitcode 1 python bench/cuda_sanitize_case.py

Runs the extension's CUDA kernels (AGEM_FAST_BACKEND=extension unless set) on a few
small gradient lists that reach the edge cases (sizes that are not multiples of the
vector width, misaligned views into a larger buffer, channels_last, None grads and
refs, every dtype and a mixed list, one tensor over a million elements), projecting
and not projecting, and checks every result against float64; on CUDA every case runs
under both ways the kernels can get their tensor table (upload, inline). Exit status 0 only
when every case is right. With the caching allocator off, each tensor is its own
cudaMalloc, so memcheck sees any access past its end.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("AGEM_FAST_BACKEND", "extension")

import torch  # noqa: E402

import agem_fast  # noqa: E402
from agem_fast._api import backend_for  # noqa: E402

DEV = torch.device(os.environ.get("AGEM_SANITIZE_DEVICE", "cuda"))  # "cpu": a dry run of the same cases
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _tensor(shape, dtype, gen, *, misalign=False, channels_last=False):
    n = 1
    for d in shape:
        n *= d
    if misalign:  # a view at element offset 1 of a larger buffer: not 16-byte aligned
        buf = torch.randn(n + 3, generator=gen).to(dtype).to(DEV)
        return buf.narrow(0, 1, n).view(shape)
    t = torch.randn(shape, generator=gen).to(dtype).to(DEV)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def _case(dtypes, shapes, gen, *, project, none_grad=(), none_ref=(), misalign=(), channels_last=()):
    params, refs = [], []
    for i, (dt, s) in enumerate(zip(dtypes, shapes)):
        p = torch.empty(s, dtype=dt, device=DEV)
        r = None if i in none_ref else _tensor(s, dt, gen, misalign=i in misalign, channels_last=i in channels_last)
        if i not in none_grad:
            g = _tensor(s, dt, gen, misalign=i in misalign, channels_last=i in channels_last)
            if r is not None:  # steer the sign of the global dot
                g.add_(r.to(g.dtype), alpha=-0.7 if project else 0.7)
            p.grad = g
        params.append(p)
        refs.append(r)
    return params, refs


def _expected(params, refs):
    dot = rr = 0.0
    for p, r in zip(params, refs):
        if r is None:
            continue
        rd = r.double().cpu().reshape(-1)
        rr += float(rd @ rd)
        if p.grad is not None:
            dot += float(p.grad.double().cpu().reshape(-1) @ rd)
    coef = dot / rr if (dot < 0 and rr > 0) else 0.0
    out = []
    for p, r in zip(params, refs):
        if p.grad is None:
            out.append(None)
        elif r is None:
            out.append(p.grad.double().cpu())
        else:
            out.append(p.grad.double().cpu() - coef * r.double().cpu().reshape(p.grad.shape))
    return out, coef != 0.0


def _table_routes():
    """On CUDA, both ways the kernels can get their tensor table (csrc/cuda/agem_cuda.cu)."""
    if DEV.type != "cuda" or os.environ.get("AGEM_FAST_BACKEND") == "torch":
        return [None]
    from agem_fast import _extension

    return ["upload", "inline"] if hasattr(_extension.load(), "_set_cuda_table_route") else [None]


def _set_route(route: str) -> None:
    from agem_fast import _extension

    _extension.load()._set_cuda_table_route(route)


def run() -> int:
    assert backend_for(DEV) == DEV.type or os.environ.get("AGEM_FAST_BACKEND") == "torch", (
        f"the extension's kernels are not in use: backend_for({DEV}) = {backend_for(DEV)}"
    )
    gen = torch.Generator().manual_seed(0)
    f16, bf, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
    cases = []
    for dt in (f32, bf, f16, f64):
        cases.append(("odd sizes " + str(dt), [dt] * 6, [(1,), (3,), (7, 5), (1000,), (33, 65), (4097,)], {}))
        cases.append(("misaligned " + str(dt), [dt] * 4, [(5,), (1023,), (17, 3), (9,)], {"misalign": (1, 2)}))
    cases.append(("mixed dtypes + None", [f32, bf, f16, f64, f32, bf], [(8, 3, 3, 3), (130,), (257,), (31,), (64,), (10,)],
                  {"none_grad": (4,), "none_ref": (5,), "channels_last": (0,)}))
    cases.append(("one tensor over 1M elements", [f32, bf], [(1 << 20) + 5, 77], {}))
    cases.append(("many tiny tensors", [f32] * 300, [(3,)] * 300, {}))
    failures = 0
    for route, name, dts, shapes, kw in [(rt, *case) for rt in _table_routes() for case in cases]:
        shapes = [s if isinstance(s, tuple) else (s,) for s in shapes]
        if route is not None:
            _set_route(route)
            name = f"{name} [{route}]"
        for project in (True, False):
            params, refs = _case(dts, shapes, gen, project=project, **kw)
            want, projects = _expected(params, refs)
            before = [None if p.grad is None else p.grad.clone() for p in params]
            res = agem_fast.project_(params, refs)
            if DEV.type == "cuda":
                torch.cuda.synchronize()
            ok = bool(res.projected) == projects == project
            worst = 0.0
            # coef is accumulated in fp32 unless every tensor is fp64 (DESIGN section 1)
            floor_tol = 0.0 if all(dt == torch.float64 for dt in dts) else 1e-5
            for p, w, b in zip(params, want, before):
                if w is None:
                    ok &= p.grad is None
                    continue
                got = p.grad.double().cpu()
                err = float((got - w).norm() / max(float(w.norm()), 1e-30))
                worst = max(worst, err)
                ok &= err <= max(TOL[p.grad.dtype], floor_tol)
                if not project:
                    ok &= torch.equal(p.grad, b)
            status = "ok" if ok else "FAIL"
            failures += not ok
            print(f"{status:4s} {name:42s} {'proj' if project else 'noproj':6s} worst rel err {worst:.2e}", flush=True)
    print("sanitize case: " + ("all OK" if not failures else f"{failures} FAILED"), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(run())
