"""The benchmark harness's inputs: every implementation, the floor included, runs on the
same memory (bench/harness.py), and the floor there still computes the projection."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for bench/
from bench import harness  # noqa: E402


@pytest.fixture(scope="module")
def wl():
    return harness.Workload("tiny5000", torch.float32, "cpu", nsets=2, seed=3)


def test_each_set_packs_its_gradients_in_parameter_order(wl):
    assert wl.sets[0].flat_grad.data_ptr() != wl.sets[1].flat_grad.data_ptr()
    for k, s in enumerate(wl.sets):
        offset = 0
        for g in s.grads:
            assert g.data_ptr() == s.flat_grad.data_ptr() + offset * g.element_size()
            offset += g.numel()
        assert offset == s.flat_grad.numel() == wl.numel
        wl.restore(k)
        assert torch.equal(s.flat_grad, wl.saved)


@pytest.mark.parametrize("projecting", [True, False])
def test_floor_runs_on_each_sets_own_memory(wl, projecting):
    wl.set_case(projecting)
    try:
        floor = harness.FloorImpl(wl)
        for k, s in enumerate(wl.sets):
            f = floor.floors[k]
            assert f.g.data_ptr() == s.flat_grad.data_ptr()
            assert f.r.data_ptr() == s.flat_ref.data_ptr()
            floor.restore(k)
            before = s.flat_grad.clone()
            floor.call(k)
            if projecting:
                assert not torch.equal(s.flat_grad, before)
                assert wl.rel_error(floor.outputs(k)) < 1e-4
            else:
                assert torch.equal(s.flat_grad, before)
            floor.restore(k)
            assert torch.equal(s.flat_grad, wl.saved)
    finally:
        wl.set_case(True)


def test_torch_backend_projects_the_packed_gradients(wl):
    """The implementations' gradients are the views of the packed buffer."""
    wl.set_case(True)
    impl = harness.make_impl("torch", wl)
    for k, s in enumerate(wl.sets):
        impl.restore(k)
        with harness.backend_env(impl.env):
            impl.call(k)
        assert wl.rel_error(s.grads) < 1e-4  # projected in place, inside the packed buffer


@pytest.mark.parametrize(
    "model, tag",
    [
        ("Intel(R) Xeon(R) Processor", "cpu-intel-xeon-4c"),
        ("AMD EPYC 9B14 96-Core Processor", "cpu-amd-epyc-9b14-96-core-4c"),
        ("Intel(R) Core(TM) i7-9700K CPU @ 3.60GHz", "cpu-intel-core-i7-9700k-3-60ghz-4c"),
        ("(R)", "cpu-cpu-4c"),
    ],
)
def test_cpu_result_file_tag_drops_trademark_signs(monkeypatch, model, tag):
    monkeypatch.setattr(harness, "_cpu_model", lambda: model)
    monkeypatch.setattr(harness.os, "cpu_count", lambda: 4)
    assert harness.device_tag(torch.device("cpu")) == tag


# ----------------------------------------------------------------------------- reported numbers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bytes_per_param_is_5s_projecting_and_2s_not(dtype):
    """DESIGN section 7: effective GB/s counts 5s bytes per parameter when projecting,
    2s when not, s = the element size of the benchmarked dtype."""
    s = torch.finfo(dtype).bits // 8
    assert harness.bytes_per_param(dtype, True) == 5 * s
    assert harness.bytes_per_param(dtype, False) == 2 * s


