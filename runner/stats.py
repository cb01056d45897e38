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

By diffusion timestep: hand the recorder each batch's t, normalised to [0, 1], before the forward
(``st.set_timesteps(t)``); every module's mean, std and dead share are then also split over
``timestep_buckets`` equal-width buckets of t (edges ``bucket_edges``). Each sample's mean, variance
and dead count are reduced on the device and scattered into its bucket (index_add), then pooled:
a bucket's mean and std (ddof 1) are those of all its samples' elements taken together, and its
dead share is the lowest histogram bin over the histogram total, as ``dead_share``. A bucket
without a sample at a step is NaN (count 0).
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

# The file format and its histogram constants live in the numpy-only runner.statsfile (the reporting
# side reads statistics without torch); re-exported here for the recorder's users.
from runner.statsfile import BUCKET_KEYS, HIST_BINS, HIST_RANGE, dead_share, load_stats, save_stats

__all__ = [
    "BUCKET_KEYS", "HIST_BINS", "HIST_RANGE", "TIMESTEP_BUCKETS", "ActivationStats", "dead_share",
    "load_stats", "module_filter", "save_stats",
]

# Bins per unit of |x|: with 0.25-wide bins, floor(|x| * 4) is the bin and every edge is exact in float.
_PER_UNIT = HIST_BINS / (HIST_RANGE[1] - HIST_RANGE[0])
# Raw histogram columns: 40 bins, then |x| == 10 exactly (histc's closed last edge, folded into bin 39
# on the host). Values above 10, inf and NaN are not counted (histc drops them).
_RAW_BINS = HIST_BINS + 1
# The float32 just below -40: b > _KEEP_ABOVE  <=>  b >= -40  <=>  |x| <= 10 for b = -4|x|.
_KEEP_ABOVE = float(torch.nextafter(torch.tensor(-4.0 * HIST_RANGE[1]), torch.tensor(-math.inf)))
DEFAULT_CHUNK = 256
# Timestep buckets: equal-width buckets of the normalised t in [0, 1]; 4 separate the nearly clean,
# middle and pure-noise inputs while leaving each bucket ~8 samples of a batch of 32.
TIMESTEP_BUCKETS = 4

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
    ``set_timesteps(t)`` before a forward adds that step's statistics by timestep bucket
    (`timestep_buckets` equal buckets of t in [0, 1]); ``to_numpy()`` then carries the bucket arrays.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: ModulesArg = "resnets",
        chunk_size: int = DEFAULT_CHUNK,
        timestep_buckets: int = TIMESTEP_BUCKETS,
    ):
        if chunk_size < 1:
            raise ValueError(f"chunk_size: expected a positive number of steps, got {chunk_size}")
        if timestep_buckets < 1:
            raise ValueError(f"timestep_buckets: expected a positive number, got {timestep_buckets}")
        self.model = model
        self.chunk_size = chunk_size
        self.bucket_edges = np.linspace(0.0, 1.0, timestep_buckets + 1)
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
        self._next_t: torch.Tensor | None = None  # set_timesteps' t, for the next recorded forward only
        self._bucketed = False  # some recorded step had timesteps: to_numpy() carries the bucket arrays

    @property
    def steps(self) -> int:
        """Number of recorded steps (forwards of the root model while ``recording`` was True)."""
        return self._steps

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"ActivationStats({len(self.names)} modules, {self.steps} steps, {state})"

    def set_timesteps(self, t: torch.Tensor) -> None:
        """The next forward's per-sample diffusion time, normalised to [0, 1] (shape [batch]).

        It applies to the next forward of the model only (a validation forward, which is not recorded,
        uses it up too), so a stale t can never be filed under another batch. On the device nothing is
        checked (that would synchronise); on the CPU values outside [0, 1] are an error.
        """
        if t.dim() != 1 or not t.is_floating_point():
            raise ValueError(f"set_timesteps: expected a 1-D float tensor of t in [0, 1], got {t.dtype} "
                             f"of shape {tuple(t.shape)}")
        if t.device.type == "cpu" and t.numel() and not bool(((t >= 0) & (t <= 1)).all()):
            raise ValueError(f"set_timesteps: t must be normalised to [0, 1]; got values in "
                             f"[{t.min().item():.4g}, {t.max().item():.4g}]")
        self._next_t = t.detach()

    # -- hooks
    # Hooks run eagerly under torch.compile (train.compile): compiled, their step counters would
    # become guards and force a recompile at every step; disabled, the model graph breaks around
    # each watched module and the statistics are computed by the same eager code as without it.

    @torch.compiler.disable
    def _begin_step(self, module: nn.Module, args: Any) -> None:
        t, self._next_t = self._next_t, None
        if not self.recording:
            self._active = False
            return
        if self._buf is None:
            self._buf = _DeviceBuffers(self.chunk_size, len(self.names), _model_device(self.model),
                                       self.bucket_edges)
        elif self._row == self.chunk_size:
            for done in self._chunks:
                done.settle()  # chunks whose copy has landed give their pinned memory back
            self._chunks.append(self._buf.flush(self._row))
            self._row = 0
        self._cur = self._row
        self._row += 1
        self._steps += 1
        self._active = True
        if t is not None:
            self._buf.begin_buckets(t)
            self._bucketed = True

    @torch.compiler.disable
    def _end_step(self, module: nn.Module, args: Any, out: Any) -> None:
        if self._active and self._buf is not None:
            self._buf.end_buckets(self._cur)
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
        """mean and std [steps, modules] float32, hist [modules, 40, steps] int32 counts, names; after
        ``set_timesteps`` also bucket_edges [K+1] float64, bucket_mean/std/dead [steps, modules, K]
        float32 and bucket_count [steps, K] int64 (see the module docstring)."""
        chunks = [c.numpy() for c in self._chunks]
        if self._buf is not None and self._row:
            chunks.append(self._buf.snapshot(self._row).numpy())
        m, k = len(self.names), len(self.bucket_edges) - 1
        if not chunks:
            by_bucket = np.zeros((0, m, k), np.float32)
            chunks = [(np.zeros((0, m), np.float32), np.zeros((0, m), np.float32),
                       np.zeros((0, m, HIST_BINS), np.int32), by_bucket, by_bucket, by_bucket,
                       np.zeros((0, k), np.int64))]
        mean, std, hist, b_mean, b_std, b_dead, b_count = (
            np.concatenate(p) for p in zip(*chunks, strict=True)
        )
        out = _as_dict(mean, std, hist, self.names)
        if self._bucketed:
            out.update(bucket_edges=self.bucket_edges.copy(), bucket_mean=b_mean, bucket_std=b_std,
                       bucket_dead=b_dead, bucket_count=b_count)
        return out

    def save(self, path: str | Path) -> Path:
        """Write the statistics to one compressed .npz file, atomically."""
        return save_stats(self.to_numpy(), path)


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


