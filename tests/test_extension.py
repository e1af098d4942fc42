"""Extension-specific checks: chunking edges, alignment, determinism, the raw op, CUDA
launch behaviour. The general randomized oracle suite (test_projection.py) runs on the
extension too, through the `backend` fixture."""

import os

import pytest
import torch

import agem_fast
from oracle import check_call, oracle

CHUNK = 1 << 14  # csrc/agem_table.h kChunkElems; checked against build_info below
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.fixture
def ext(monkeypatch):
    from agem_fast import _extension

    if not _extension.supports("cpu"):
        if os.environ.get("AGEM_FAST_STRICT") == "1":
            pytest.fail("extension unavailable with AGEM_FAST_STRICT=1")
        pytest.skip("extension unavailable")
    monkeypatch.setenv("AGEM_FAST_BACKEND", "extension")
    return _extension


@pytest.fixture(params=["best", "baseline"])
def isa(request, ext):
    """Each copy of the CPU kernels (csrc/cpu/agem_cpu.cpp): the one this machine picks
    (AVX2+FMA on most x86 CPUs) and the baseline one it would otherwise run."""
    module = ext.load()
    if request.param == "best":
        yield module.build_info()["cpu_isa"]
        return
    module._force_cpu_baseline(True)
    try:
        yield "baseline"
    finally:
        module._force_cpu_baseline(False)


def _x86_cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def test_forcing_the_baseline_changes_the_code_that_runs(ext):
    """The `isa` fixture's halves must run different copies. Where this machine picks
    AVX2 the copies round differently (twice the lanes, fused multiply-adds), so each
    pass gives other bits on a fixed case when the baseline is forced."""
    module = ext.load()
    if module.build_info()["cpu_isa"] != "avx2":
        pytest.skip("this machine runs the baseline copies only")
    gen = torch.Generator().manual_seed(21)
    r = torch.randn(3 * CHUNK + 5, generator=gen)
    g = torch.randn(3 * CHUNK + 5, generator=gen) - 0.7 * r
    coef, yes = torch.tensor(-0.37, dtype=torch.float64), torch.tensor(True)
    results = {}
    for baseline in (False, True):
        module._force_cpu_baseline(baseline)
        try:
            sums = torch.ops.agem_fast.sums([g], [r], [])
            updated = g.clone()
            torch.ops.agem_fast.apply_([updated], [r], coef, yes)
        finally:
            module._force_cpu_baseline(False)
        results[baseline] = (sums, updated)
    assert not torch.equal(results[False][0], results[True][0])  # pass 1
    assert not torch.equal(results[False][1], results[True][1])  # pass 2, same coef


def test_the_default_copy_is_the_avx2_one_and_the_forced_one_the_baseline(ext):
    """The test above shows the two halves of the `isa` fixture differ, not which is which:
    swapped, every oracle test still passes, while the default run leaves AVX2 unused and
    a CPU without AVX2 runs the AVX2 copy (an illegal instruction). The fp32 update tells
    them apart. With FMA, g - c*r is rounded once: the float64 value rounded to fp32 (c
    is coef rounded to fp32, as the kernels take it; c*r is exact in float64). Without
    FMA, c*r is rounded to fp32 first."""
    module = ext.load()
    if module.build_info()["cpu_isa"] != "avx2":
        pytest.skip("this machine runs the baseline copies only")
    gen = torch.Generator().manual_seed(5)
    shapes = [(3 * CHUNK + 5,), (40, 33), (7,)]
    for baseline in (False, True):
        params, refs = _case(shapes, torch.float32, "cpu", int(torch.randint(1 << 30, (), generator=gen)))
        before = [p.grad.clone() for p in params]
        module._force_cpu_baseline(baseline)
        try:
            res = _run(params, refs, "cpu")  # against the float64 oracle
        finally:
            module._force_cpu_baseline(False)
        assert bool(res.projected)
        c = res.coef.float()
        n_differ = 0
        for i, (p, g, r) in enumerate(zip(params, before, refs)):
            fused = (g.double() - c.double() * r.double()).float()
            unfused = g - c * r  # fp32 ops: the product rounded, then the difference
            n_differ += int((fused != unfused).sum())
            expected = unfused if baseline else fused
            assert torch.equal(p.grad, expected), (
                f"params[{i}].grad: the {'forced baseline' if baseline else 'default (avx2)'} copy "
                f"does not round like the {'unfused' if baseline else 'fused'} update")
        assert n_differ > 100  # the case does tell the two roundings apart


