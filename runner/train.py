"""Training loop: one spec -> a trained model, metrics.json and the activation statistics file.

The loop is the originals' (miniai Learner with DDPM-style callbacks): AdamW with OneCycleLR over
all steps, MSE between predicted and true noise, optional mixed precision (with or without a gradient
scaler: the Diffusers originals ran without one), the last partial batch kept. Added for the lab:
a fixed-noise validation set so epochs and variants are compared on the same noise, BatchNorm
validation both with running statistics (as the originals reported) and with batch statistics,
and a divergence guard that stops a run whose loss explodes but keeps what was recorded.
"""

from __future__ import annotations

import math
import platform
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from runner import __version__
from runner.bngap import running_gap
from runner.data import BatchLoader, load_splits
from runner.faults import kill_point
from runner.files import write_json, write_text
from runner.models import build
from runner.noise import Noiser
from runner.spec import Spec, TrainSpec
from runner.stats import ActivationStats, save_stats

# Validation noise is drawn from this seed every epoch, for every variant: same noise, comparable losses.
VALID_NOISE_SEED = 1234
# The "early level" of the loss is its lowest value over the first EARLY_STEPS steps (the lowest,
# so that a run exploding from its second step is still measured against a sane level); later
# losses above `spec.train.divergence_factor` times that level count as divergence.
EARLY_STEPS = 10
# On CUDA the loss is copied to the host (and checked) only every this many steps, so the GPU
# never waits for the host; on CPU every step is checked (there is nothing to overlap).
CUDA_CHECK_EVERY = 25
CPU_CHECK_EVERY = 1
# Per-step statistics arrays with the step on their first axis (`hist` has it last).
_STEP_FIRST = ("mean", "std", "steps", "bucket_mean", "bucket_std", "bucket_dead", "bucket_count")


# The torch.compile backend for `train.compile` (CPU tests swap in "eager", which runs the graphs
# dynamo captures without generating kernels, in seconds instead of minutes).
COMPILE_BACKEND = "inductor"


class PrecisionError(RuntimeError):
    """The spec asks for a numeric precision this device cannot run."""


@dataclass(frozen=True)
class Result:
    status: str  # "completed" | "diverged" | "failed"
    metrics: dict[str, Any]
    out_dir: Path
    model: nn.Module | None = field(default=None, repr=False)  # the trained model, for runner.sample


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision, or a clear error where the device cannot run it."""
    if precision == "fp32":
        return None
    if precision in ("fp16", "fp16_unscaled"):
        if device.type != "cuda":
            raise PrecisionError(
                f"precision {precision} (float16 mixed precision, as the originals ran on their GPU) needs a "
                f"CUDA device; this run is on {device}. Use precision: fp32 (or bf16) on a CPU."
            )
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PrecisionError(
            f"precision bf16: {torch.cuda.get_device_name(device)} does not support bfloat16"
        )
    return torch.bfloat16


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A gradient scaler for precision "fp16" only; every other mode (fp16_unscaled included) gets none."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def train_loader(x: torch.Tensor, t: TrainSpec) -> BatchLoader:
    """The shuffled training batches of one spec; `t.last_batch` decides the last, smaller batch."""
    return BatchLoader(x, t.batch_size, shuffle=True, seed=t.seed, drop_last=t.last_batch == "drop")


def training_forward(model: nn.Module, mode: str) -> nn.Module:
    """The module the training step calls: `model` itself, or it compiled with `train.compile`'s mode.

    The compiled module shares `model`'s parameters and hooks; only the training forward uses it
    (validation switches BatchNorm modes, which would only add recompiles for two small passes).
    """
    if mode == "none":
        return model
    return torch.compile(model, mode=mode, backend=COMPILE_BACKEND)


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise with the batch's statistics and leave their running statistics alone.

    momentum 0 makes the running-stat update a no-op; the buffers are restored anyway, since
    num_batches_tracked still counts.
    """
    bns = _batchnorms(model)
    saved = [({k: v.clone() for k, v in m.state_dict().items()}, m.momentum) for m in bns]
    for m in bns:
        m.train()
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (state, momentum) in zip(bns, saved, strict=True):
            m.load_state_dict(state)
            m.momentum = momentum
            m.eval()


