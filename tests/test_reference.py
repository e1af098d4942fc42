"""agem_fast.ReferenceGradient: allocate once, keep each gradient's layout, Avalanche
flat view where one exists, None grads recorded as absent, atomic capture_."""

from __future__ import annotations

import math

import pytest
import torch

import agem_fast
from oracle import assert_bit_identical, bits, check_call, oracle

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SHAPES = [(8, 3, 3, 3), (8,), (), (5, 7), (2, 4, 3, 3, 2), (13,)]


def _vals(gen, shape, dtype, device):
    mag = torch.exp2(torch.rand(shape, generator=gen, dtype=torch.float64) * 6 - 3)
    sign = torch.randint(0, 2, shape, generator=gen).to(torch.float64) * 2 - 1
    return (sign * mag).to(device=device, dtype=dtype)


def make_params(device, dtypes=None, formats=None, shapes=SHAPES):
    dtypes = dtypes or [torch.float32] * len(shapes)
    formats = formats or [torch.contiguous_format] * len(shapes)
    return [torch.empty(s, dtype=dt, device=device).contiguous(memory_format=fmt)
            for s, dt, fmt in zip(shapes, dtypes, formats)]


def set_grads(params, gen, none=(), noncontig=(), transposed=()):
    for i, p in enumerate(params):
        if i in none:
            p.grad = None
        elif i in transposed and p.dim() >= 2:
            # dense but permuted (dims reversed): memory order differs from logical order
            dims = tuple(reversed(range(p.dim())))
            base = _vals(gen, p.shape, p.dtype, p.device).permute(dims).contiguous()
            p.grad = base.permute(dims)
        elif i in noncontig and p.dim() >= 1:
            # a gapped view into a larger buffer, values in logical order
            big = torch.full(tuple(2 * s for s in p.shape), float("nan"), dtype=p.dtype, device=p.device)
            view = big[tuple(slice(0, 2 * s, 2) for s in p.shape)]
            view.copy_(_vals(gen, p.shape, p.dtype, p.device))
            p.grad = view
        else:  # same layout as the parameter (channels_last params get channels_last grads)
            p.grad = torch.empty_like(p).copy_(_vals(gen, p.shape, p.dtype, p.device))
    return [p.grad for p in params]


def slot_state(rg):
    return [None if t is None else (t.data_ptr(), tuple(t.stride()), bits(t)) for t in rg.as_list()]


@pytest.mark.parametrize("dtype", DTYPES)
def test_allocates_once_and_flat_is_avalanche_layout(dtype, device):
    gen = torch.Generator().manual_seed(1)
    params = make_params(device, [dtype] * len(SHAPES))
    rg = agem_fast.ReferenceGradient(params)
    assert len(rg) == len(params)

    set_grads(params, gen, noncontig=(0, 3), transposed=(4,))
    rg.capture_(params)
    flat = rg.flat
    assert flat is not None and flat.dim() == 1 and flat.dtype == dtype
    assert flat.numel() == sum(p.numel() for p in params)
    assert flat.device.type == torch.device(device).type
    expected = torch.cat([p.grad.reshape(-1) for p in params])
    assert_bit_identical(flat, expected, "flat after capture 1")
    ptrs = [t.data_ptr() for t in rg.as_list()]
    flat_ptr = flat.data_ptr()

    set_grads(params, gen, noncontig=(1, 5), transposed=(0, 3))
    rg.capture_(params)
    assert [t.data_ptr() for t in rg.as_list()] == ptrs, "capture_ reallocated a slot"
    assert rg.flat.data_ptr() == flat_ptr, "capture_ reallocated the flat buffer"
    expected2 = torch.cat([p.grad.reshape(-1) for p in params])
    assert not torch.equal(bits(expected2), bits(expected))
    assert_bit_identical(rg.flat, expected2, "flat after capture 2")
    for i, (t, p) in enumerate(zip(rg.as_list(), params)):
        assert t.shape == p.shape and t.dtype == p.dtype
        assert_bit_identical(t, p.grad, f"slot {i}")
    # the slots are views of the flat buffer (one allocation)
    for t in rg.as_list():
        if t.numel():
            assert flat_ptr <= t.data_ptr() < flat_ptr + flat.numel() * flat.element_size()


