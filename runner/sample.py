"""After training: draw 16 samples with DDIM, decode them to pictures, write ``samples/`` in the run folder.

Samplers (``spec.sample.samplers``):

- ``matched``: the schedule and timestep input the model was trained with, eta 0 (deterministic).
  Cosine specs step the continuous t from ``1 - 1/steps`` (the course's start) down to 0 in ``steps``
  equal steps on the cosine alpha-bar, the model receiving t exactly as in training
  (``Noiser.t_factor``); the predicted clean latent is not clamped (latents are not images in
  [-1, 1]). DDIM-noise specs use the spec's own ``DDIMScheduler`` with integer timesteps, with
  ``clip_sample`` off for the same reason.
- ``originals``: as the original notebooks sampled every model, cosine-trained ones included:
  ``DDIMScheduler(beta_end=0.01)`` with its defaults (x0 clipped to [-1, 1]), eta 1, the model called
  with the scheduler's integer timesteps. For a cosine-trained model this mismatches both the schedule
  and the timestep input; it is kept to show what the originals' samples could show.

Files: ``samples/samples.npz`` (one [16, 4, 32, 32] float32 array per sampler, in the training space:
normalised and scaled as the model saw its data), ``samples/grid_<sampler>.png`` and
``samples/grid_real.png`` (the first 16 validation latents through the same decoder), and
``samples/samples.json`` (settings, seconds, and each sampler's latent mean/std against the data's).
A run that did not complete gets only ``samples.json`` with ``status: "skipped"`` and the reason.
"""

from __future__ import annotations

import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler
from torch import nn

from runner.data import load_splits
from runner.decode import decoder_for, save_grid, to_raw
from runner.files import read_json, write_atomic, write_json
from runner.noise import T_MAX, Noiser, alpha_bar
from runner.spec import DataSpec, Spec, load_resolved
from runner.train import Result, _autocast, autocast_dtype

SAMPLE_COUNT = 16
SAMPLE_SEED = 0
SAMPLES_DIR = "samples"
ORIGINALS_BETA_END = 0.01
ORIGINALS_ETA = 1.0


class SampleError(RuntimeError):
    """A run folder has no samples to draw."""


def describe_sampler(spec: Spec, sampler: str) -> dict[str, Any]:
    """The settings a sampler runs with, as recorded in samples.json."""
    noise = spec.noise
    if sampler == "originals":
        return {"schedule": f"DDIMScheduler(beta_end={ORIGINALS_BETA_END})", "timestep": "integer",
                "eta": ORIGINALS_ETA, "clip_sample": True}
    if noise.schedule == "ddim":
        beta_end = noise.beta_end if noise.beta_end is not None else "default 0.02"
        return {"schedule": f"DDIMScheduler(beta_end={beta_end})", "timestep": "integer",
                "eta": 0.0, "clip_sample": False}
    return {"schedule": "cosine", "timestep": noise.timestep_input, "eta": 0.0, "clip_sample": False}


def initial_noise(shape: tuple[int, ...], seed: int = SAMPLE_SEED) -> torch.Tensor:
    # Drawn on the CPU so that CPU and CUDA runs start from the same noise.
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def cosine_start(steps: int) -> float:
    """The first t: 1 - 1/steps, as the course's DDIM sampler starts, at most T_MAX.

    Starting at T_MAX (alpha-bar 2.5e-6) would divide the first noise prediction's error by
    sqrt(alpha-bar) = 1.6e-3; one step below it the error is amplified some 50 times less (20 steps).
    The pure-noise start then omits sqrt(alpha-bar) x0 (0.08 x0 at 20 steps, 0.016 x0 at 100).
    """
    return min(T_MAX, 1.0 - 1.0 / steps)


@torch.no_grad()
def ddim_cosine(model: nn.Module, x: torch.Tensor, steps: int, t_factor: float, amp=None) -> torch.Tensor:
    """Deterministic DDIM (eta 0) on the cosine alpha-bar, `cosine_start(steps)` to 0 in `steps` steps."""
    ts = torch.linspace(cosine_start(steps), 0.0, steps + 1, dtype=torch.float64)
    for t, t_next in zip(ts[:-1], ts[1:], strict=True):
        ab, ab_next = alpha_bar(t).item(), alpha_bar(t_next).item()
        t_in = torch.full((x.shape[0],), t.item() * t_factor, device=x.device, dtype=x.dtype)
        with _autocast(x.device, amp):
            eps = model(x, t_in).float()
        x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        x = math.sqrt(ab_next) * x0 + math.sqrt(1 - ab_next) * eps
    return x