def test_summarize_reports_the_median_not_the_mean_or_min():
    ts = [0.5, 0.1, 9.0, 0.2, 0.3]  # an outlier: median, mean and min all differ
    st = harness.summarize(ts)
    ordered = sorted(ts)
    assert st["median_s"] == ordered[len(ts) // 2]
    assert (st["min_s"], st["max_s"], st["n"]) == (ordered[0], ordered[-1], len(ts))
    even = sorted(ts[:4])  # even count: mean of the two middle values
    assert harness.summarize(ts[:4])["median_s"] == pytest.approx((even[1] + even[2]) / 2)


def test_copy_bandwidth_counts_bytes_read_and_written():
    nbytes = 1 << 20
    st = harness.copy_bandwidth(torch.device("cpu"), nbytes=nbytes, repeats=3)
    assert st["bytes_moved"] == 2 * nbytes  # one read + one write of the buffer
    assert st["gbps"] == pytest.approx(st["bytes_moved"] / st["median_s"] / 1e9)


def _run(times):
    import statistics

    return {"median_s": statistics.median(times), "times_s": list(times)}


@pytest.mark.parametrize("rounds", [5, 6])
def test_derive_gbps_copy_share_and_paired_ratios(rounds):
    """GB/s = numel * bytes_per_param / median / 1e9; % copy BW against the same run's
    copy bandwidth; x floor = median of t/t_floor per round; vs Avalanche = median of
    t_avalanche/t per round (not ratios of medians, not inverted, and with an even number
    of rounds not 1 / median of t/t_avalanche either)."""
    import statistics

    numel, bpp = 1_000_000, 20
    # rounds chosen so that the ratio of medians differs from the median of ratios
    times = {
        "floor": [1.0, 1.0, 1.0, 4.0, 1.0, 1.0][:rounds],
        "torch": [2.0, 1.5, 1.2, 4.4, 3.0, 1.0][:rounds],
        "avalanche": [20.0, 30.0, 9.0, 40.0, 12.0, 15.0][:rounds],
    }
    if rounds % 2 == 0:  # the data tell the median of a/t from 1 / median of t/a
        assert statistics.median(a / t for a, t in zip(times["avalanche"], times["torch"])) != pytest.approx(
            1 / statistics.median(t / a for a, t in zip(times["avalanche"], times["torch"])))
    rows = [{"device": "cpu", "workload": "w", "dtype": "fp32", "projecting": True, "impl": impl,
             "numel": numel, "bytes_per_param": bpp, "runs": [_run(ts)]} for impl, ts in times.items()]
    copy = [{"gbps": 7.0}]
    harness.derive(rows, copy)
    by = {r["impl"]: r["runs"][0] for r in rows}
    run = by["torch"]
    med = statistics.median(times["torch"])
    assert run["gbps"] == pytest.approx(numel * bpp / med / 1e9)
    assert run["pct_copy_bw"] == pytest.approx(100 * numel * bpp / med / 1e9 / 7.0)
    x_floor = statistics.median(t / f for t, f in zip(times["torch"], times["floor"]))
    vs_ava = statistics.median(a / t for a, t in zip(times["avalanche"], times["torch"]))
    assert x_floor != pytest.approx(med / statistics.median(times["floor"]))  # the data tell them apart
    assert vs_ava != pytest.approx(statistics.median(times["avalanche"]) / med)
    assert run["x_floor"] == pytest.approx(x_floor)
    assert run["speedup_vs_avalanche"] == pytest.approx(vs_ava)
    assert by["floor"]["x_floor"] == pytest.approx(1.0)
    assert by["avalanche"]["speedup_vs_avalanche"] == pytest.approx(1.0)


class _Recorder(harness.Impl):
    """Records restore / call order; the flush records into the same log."""

    def __init__(self, wl, log, tag):
        super().__init__(wl)
        self.name, self.log, self.tag = tag, log, tag

    def restore(self, k):
        self.log.append(("restore", self.tag, k))

    def call(self, k):
        self.log.append(("call", self.tag, k))


def test_round_robin_restores_and_flushes_before_every_timed_call_and_times_no_warmup():
    import types

    wl = types.SimpleNamespace(device=torch.device("cpu"), nsets=2)
    log = []
    impls = [_Recorder(wl, log, "a"), _Recorder(wl, log, "b")]
    repeats, warmup = 5, 3
    times = harness.time_round_robin(impls, repeats=repeats, warmup=warmup, flush=lambda: log.append(("flush",)))
    for impl in impls:
        assert len(times[id(impl)]) == repeats  # warm-up calls are not among the timings
    calls = [i for i, e in enumerate(log) if e[0] == "call"]
    assert len(calls) == len(impls) * (warmup + repeats)
    for n, i in enumerate(calls):
        _, tag, k = log[i]
        prev = calls[n - 1] + 1 if n else 0
        between = log[prev:i]
        assert ("restore", tag, k) in between  # gradients restored before EVERY call
        if n >= len(impls) * warmup:  # timed: restored, then the cache flushed
            assert between.index(("restore", tag, k)) < between.index(("flush",))


@pytest.mark.parametrize("projecting", [True, False])
def test_set_case_gives_the_sign_of_the_case(wl, projecting):
    """Projecting: <g, r> < 0 in every set; not projecting: > 0 (the refs negated)."""
    wl.set_case(projecting)
    try:
        for s in wl.sets:
            dot = float(torch.dot(wl.saved.double(), s.flat_ref.double()))
            assert (dot < 0) if projecting else (dot > 0)
        assert (wl.expected_coef() != 0.0) == projecting
    finally:
        wl.set_case(True)


def _exact(wl):
    g = wl.saved.double()
    r = wl.sets[0].flat_ref.double()
    d = float(g @ r)
    return g - (d / float(r @ r)) * r if d < 0 else g


@pytest.mark.parametrize("rel", [1e-5, 3e-3])
def test_rel_error_is_the_relative_l2_error_against_float64(wl, rel):
    wl.set_case(True)
    exact = _exact(wl)
    noise = torch.randn(exact.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = exact + noise * (rel * exact.norm() / noise.norm())
    views, off = [], 0
    for g in wl.sets[0].grads:
        views.append(out[off:off + g.numel()].view(g.shape))
        off += g.numel()
    assert wl.rel_error(views) == pytest.approx(rel, rel=1e-6)


class _Off(harness.Impl):
    """A checked implementation whose output is the exact projection off by `rel`."""

    name = "torch"

    def __init__(self, wl, rel):
        super().__init__(wl)
        self.rel = rel

    def call(self, k):
        pass

    def outputs(self, k):
        exact = _exact(self.wl)
        out, views, off = exact * (1 + self.rel), [], 0
        for g in self.wl.sets[k].grads:
            views.append(out[off:off + g.numel()].view(g.shape))
            off += g.numel()
        return views


def test_wrong_flag_thresholds_match_the_documented_ones(monkeypatch):
    """The report states the thresholds ('flagged **WRONG** above 1e-4 (fp32), 1e-2 (fp16),
    3e-2 (bf16)'): a checked row is flagged just above its dtype's and not just below."""
    import re

    from bench import report

    monkeypatch.setattr(harness, "peak_extra_bytes", lambda fn, device: (fn(), 0)[1])
    text = report.device_markdown({"device_name": "x", "device": "cpu", "torch": "t", "cuda": None,
                                   "agem_fast": "v", "copy_bandwidth": [], "repeats": 1, "warmup": 0,
                                   "runs": 1, "flush_bytes": 0, "rows": []}, date="d")
    stated = dict((d, float(v)) for v, d in re.findall(r"([0-9.]+e-[0-9]+) \((fp32|fp16|bf16)\)", text))
    assert set(stated) == {"fp32", "fp16", "bf16"}
    for name, dtype in harness.DTYPES.items():
        wl = harness.Workload("tiny5000", dtype, "cpu", seed=1)
        assert harness.check_and_peak(_Off(wl, 0.8 * stated[name]))["check_ok"] is True, name
        assert harness.check_and_peak(_Off(wl, 1.25 * stated[name]))["check_ok"] is False, name