def test_slots_keep_channels_last_and_flat_is_none(device):
    gen = torch.Generator().manual_seed(2)
    fmts = [torch.channels_last, torch.contiguous_format, torch.contiguous_format,
            torch.contiguous_format, torch.channels_last_3d, torch.contiguous_format]
    params = make_params(device, formats=fmts)
    rg = agem_fast.ReferenceGradient(params)
    set_grads(params, gen)
    assert params[0].grad.is_contiguous(memory_format=torch.channels_last)
    rg.capture_(params)
    assert rg.flat is None, "channels_last slots are not in Avalanche's row-major layout"
    slots = rg.as_list()
    assert slots[0].is_contiguous(memory_format=torch.channels_last) and not slots[0].is_contiguous()
    assert slots[4].is_contiguous(memory_format=torch.channels_last_3d) and not slots[4].is_contiguous()
    for i, (t, p) in enumerate(zip(slots, params)):
        if p.numel() > 1:
            assert t.stride() == p.stride(), f"slot {i} strides {t.stride()} vs param {p.stride()}"
        assert_bit_identical(t, p.grad, f"slot {i}")


def test_flat_is_none_for_mixed_dtypes(device):
    gen = torch.Generator().manual_seed(3)
    dtypes = [torch.float32, torch.float16, torch.float32, torch.bfloat16, torch.float64, torch.float32]
    params = make_params(device, dtypes)
    rg = agem_fast.ReferenceGradient(params)
    set_grads(params, gen, noncontig=(3,))
    rg.capture_(params)
    assert rg.flat is None
    for i, (t, p) in enumerate(zip(rg.as_list(), params)):
        assert t.dtype == p.dtype
        assert_bit_identical(t, p.grad, f"slot {i}")


def test_capture_overwrites_every_element(device):
    """Poison the slots with NaN after a capture; the next capture must replace all of it."""
    gen = torch.Generator().manual_seed(4)
    params = make_params(device, [torch.bfloat16] * len(SHAPES))
    rg = agem_fast.ReferenceGradient(params)
    set_grads(params, gen)
    rg.capture_(params)
    for t in rg.as_list():
        t.fill_(float("nan"))
    set_grads(params, gen, noncontig=(0,))
    rg.capture_(params)
    for i, (t, p) in enumerate(zip(rg.as_list(), params)):
        assert_bit_identical(t, p.grad, f"slot {i}")


@pytest.mark.parametrize("dtype,nan_bits", [(torch.float16, (0x7C01, 0x7E01)), (torch.bfloat16, (0x7F81, 0x7FC1)),
                                            (torch.float32, (0x7F800001, 0x7FC00001))])
def test_capture_copies_nan_payloads_bit_for_bit(dtype, nan_bits, device):
    """A captured reference is the gradient's bits, NaN payloads included: on CUDA a
    float copy of fp16/bf16 goes through fp32 and would make every NaN the canonical one."""
    gen = torch.Generator().manual_seed(6)
    params = make_params(device, [dtype] * len(SHAPES))
    set_grads(params, gen)
    ints = {2: torch.int16, 4: torch.int32}[params[0].grad.element_size()]
    for p in params:
        if p.grad.numel() >= 2:
            raw = p.grad.view(ints).view(-1)
            raw[0], raw[-1] = nan_bits
    rg = agem_fast.ReferenceGradient(params).capture_(params)
    for i, (t, p) in enumerate(zip(rg.as_list(), params)):
        assert_bit_identical(t, p.grad, f"slot {i}")