@torch.no_grad()
def ddim_scheduler(
    model: nn.Module, scheduler: DDIMScheduler, x: torch.Tensor, steps: int, eta: float, seed: int, amp=None
) -> torch.Tensor:
    """DDIM through a diffusers scheduler, the model called with its integer timesteps."""
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed + 1)  # step noise (eta > 0), CPU-drawn like the start
    for t in scheduler.timesteps:
        t_in = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        with _autocast(x.device, amp):
            eps = model(x, t_in).float()
        variance_noise = torch.randn(x.shape, generator=gen).to(x.device) if eta > 0 else None
        x = scheduler.step(eps, t, x, eta=eta, variance_noise=variance_noise).prev_sample
    return x


def draw(model: nn.Module, spec: Spec, sampler: str, seed: int = SAMPLE_SEED, count: int = SAMPLE_COUNT,
         amp: torch.dtype | None = None) -> torch.Tensor:
    """`count` latents [count, 4, 32, 32] (float32, CPU, training space) from `model` with `sampler`."""
    device = next(model.parameters()).device
    x = initial_noise((count, 4, 32, 32), seed).to(device)
    was_training = model.training
    model.eval()
    try:
        if sampler == "originals":
            scheduler = DDIMScheduler(beta_end=ORIGINALS_BETA_END)
            x = ddim_scheduler(model, scheduler, x, spec.sample.steps, ORIGINALS_ETA, seed, amp)
        elif spec.noise.schedule == "ddim":
            scheduler = Noiser(spec.noise, spec.model.family).scheduler
            matched = DDIMScheduler.from_config(scheduler.config, clip_sample=False)
            x = ddim_scheduler(model, matched, x, spec.sample.steps, 0.0, seed, amp)
        else:
            t_factor = Noiser(spec.noise, spec.model.family).t_factor
            x = ddim_cosine(model, x, spec.sample.steps, t_factor, amp)
    finally:
        model.train(was_training)
    return x.float().cpu()


def latent_summary(x: torch.Tensor) -> dict[str, Any]:
    """Mean and std overall and per channel of finite values, and how many values are not finite."""
    finite = torch.isfinite(x)
    # Non-finite values would make every statistic NaN; they are counted instead.
    clean = torch.where(finite, x, torch.nan).double()
    per_channel = clean.transpose(0, 1).reshape(x.shape[1], -1)
    return {
        "mean": _nanmean(clean.flatten()),
        "std": _nanstd(clean.flatten()),
        "channel_mean": [_nanmean(c) for c in per_channel],
        "channel_std": [_nanstd(c) for c in per_channel],
        "nonfinite": int((~finite).sum()),
    }


def _nanmean(v: torch.Tensor) -> float:
    return float(v.nanmean())


def _nanstd(v: torch.Tensor) -> float:
    v = v[~v.isnan()]
    return float(v.std()) if v.numel() > 1 else math.nan


def _skip_reason(result: Result) -> str | None:
    if result.status == "completed" and result.model is not None:
        return None
    if result.status == "diverged":
        return f"the run diverged at step {result.metrics.get('diverged_at_step')}: its model is not sampled"
    if result.status == "completed":
        return "no trained model was handed over"
    return f"the run {result.status}: {result.metrics.get('error') or 'no model'}"


def sample_run(spec: Spec, result: Result, vae: str | Path | None = None) -> dict[str, Any]:
    """Sample the trained model of `result` with every sampler the spec lists; write ``samples/``.

    Returns what samples.json holds. A run that did not complete is not sampled: samples.json says why.
    A sampling error (a VAE folder that does not load, say) is recorded there as status "failed" and
    printed, not raised: the trained run and its files stay as they are.
    `vae`: a folder of AutoencoderKL weights to decode with; None uses the preview decoder.
    """
    out = Path(result.out_dir) / SAMPLES_DIR
    reason = _skip_reason(result)
    if reason is not None:
        record = {"status": "skipped", "reason": reason, "samplers": {}}
        write_json(out / "samples.json", record)
        return record
    try:
        return _sample(spec, result, out, vae)
    except Exception as e:
        message = "".join(traceback.format_exception_only(type(e), e)).strip()
        print(f"{spec.id}: sampling failed: {message}", file=sys.stderr)
        record = {"status": "failed", "reason": message, "samplers": {}}
        write_json(out / "samples.json", record)
        return record


