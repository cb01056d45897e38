"""BatchNorm train/eval mismatch: how far a layer's running statistics are from its validation statistics.

A BatchNorm layer trains on each batch's own mean and variance, and at evaluation normalises with
its running (exponentially averaged) ones. When these drift apart, the network evaluates on
inputs scaled and shifted unlike anything it trained on: a validation loss that rockets while the
training loss is fine, as in the original BatchNorm runs.

The distance (``running_gap``), per layer and per epoch, is scale-free, so layers and runs compare:

- ``mean``: root mean square over channels of (running mean - validation mean) / sqrt(validation
  var + eps), i.e. how many validation standard deviations the running mean is off;
- ``var``: root mean square over channels of ln((running var + eps) / (validation var + eps)), the
  log-ratio of the variances the layer divides by at evaluation and in training (0.69 = a factor 2).

The validation statistics are those the layer computes from its input in training mode on the
validation batches (the batch-statistics validation pass, ``runner.train``): per channel, the mean
and the unbiased variance of each batch, as BatchNorm computes them for its running update,
averaged over the batches weighted by their element counts. So each layer is judged on the input
that the network in training mode gives it, not on inputs already distorted by earlier layers.

This module is numpy-only: the report reads ``metrics.json`` (``epochs[i]["bn_running_gap"]``) without
torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["RUNNING_GAP_LIMIT", "LargestGap", "gap_series", "largest_running_gap", "running_gap"]

# A running mean half a validation std off, or a running variance e^0.5 = 1.65 times off (either
# way), changes a layer's evaluation output by about as much as the layer's own spread: beyond noise
# of a healthy EMA (a few hundredths), well below the originals' rocketing runs.
RUNNING_GAP_LIMIT = 0.5


def running_gap(
    running_mean: Any, running_var: Any, valid_mean: Any, valid_var: Any, eps: float
) -> dict[str, float]:
    """{"mean": float, "var": float}: the module docstring's distances, from per-channel arrays."""
    rm, rv, vm, vv = (np.asarray(a, np.float64) for a in (running_mean, running_var, valid_mean, valid_var))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.sqrt(np.mean((rm - vm) ** 2 / (vv + eps)))
        var = np.sqrt(np.mean(np.log((rv + eps) / (vv + eps)) ** 2))
    return {"mean": float(mean), "var": float(var)}


@dataclass(frozen=True)
class LargestGap:
    """The largest running-statistics gap of a run's last diagnosed epoch."""

    value: float
    layer: str
    statistic: str  # "mean" | "var"
    epoch: int  # the metrics' epoch number (1-based)

    @property
    def mismatch(self) -> bool:
        return self.value > RUNNING_GAP_LIMIT


def largest_running_gap(epochs: Sequence[Mapping[str, Any]]) -> LargestGap | None:
    """The largest gap (over layers, mean and var) at the last epoch with a finite ``bn_running_gap``.

    `epochs` is metrics.json's ``epochs`` list. None when no epoch has a finite gap (no BatchNorm, or
    no validation yet). Non-finite gaps (written as null) are skipped: a run that produced them
    diverged, which its verdict already says.
    """
    for entry in reversed(epochs):
        gaps = entry.get("bn_running_gap")
        if not gaps:
            continue
        found = [
            (float(v), layer, stat)
            for layer, pair in gaps.items()
            for stat, v in pair.items()
            if v is not None and np.isfinite(v)
        ]
        if found:
            value, layer, stat = max(found, key=lambda f: f[0])
            return LargestGap(value, layer, stat, int(entry["epoch"]))
    return None


def gap_series(epochs: Sequence[Mapping[str, Any]]) -> tuple[list[int], dict[str, dict[str, list[float]]]]:
    """For a chart: the epochs with a ``bn_running_gap`` and, per layer, its "mean" and "var" gap at each
    (NaN where that epoch did not record the layer or recorded null), layers in first-seen order."""
    rows = [(int(e["epoch"]), e["bn_running_gap"]) for e in epochs if e.get("bn_running_gap")]
    layers = list(dict.fromkeys(layer for _, gaps in rows for layer in gaps))

    def value(gaps: Mapping[str, Any], layer: str, stat: str) -> float:
        v = (gaps.get(layer) or {}).get(stat)
        return float(v) if v is not None else float("nan")

    series = {layer: {stat: [value(g, layer, stat) for _, g in rows] for stat in ("mean", "var")}
              for layer in layers}
    return [n for n, _ in rows], series