def _case(shapes, dtype, device, seed, *, coupling=-0.7):
    """Params with random grads g = n + coupling * r, refs r; never zeros."""
    gen = torch.Generator().manual_seed(seed)
    params, refs = [], []
    for s in shapes:
        r = torch.randn(s, generator=gen, dtype=torch.float64) + 0.01
        g = torch.randn(s, generator=gen, dtype=torch.float64) + coupling * r
        p = torch.nn.Parameter(torch.empty(s, dtype=dtype, device=device))
        p.grad = g.to(dtype).to(device)
        params.append(p)
        refs.append(r.to(dtype).to(device))
    return params, refs


def _run(params, refs, device, eps=0.0):
    before = [None if p.grad is None else p.grad.cpu().clone() for p in params]
    orc = oracle(before, [r.cpu() for r in refs], eps)
    res = agem_fast.project_(params, refs, eps=eps)
    check_call(res, orc, [None if p.grad is None else p.grad.cpu() for p in params], before, device)
    return res


def test_chunk_size_matches_build(ext):
    assert ext.build_info()["chunk_elems"] == CHUNK


def test_cpu_isa_is_the_best_the_machine_has_and_can_be_forced_to_baseline(ext):
    module = ext.load()
    flags = _x86_cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    expected = "avx2" if {"avx2", "fma"} <= flags else "baseline"
    assert module.build_info()["cpu_isa"] == expected
    module._force_cpu_baseline(True)
    try:
        assert module.build_info()["cpu_isa"] == "baseline"
    finally:
        module._force_cpu_baseline(False)
    assert module.build_info()["cpu_isa"] == expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 15, 17, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