def test_none_grads_become_absent_and_are_ignored(backend, device):
    gen = torch.Generator().manual_seed(5)
    params = make_params(device)
    rg = agem_fast.ReferenceGradient(params)
    first = set_grads(params, gen)
    rg.capture_(params)  # every slot now holds data ...
    assert rg.present == [True] * len(params)
    ref_grads = set_grads(params, gen, none=(1, 3))
    rg.capture_(params)  # ... and slots 1, 3 are now absent: their stale data must be ignored
    assert rg.present == [i not in (1, 3) for i in range(len(params))]
    refs = rg.as_list()
    assert refs[1] is None and refs[3] is None
    assert all(refs[i] is not None for i in (0, 2, 4, 5))
    refs[0] = None  # as_list() hands out a copy: changing it changes nothing
    assert rg.as_list()[0] is not None and rg.present[0]
    refs = rg.as_list()

    # current gradients: every param has one, strongly opposed to the reference
    grads = []
    for i, p in enumerate(params):
        noise = _vals(gen, p.shape, p.dtype, device)
        p.grad = (noise - 2 * ref_grads[i]) if ref_grads[i] is not None else noise
        grads.append(p.grad)
    orc = oracle(grads, ref_grads)
    assert orc.projected
    # using the stale slots would give a clearly different rr and dot
    stale = oracle(grads, [first[i] if i in (1, 3) else r for i, r in enumerate(ref_grads)])
    assert stale.rr != pytest.approx(orc.rr, rel=1e-2)
    before = [g.clone() for g in grads]
    res = agem_fast.project_(params, rg)
    check_call(res, orc, [p.grad for p in params], before, device)
    assert all(p.grad is not None for p in params)


@pytest.mark.parametrize("mixed", [False, True])
def test_project_with_reference_gradient_matches_oracle(mixed, backend, device):
    gen = torch.Generator().manual_seed(6)
    dtypes = ([torch.float32, torch.float16, torch.float64, torch.bfloat16, torch.float32, torch.float16]
              if mixed else [torch.float64] * len(SHAPES))
    fmts = [torch.channels_last] + [torch.contiguous_format] * (len(SHAPES) - 1)
    params = make_params(device, dtypes, fmts)
    rg = agem_fast.ReferenceGradient(params)
    ref_vals = set_grads(params, gen, none=(2,), noncontig=(3,), transposed=(0,))
    rg.capture_(params)
    grads = []
    for i, p in enumerate(params):
        if i == 4:
            p.grad = None  # reference-only entry: counts in rr
        else:
            g = _vals(gen, p.shape, p.dtype, device)
            p.grad = g - ref_vals[i] if ref_vals[i] is not None else g
        grads.append(p.grad)
    before = [None if g is None else g.clone() for g in grads]
    orc = oracle(grads, ref_vals)  # what was captured, not what capture_ stored
    assert orc.projected and ref_vals[4] is not None and rg.as_list()[4] is not None
    res = agem_fast.project_(params, rg)
    check_call(res, orc, [p.grad for p in params], before, device)


def test_flat_form_equals_object_form(backend, device):
    """project_(params, rg.flat) and project_(params, rg) agree with the oracle (and with
    each other) when every slot is present."""
    gen = torch.Generator().manual_seed(7)
    params = make_params(device, [torch.float32] * len(SHAPES))
    rg = agem_fast.ReferenceGradient(params)
    ref_vals = set_grads(params, gen)
    rg.capture_(params)
    cur = [_vals(gen, p.shape, p.dtype, device) - r for p, r in zip(params, ref_vals)]
    results = []
    for form in (rg, rg.flat):
        for p, c in zip(params, cur):
            p.grad = c.clone()
        res = agem_fast.project_(params, form)
        orc = oracle(cur, ref_vals)
        check_call(res, orc, [p.grad for p in params], cur, device)
        results.append([bits(p.grad) for p in params])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _bad_capture(kind, params, device, gen):
    """A list of tensors like `params` whose entry 2 is wrong in one way."""
    other = [torch.empty_like(p) for p in params]
    for o in other:
        o.grad = _vals(gen, o.shape, o.dtype, device)
    if kind == "shape":
        o = torch.empty(4, 5, device=device)  # params[2] is a scalar
        o.grad = _vals(gen, o.shape, o.dtype, device)
        other[2] = o
    elif kind == "shape_same_numel":
        o = torch.empty(35, device=device)  # params[3] is (5, 7): same numel, wrong shape
        o.grad = _vals(gen, o.shape, o.dtype, device)
        other[3] = o
    elif kind == "device":
        o = torch.empty(params[2].shape, device="meta")
        o.grad = torch.empty(params[2].shape, device="meta")
        other[2] = o
    elif kind == "sparse":
        o = torch.empty(params[3].shape, device=device)
        o.grad = _vals(gen, o.shape, o.dtype, device).to_sparse()
        other[3] = o
    elif kind == "dtype":
        o = torch.empty(params[2].shape, dtype=torch.float64, device=device)
        o.grad = _vals(gen, o.shape, o.dtype, device)  # a copy would round it silently
        other[2] = o
    elif kind == "length":
        other = other[:-1]
    else:
        raise AssertionError(kind)
    return other


