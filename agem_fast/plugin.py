"""`AGEMPlugin`: a drop-in replacement for Avalanche's A-GEM plugin.

Same constructor, hooks, attributes and algorithm as
`avalanche.training.plugins.AGEMPlugin`, with the projection done by
`agem_fast.project_` against a `ReferenceGradient` allocated once, and (by default)
the episodic memory held as tensors on the strategy's device, so drawing a
reference batch is a few slices instead of a DataLoader step.

Works with Avalanche strategies (it subclasses Avalanche's `SupervisedPlugin` when
Avalanche is importable) and with any object that offers `model`, `optimizer`,
`device`, `_criterion` and, for `after_training_exp`, `experience.dataset`.
"""

from __future__ import annotations

import random
import warnings
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch.utils.data import Dataset

from ._api import project_
from ._reference import ReferenceGradient

try:  # Avalanche is optional: subclass its plugin base when it is there.
    from avalanche.core import SupervisedPlugin as _PluginBase

    HAS_AVALANCHE = True
except ImportError:
    HAS_AVALANCHE = False

    # The callbacks of Avalanche's SupervisedPlugin (BasePlugin + BaseSGDPlugin).
    _CALLBACKS = (
        "before_training",
        "before_training_exp",
        "after_training_exp",
        "after_training",
        "before_eval",
        "before_eval_exp",
        "after_eval_exp",
        "after_eval",
        "before_training_epoch",
        "before_training_iteration",
        "before_forward",
        "after_forward",
        "before_backward",
        "after_backward",
        "after_training_iteration",
        "before_update",
        "after_update",
        "after_training_epoch",
        "before_eval_iteration",
        "before_eval_forward",
        "after_eval_forward",
        "after_eval_iteration",
        "before_train_dataset_adaptation",
        "after_train_dataset_adaptation",
        "before_eval_dataset_adaptation",
        "after_eval_dataset_adaptation",
    )

    def _noop(self, strategy, *args, **kwargs):
        return None

    class _PluginBase:  # type: ignore[no-redef]
        """Stand-in for Avalanche's SupervisedPlugin: every callback is a no-op."""

        supports_distributed: bool = False

        def __init__(self):
            super().__init__()

    for _name in _CALLBACKS:
        setattr(_PluginBase, _name, _noop)
    del _name


MEMORY_MODES = ("tensor", "dataset")

_STATE_VERSION = 1


class TensorMemory(Dataset):
    """One experience's memory as collated tensors (memory="tensor").

    `fields[j]` is the j-th element of the collated batch (patterns, targets, ...,
    task labels last), first dimension = pattern: a tensor, or a list for a field the
    collate function leaves as a Python sequence (file names, say). Indexing gives a
    tuple like an Avalanche classification dataset item (without transforms: they were
    applied once when the memory was filled).
    """

    def __init__(self, fields: Sequence[Any]):
        self.fields: List[Any] = list(fields)

    def __len__(self) -> int:
        return len(self.fields[0]) if self.fields else 0

    def __getitem__(self, index):
        return tuple(f[index] for f in self.fields)

    def to(self, device) -> "TensorMemory":
        self.fields = [f.to(device) if isinstance(f, torch.Tensor) else f for f in self.fields]
        return self

    @property
    def device(self) -> Optional[torch.device]:
        return next((f.device for f in self.fields if isinstance(f, torch.Tensor)), None)

    def __repr__(self) -> str:
        shapes = ", ".join(
            f"{tuple(f.shape)}:{f.dtype}" if isinstance(f, torch.Tensor) else f"{type(f).__name__}[{len(f)}]"
            for f in self.fields
        )
        return f"TensorMemory({shapes})"


def _concat(parts: List[Any]):
    """Slices of one memory field, joined along the pattern dimension."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return type(parts[0])(x for part in parts for x in part)  # a list or a tuple, as collated


def _kinds(fields: Sequence[Any]) -> str:
    return ", ".join("tensor" if isinstance(f, torch.Tensor) else "list" for f in fields)


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype}"


def _split_if_mixed_dtypes(params: List[torch.Tensor], flat: torch.Tensor):
    """An assigned flat reference as `project_` takes it: whole when it has every
    gradient's dtype; else (Avalanche's flat tensor of a mixed-dtype model has the
    promoted dtype) one slice per parameter in its gradient's dtype."""
    if all(p.grad is None or p.grad.dtype == flat.dtype for p in params):
        return flat
    if flat.dim() != 1 or flat.numel() != sum(p.numel() for p in params):
        return flat  # project_ says what is wrong with it
    parts, offset = [], 0
    for p in params:
        part = flat[offset : offset + p.numel()].view(p.shape)
        parts.append(part if p.grad is None else part.to(p.grad.dtype))
        offset += p.numel()
    return parts


