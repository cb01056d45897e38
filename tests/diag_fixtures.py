"""Run folders for the BatchNorm-gap, timestep-bucket and reproduction pages, written through the real
contract (runner.results.Metrics, runner.statsfile.save_stats) on tiny made-up numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from runner.results import Metrics, write_metrics
from runner.spec import Spec, build_spec
from runner.statsfile import HIST_BINS, save_stats

NAMES = ("unet.down_blocks.0.resnets.0", "unet.mid_block.resnets.0", "unet.up_blocks.0.resnets.0")
LAYERS = ("unet.down_blocks.0.resnets.0.norm1", "unet.up_blocks.0.resnets.0.norm2")


def spec(run_id: str, group: str = "ablations", axis: str = "BatchNorm running statistics",
         profile: str = "smoke", **sections: Any) -> Spec:
    raw = {"id": run_id, "title": run_id, "group": group, "axis": axis, **sections}
    return build_spec(raw, "test", profile=profile)


def metrics(s: Spec, epochs: list[dict[str, Any]], steps_per_epoch: int = 3) -> Metrics:
    """A completed run's record with the given epoch entries (epoch, train_loss, valid_loss and optionally
    valid_loss_batch_stats and bn_running_gap); every other field as training writes it."""
    entries = [{"step": e["epoch"] * steps_per_epoch, "valid_loss_batch_stats": None, "bn_running_gap": None,
                **e} for e in epochs]
    n = steps_per_epoch * len(entries)
    last = entries[-1] if entries else {}
    return Metrics.model_validate({
        "id": s.id, "title": s.title, "spec_hash": s.content_hash(), "profile": s.profile,
        "status": "completed", "diverged_at_step": None, "error": None, "params": 10,
        "steps_per_epoch": steps_per_epoch, "steps_completed": n, "steps_total": n, "schedule_steps": n,
        "batches": {"loss": [0.5] * n, "lr": [1e-3] * n, "grad_norm": [1.0] * n},
        "epochs": entries,
        "final": {k: last.get(k) for k in ("train_loss", "valid_loss", "valid_loss_batch_stats")},
        "timings": {"total_s": 1.0, "step_s": 0.01},
        "environment": {"device": "cpu", "precision": s.train.precision, "torch": "t", "diffusers": "d",
                        "python": "3", "runner": "r"},
    })


def gap_epochs(gaps: list[float], valid: list[float], valid_bs: list[float]) -> list[dict[str, Any]]:
    """Epochs whose first layer's variance gap is `gaps[i]` (the other gaps a tenth of it)."""
    return [
        {"epoch": i + 1, "train_loss": 0.3, "valid_loss": v, "valid_loss_batch_stats": b,
         "bn_running_gap": {LAYERS[0]: {"mean": g / 10, "var": g},
                            LAYERS[1]: {"mean": g / 10, "var": g / 10}}}
        for i, (g, v, b) in enumerate(zip(gaps, valid, valid_bs, strict=True))
    ]


def stats(path: Path, steps: int = 8, buckets: int | None = 4, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    m = len(NAMES)
    hist = np.zeros((m, HIST_BINS, steps))
    hist[:, 0], hist[:, 3] = 10, 30
    arrays: dict[str, Any] = {"mean": rng.normal(0, 0.1, (steps, m)), "std": 1 + rng.random((steps, m)),
                              "hist": hist, "names": NAMES, "steps": np.arange(steps)}
    if buckets:
        k = buckets
        std = 1 + np.arange(k)[None, None, :] + 0.1 * rng.random((steps, m, k))
        std[0, 0, 0] = np.nan  # a bucket without a sample at a step
        arrays.update(bucket_edges=np.linspace(0, 1, k + 1), bucket_mean=np.zeros((steps, m, k)),
                      bucket_std=std, bucket_dead=np.full((steps, m, k), 0.25),
                      bucket_count=np.full((steps, k), 4))
    save_stats(arrays, path)


def run_folder(results: Path, s: Spec, m: Metrics, with_stats: bool = True, buckets: int | None = 4,
               steps: int = 8) -> Path:
    d = Path(results) / s.id
    d.mkdir(parents=True)
    (d / "spec.yaml").write_text(s.to_yaml())
    write_metrics(d, m)
    if with_stats:
        stats(d / "stats.npz", steps=steps, buckets=buckets)
    return d