@pytest.mark.parametrize("kind", ["shape", "shape_same_numel", "device", "sparse", "dtype", "length"])
def test_capture_bad_input_raises_and_changes_nothing(kind, device):
    gen = torch.Generator().manual_seed(8)
    params = make_params(device)
    rg = agem_fast.ReferenceGradient(params)
    set_grads(params, gen, none=(1,))
    rg.capture_(params)
    state = slot_state(rg)
    present = rg.present
    flat_bits = bits(rg.flat)
    bad = _bad_capture(kind, params, device, gen)
    with pytest.raises((ValueError, TypeError)) as info:
        rg.capture_(bad)
    if kind != "length":
        index = 3 if kind in ("shape_same_numel", "sparse") else 2
        assert f"[{index}]" in str(info.value), str(info.value)
    assert rg.present == present
    assert torch.equal(bits(rg.flat), flat_bits), "a capture_ that raised wrote into the buffer"
    for i, (a, b) in enumerate(zip(slot_state(rg), state)):
        assert (a is None) == (b is None), f"slot {i} presence changed"
        if a is not None:
            assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2]), f"slot {i} changed"


def test_unsupported_param_dtype_rejected_unless_frozen():
    """A complex or float8 parameter that requires grad can get a gradient no backend
    supports: refused. A frozen one (a fixed Fourier basis, say) never gets one: its
    slot is always absent, as an integer parameter's is, and Avalanche's plugin runs on
    such a model too. A gradient of such a dtype turning up anyway is refused by
    capture_, which then changes nothing."""
    with pytest.raises(TypeError, match=r"params\[1\] has unsupported dtype torch.complex64 and requires grad"):
        agem_fast.ReferenceGradient([torch.empty(3), nn_param(torch.ones(3, dtype=torch.complex64))])
    with pytest.raises(TypeError, match=r"\[1\]"):
        agem_fast.ReferenceGradient([torch.empty(3), "weight"])
    gen = torch.Generator().manual_seed(9)
    frozen = [nn_param(torch.ones(3, dtype=torch.complex64), False)]
    if hasattr(torch, "float8_e4m3fn"):
        frozen.append(nn_param(torch.ones(2, 2).to(torch.float8_e4m3fn), False))
    params = [nn_param(torch.empty(4, 2))] + frozen + [nn_param(torch.empty(5))]
    rg = agem_fast.ReferenceGradient(params)
    for p in (params[0], params[-1]):
        p.grad = _vals(gen, p.shape, p.dtype, p.device)
    rg.capture_(params)
    assert rg.present == [True] + [False] * len(frozen) + [True]
    expected = torch.cat([params[0].grad.reshape(-1)] + [torch.zeros(p.numel()) for p in frozen]
                         + [params[-1].grad])
    assert_bit_identical(rg.flat, expected, "rg.flat")  # Avalanche's layout: zeros for the frozen ones
    before = rg.flat.clone()
    frozen[0].grad = torch.ones(3, dtype=torch.complex64)
    with pytest.raises(TypeError, match=r"params\[1\]\.grad has unsupported dtype torch.complex64"):
        rg.capture_(params)
    assert_bit_identical(rg.flat, before, "rg.flat after the refused capture")