def _first_batch_dependent_row(fields: List[Any], alone: List[Any]):
    """(pattern k, element j, what k collated alone gave) for the first tensor row of
    the whole batch `fields` that differs from `alone[k]`, pattern k collated alone;
    None if every row matches."""
    for j, f in enumerate(fields):
        if not isinstance(f, torch.Tensor):
            continue  # passed along, never read
        rows = [a[j] if isinstance(a, (list, tuple)) and len(a) > j else None for a in alone]
        row_shape = (1,) + tuple(f.shape[1:])
        if all(isinstance(r, torch.Tensor) and tuple(r.shape) == row_shape for r in rows):
            if _same_bits(torch.cat(rows), f):  # one comparison for the whole field
                continue
        for k, r in enumerate(rows):
            if not isinstance(r, torch.Tensor) or not _same_bits(r, f[k : k + 1]):
                what = _describe(r) if isinstance(r, torch.Tensor) else type(r).__name__
                return k, j, what
    return None


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes, dtypes and bits (NaNs included, unlike torch.equal)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8),
                       b.reshape(-1).contiguous().view(torch.uint8))


def _default_collate(batch):
    from torch.utils.data import default_collate

    return default_collate(batch)


_MULTI_TASK_TYPES: Optional[tuple] = None


def _is_multi_task_module(model) -> bool:
    """Avalanche's `is_multi_task_module`, without importing Avalanche's models eagerly."""
    global _MULTI_TASK_TYPES
    if not HAS_AVALANCHE:
        return False
    if _MULTI_TASK_TYPES is None:
        try:
            from avalanche.models import MultiTaskModule

            _MULTI_TASK_TYPES = (MultiTaskModule,)
        except ImportError:  # pragma: no cover - broken Avalanche install
            _MULTI_TASK_TYPES = ()
    if not _MULTI_TASK_TYPES:
        return False
    if isinstance(model, _MULTI_TASK_TYPES):
        return True
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel) and isinstance(model.module, _MULTI_TASK_TYPES)