class BatchNormInputs:
    """Per-channel statistics of every BatchNorm layer's input, from forward pre-hooks; a context manager.

    Inside the block each forward adds, per layer, the batch's per-channel mean and unbiased variance
    (what BatchNorm computes for its running update), weighted by elements per channel; all on the
    device, read once by ``gaps()``. The hooks live exactly as long as the block.
    """

    def __init__(self, model: nn.Module):
        self.layers = {n: m for n, m in model.named_modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}
        self._sums: dict[str, list[Any]] = {}  # name -> [sum n*mean, sum n*var, sum n]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> BatchNormInputs:
        try:
            for name, bn in self.layers.items():
                self._handles.append(bn.register_forward_pre_hook(self._hook(name)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        while self._handles:
            self._handles.pop().remove()

    def _hook(self, name: str):
        @torch.no_grad()
        def hook(module: nn.Module, args: Any) -> None:
            x = args[0].detach().float()
            n = x.numel() // x.shape[1]
            var, mean = torch.var_mean(x, [0, *range(2, x.dim())], correction=1)
            acc = self._sums.setdefault(name, [0.0, 0.0, 0])
            acc[0] = acc[0] + n * mean
            acc[1] = acc[1] + n * var
            acc[2] += n

        return hook

    def gaps(self) -> dict[str, dict[str, float]]:
        """{layer: {"mean", "var"}}: ``runner.bngap.running_gap`` of each layer that saw an input."""
        out = {}
        for name, (s_mean, s_var, n) in self._sums.items():
            bn = self.layers[name]
            out[name] = running_gap(bn.running_mean.cpu().numpy(), bn.running_var.cpu().numpy(),
                                    (s_mean / n).cpu().numpy(), (s_var / n).cpu().numpy(), bn.eps)
        return out


class DivergenceGuard:
    """Flags the first step whose loss is non-finite or above `factor` x the early loss level."""

    def __init__(self, factor: float):
        self.factor = factor
        self.seen = 0
        self.level = math.inf

    def first_bad(self, losses: list[float], first_step: int) -> int | None:
        for i, loss in enumerate(losses):
            if not math.isfinite(loss) or (self.seen > 0 and loss > self.factor * self.level):
                return first_step + i
            if self.seen < EARLY_STEPS:
                self.level = min(self.level, loss)
            self.seen += 1
        return None


def _environment(device: torch.device, precision: str) -> dict[str, str]:
    import diffusers

    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    return {
        "device": name,
        "precision": precision,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "runner": __version__,
    }


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader, noiser: Noiser, amp: torch.dtype | None) -> float:
    """Mean MSE over the validation set, on noise drawn from VALID_NOISE_SEED."""
    device = next(model.parameters()).device
    gen = torch.Generator(device).manual_seed(VALID_NOISE_SEED)
    total, count = torch.zeros((), device=device), 0
    for xb in loader:
        (xt, t), noise = noiser(xb, gen)
        with _autocast(device, amp):
            pred = model(xt, t)
        total += F.mse_loss(pred.float(), noise, reduction="sum")
        count += noise.numel()
    return total.item() / max(count, 1)


def _autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()


class _Run:
    """State of one training run; `metrics()` is what metrics.json holds at any point."""

    def __init__(self, spec: Spec, device: torch.device):
        self.spec, self.device = spec, device
        self.status, self.error, self.diverged_at = "running", None, None
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self.grad_norms: list[float] = []
        self.epochs: list[dict[str, Any]] = []
        self.params = 0
        self.steps_per_epoch = self.steps_total = self.schedule_steps = 0
        self.started = time.perf_counter()
        self.train_seconds = 0.0

    def metrics(self) -> dict[str, Any]:
        last = self.epochs[-1] if self.epochs else {}
        steps = len(self.losses)
        return {
            "id": self.spec.id,
            "title": self.spec.title,
            "spec_hash": self.spec.content_hash(),
            "profile": self.spec.profile,
            "status": self.status,
            "diverged_at_step": self.diverged_at,
            "error": self.error,
            "params": self.params,
            "steps_per_epoch": self.steps_per_epoch,
            "steps_completed": steps,
            "steps_total": self.steps_total,
            # The OneCycle length: more than steps_total when the spec stops after its first epochs.
            "schedule_steps": self.schedule_steps,
            "batches": {"loss": self.losses, "lr": self.lrs, "grad_norm": self.grad_norms},
            "epochs": self.epochs,
            "final": {k: last.get(k) for k in ("train_loss", "valid_loss", "valid_loss_batch_stats")},
            "timings": {
                "total_s": round(time.perf_counter() - self.started, 3),
                "step_s": round(self.train_seconds / steps, 5) if steps else None,
            },
            "environment": _environment(self.device, self.spec.train.precision),
        }


def failed_metrics(spec: Spec, error: str) -> dict[str, Any]:
    """metrics.json for a run that failed before training started (same fields as a trained run's)."""
    run = _Run(spec, pick_device())
    run.status, run.error = "failed", error
    return run.metrics()


def train(
    spec: Spec, out_dir: str | Path, device: str | torch.device | None = None, progress: bool = True
) -> Result:
    """Train `spec`, writing spec.yaml, metrics.json and stats.npz into `out_dir`.

    A run that diverges is stopped and recorded as such (status "diverged"); any other error is
    recorded (status "failed", with the message) and re-raised. Statistics recorded before the
    stop are always saved.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "spec.yaml", spec.to_yaml())
    device = device if isinstance(device, torch.device) else pick_device(device)
    amp = autocast_dtype(spec.train.precision, device)  # before any work: a clear error, no fallback
    splits = load_splits(spec.data)

    torch.manual_seed(spec.train.seed)
    model = build(spec).to(device)
    run = _Run(spec, device)
    run.params = sum(p.numel() for p in model.parameters())
    stats = ActivationStats(model, modules=spec.stats.modules)
    try:
        with stats:
            _loop(run, model, splits, stats, amp, progress)
        if run.status == "running":
            run.status = "completed"
    except BaseException as e:
        run.status, run.error = "failed", "".join(traceback.format_exception_only(type(e), e)).strip()
        raise
    finally:
        if stats.steps:
            save_stats(_trim_steps(stats.to_numpy(), run.diverged_at), out / "stats.npz")
        metrics = run.metrics()
        write_json(out / "metrics.json", metrics)
    if spec.train.checkpoint == "final" and run.status == "completed":
        torch.save(model.state_dict(), out / "checkpoint.pt")
    return Result(run.status, metrics, out, model)


def _loop(run: _Run, model: nn.Module, splits, stats: ActivationStats, amp, progress: bool) -> None:
    spec, device = run.spec, run.device
    t = spec.train
    forward = training_forward(model, t.compile)
    train_x, valid_x = splits.train.to(device), splits.valid.to(device)
    loader = train_loader(train_x, t)
    valid_loader = BatchLoader(valid_x, t.batch_size, shuffle=False, seed=0, drop_last=False)
    if len(train_x) < t.batch_size:  # with last_batch keep too: one short batch per epoch is a mistake
        raise ValueError(f"{spec.id}: {len(train_x)} training latents make no full batch of {t.batch_size}")
    has_bn = bool(_batchnorms(model))
    if has_bn and t.last_batch == "keep" and len(train_x) % t.batch_size == 1:
        # BatchNorm cannot normalise a single item whose feature map is 1x1 (the deepest levels).
        raise ValueError(
            f"{spec.id}: {len(train_x)} training latents at batch {t.batch_size} leave a last batch of one "
            "item, whose BatchNorm batch statistics are degenerate (an error on 1x1 maps); set "
            "train.last_batch: drop or another batch size"
        )
    # The OneCycle schedule spans all `epochs`; stop_after_epochs only ends the loop early.
    run.steps_per_epoch, run.steps_total = len(loader), t.epochs_run * len(loader)
    run.schedule_steps = t.epochs * len(loader)

    noiser = Noiser(spec.noise, spec.model.family)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, eps=t.adam_eps, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=t.lr, total_steps=run.schedule_steps)
    scaler = make_scaler(t.precision, device)
    gen = torch.Generator(device).manual_seed(t.seed)
    guard = DivergenceGuard(t.divergence_factor)
    check_every = CUDA_CHECK_EVERY if device.type == "cuda" else CPU_CHECK_EVERY

    # Outside a terminal (papermill logs every refresh as a line) the bar refreshes rarely.
    interval = 0.5 if sys.stderr.isatty() else 15.0
    bar = tqdm(total=run.steps_total, desc=spec.id, disable=not progress, unit="step", mininterval=interval)
    pending_loss: list[torch.Tensor] = []
    pending_gn: list[torch.Tensor] = []
    for epoch in range(1, t.epochs_run + 1):
        model.train()
        stats.recording = True
        first_step = len(run.losses) + len(pending_loss)
        tic = time.perf_counter()
        for xb in loader:
            (xt, tt), noise = noiser(xb, gen)
            stats.set_timesteps(noiser.unit_time(tt))  # statistics by timestep bucket, for this forward
            with _autocast(device, amp):
                pred = forward(xt, tt)
            loss = F.mse_loss(pred.float(), noise)
            grad_norm = _step(model, opt, scaler, loss)
            run.lrs.append(sched.get_last_lr()[0])
            sched.step()
            pending_loss.append(loss.detach())
            pending_gn.append(grad_norm.detach())
            bar.update()
            kill_point("train")
            if len(pending_loss) >= check_every and _flush(run, guard, pending_loss, pending_gn, bar):
                break
        else:  # the epoch ran to its end: check its last steps too
            if pending_loss:
                _flush(run, guard, pending_loss, pending_gn, bar)
        run.train_seconds += time.perf_counter() - tic
        if run.status == "diverged":
            return
        stats.recording = False
        _validate(run, model, valid_loader, noiser, amp, has_bn, epoch, first_step)
        if run.status == "diverged":
            bar.write(f"{spec.id}: non-finite validation loss after step {run.diverged_at}")
            break
    bar.close()


def _step(model: nn.Module, opt: torch.optim.Optimizer, scaler, loss: torch.Tensor) -> torch.Tensor:
    """Backward and optimiser step, through `scaler` when there is one; returns the gradient norm."""
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), math.inf)
        opt.step()
        return grad_norm
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), math.inf)
    scaler.step(opt)
    scaler.update()
    return grad_norm


def _flush(
    run: _Run, guard: DivergenceGuard, losses: list[torch.Tensor], gns: list[torch.Tensor], bar
) -> bool:
    """Copy pending per-step values to the host; True (and status diverged) if the guard fires."""
    first = len(run.losses)
    values = torch.stack(losses).float().cpu().tolist()
    run.losses += values
    run.grad_norms += torch.stack(gns).float().cpu().tolist()
    losses.clear()
    gns.clear()
    bar.set_postfix(loss=f"{values[-1]:.4f}", refresh=False)
    bad = guard.first_bad(values, first)
    if bad is not None:
        run.status, run.diverged_at = "diverged", bad
        # Checked in batches (CUDA), steps after the bad one already ran: they are not part of the run.
        del run.losses[bad + 1 :], run.grad_norms[bad + 1 :], run.lrs[bad + 1 :]
        bar.write(f"{run.spec.id}: diverged at step {bad} (loss {run.losses[bad]:.4g})")
        bar.close()
        return True
    return False


def _trim_steps(stats: dict[str, Any], last_step: int | None) -> dict[str, Any]:
    """Statistics without the rows recorded after `last_step` (the diverged step; None keeps all)."""
    if last_step is None:
        return stats
    rows = len(stats["mean"])
    steps = np.asarray(stats["steps"]) if "steps" in stats else np.arange(rows)
    keep = steps <= last_step
    if keep.all():
        return stats
    out = dict(stats)
    for key in _STEP_FIRST:
        if key in out:
            out[key] = np.asarray(out[key])[keep]
    out["hist"] = np.asarray(out["hist"])[..., keep]
    return out


def _validate(run: _Run, model, valid_loader, noiser, amp, has_bn: bool, epoch: int, first_step: int) -> None:
    model.eval()
    valid = evaluate(model, valid_loader, noiser, amp)
    valid_bs = bn_gap = None
    if has_bn:
        # The batch-statistics pass also measures each layer's input: running vs validation statistics.
        with batch_statistics(model), BatchNormInputs(model) as bn_inputs:
            valid_bs = evaluate(model, valid_loader, noiser, amp)
        bn_gap = bn_inputs.gaps()
    if not math.isfinite(valid) or (valid_bs is not None and not math.isfinite(valid_bs)):
        run.status, run.diverged_at = "diverged", len(run.losses) - 1
    epoch_losses = [x for x in run.losses[first_step:] if math.isfinite(x)]
    run.epochs.append(
        {
            "epoch": epoch,
            "step": len(run.losses),
            "train_loss": sum(epoch_losses) / len(epoch_losses) if epoch_losses else None,
            "valid_loss": valid,
            "valid_loss_batch_stats": valid_bs,
            "bn_running_gap": bn_gap,
        }
    )
