"""Activation statistics recorded by forward hooks, as in fastai/miniai's ``ActivationStats``.

For every watched module and every recorded training step we keep the mean and standard
deviation of its output, and miniai's 40-bin histogram of ``|output|`` over [0, 10]
(``torch.histc(x.abs(), 40, 0, 10)``: values above 10 are dropped). The "dead" share of a
module at a step is its lowest bin over the histogram's total (``dead_share``).

Usage (training loop or notebook)::

    with ActivationStats(model) as st:          # hooks live exactly as long as the block
        for xb in batches: ...                  # one recorded step per forward of `model`
    st.to_numpy()["mean"]                       # [steps, modules]
    st.save("stats.npz"); load_stats("stats.npz")

The statistics stay on the model's device in preallocated buffers and go to the host once per
chunk of steps, so recording never synchronises the host with the device per batch.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "HIST_BINS", "HIST_RANGE", "ActivationStats", "dead_share", "load_stats", "module_filter", "save_stats",
]

HIST_BINS = 40
HIST_RANGE = (0.0, 10.0)
# Bins per unit of |x|: with 0.25-wide bins, floor(|x| * 4) is the bin and every edge is exact in float.
_PER_UNIT = HIST_BINS / (HIST_RANGE[1] - HIST_RANGE[0])
# Raw histogram columns: 40 bins, then |x| == 10 exactly (histc's closed last edge, folded into bin 39
# on the host). Values above 10, inf and NaN are not counted (histc drops them).
_RAW_BINS = HIST_BINS + 1
# The float32 just below -40: b > _KEEP_ABOVE  <=>  b >= -40  <=>  |x| <= 10 for b = -4|x|.
_KEEP_ABOVE = float(torch.nextafter(torch.tensor(-4.0 * HIST_RANGE[1]), torch.tensor(-math.inf)))
DEFAULT_CHUNK = 256

ModuleFilter = Callable[[str, nn.Module], bool]
ModulesArg = str | ModuleFilter | Sequence[str]


# ---------------------------------------------------------------- module selection


def module_filter(kind: str) -> ModuleFilter:
    """The filter for "resnets", "attention" or "resnets+attention" (the spec's ``stats.modules``)."""
    # Imported here: runner.models pulls in diffusers, and the filters belong to the model owner.
    from runner.models import is_attention_block, is_residual_block

    filters: dict[str, ModuleFilter] = {
        "resnets": is_residual_block,
        "attention": is_attention_block,
        "resnets+attention": lambda n, m: is_residual_block(n, m) or is_attention_block(n, m),
    }
    if kind not in filters:
        raise ValueError(f"modules: unknown kind {kind!r}; expected one of {sorted(filters)}, "
                         "a filter(name, module) -> bool or a list of module names")
    return filters[kind]


def _select(model: nn.Module, modules: ModulesArg) -> list[tuple[str, nn.Module]]:
    """(name, module) pairs to watch, in the network's named_modules order (the root is never watched)."""
    named = [(n, m) for n, m in model.named_modules() if n]
    if isinstance(modules, str):
        keep = module_filter(modules)
        chosen = [(n, m) for n, m in named if keep(n, m)]
    elif callable(modules):
        chosen = [(n, m) for n, m in named if modules(n, m)]
    else:
        wanted = set(modules)
        known = [n for n, _ in named]
        unknown = [n for n in modules if n not in set(known)]
        if unknown:
            hints = {n: difflib.get_close_matches(n, known, n=5) for n in unknown}
            detail = "; ".join(f"{n!r} (close matches: {h or 'none'})" for n, h in hints.items())
            raise ValueError(f"modules: unknown module name(s) {detail}")
        chosen = [(n, m) for n, m in named if n in wanted]
    if not chosen:
        raise ValueError(f"modules: {modules!r} selects no module of this {type(model).__name__}")
    return chosen


def _first_tensor(out: Any) -> torch.Tensor | None:
    """A module's output tensor: itself, the first element of a tuple/list, the first value of a mapping."""
    if isinstance(out, Mapping):  # e.g. diffusers' BaseOutput
        out = next(iter(out.values()), None)
    elif isinstance(out, (tuple, list)):
        out = out[0] if out else None
    return out if isinstance(out, torch.Tensor) else None


# ---------------------------------------------------------------- recorder


class ActivationStats:
    """Record mean, std and |x| histogram of selected modules' outputs at every forward of `model`.

    `modules`: "resnets" (default, ``runner.models.is_residual_block``), "attention",
    "resnets+attention", a ``filter(name, module) -> bool``, or a list of module names.
    Hooks are registered on ``__enter__`` (or ``attach()``) and removed on ``__exit__`` (or
    ``remove()``), also when the block raises. Set ``recording = False`` to pause (validation).
    `chunk_size` steps are buffered on the device before one copy to the host.
    """

    def __init__(self, model: nn.Module, modules: ModulesArg = "resnets", chunk_size: int = DEFAULT_CHUNK):
        if chunk_size < 1:
            raise ValueError(f"chunk_size: expected a positive number of steps, got {chunk_size}")
        self.model = model
        self.chunk_size = chunk_size
        self.recording = True
        selected = _select(model, modules)
        self.names: list[str] = [n for n, _ in selected]
        self._modules = [m for _, m in selected]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.reset()

    # -- lifecycle

    def __enter__(self) -> ActivationStats:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def attach(self) -> ActivationStats:
        """Register the hooks (idempotent); ``remove()`` or leaving the ``with`` block takes them off."""
        if self._handles:
            return self
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._begin_step))
            # always_call: a forward that raises must still end the step, or later calls would write into it.
            self._handles.append(self.model.register_forward_hook(self._end_step, always_call=True))
            for j, mod in enumerate(self._modules):
                self._handles.append(mod.register_forward_hook(self._make_hook(j)))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Remove every hook this object registered; recorded statistics are kept."""
        while self._handles:
            self._handles.pop().remove()
        self._active = False

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def reset(self) -> None:
        """Forget everything recorded so far (hooks stay as they are)."""
        self._chunks: list[_HostChunk] = []
        self._buf: _DeviceBuffers | None = None
        self._row = 0  # next free row of the device chunk
        self._steps = 0
        self._cur = 0  # row of the step in progress
        self._active = False

    @property
    def steps(self) -> int:
        """Number of recorded steps (forwards of the root model while ``recording`` was True)."""
        return self._steps

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"ActivationStats({len(self.names)} modules, {self.steps} steps, {state})"

    # -- hooks
    # Hooks run eagerly under torch.compile (train.compile): compiled, their step counters would
    # become guards and force a recompile at every step; disabled, the model graph breaks around
    # each watched module and the statistics are computed by the same eager code as without it.

    @torch.compiler.disable
    def _begin_step(self, module: nn.Module, args: Any) -> None:
        if not self.recording:
            self._active = False
            return
        if self._buf is None:
            self._buf = _DeviceBuffers(self.chunk_size, len(self.names), _model_device(self.model))
        elif self._row == self.chunk_size:
            for done in self._chunks:
                done.settle()  # chunks whose copy has landed give their pinned memory back
            self._chunks.append(self._buf.flush(self._row))
            self._row = 0
        self._cur = self._row
        self._row += 1
        self._steps += 1
        self._active = True

    @torch.compiler.disable
    def _end_step(self, module: nn.Module, args: Any, out: Any) -> None:
        self._active = False

    def _make_hook(self, j: int) -> Callable[[nn.Module, Any, Any], None]:
        @torch.compiler.disable
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if self._active:
                x = _first_tensor(out)
                if x is not None:
                    assert self._buf is not None
                    self._buf.record(x, self._cur, j)

        return hook

    # -- results

    def to_numpy(self) -> dict[str, Any]:
        """mean and std [steps, modules] float32, hist [modules, 40, steps] int32 counts, names."""
        chunks = [c.numpy() for c in self._chunks]
        if self._buf is not None and self._row:
            chunks.append(self._buf.snapshot(self._row).numpy())
        m = len(self.names)
        if not chunks:
            return _as_dict(np.zeros((0, m), np.float32), np.zeros((0, m), np.float32),
                            np.zeros((0, m, HIST_BINS), np.int32), self.names)
        mean, std, hist = (np.concatenate(parts) for parts in zip(*chunks, strict=True))
        return _as_dict(mean, std, hist, self.names)

    def save(self, path: str | Path) -> Path:
        """Write the statistics to one compressed .npz file, atomically."""
        return save_stats(self.to_numpy(), path)

    # -- notebook conveniences (miniai's names)

    def plot_stats(self, figsize: tuple[float, float] = (10, 4)) -> Any:
        """Mean (left) and std (right) of every module against step; returns the matplotlib Figure."""
        import matplotlib.pyplot as plt

        d = self.to_numpy()
        fig, axs = plt.subplots(1, 2, figsize=figsize)
        for ax, key in zip(axs, ("mean", "std"), strict=True):
            ax.plot(d[key])
            ax.set_title(key)
            ax.set_xlabel("step")
        axs[0].legend(d["names"], fontsize="x-small")
        return fig

    def color_dim(self, figsize: tuple[float, float] = (11, 5)) -> Any:
        """The "colorful dimension": log(1 + histogram) of each module over steps."""
        import matplotlib.pyplot as plt

        hist = self.to_numpy()["hist"]
        cols = 4
        rows = max(1, -(-len(self.names) // cols))
        fig, axs = plt.subplots(rows, cols, figsize=(figsize[0], figsize[1] * rows / 2), squeeze=False)
        for ax, h, name in zip(axs.flat, hist, self.names, strict=False):
            ax.imshow(np.log1p(h), origin="lower", aspect="auto")
            ax.set_title(name, fontsize="small")
        for ax in axs.flat:
            ax.set_axis_off()
        return fig

    def dead_chart(self, figsize: tuple[float, float] = (10, 4)) -> Any:
        """Share of |activations| in the lowest bin ([0, 0.25)) of each module against step."""
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=figsize)
        ax.plot(dead_share(self.to_numpy()["hist"]).T)
        ax.set_ylim(0, 1)
        ax.set_xlabel("step")
        ax.legend(self.names, fontsize="x-small")
        return fig


# ---------------------------------------------------------------- device side


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _flat_view(x: torch.Tensor) -> torch.Tensor | None:
    """x's elements as a 1-D view in memory order, when they are dense (contiguous or permuted, e.g.
    channels_last, as the attention blocks leave them); None otherwise. Statistics ignore order."""
    if x.is_contiguous():
        return x.view(-1)
    dims = sorted(range(x.dim()), key=lambda d: x.stride(d), reverse=True)
    p = x.permute(dims)
    return p.view(-1) if p.is_contiguous() else None


def _prefer_bincount(device: torch.device) -> bool:
    """bincount on CPU (faster than histc there, see _hist_bincount); histc on other devices."""
    return device.type == "cpu"


class _DeviceBuffers:
    """Preallocated per-chunk buffers on the model's device, plus scratch space for the histogram."""

    def __init__(self, chunk: int, modules: int, device: torch.device):
        self.device = device
        self.mean = torch.full((chunk, modules), float("nan"), device=device)
        self.std = torch.full((chunk, modules), float("nan"), device=device)
        self.hist = torch.zeros((chunk, modules, _RAW_BINS), dtype=torch.int64, device=device)
        # Reused scratch (grown on demand): fresh allocations of MB-sized tensors cost page faults on CPU.
        self._f32 = torch.empty(0, device=device)
        self._i8 = torch.empty(0, dtype=torch.int8, device=device)
        # bincount's slot for bin k: the int8 value -k read as uint8 (see _hist_bincount).
        self._slots = torch.tensor([(256 - k) % 256 for k in range(_RAW_BINS)], device=device)
        self.use_bincount = _prefer_bincount(device)

    def _scratch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._f32.numel() < n:
            self._f32 = torch.empty(n, device=self.device)
        if self.use_bincount and self._i8.numel() < n:
            self._i8 = torch.empty(n, dtype=torch.int8, device=self.device)
        return self._f32[:n], self._i8[:n]

    @torch.no_grad()
    def record(self, out: torch.Tensor, row: int, j: int) -> None:
        x = out.detach()
        a, idx = self._scratch(x.numel())
        v = _flat_view(x) if x.dtype == torch.float32 else None
        if v is None:  # autocast output (bf16/fp16) or a strided view: statistics are always float32
            a.view(x.shape).copy_(x)
            v = a
        torch.mean(v, 0, out=self.mean[row, j])
        torch.std(v, 0, out=self.std[row, j])
        torch.abs(v, out=a)
        if self.use_bincount:
            self._hist_bincount(a, idx, row, j)
        else:
            self.hist[row, j, :HIST_BINS].copy_(torch.histc(a, HIST_BINS, *HIST_RANGE))

    def _hist_bincount(self, a: torch.Tensor, idx: torch.Tensor, row: int, j: int) -> None:
        """histc(|x|, 40, 0, 10) from a = |x|, by bincount of int8 bin numbers (a is overwritten).

        Measured on CPU (benchmarks/stats_overhead.py) this is several times faster than torch.histc,
        which interpolates every element in double. Not used on CUDA, where bincount reads its
        maximum back to the host (a sync per call) and histc is fast.
        """
        # b = -4|x|: bin k of histc is b in (-(k+1), -k], and int8 conversion truncates toward zero to -k.
        # On the negative side one threshold_ pass (b <= t -> value) keeps exactly |x| <= 10 (10 is
        # histc's closed last edge) and sends |x| > 10 and inf to -41; NaN passes threshold_, hence
        # nan_to_num_ (cheaper than a comparison mask + where, which would do both).
        drop = -float(_RAW_BINS)
        a.mul_(-_PER_UNIT)
        torch.threshold_(a, _KEEP_ABOVE, drop)
        a.nan_to_num_(nan=drop)
        idx.copy_(a)
        # int8 -k read as uint8 is 256 - k: bincount over 256 slots, then pick the slots of bins 0..40
        # (slot of bin 40 = |x| == 10 exactly, folded into bin 39 on the host; -41 is never picked).
        counts = torch.bincount(idx.view(torch.uint8), minlength=256)
        torch.index_select(counts, 0, self._slots, out=self.hist[row, j])

    def flush(self, rows: int) -> _HostChunk:
        """Start copying the first `rows` rows to the host and clear the buffers for the next chunk."""
        chunk = self.snapshot(rows)
        self.mean.fill_(float("nan"))  # a module that did not run in a step stays NaN, not stale
        self.std.fill_(float("nan"))
        self.hist.zero_()
        return chunk

    def snapshot(self, rows: int) -> _HostChunk:
        parts = (self.mean[:rows], self.std[:rows], self.hist[:rows])
        if self.device.type == "cuda":
            # Pinned memory + non_blocking: the copy overlaps training; the event says when it is done.
            host = tuple(torch.empty(p.shape, dtype=p.dtype, pin_memory=True) for p in parts)
            for h, p in zip(host, parts, strict=True):
                h.copy_(p, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return _HostChunk(host, event)
        return _HostChunk(tuple(p.to("cpu", copy=True) for p in parts), None)


class _HostChunk:
    """One chunk's statistics on the host (possibly still in flight from the device)."""

    def __init__(self, parts: tuple[torch.Tensor, ...], event: Any):
        self._parts = parts
        self._event = event
        self._np: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def settle(self) -> None:
        """Convert to numpy now if the copy has finished (never waits)."""
        if self._np is None and (self._event is None or self._event.query()):
            self.numpy()

    def numpy(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """mean, std [rows, M] float32 and hist [rows, M, 40] int32 (|x| == 10 folded into bin 39)."""
        if self._np is None:
            if self._event is not None:
                self._event.synchronize()
            mean, std, raw = (p.numpy() for p in self._parts)
            hist = raw[..., :HIST_BINS].astype(np.int32)
            hist[..., HIST_BINS - 1] += raw[..., HIST_BINS].astype(np.int32)
            self._np = (mean.copy(), std.copy(), hist)
            self._parts = ()  # release pinned memory
        return self._np


# ---------------------------------------------------------------- files and measures


def _as_dict(mean: np.ndarray, std: np.ndarray, hist_smb: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    return {
        "mean": np.asarray(mean, np.float32),
        "std": np.asarray(std, np.float32),
        # [steps, M, bins] -> [M, bins, steps]
        "hist": np.ascontiguousarray(np.transpose(hist_smb, (1, 2, 0))),
        "names": [str(n) for n in names],
    }


def save_stats(stats: Mapping[str, Any], path: str | Path) -> Path:
    """Write a ``to_numpy()``-style dict to a compressed .npz atomically (temp file, then os.replace)."""
    from runner.files import write_atomic

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would otherwise append ".npz" to the name
            np.savez_compressed(f, mean=stats["mean"], std=stats["std"], hist=stats["hist"],
                                names=np.array(list(stats["names"]), dtype=str))

    return write_atomic(Path(path), write)


def load_stats(path: str | Path) -> dict[str, Any]:
    """Read a file written by ``ActivationStats.save``: the same dict as ``to_numpy()``."""
    with np.load(Path(path), allow_pickle=False) as f:
        return {
            "mean": f["mean"],
            "std": f["std"],
            "hist": f["hist"],
            "names": [str(n) for n in f["names"]],
        }


def dead_share(hist: np.ndarray) -> np.ndarray:
    """Share of |activations| in the lowest bin, hist [modules, 40, steps] -> [modules, steps].

    miniai's ``get_min``: bin 0 over the histogram's total (values above 10 are not counted);
    NaN where a module recorded nothing at a step.
    """
    h = np.asarray(hist, dtype=np.float64)
    total = h.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, h[:, 0] / np.where(total > 0, total, 1), np.nan)
