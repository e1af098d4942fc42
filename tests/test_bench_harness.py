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
