"""Benchmark workloads: real models' parameter shape lists, and random gradient sets.

The shape lists are written out as code (no torchvision / transformers needed at run
time); tests/test_workloads.py checks ResNet-18 and ViT-B/16 against torchvision's
models built on the meta device. Order is the models' `named_parameters()` order,
which is the order Avalanche concatenates gradients in.

    shapes("resnet18")            -> [(64, 3, 7, 7), (64,), (64,), ...]
    make_grads(shapes("gpt2"), torch.bfloat16, "cuda", project=True)

Workloads
- resnet18:  torchvision.models.resnet18() (1000 classes): 62 tensors, 11,689,512 params.
- vit_b_16:  torchvision.models.vit_b_16() (1000 classes): 152 tensors, 86,567,656 params.
- gpt2:      GPT-2 small (HF GPT2LMHeadModel, n_embd 768, 12 layers, vocab 50257,
             1024 positions); the LM head is tied to wte and counted once:
             148 tensors, 124,439,808 params.
- llama_1b:  a Llama-3.2-1B-style config (vocab 128256, hidden 2048, 16 layers,
             intermediate 8192, 32 heads, 8 kv heads, head_dim 64, RMSNorm without
             bias, tied embeddings counted once): 146 tensors, 1,235,814,400 params.
- tiny5000:  5,000 tensors of 100 elements (500,000 params): per-tensor overhead.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch

Shape = Tuple[int, ...]


def _resnet18(num_classes: int = 1000) -> List[Shape]:
    out: List[Shape] = [(64, 3, 7, 7), (64,), (64,)]  # conv1, bn1.weight, bn1.bias
    in_ch = 64
    for width, first_stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):  # BasicBlock x 2 per layer
            stride = first_stride if block == 0 else 1
            out += [(width, in_ch, 3, 3), (width,), (width,)]  # conv1, bn1
            out += [(width, width, 3, 3), (width,), (width,)]  # conv2, bn2
            if block == 0 and (stride != 1 or in_ch != width):
                out += [(width, in_ch, 1, 1), (width,), (width,)]  # downsample conv, bn
            in_ch = width
    out += [(num_classes, 512), (num_classes,)]  # fc
    return out


def _vit_b_16(num_classes: int = 1000) -> List[Shape]:
    d, mlp, layers, patch, seq = 768, 3072, 12, 16, (224 // 16) ** 2 + 1
    out: List[Shape] = [(1, 1, d), (d, 3, patch, patch), (d,), (1, seq, d)]
    for _ in range(layers):
        out += [(d,), (d,)]  # ln_1
        out += [(3 * d, d), (3 * d,), (d, d), (d,)]  # self_attention in_proj, out_proj
        out += [(d,), (d,)]  # ln_2
        out += [(mlp, d), (mlp,), (d, mlp), (d,)]  # mlp.0, mlp.3
    out += [(d,), (d,), (num_classes, d), (num_classes,)]  # encoder.ln, heads.head
    return out


def _gpt2_small() -> List[Shape]:
    d, layers, vocab, positions = 768, 12, 50257, 1024
    out: List[Shape] = [(vocab, d), (positions, d)]  # wte (tied with lm_head), wpe
    for _ in range(layers):
        out += [(d,), (d,)]  # ln_1
        out += [(d, 3 * d), (3 * d,), (d, d), (d,)]  # attn.c_attn, attn.c_proj (Conv1D)
        out += [(d,), (d,)]  # ln_2
        out += [(d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # mlp.c_fc, mlp.c_proj (Conv1D)
    out += [(d,), (d,)]  # ln_f
    return out


def _llama_1b() -> List[Shape]:
    vocab, d, layers, inter, heads, kv_heads = 128256, 2048, 16, 8192, 32, 8
    kv = kv_heads * (d // heads)
    out: List[Shape] = [(vocab, d)]  # embed_tokens (tied with lm_head)
    for _ in range(layers):
        out += [(d, d), (kv, d), (kv, d), (d, d)]  # q, k, v, o projections
        out += [(inter, d), (inter, d), (d, inter)]  # gate, up, down
        out += [(d,), (d,)]  # input_layernorm, post_attention_layernorm
    out += [(d,)]  # final norm
    return out


def _tiny5000() -> List[Shape]:
    return [(100,)] * 5000


_BUILDERS: Dict[str, Callable[[], List[Shape]]] = {
    "resnet18": _resnet18,
    "vit_b_16": _vit_b_16,
    "gpt2": _gpt2_small,
    "llama_1b": _llama_1b,
    "tiny5000": _tiny5000,
}

WORKLOADS: Tuple[str, ...] = tuple(_BUILDERS)


def shapes(name: str) -> List[Shape]:
    """Parameter shapes of workload `name`, in `named_parameters()` order."""
    try:
        return list(_BUILDERS[name]())
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}") from None


def numel(shape_list: Sequence[Shape]) -> int:
    """Total number of elements of a shape list."""
    total = 0
    for s in shape_list:
        n = 1
        for d in s:
            n *= d
        total += n
    return total


def _numel(shape: Shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@torch.no_grad()
def make_grads(
    shape_list: Sequence[Shape],
    dtype: torch.dtype = torch.float32,
    device="cpu",
    *,
    project: bool = True,
    seed: int = 0,
):
    """Random gradients and reference gradients for `shape_list`.

    Returns `(params, refs)`:
    - `params`: one tensor per shape whose `.grad` is a separately allocated, contiguous
      random gradient. The parameter itself takes no memory (a broadcast view of one
      element), so only gradients and references count.
    - `refs`: per-parameter reference gradients, contiguous views into ONE flat buffer
      in Avalanche's layout (`flat_buffer(refs)` returns it without a copy).

    The values are random normal (never zeros). With `project=True` the global dot
    <g, r> is negative, with `project=False` positive, by a margin that holds after
    rounding to `dtype` and under any summation order: g = n + c r with c = -0.5 or
    +0.5 and n independent noise, so <g,r> ~ c |r|^2 +- |r|; |<g,r>| >= 0.1 |r|^2 is
    checked (fp32 per-tensor dots summed in fp64) and, for very small shape lists, the
    seed is advanced until it holds.
    """
    device = torch.device(device)
    shape_list = [tuple(int(d) for d in s) for s in shape_list]
    total = numel(shape_list)
    sign = -1.0 if project else 1.0
    for attempt in range(64):
        gen = torch.Generator(device=device)
        gen.manual_seed(seed * 1000003 + attempt)
        flat_ref = torch.randn(total, generator=gen, dtype=torch.float32, device=device).to(dtype)
        refs, grads, offset = [], [], 0
        dot = torch.zeros((), dtype=torch.float64, device=device)
        rr = torch.zeros((), dtype=torch.float64, device=device)
        for s in shape_list:
            n = _numel(s)
            r = flat_ref.narrow(0, offset, n).view(s)
            offset += n
            g = torch.randn(s, generator=gen, dtype=torch.float32, device=device)
            g.add_(r.float(), alpha=0.5 * sign)
            g = g.to(dtype)
            if n:  # fp32 dots (no fp64 copies of 1B-element tensors); the margin is wide
                gf, rf = g.reshape(-1).float(), r.reshape(-1).float()
                dot += torch.dot(gf, rf).double()
                rr += torch.dot(rf, rf).double()
            refs.append(r)
            grads.append(g)
        dot_v, rr_v = float(dot), float(rr)
        # |dot| must dominate its own rounding noise by a wide margin: >= 0.1 |r|^2.
        if rr_v > 0 and sign * dot_v > 0.1 * rr_v:
            break
    else:  # pragma: no cover - only for degenerate shape lists (e.g. all empty)
        raise ValueError(f"could not draw gradients with dot {'<' if project else '>'} 0 for these shapes")
    params = []
    anchor = torch.empty(1, dtype=dtype, device=device)
    for s, g in zip(shape_list, grads):
        p = anchor.expand(s) if len(s) else anchor.view(())
        p.grad = g
        params.append(p)
    return params, refs


@torch.no_grad()
def pack_grads(params) -> torch.Tensor:
    """Moves every `p.grad` into a view of one new flat buffer (parameter order, values
    kept) and returns the buffer: the benchmarks run their flat floor on it, so that
    the floor and the implementations read and write the same memory."""
    grads = [p.grad for p in params]
    flat = torch.empty(sum(g.numel() for g in grads), dtype=grads[0].dtype, device=grads[0].device)
    offset = 0
    for p, g in zip(params, grads):
        view = flat.narrow(0, offset, g.numel()).view(g.shape)
        view.copy_(g)
        p.grad = view
        offset += g.numel()
    return flat


def flat_buffer(refs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The 1-D Avalanche-layout buffer behind `refs` from `make_grads` (no copy).

    Falls back to a concatenation when `refs` are not consecutive views of one buffer.
    """
    if refs:
        base = refs[0]._base if refs[0]._base is not None else refs[0]
        if base.dim() == 1 and base.numel() == sum(r.numel() for r in refs):
            offset, ok = refs[0].storage_offset(), True
            for r in refs:
                if (
                    r.untyped_storage().data_ptr() != base.untyped_storage().data_ptr()
                    or r.storage_offset() != offset
                    or not r.is_contiguous()
                ):
                    ok = False
                    break
                offset += r.numel()
            if ok and base.storage_offset() == refs[0].storage_offset():
                return base
    if not refs:
        return torch.empty(0)
    return torch.cat([r.reshape(-1) for r in refs])