def test_sizes_around_vector_width_and_chunk(isa, dtype, n):
    params, refs = _case([(n,), (n + 3,)], dtype, "cpu", seed=n)
    _run(params, refs, torch.device("cpu"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g_off,r_off", [(1, 1), (1, 2), (3, 0), (0, 5)])
def test_misaligned_views_into_larger_buffers(isa, dtype, g_off, r_off):
    gen = torch.Generator().manual_seed(g_off * 10 + r_off)
    n = 2 * CHUNK + 37
    g_buf = torch.randn(n + 16, generator=gen, dtype=torch.float64).to(dtype)
    r_buf = torch.randn(n + 16, generator=gen, dtype=torch.float64).to(dtype)
    g_buf[g_off:g_off + n] -= 0.5 * r_buf[r_off:r_off + n]  # make it project
    p = torch.nn.Parameter(torch.empty(n, dtype=dtype))
    p.grad = g_buf[g_off:g_off + n]
    guard_before = g_buf.clone()
    res = _run([p], [r_buf[r_off:r_off + n]], torch.device("cpu"))
    assert bool(res.projected)
    # nothing outside the view was touched
    torch.testing.assert_close(g_buf[:g_off], guard_before[:g_off], rtol=0, atol=0)
    torch.testing.assert_close(g_buf[g_off + n:], guard_before[g_off + n:], rtol=0, atol=0)


def test_single_tensor_many_chunks_mixed_with_tiny(isa):
    shapes = [(5 * CHUNK + 11,), (3,), (), (2, 3), (CHUNK * 2,)]
    for dtype in DTYPES:
        params, refs = _case(shapes, dtype, "cpu", seed=3)
        _run(params, refs, torch.device("cpu"))


def test_5000_tiny_tensors(ext):
    params, refs = _case([(100,)] * 5000, torch.float32, "cpu", seed=5)
    res = _run(params, refs, torch.device("cpu"))
    assert bool(res.projected)


def test_mixed_dtypes_in_one_call(isa):
    gen = torch.Generator().manual_seed(9)
    params, refs = [], []
    for i in range(40):
        dtype = DTYPES[i % 4]
        ps, rs = _case([(int(torch.randint(1, 3 * CHUNK, (1,), generator=gen)),)], dtype, "cpu", seed=i)
        params += ps
        refs += rs
    _run(params, refs, torch.device("cpu"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_only_entries(isa, dtype):
    """Pass 1's rr-only copy: parameters with a reference but no grad, between pairs."""
    params, refs = _case([(CHUNK + 9,), (300,), (2 * CHUNK + 1,), (31,)], dtype, "cpu", seed=13)
    params[1].grad = None
    params[2].grad = None
    _run(params, refs, torch.device("cpu"))


@pytest.mark.parametrize("threads", [1, 2])
def test_bitwise_identical_for_any_thread_count(isa, threads):
    params, refs = _case([(3 * CHUNK + 1,), (17,), (CHUNK * 4,)] * 3, torch.float32, "cpu", seed=11)
    saved = [p.grad.clone() for p in params]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref_res = agem_fast.project_(params, refs)
        ref_grads = [p.grad.clone() for p in params]
        for p, g in zip(params, saved):
            p.grad.copy_(g)
        torch.set_num_threads(threads + 1)
        res = agem_fast.project_(params, refs)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(ref_res, res):
        assert torch.equal(a, b)
    for a, p in zip(ref_grads, params):
        assert torch.equal(a, p.grad)


def test_layout_mismatch_is_staged_not_rejected(ext):
    """channels_last grad with a contiguous ref, and a grad with gaps: right answer."""
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(4, 6, 5, 3, generator=gen, dtype=torch.float64)
    p1 = torch.nn.Parameter(torch.empty(4, 6, 5, 3))
    p1.grad = x.float().contiguous(memory_format=torch.channels_last)
    r1 = (torch.randn(4, 6, 5, 3, generator=gen) - 0.5 * p1.grad).contiguous()
    big = torch.randn(10, 20, generator=gen)
    p2 = torch.nn.Parameter(torch.empty(10, 7))
    p2.grad = big[:, 3:10]  # a view with gaps: not dense
    r2 = torch.randn(10, 7, generator=gen)
    big_before = big.clone()
    res = _run([p1, p2], [r1, r2], torch.device("cpu"))
    assert p1.grad.is_contiguous(memory_format=torch.channels_last)
    assert p2.grad.data_ptr() == big[:, 3:10].data_ptr()
    torch.testing.assert_close(big[:, :3], big_before[:, :3], rtol=0, atol=0)
    torch.testing.assert_close(big[:, 10:], big_before[:, 10:], rtol=0, atol=0)
    assert bool(res.projected)


def test_raw_op_rejects_mismatched_pairs(ext):
    g = torch.randn(4, 5)
    with pytest.raises(ValueError, match="different strides"):
        torch.ops.agem_fast.project_([g], [torch.randn(5, 4).t()], [], 0.0)
    with pytest.raises(ValueError, match="dense"):
        torch.ops.agem_fast.project_([torch.randn(4, 10)[:, ::2]], [torch.randn(4, 5)], [], 0.0)
    with pytest.raises(TypeError, match="refs\\[0\\]"):
        torch.ops.agem_fast.project_([g], [g.double()], [], 0.0)
    with pytest.raises(ValueError, match="1 grads but 0 refs"):
        torch.ops.agem_fast.project_([g], [], [], 0.0)


def test_opcheck(ext):
    params, refs = _case([(33,), (4, 5)], torch.float32, "cpu", seed=1)
    grads = [p.grad for p in params]
    # torch 2.4's AOT dispatch cannot functionalize our ops that mutate a list (so project_
    # is kept out of compiled graphs there: see _api.TRACEABLE_FROM)
    mutating = {}
    if torch.__version__ < "2.5":
        mutating["test_utils"] = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.agem_fast.project_.default, (grads, refs, [torch.randn(7)], 0.0),
                          **mutating)
    torch.library.opcheck(torch.ops.agem_fast.sums.default, (grads, refs, [torch.randn(7)]))
    coef = torch.tensor(-0.5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.agem_fast.apply_.default, (grads, refs, coef, torch.tensor(True)),
                          **mutating)


def _check_split_ops(device):
    """sums + decide + apply_ (the sharded path's ops) equal the fused project_, bitwise,
    with a reference-only tensor in pass 1; apply_ with a false flag writes nothing."""
    params, refs = _case([(3 * CHUNK + 5,), (7, 3), ()], torch.float32, device, seed=8)
    ref_only = [torch.randn(CHUNK + 3, generator=torch.Generator().manual_seed(9)).to(device)]
    saved = [p.grad.clone() for p in params]
    fused = torch.ops.agem_fast.project_([p.grad for p in params], refs, ref_only, 0.0)
    fused_grads = [p.grad.clone() for p in params]
    for p, g in zip(params, saved):
        p.grad.copy_(g)
    sums = torch.ops.agem_fast.sums([p.grad for p in params], refs, ref_only)
    assert torch.equal(sums, torch.stack(fused[:2]))
    torch.ops.agem_fast.apply_([p.grad for p in params], refs, fused[2], fused[3])
    assert bool(fused[3])
    for a, p in zip(fused_grads, params):
        assert torch.equal(a, p.grad)
    torch.ops.agem_fast.apply_([p.grad for p in params], refs, fused[2], torch.zeros_like(fused[3]))
    for a, p in zip(fused_grads, params):
        assert torch.equal(a, p.grad)
    torch.ops.agem_fast.apply_([], [], fused[2], fused[3])  # nothing to update


def test_split_ops_compose_to_project(ext):
    _check_split_ops("cpu")


# ---------------------------------------------------------------- CUDA (GPU machine) --

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture
def cuda_ext(ext):
    if not ext.supports("cuda"):
        pytest.fail("CUDA device present but the extension has no CUDA kernels")
    return ext


@cuda
@pytest.mark.parametrize("table_route", ["upload", "inline"])
def test_cuda_split_ops_compose_to_project(cuda_ext, table_route):
    module = cuda_ext.load()
    old = module._cuda_table_route()
    module._set_cuda_table_route(table_route)
    try:
        _check_split_ops("cuda")
        params, refs = _case([(33,), (4, 5)], torch.float32, "cuda", seed=1)
        grads, extra = [p.grad for p in params], [torch.randn(7, device="cuda")]
        torch.library.opcheck(torch.ops.agem_fast.project_.default, (grads, refs, extra, 0.0))
        torch.library.opcheck(torch.ops.agem_fast.sums.default, (grads, refs, extra))
        coef = torch.tensor(-0.5, dtype=torch.float64, device="cuda")
        yes = torch.tensor(True, device="cuda")
        torch.library.opcheck(torch.ops.agem_fast.apply_.default, (grads, refs, coef, yes))
    finally:
        module._set_cuda_table_route(old)


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_chunk_edges_and_alignment(cuda_ext, dtype):
    dev = torch.device("cuda")
    for n in [1, 9, CHUNK - 1, CHUNK + 1, 3 * CHUNK + 5]:
        params, refs = _case([(n,), (n + 3,), (2, 3)], dtype, dev, seed=n)
        _run(params, refs, dev)
    n = 3 * CHUNK
    for go, ro in [(1, 1), (1, 2), (0, 3), (3, 0)]:
        gen = torch.Generator().manual_seed(go * 10 + ro)
        buf_g = torch.randn(n + 16, generator=gen, dtype=torch.float64).to(dtype)
        buf_r = torch.randn(n + 16, generator=gen, dtype=torch.float64).to(dtype)
        buf_g[go:go + n] -= 0.5 * buf_r[ro:ro + n]  # make it project: the update must run
        buf_g, buf_r = buf_g.to(dev), buf_r.to(dev)
        guard_before = buf_g.clone()
        p = torch.nn.Parameter(torch.empty(n, dtype=dtype, device=dev))
        p.grad = buf_g[go:go + n]
        res = _run([p], [buf_r[ro:ro + n]], dev)
        assert bool(res.projected), (go, ro)
        assert torch.equal(buf_g[:go], guard_before[:go]) and torch.equal(buf_g[go + n:], guard_before[go + n:])


@cuda
def test_cuda_5000_tiny_and_mixed(cuda_ext):
    dev = torch.device("cuda")
    params, refs = _case([(100,)] * 5000, torch.float32, dev, seed=5)
    _run(params, refs, dev)
    params, refs = [], []
    for i in range(40):
        ps, rs = _case([(1 + 997 * i,)], DTYPES[i % 4], dev, seed=i)
        params += ps
        refs += rs
    _run(params, refs, dev)


@cuda
def test_cuda_bitwise_reproducible(cuda_ext):
    dev = torch.device("cuda")
    params, refs = _case([(3 * CHUNK + 1,), (17,), (CHUNK * 40,)] * 3, torch.float32, dev, seed=11)
    saved = [p.grad.clone() for p in params]
    out = []
    for _ in range(3):
        for p, g in zip(params, saved):
            p.grad.copy_(g)
        res = agem_fast.project_(params, refs)
        out.append(([t.clone() for t in res], [p.grad.clone() for p in params]))
    for scalars, grads in out[1:]:
        assert all(torch.equal(a, b) for a, b in zip(scalars, out[0][0]))
        assert all(torch.equal(a, b) for a, b in zip(grads, out[0][1]))


@cuda
def test_cuda_two_kernel_launches_for_any_tensor_count(cuda_ext):
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device("cuda")
    for count in (1, 62, 3000):
        params, refs = _case([(257,)] * count, torch.float32, dev, seed=count)
        agem_fast.project_(params, refs)  # warm-up
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            agem_fast.project_(params, refs)
            torch.cuda.synchronize()
        device_events = [e for e in prof.events()
                         if e.device_type == torch.autograd.DeviceType.CUDA]
        kernels = [e.name for e in device_events
                   if not e.name.startswith(("Memcpy", "Memset", "memcpy", "memset"))]
        assert len(kernels) == 2, kernels
        assert any("reduce_kernel" in k for k in kernels) and any("update_kernel" in k for k in kernels)


@cuda
def test_cuda_non_default_stream(cuda_ext):
    dev = torch.device("cuda")
    params, refs = _case([(CHUNK * 8 + 3,), (5,)], torch.float32, dev, seed=2)
    before = [p.grad.clone() for p in params]
    orc = oracle([g.cpu() for g in before], [r.cpu() for r in refs])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        res = agem_fast.project_(params, refs)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    check_call(res, orc, [p.grad.cpu() for p in params], [g.cpu() for g in before], dev)


@cuda
def test_cuda_graph_capture_and_replay(cuda_ext):
    dev = torch.device("cuda")
    params, refs = _case([(CHUNK * 3 + 7,), (64, 3), (9,)], torch.float32, dev, seed=4)
    static_in = [p.grad.clone() for p in params]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture, as the CUDA graph recipe asks
        agem_fast.project_(params, refs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for p, g in zip(params, static_in):
            p.grad.copy_(g)
        res = agem_fast.project_(params, refs)
    for seed in range(3):  # new inputs each replay, same static storage
        new = _case([tuple(p.shape) for p in params], torch.float32, dev, seed=100 + seed,
                    coupling=-0.7 if seed != 1 else 0.7)[0]
        for g, q in zip(static_in, new):
            g.copy_(q.grad)
        orc = oracle([g.cpu() for g in static_in], [r.cpu() for r in refs])
        graph.replay()
        torch.cuda.synchronize()
        check_call(res, orc, [p.grad.cpu() for p in params], [g.cpu() for g in static_in], dev)


def _pattern(start, stop, device):
    """Position-dependent fp16 values (exact small integers): r in 1..5, g = (i % 7 - 3) - 2r,
    so <g, r> < 0; an index off by any amount reads a different value somewhere."""
    i = torch.arange(start, stop, device=device)
    r = (i % 5 + 1).to(torch.float16)
    g = ((i % 7 - 3) - 2 * (i % 5 + 1)).to(torch.float16)
    return g, r


def _check_one_big_tensor(n, device, step=1 << 26):
    """Project one fp16 tensor of n elements; check dot, rr and every element of g and r
    against the pattern, streamed in pieces of `step` elements (no fp64 copy of the whole)."""
    g = torch.empty(n, dtype=torch.float16, device=device)
    r = torch.empty(n, dtype=torch.float16, device=device)
    dot = rr = 0
    for a in range(0, n, step):
        g0, r0 = _pattern(a, min(a + step, n), device)
        g[a:a + len(g0)], r[a:a + len(r0)] = g0, r0
        dot += int((g0.double() * r0.double()).sum())  # integers: exact in fp64
        rr += int((r0.double() ** 2).sum())
    p = torch.nn.Parameter(torch.empty(n, dtype=torch.float16, device=device))
    p.grad = g
    res = agem_fast.project_([p], [r])
    # every chunk's fp32 partial is an integer below 2^24 and fp64 adds them exactly
    assert float(res.dot) == dot and float(res.ref_sq_norm) == rr and bool(res.projected)
    coef32 = torch.tensor(dot / rr, dtype=torch.float32)
    for a in range(0, n, step):
        g0, r0 = _pattern(a, min(a + step, n), device)
        assert torch.equal(r[a:a + len(r0)], r0), f"reference changed in [{a}, {a + len(r0)})"
        expected = (g0.float() - coef32.to(device) * r0.float()).half()
        torch.testing.assert_close(g[a:a + len(g0)], expected, rtol=2**-10, atol=2**-14,
                                   msg=lambda m: f"g in [{a}, {a + len(g0)}): {m}")


def test_one_big_tensor_checked_element_by_element(ext):
    """The streamed check of the 2^31 test below, at a size this machine runs."""
    _check_one_big_tensor(3 * CHUNK + 4099, torch.device("cpu"), step=CHUNK + 7)


@cuda
def test_cuda_tensor_over_2_pow_31_elements(cuda_ext):
    """64-bit indexing: a tensor past 2^31 elements, every element checked."""
    n = 2**31 + 4099
    if os.environ.get("AGEM_FAST_BIG_TESTS") == "0":
        pytest.skip("AGEM_FAST_BIG_TESTS=0")
    free, _ = torch.cuda.mem_get_info()
    if free < 20 * 2**30:  # g, r and the parameter: 3 x 4 GiB, plus the pieces in flight
        pytest.skip(f"needs 20 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    _check_one_big_tensor(n, torch.device("cuda"))