def _samples_in_blocks(x: torch.Tensor) -> bool:
    """Whether each sample (index of dim 0) of a dense x fills one block of memory, in sample order, so
    that the memory-order flat view reshapes to [batch, elements] (true for NCHW and channels_last)."""
    n = x.shape[0]
    return n <= 1 or x.stride(0) * n == x.numel()


def _prefer_bincount(device: torch.device) -> bool:
    """bincount on CPU (faster than histc there, see _hist_bincount); histc on other devices."""
    return device.type == "cpu"


class _DeviceBuffers:
    """Preallocated per-chunk buffers on the model's device, plus scratch space for the histogram."""

    def __init__(self, chunk: int, modules: int, device: torch.device, bucket_edges: np.ndarray):
        self.device = device
        self.mean = torch.full((chunk, modules), float("nan"), device=device)
        self.std = torch.full((chunk, modules), float("nan"), device=device)
        self.hist = torch.zeros((chunk, modules, _RAW_BINS), dtype=torch.int64, device=device)
        k = len(bucket_edges) - 1
        self.b_mean = torch.full((chunk, modules, k), float("nan"), device=device)
        self.b_std = torch.full((chunk, modules, k), float("nan"), device=device)
        self.b_dead = torch.full((chunk, modules, k), float("nan"), device=device)
        self.b_count = torch.zeros((chunk, k), dtype=torch.int64, device=device)
        self._inner_edges = torch.tensor(bucket_edges[1:-1], dtype=torch.float32, device=device)
        self._dead_below = HIST_RANGE[0] + 1 / _PER_UNIT  # top of the lowest histogram bin, [0, 0.25)
        # The step in progress, when it has timesteps: each sample's bucket, and per module and sample
        # [mean, population variance, elements in the lowest bin, elements in the histogram range];
        # per module, elements per sample. NaN rows: modules that did not run (or had no batch dim).
        self._bucket: torch.Tensor | None = None
        self._per_sample: torch.Tensor | None = None
        self._elems = torch.zeros(modules, device=device)
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
    def begin_buckets(self, t: torch.Tensor) -> None:
        """The step in progress has per-sample times t in [0, 1]: its bucket of each sample (on device)."""
        t = t.to(self.device, torch.float32, non_blocking=True)
        # right=True: bucket i holds edges[i] <= t < edges[i+1]; t = 1 falls into the last one.
        self._bucket = torch.bucketize(t, self._inner_edges, right=True)
        self._per_sample = torch.full((self.mean.shape[1], 4, t.numel()), float("nan"), device=self.device)

    @torch.no_grad()
    def record(self, out: torch.Tensor, row: int, j: int) -> None:
        x = out.detach()
        ps = self._per_sample
        by_sample = ps is not None and x.dim() > 0 and x.shape[0] == ps.shape[2]
        per_rows = x.dim() > 1 and x.numel() > 0  # batch-shaped: reduce per sample, then pool
        a, idx = self._scratch(x.numel())
        dense = x.dtype == torch.float32 and (not per_rows or _samples_in_blocks(x))
        v = _flat_view(x) if dense else None
        if v is None:  # autocast output (bf16/fp16) or a strided view: statistics are always float32
            a.view(x.shape).copy_(x)
            v = a
        if per_rows:
            mean, var = self._per_sample_moments(v.view(x.shape[0], -1), a)
            if by_sample:
                assert ps is not None
                ps[j, 0].copy_(mean)
                ps[j, 1].copy_(var)
                self._elems[j].fill_(v.numel() // x.shape[0])
        else:
            torch.mean(v, 0, out=self.mean[row, j])
            torch.std(v, 0, out=self.std[row, j])
        if per_rows:
            self._pool_moments(mean, var, v.numel() // x.shape[0], row, j)
        torch.abs(v, out=a)
        if self.use_bincount:
            per = self._hist_bincount(a, idx, row, j, x.shape[0] if by_sample else None)
            if by_sample:
                assert ps is not None and per is not None
                ps[j, 2].copy_(per[:, 0])  # slot of bin 0
                ps[j, 3].copy_(per.index_select(1, self._slots).sum(1))  # bins 0..40: |x| <= 10
        else:
            if by_sample:
                assert ps is not None
                rows = a.view(x.shape[0], -1)
                ps[j, 2].copy_((rows < self._dead_below).sum(1))
                ps[j, 3].copy_((rows <= HIST_RANGE[1]).sum(1))  # NaN and inf compare False: not in range
            self.hist[row, j, :HIST_BINS].copy_(torch.histc(a, HIST_BINS, *HIST_RANGE))

    def _per_sample_moments(
        self, rows: torch.Tensor, scratch: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's mean and population variance, two-pass (centred, so no cancellation).

        Measured on CPU this is several times faster than torch.std over all elements (Welford) or
        torch.var_mean along dim 1, which is what makes the timestep buckets nearly free.
        """
        mean = rows.mean(1)
        if rows.data_ptr() == scratch.data_ptr():  # rows live in the scratch (a converted copy)
            centred = rows - mean[:, None]
        else:
            centred = torch.sub(rows, mean[:, None], out=scratch.view(rows.shape))
        var = torch.linalg.vector_norm(centred, dim=1).square_().div_(rows.shape[1])
        return mean, var

    def _pool_moments(self, mean: torch.Tensor, var: torch.Tensor, elems: int, row: int, j: int) -> None:
        """Mean and std (ddof 1, as torch.std) of all elements, from per-sample means and variances."""
        total = torch.mean(mean, 0, out=self.mean[row, j])
        squares = (var.sum() + (mean - total).square().sum()) * elems
        torch.sqrt(squares / (elems * mean.numel() - 1), out=self.std[row, j])

    def _hist_bincount(
        self, a: torch.Tensor, idx: torch.Tensor, row: int, j: int, samples: int | None
    ) -> torch.Tensor | None:
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
        slots = idx.view(torch.uint8)
        if samples is None:
            torch.index_select(torch.bincount(slots, minlength=256), 0, self._slots, out=self.hist[row, j])
            return None
        # By sample (timestep buckets): one bincount per sample's block, [samples, 256] slot counts.
        n = slots.numel() // samples
        per = torch.stack([torch.bincount(slots[i * n:(i + 1) * n], minlength=256) for i in range(samples)])
        torch.index_select(per.sum(0), 0, self._slots, out=self.hist[row, j])
        return per

    @torch.no_grad()
    def end_buckets(self, row: int) -> None:
        """Pool the step's per-sample statistics by bucket into `row` (no-op for a step without t).

        A bucket's mean is the mean of its samples' means (every sample of a module has as many
        elements); its sum of squared deviations is the sum over samples of elements x (variance +
        (sample mean - bucket mean)^2), and its std divides that by elements - 1, as torch.std.
        """
        ps, b = self._per_sample, self._bucket
        if ps is None or b is None:
            return
        self._per_sample = self._bucket = None
        m, k = ps.shape[0], self.b_count.shape[1]
        count = torch.zeros(k, device=self.device).index_add_(0, b, torch.ones(b.shape, device=self.device))
        sums = torch.zeros((m, 4, k), device=self.device).index_add_(2, b, ps)
        mu = sums[:, 0] / count  # 0 / 0: NaN for an empty bucket
        spread = torch.zeros((m, k), device=self.device).index_add_(1, b, (ps[:, 0] - mu[:, b]).square())
        elems = self._elems[:, None]
        var = (sums[:, 1] + spread) * elems / (elems * count - 1)
        self.b_mean[row] = mu
        self.b_std[row] = torch.where(count > 0, var.sqrt(), torch.nan)
        self.b_dead[row] = sums[:, 2] / sums[:, 3]
        self.b_count[row] = count.long()

    def flush(self, rows: int) -> _HostChunk:
        """Start copying the first `rows` rows to the host and clear the buffers for the next chunk."""
        chunk = self.snapshot(rows)
        for t in (self.mean, self.std, self.b_mean, self.b_std, self.b_dead):
            t.fill_(float("nan"))  # a module that did not run in a step stays NaN, not stale
        self.hist.zero_()
        self.b_count.zero_()
        return chunk

    def snapshot(self, rows: int) -> _HostChunk:
        parts = (self.mean[:rows], self.std[:rows], self.hist[:rows],
                 self.b_mean[:rows], self.b_std[:rows], self.b_dead[:rows], self.b_count[:rows])
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
        self._np: tuple[np.ndarray, ...] | None = None

    def settle(self) -> None:
        """Convert to numpy now if the copy has finished (never waits)."""
        if self._np is None and (self._event is None or self._event.query()):
            self.numpy()

    def numpy(self) -> tuple[np.ndarray, ...]:
        """mean, std [rows, M] float32, hist [rows, M, 40] int32 (|x| == 10 folded into bin 39), then
        bucket mean, std, dead [rows, M, K] float32 and bucket count [rows, K] int64."""
        if self._np is None:
            if self._event is not None:
                self._event.synchronize()
            mean, std, raw, *buckets = (p.numpy() for p in self._parts)
            hist = raw[..., :HIST_BINS].astype(np.int32)
            hist[..., HIST_BINS - 1] += raw[..., HIST_BINS].astype(np.int32)
            self._np = (mean.copy(), std.copy(), hist, *(b.copy() for b in buckets))
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