def _indexed(device) -> torch.device:
    """`device` with its index: tensors report cuda:0, strategies often say cuda, and the
    two compare unequal (the memory would be moved, to where it already is, every step)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _forward(model, x, task_labels):
    """`avalanche_forward`: multi-task modules get the task labels, others only x."""
    if _is_multi_task_module(model):
        return model(x, task_labels)
    return model(x)


class AGEMPlugin(_PluginBase):
    """Average Gradient Episodic Memory (A-GEM), Avalanche-compatible and fast.

    A drop-in replacement for `avalanche.training.plugins.AGEMPlugin`. Before each
    training iteration it computes the reference gradient of the loss on a batch
    drawn from an episodic memory of past experiences (model in train mode, the
    strategy's bare `_criterion`); after the backward pass it projects the current
    gradient with `agem_fast.project_`: when `<g, g_ref> < 0`,
    `g <- g - <g, g_ref> / <g_ref, g_ref> * g_ref`, globally over all parameters.

    Memory: after each experience, `patterns_per_experience` patterns of it are kept,
    chosen as Avalanche does (`random.shuffle` of the indices, first
    `patterns_per_experience` kept; the whole experience if it is smaller), so the
    same Python `random` seed selects the same patterns.

    Sampling: with `n` experiences in memory, each reference batch takes
    `sample_size // n` consecutive patterns from every experience (experience order),
    walking through each experience's memory in a fixed order and starting again
    from its first pattern after its last (possibly shorter) chunk, exactly as
    Avalanche's `GroupBalancedInfiniteDataLoader` does. Every new experience restarts
    all walks from the first pattern. With deterministic transforms the reference
    batches are identical to Avalanche's.

    Rule for too many experiences: every reference batch takes at least one pattern
    from every experience, so it needs `sample_size` >= the number of experiences in
    memory. As in Avalanche, any number of experiences can be stored; where Avalanche's
    loader then crashes (the first reference batch drawn from more experiences than
    `sample_size`), `sample_from_memory` raises a `ValueError` saying so, before
    anything is changed.

    :param patterns_per_experience: number of patterns per experience in memory.
    :param sample_size: number of patterns of a reference batch (split evenly over
        the experiences; the remainder of the division is not used, as in Avalanche).
    :param memory: "tensor" (default): the memory is collated once into tensors on
        the strategy's device and sampling is slicing, no DataLoader; transforms are
        applied once, when the memory is filled, so a random transform is drawn once
        per stored pattern (a warning says so when the transforms drew from torch's
        RNG). The dataset's collate function must return a sequence with one row per
        pattern in every element (a tensor, or a list such as file names) and treat
        every pattern alone, as stacking does (true for Avalanche's classification
        datasets); a collate function that makes a pattern's row depend on the rest of
        its batch (padding to the longest, say) is refused with a `TypeError`, before
        anything is changed. "dataset": the memory is kept as dataset subsets and every
        reference batch is fetched item by item and collated, so transforms run at
        every access, as Avalanche.

    Attributes (as Avalanche's): `buffers` (one dataset per experience: a subset of
    the experience's dataset with memory="dataset", a `TensorMemory` with
    memory="tensor"; a dataset appended by hand joins the walk at the next
    `update_memory`, as with Avalanche's loader, and is then stored as tensors with
    memory="tensor"), `reference_gradients` (the last reference gradient in
    Avalanche's flat layout, zeros where a parameter had no gradient; assignable, as
    in Avalanche: `after_backward` then projects against the assigned flat tensor until
    the next reference pass). Also `reference_gradient`, the underlying
    `agem_fast.ReferenceGradient`. Avalanche's `buffer_dataloader` and
    `buffer_dliter` do not exist: no DataLoader is used.

    Random numbers: the memory subset uses Python's `random` exactly as Avalanche
    does. Avalanche's memory loader draws one seed from the global torch RNG at the
    first reference batch after each experience; this plugin does not, and draws from
    torch's RNG only through the dataset's transforms (with memory="tensor", once per
    stored pattern when the memory is filled), so a seeded run with it shuffles later
    training batches differently from the same run with Avalanche's plugin.

    Checkpointing: `state_dict()` / `load_state_dict()` save and restore the memory
    and each experience's sampling position; pickling the plugin (or an Avalanche
    strategy holding it) keeps the same state. With memory="tensor" the state dict
    leaves out the collate function (so that it stays plain data): after
    `load_state_dict`, later experiences are collated with their own dataset's
    collate function, which is the first experience's unless they differ.
    """

    def __init__(self, patterns_per_experience: int, sample_size: int, *, memory: str = "tensor"):
        super().__init__()
        self.patterns_per_experience = int(patterns_per_experience)
        self.sample_size = int(sample_size)
        if self.patterns_per_experience < 1:
            raise ValueError(
                f"patterns_per_experience must be >= 1, got {patterns_per_experience!r}"
            )
        if self.sample_size < 1:
            raise ValueError(f"sample_size must be >= 1, got {sample_size!r}")
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
        self.memory = memory

        self.buffers: List[Any] = []
        self._cursors: List[int] = []  # next pattern of each experience's walk
        self._collate_fn = None  # the first buffer's collate function (as Avalanche)
        self._device: Optional[torch.device] = None
        self._warned_random_transforms = False
        self._init_transient()

    # ------------------------------------------------------------------ state
    def _init_transient(self) -> None:
        self._reference: Optional[ReferenceGradient] = None
        self._reference_params: List[torch.Tensor] = []
        self._reference_keys: List[tuple] = []  # (shape, strides, dtype, device) per parameter
        self._numels: List[int] = []
        self._reference_ready = False
        self._assigned_reference: Optional[torch.Tensor] = None  # reference_gradients = ...

    @property
    def reference_gradient(self) -> Optional[ReferenceGradient]:
        """The `ReferenceGradient` of the last reference pass (None before the first)."""
        return self._reference if self._reference_ready else None

    @property
    def reference_gradients(self) -> torch.Tensor:
        """Last reference gradient in Avalanche's flat layout.

        Parameters that had no gradient contribute zeros, as in Avalanche. An empty
        tensor before the first reference pass. When the parameters share dtype,
        device and a row-major layout this is a view of the internal buffer,
        overwritten by the next reference pass (clone it to keep it); otherwise a
        fresh concatenation.
        """
        if self._assigned_reference is not None:
            return self._assigned_reference
        ref = self.reference_gradient
        if ref is None:
            return torch.empty(0)
        if ref.flat is not None:  # absent slots are zeroed by capture_: Avalanche's layout
            return ref.flat
        parts = ref.as_list()
        device = next((p.device for p in parts if p is not None), self._device)
        return torch.cat(
            [
                p.reshape(-1) if p is not None else torch.zeros(n, device=device)
                for p, n in zip(parts, self._numels)
            ]
        )

    @reference_gradients.setter
    def reference_gradients(self, value: torch.Tensor) -> None:
        """Assignable, as in Avalanche: a 1-D tensor in Avalanche's flat layout that
        `after_backward` projects against until the next reference pass replaces it."""
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"reference_gradients must be a tensor, got {type(value).__name__}")
        self._assigned_reference = value

    @property
    def buffer_dataloader(self):
        raise AttributeError(
            "agem_fast.AGEMPlugin has no buffer_dataloader: its memory is sampled without "
            "a DataLoader (sample_from_memory() gives the next reference batch)"
        )

    @property
    def buffer_dliter(self):
        raise AttributeError(
            "agem_fast.AGEMPlugin has no buffer_dliter: its memory is sampled without "
            "a DataLoader (sample_from_memory() gives the next reference batch)"
        )

    def state_dict(self) -> Dict[str, Any]:
        """Memory and sampling position, to resume a checkpointed run.

        With memory="tensor" the memory is plain tensors (and the lists the collate
        function left as they were, file names say); with memory="dataset" it is the
        dataset subsets themselves (load with `torch.load(..., weights_only=False)`).
        """
        if self.memory == "tensor":
            for k, b in enumerate(self.buffers):
                if not isinstance(b, TensorMemory):
                    raise TypeError(
                        f"AGEMPlugin.state_dict: buffers[{k}] is a {type(b).__name__}, put in by hand; "
                        "with memory='tensor' it is stored as tensors at the next update_memory")
            buffers = [list(b.fields) for b in self.buffers]
        else:
            buffers = list(self.buffers)
        return {
            "version": _STATE_VERSION,
            "patterns_per_experience": self.patterns_per_experience,
            "sample_size": self.sample_size,
            "memory": self.memory,
            "buffers": buffers,
            "cursors": list(self._cursors),
            # memory="tensor" keeps the state plain tensors (torch.load weights_only=True)
            "collate_fn": self._collate_fn if self.memory == "dataset" else None,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what `state_dict()` returned (same constructor arguments required)."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError("not an agem_fast.AGEMPlugin state_dict (missing or unknown 'version')")
        for key in ("patterns_per_experience", "sample_size", "memory"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"state_dict has {key}={state[key]!r} but this plugin was built with "
                    f"{key}={getattr(self, key)!r}"
                )
        buffers, cursors = list(state["buffers"]), [int(c) for c in state["cursors"]]
        if len(buffers) != len(cursors):
            raise ValueError("state_dict 'buffers' and 'cursors' differ in length")
        if self.memory == "tensor":
            buffers = [TensorMemory(fields) for fields in buffers]
        self.buffers = buffers
        self._cursors = cursors
        self._collate_fn = state.get("collate_fn")
        self._init_transient()

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in ("_reference", "_reference_params", "_reference_keys", "_numels",
                    "_reference_ready", "_assigned_reference"):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_transient()

    # ------------------------------------------------------------------ hooks
    def before_training_iteration(self, strategy, **kwargs):
        """Compute the reference gradient on a memory batch."""
        self._reference_ready = False
        self._assigned_reference = None
        if len(self.buffers) == 0:
            return
        model = strategy.model
        device = getattr(strategy, "device", None)
        if device is None:
            device = next(model.parameters()).device
        device = _indexed(device)
        self._to_device(device)
        mb = self.sample_from_memory()  # first: a call that raises has changed nothing
        model.train()
        strategy.optimizer.zero_grad()
        if mb is None:  # every stored experience is empty: nothing to refer to
            return
        xref, yref, tid = mb[0], mb[1], mb[-1]
        xref, yref = xref.to(device), yref.to(device)
        if isinstance(tid, torch.Tensor):
            tid = tid.to(device)
        out = _forward(model, xref, tid)
        loss = strategy._criterion(out, yref)
        loss.backward()
        params = list(model.parameters())
        self._reference_for(params).capture_(params)
        self._reference_ready = True
        strategy.optimizer.zero_grad()

    @torch.no_grad()
    def after_backward(self, strategy, **kwargs):
        """Project the current gradient against the reference gradient."""
        params = list(strategy.model.parameters())
        ref = self._assigned_reference
        if ref is not None:
            ref = _split_if_mixed_dtypes(params, ref)
        elif self._reference_ready:
            ref = self._reference
        if len(self.buffers) > 0 and ref is not None:
            project_(params, ref)

    def after_training_exp(self, strategy, **kwargs):
        """Add patterns of the experience just trained on to the memory."""
        if getattr(strategy, "device", None) is not None:
            self._device = _indexed(strategy.device)
        self.update_memory(strategy.experience.dataset, **kwargs)

    # ------------------------------------------------------------------ memory
    def sample_from_memory(self):
        """Next reference batch: the collated batch (patterns, targets, ..., task labels).

        memory="tensor": tensors on the memory's device. memory="dataset": the
        dataset's collate output (CPU tensors, as Avalanche's loader gives).
        None when the memory is empty (or every stored experience is).
        """
        # As Avalanche's memory loader, made by update_memory: it walks the buffers there
        # were then (one appended to `buffers` by hand joins at the next update_memory).
        walked = self.buffers[: len(self._cursors)]
        if not walked:
            return None
        per_exp = self.sample_size // len(walked)
        if per_exp < 1:
            raise ValueError(
                f"AGEMPlugin: {len(walked)} experiences in memory but sample_size="
                f"{self.sample_size}: a reference batch takes sample_size // n_experiences "
                f"patterns from every experience, which is 0 (Avalanche's memory loader "
                f"fails here too). Use a sample_size of at least the number of experiences."
            )
        ranges = []
        for k, buf in enumerate(walked):
            n = len(buf)
            if n == 0:
                continue
            start = self._cursors[k]
            stop = min(start + per_exp, n)
            self._cursors[k] = 0 if stop >= n else stop
            ranges.append((buf, start, stop))
        if not ranges:
            return None
        if self.memory == "tensor":
            n_fields = len(ranges[0][0].fields)
            return [
                _concat([buf.fields[j][start:stop] for buf, start, stop in ranges])
                for j in range(n_fields)
            ]
        items = [buf[i] for buf, start, stop in ranges for i in range(start, stop)]
        collate = self._collate_fn if self._collate_fn is not None else _default_collate
        return collate(items)

    @torch.no_grad()
    def update_memory(self, dataset, num_workers=0, **kwargs):
        """Store `patterns_per_experience` random patterns of `dataset` in memory.

        `num_workers` is accepted for compatibility and ignored (no DataLoader). A call
        that raises changes nothing (Python's `random` state included).
        """
        rng_state, torch_rng_state = random.getstate(), torch.get_rng_state()
        try:
            n = len(dataset)
            indices: Optional[List[int]] = None
            if n - self.patterns_per_experience > 0:
                indices = list(range(n))
                random.shuffle(indices)
                indices = indices[: self.patterns_per_experience]

            if self.memory == "dataset":
                if indices is None:
                    buffer = dataset
                elif hasattr(dataset, "subset"):
                    buffer = dataset.subset(indices)
                else:
                    buffer = torch.utils.data.Subset(dataset, indices)
                if not self.buffers:
                    self._collate_fn = getattr(buffer, "collate_fn", None) or getattr(
                        dataset, "collate_fn", None
                    )
            else:
                # A dataset put in `buffers` by hand (as Avalanche's allow) is stored as
                # tensors too, whole, as the walk would take it.
                earlier: List[TensorMemory] = []
                for b in self.buffers:
                    earlier.append(b if isinstance(b, TensorMemory) else self._materialise(b, None, earlier))
                buffer = self._materialise(dataset, indices, earlier)
        except BaseException:
            random.setstate(rng_state)
            torch.set_rng_state(torch_rng_state)  # drawn by random transforms
            raise

        if self.memory == "tensor":
            self.buffers = earlier
        self.buffers.append(buffer)
        self._cursors = [0] * len(self.buffers)  # a new loader restarts every walk

    def _materialise(self, dataset, indices: Optional[List[int]],
                     earlier_buffers: List[TensorMemory]) -> TensorMemory:
        """The patterns of `dataset` at `indices` (all if None), collated once, to follow
        `earlier_buffers`. Sets the collate function (Avalanche collates every reference
        batch with the first buffer's) only when it succeeds."""
        collate_fn = self._collate_fn
        if not earlier_buffers or collate_fn is None:
            collate_fn = getattr(dataset, "collate_fn", None)
        collate = collate_fn or _default_collate
        idx = range(len(dataset)) if indices is None else indices
        torch_rng = torch.get_rng_state()
        items = [dataset[i] for i in idx]
        random_transforms = not torch.equal(torch_rng, torch.get_rng_state())
        device = self._device if self._device is not None else torch.device("cpu")
        earlier = next((b.fields for b in earlier_buffers if len(b) > 0), None)
        if not items:
            self._collate_fn = collate_fn
            return TensorMemory([f[:0] for f in earlier] if earlier else [])
        batch = collate(items)
        if isinstance(batch, torch.Tensor) or not isinstance(batch, (list, tuple)):
            raise TypeError(
                "memory='tensor' needs the dataset's collate function to return a sequence "
                f"(patterns, targets, ..., task labels); got {type(batch).__name__}. "
                "Use memory='dataset'."
            )
        n = len(items)
        fields = []
        for j, f in enumerate(batch):
            if isinstance(f, torch.Tensor) and f.dim() > 0 and f.shape[0] == n:
                fields.append(f)
            elif isinstance(f, (list, tuple)) and len(f) == n and j not in (0, 1):
                fields.append(f)  # passed along, never read by the reference pass
            else:
                what = "patterns" if j == 0 else "targets" if j == 1 else f"element {j}"
                raise TypeError(
                    f"memory='tensor': {what} of the collated batch must be a tensor with "
                    f"one row per pattern ({n}){' or a list of one entry per pattern' if j > 1 else ''}; "
                    f"got {type(f).__name__}. Use memory='dataset'."
                )
        if earlier is not None and [isinstance(f, torch.Tensor) for f in fields] != [
            isinstance(f, torch.Tensor) for f in earlier
        ]:
            raise TypeError(
                f"memory='tensor': this experience's batches have {len(fields)} elements "
                f"({_kinds(fields)}), earlier ones {len(earlier)} ({_kinds(earlier)})"
            )
        # A reference batch is a slice of this one, so each pattern's row must not depend
        # on the rest of the batch (as it does with padding to the longest pattern).
        mismatch = _first_batch_dependent_row(fields, [collate([item]) for item in items])
        if mismatch is not None:
            k, j, alone = mismatch
            raise TypeError(
                f"memory='tensor': the collate function makes pattern {k}'s row of element "
                f"{j} depend on the rest of its batch (collated alone it is {alone}, in the "
                f"experience's batch {_describe(fields[j][k : k + 1])}; padding to the "
                f"longest pattern, say), so slices of one batch are not the batches "
                f"Avalanche would collate. Use memory='dataset'."
            )
        if random_transforms and not self._warned_random_transforms:
            self._warned_random_transforms = True
            warnings.warn(
                "AGEMPlugin(memory='tensor'): the dataset's transforms drew random numbers "
                "while the memory was filled, so each stored pattern keeps the one random "
                "transform it got then (Avalanche's plugin draws a new one at every "
                "access). Pass memory='dataset' for that.",
                stacklevel=3,
            )
        self._collate_fn = collate_fn
        return TensorMemory([f.to(device) if isinstance(f, torch.Tensor) else f for f in fields])

    def _to_device(self, device: torch.device) -> None:
        self._device = device
        if self.memory != "tensor":
            return
        for buf in self.buffers:
            if not isinstance(buf, TensorMemory):
                continue  # put in by hand: stored as tensors at the next update_memory
            d = buf.device
            if d is not None and d != device:
                buf.to(device)

    def _reference_for(self, params: List[torch.Tensor]) -> ReferenceGradient:
        """The ReferenceGradient for these parameters, allocated once per parameter set.

        Reallocated only when the parameters change (a new head, a resized tensor, a
        model moved to another dtype, device or memory format).
        """
        same = (
            self._reference is not None
            and len(params) == len(self._reference_params)
            and all(
                p is q and (p.shape, p.stride(), p.dtype, p.device) == k
                for p, q, k in zip(params, self._reference_params, self._reference_keys)
            )
        )
        if not same:
            self._reference = ReferenceGradient(params)
            self._reference_params = list(params)
            self._reference_keys = [(p.shape, p.stride(), p.dtype, p.device) for p in params]
            self._numels = [p.numel() for p in params]
        return self._reference


__all__ = ["AGEMPlugin", "TensorMemory", "HAS_AVALANCHE"]