def nn_param(t, requires_grad=True):
    return torch.nn.Parameter(t, requires_grad=requires_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_integer_params_are_always_absent_slots(dtype, device):
    """An integer parameter (a frozen lookup table) can never have a gradient: its slot
    is absent and zero, `flat` keeps Avalanche's layout, and the projection matches the
    oracle with that parameter left out."""
    gen = torch.Generator().manual_seed(12)
    params = make_params(device, [dtype] * len(SHAPES))
    table = torch.arange(6, device=device).view(2, 3)  # int64
    params = params[:2] + [table] + params[2:]
    rg = agem_fast.ReferenceGradient(params)
    set_grads(params[:2], gen)
    set_grads(params[3:], gen)
    rg.capture_(params)
    assert rg.present == [True, True, False] + [True] * (len(params) - 3)
    assert rg.as_list()[2] is None
    flat = rg.flat
    assert flat is not None and flat.dtype == dtype
    expected = torch.cat([p.grad.reshape(-1) if p.grad is not None
                          else torch.zeros(p.numel(), dtype=dtype, device=device)
                          for p in params])
    assert_bit_identical(flat, expected, "rg.flat")
    refs = [None if p.grad is None else p.grad.clone() for p in params]
    cur = [None if p.grad is None else _vals(gen, p.shape, p.dtype, device) for p in params]
    for form in (rg, flat):
        for p, c in zip(params, cur):
            p.grad = None if c is None else c.clone()
        res = agem_fast.project_(params, form)
        check_call(res, oracle(cur, refs), [p.grad for p in params], cur, device)
    # with a mixed-dtype model there is no flat buffer, but the slot is still absent
    mixed = [torch.empty(3, dtype=torch.float64, device=device), table,
             torch.empty(2, dtype=torch.float32, device=device)]
    rg = agem_fast.ReferenceGradient(mixed)
    set_grads([mixed[0], mixed[2]], gen)
    rg.capture_(mixed)
    assert rg.flat is None and rg.present == [True, False, True]


def test_flat_after_capturing_none_grads_is_avalanche_layout(backend, device):
    """Same dtype, row-major slots: a flat view exists after a capture with None grads,
    with zeros in the absent slots (Avalanche's layout), and both forms project right."""
    gen = torch.Generator().manual_seed(9)
    params = make_params(device)
    rg = agem_fast.ReferenceGradient(params)
    set_grads(params, gen)
    rg.capture_(params)
    ref_grads = set_grads(params, gen, none=(1, 3))
    rg.capture_(params)
    flat = rg.flat
    assert flat is not None
    zeros_for_none = [r if r is not None else torch.zeros(p.shape, dtype=p.dtype, device=device)
                      for p, r in zip(params, ref_grads)]
    assert_bit_identical(flat, torch.cat([r.reshape(-1) for r in zeros_for_none]), "rg.flat")
    cur = [_vals(gen, p.shape, p.dtype, device) - 2 * r for p, r in zip(params, zeros_for_none)]
    orc = oracle(cur, zeros_for_none)  # zeros add nothing to dot or rr: same as absent
    assert orc.projected
    for form in (rg, flat):
        for p, c in zip(params, cur):
            p.grad = c.clone()
        res = agem_fast.project_(params, form)
        check_call(res, orc, [p.grad for p in params], cur, device)


@pytest.mark.parametrize("mixed", [False, True])
def test_absent_slots_are_zeroed_once_until_written(device, monkeypatch, mixed):
    """An absent slot holds zeros (Avalanche's flat layout). One that stays absent (a
    frozen parameter) is not zeroed again at every capture, unless it was written since:
    through `flat`, or present in between."""
    gen = torch.Generator().manual_seed(12)
    dtypes = [torch.float32, torch.float64] * 3 if mixed else None
    params = make_params(device, dtypes)
    rg = agem_fast.ReferenceGradient(params)
    zeroed = []
    real_zero = torch._foreach_zero_

    def recording_zero(tensors):
        zeroed.append([t.data_ptr() for t in tensors])
        real_zero(tensors)

    monkeypatch.setattr(torch, "_foreach_zero_", recording_zero)
    slots = [t.data_ptr() for t in rg._slots]

    def capture(none):
        zeroed.clear()
        set_grads(params, gen, none=none)
        rg.capture_(params)
        for i in none:  # every absent slot holds zeros, however it got them
            assert not rg._slots[i].any() and rg._slots[i].signbit().logical_not().all()
        return sorted(p for call in zeroed for p in call)

    assert capture(none=(1, 3)) == sorted([slots[1], slots[3]])
    assert capture(none=(1, 3)) == []  # still zeros, not written since
    assert capture(none=(1,)) == []
    assert capture(none=(1, 3)) == [slots[3]]  # slot 3 held a gradient in between
    if not mixed:
        rg.flat.add_(1.0)  # a write into the buffer: every absent slot is stale
        assert capture(none=(1, 3)) == sorted([slots[1], slots[3]])
        rg.flat[:1].mul_(-0.0)  # even a write that cannot be seen in the values
        assert capture(none=(1, 3)) == sorted([slots[1], slots[3]])
    else:
        rg._slots[1].fill_(7.0)
        assert capture(none=(1, 3)) == [slots[1]]