def _sample(spec: Spec, result: Result, out: Path, vae: str | Path | None) -> dict[str, Any]:
    device = next(result.model.parameters()).device
    amp = autocast_dtype(spec.train.precision, device)
    latents, samplers = {}, {}
    for sampler in spec.sample.samplers:
        steps = spec.sample.steps
        print(f"{spec.id}: drawing {SAMPLE_COUNT} samples, {sampler} sampler, {steps} steps", flush=True)
        tic = time.perf_counter()
        latents[sampler] = draw(result.model, spec, sampler, amp=amp)
        seconds = round(time.perf_counter() - tic, 3)
        summary = latent_summary(latents[sampler])
        samplers[sampler] = {**describe_sampler(spec, sampler), "seconds": seconds, **summary}
    arrays = {k: v.numpy() for k, v in latents.items()}
    write_atomic(out / "samples.npz", lambda tmp: np.savez(tmp, **arrays))
    data = load_splits(spec.data).train
    record = {
        "status": "completed",
        "reason": None,
        "count": SAMPLE_COUNT,
        "seed": SAMPLE_SEED,
        "steps": spec.sample.steps,
        "device": str(device),
        "precision": spec.train.precision,
        "space": "training space: latents normalised and scaled as the model saw them",
        "data": {"rows": f"the run's {len(data)} train latents", **latent_summary(data)},
        "samplers": samplers,
    }
    write_json(out / "samples.json", record)
    return render(result.out_dir, vae)


def real_latents(data_spec: DataSpec, count: int = SAMPLE_COUNT) -> torch.Tensor:
    """The first `count` validation latents, in the training space of `data_spec`.

    A small ``data.size`` (smoke, tests) has fewer valid rows than a grid; the valid split's first rows
    are the same for every size, so a size that holds `count` of them is read instead.
    """
    size = max(data_spec.size, 10 * count + 10)  # 10% valid: at least `count` valid rows
    return load_splits(data_spec.model_copy(update={"size": size})).valid[:count]


def render(run_dir: str | Path, vae: str | Path | None = None) -> dict[str, Any]:
    """Decode ``samples/samples.npz`` and 16 real validation latents into grids; record the decoder.

    Also the way to redraw the grids of a finished run with the VAE: nothing is resampled.
    """
    run_dir = Path(run_dir)
    out = run_dir / SAMPLES_DIR
    record = read_json(out / "samples.json")
    if record.get("status") != "completed":
        raise SampleError(f"{out}: no samples to draw ({record.get('reason')})")
    spec = load_resolved(run_dir / "spec.yaml")
    tic = time.perf_counter()
    decoder = decoder_for(vae)
    with np.load(out / "samples.npz") as f:
        latents = {k: torch.from_numpy(f[k]) for k in f.files}
    real = real_latents(spec.data)
    for name, x in {**latents, "real": real}.items():
        save_grid(decoder(to_raw(x, spec.data)), out / f"grid_{name}.png")
    record["decoder"] = decoder.describe()
    record["grids"] = {name: f"grid_{name}.png" for name in (*latents, "real")}
    record["real"] = f"the first {len(real)} validation latents, through the same decoder"
    record["decode_seconds"] = round(time.perf_counter() - tic, 3)
    write_json(out / "samples.json", record)
    return record


def grid_captions(record: dict[str, Any]) -> list[tuple[str, str]]:
    """(grid file, caption) for each grid `sample_run` drew, numbers through the project's formatter.

    A sampler whose samples are all non-finite has no mean or std: the caption says how many values
    were non-finite instead of failing (the run itself trained fine).
    """
    from runner.text import fmt

    captions = []
    for name, file in record.get("grids", {}).items():
        measured = record.get("samplers", {}).get(name)
        if measured is None:
            captions.append((file, name))
            continue
        bad = measured.get("nonfinite") or 0
        text = f"{name}: mean {fmt(measured.get('mean'))}, std {fmt(measured.get('std'))}"
        text += f", {fmt(bad)} non-finite values" if bad else ""
        captions.append((file, f"{text}, {fmt(measured.get('seconds'))} s"))
    return captions
