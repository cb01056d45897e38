"""Health numbers of runs: measures, thresholds, verdicts, score, ranking and the per-axis tables.

Pure numpy analysis of `runner.results.Run`s (metrics + statistics); nothing here writes sentences
(runner.prose does, from these numbers), plots or writes files. runner.report builds all of it once.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from runner.bngap import RUNNING_GAP_LIMIT, largest_running_gap
from runner.results import Metrics, Run
from runner.spec import Spec
from runner.statsfile import BIN_WIDTH, Stats, dead_share
from runner.text import DASH, fmt

REFERENCE_ID = "diffusers_baseline"  # the Diffusers UNet as first used: the configuration to explain
COURSE_ID = "course_baseline"  # the fast.ai course UNet: the run every variant is read against
ROLES = {REFERENCE_ID: "reference", COURSE_ID: "course reference"}

WINDOW_SHARE = 0.1  # "early" / "late" = the first / last 10% of recorded steps (at least one step)
SPIKE_FACTOR = 2.0  # a batch loss above this multiple of the running minimum is a spike
SPIKE_SMOOTH = 10  # steps in the trailing median whose running minimum is the spike baseline
LEVELS = ("healthy", "warning", "unhealthy")


def _window(n: int) -> int:
    return max(1, math.ceil(WINDOW_SHARE * n))


def _finite(a: Any) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    return np.where(np.isfinite(arr), arr, np.nan)


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence numpy's "mean of empty slice" warnings: all-NaN windows are expected and give NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _nanmean(a: np.ndarray, axis: int | None = None) -> Any:
    with _quiet():
        return np.nanmean(a, axis=axis)


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.number)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def loss_spikes(loss: Any) -> tuple[int | None, float | None]:
    """(spike count, max loss ratio) of a per-batch loss series (None/NaN entries are skipped).

    Baseline at step i: the minimum, over steps before i, of the trailing median of SPIKE_SMOOTH batch
    losses (smoothing keeps one lucky batch from setting an unreachable floor). Steps after the first
    10% whose loss exceeds SPIKE_FACTOR x baseline are spikes; the ratio is loss / baseline.
    """
    values = _finite([np.nan if v is None else v for v in loss])
    n = values.size
    if np.isfinite(values).sum() < 2:
        return None, None
    padded = np.concatenate([np.full(SPIKE_SMOOTH - 1, np.nan), values])
    windows = np.lib.stride_tricks.sliding_window_view(padded, SPIKE_SMOOTH)
    with _quiet():
        median = np.nanmedian(windows, axis=1)
    running = np.fmin.accumulate(np.where(np.isnan(median), np.inf, median))
    baseline = np.concatenate([[np.inf], running[:-1]])  # before step i, never including it
    steps = np.arange(n) >= _window(n)
    ok = steps & np.isfinite(values) & np.isfinite(baseline) & (baseline > 0)
    if not ok.any():
        return None, None
    ratios = values[ok] / baseline[ok]
    return int((ratios > SPIKE_FACTOR).sum()), float(ratios.max())


def _nonfinite_steps(std: np.ndarray, hist: Any) -> int:
    """Steps where some module's std is infinite, or NaN although the module ran (its histogram has
    counts); runner.stats leaves NaN where a module did not run, which is no overflow."""
    bad = np.isinf(std)
    if hist is not None and np.shape(hist)[::2] == std.shape[::-1]:
        ran = np.asarray(hist, dtype=np.float64).sum(axis=1).T > 0  # [steps, modules]
        bad |= np.isnan(std) & ran
    return int(bad.any(axis=1).sum())


@dataclass(frozen=True)
class Health:
    """Measures of one run; a field is None when it cannot be computed (e.g. no stats for a failed run)."""

    status: str
    steps: int | None = None  # optimiser steps completed
    has_stats: bool = False
    max_std: float | None = None
    max_std_module: str | None = None
    max_std_step: int | None = None  # optimiser step (from the statistics file's `steps`)
    std_growth: float | None = None
    std_growth_module: str | None = None
    mean_drift: float | None = None
    mean_drift_module: str | None = None
    dead_early: float | None = None
    dead_late: float | None = None
    nonfinite_steps: int | None = None
    loss_spikes: int | None = None
    max_loss_ratio: float | None = None
    diverged: bool = False
    diverged_at_step: int | None = None
    error: str | None = None
    train_loss: float | None = None
    valid_loss: float | None = None
    valid_loss_batch_stats: float | None = None
    valid_gap: float | None = None
    valid_gap_batch_stats: float | None = None
    # BatchNorm train/eval mismatch (runner.bngap): the largest running-statistics gap of the last epoch
    # that measured one, where, and the final valid loss with running over with batch statistics.
    bn_gap: float | None = None
    bn_gap_where: str | None = None  # "<layer> (<mean|var>, epoch <n>)"
    valid_running_over_batch: float | None = None


def short_name(name: str) -> str:
    """Module names as the charts label them (runner.charts owns the shortening; matplotlib is lazy)."""
    from runner.charts import short_name as shorten

    return shorten(name)


def _stats_measures(stats: Stats) -> dict[str, Any]:
    mean, std = _finite(stats.mean), _finite(stats.std)
    steps, modules = std.shape
    if steps == 0 or modules == 0:
        return {}
    names = [short_name(n) for n in stats.names]
    k = _window(steps)
    out: dict[str, Any] = {"has_stats": True, "nonfinite_steps": _nonfinite_steps(stats.std, stats.hist)}
    if np.isfinite(std).any():
        step, mod = np.unravel_index(np.nanargmax(std), std.shape)
        out.update(
            max_std=float(std[step, mod]), max_std_module=names[mod], max_std_step=int(stats.steps[step]) + 1
        )
    early, late = _nanmean(std[:k], axis=0), _nanmean(std[-k:], axis=0)
    if np.isfinite(late).any():
        m = int(np.nanargmax(late))
        if np.isfinite(early[m]) and early[m] > 0:
            out.update(std_growth=float(late[m] / early[m]), std_growth_module=names[m])
    drift = np.abs(_nanmean(mean[-k:], axis=0) - _nanmean(mean[:k], axis=0))
    if np.isfinite(drift).any():
        m = int(np.nanargmax(drift))
        out.update(mean_drift=float(drift[m]), mean_drift_module=names[m])
    dead = dead_share(stats.hist)
    out["dead_early"] = _num(_nanmean(dead[:, :k]))
    out["dead_late"] = _num(_nanmean(dead[:, -k:]))
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def measure(metrics: Metrics, stats: Stats | None) -> Health:
    """Health of one run from its metrics and its statistics (None: none recorded)."""
    final = metrics.final
    spikes, ratio = loss_spikes(metrics.batches.loss)
    train, valid, valid_bs = (
        _num(v) for v in (final.train_loss, final.valid_loss, final.valid_loss_batch_stats)
    )
    values: dict[str, Any] = {
        "status": metrics.status,
        "steps": metrics.steps_completed,
        "loss_spikes": spikes,
        "max_loss_ratio": ratio,
        "diverged": metrics.status == "diverged" or metrics.diverged_at_step is not None,
        "diverged_at_step": metrics.diverged_at_step,
        "error": metrics.error or None,
        "train_loss": train,
        "valid_loss": valid,
        "valid_loss_batch_stats": valid_bs,
        "valid_gap": _ratio(valid, train),
        "valid_gap_batch_stats": _ratio(valid_bs, train),
    }
    values.update(_bn_measures(metrics, valid, valid_bs))
    if stats is not None:
        values.update(_stats_measures(stats))
    return Health(**values)


def _bn_measures(metrics: Metrics, valid: float | None, valid_bs: float | None) -> dict[str, Any]:
    """The BatchNorm mismatch measures; empty for a run without BatchNorm (no gap, no batch-stats loss)."""
    out: dict[str, Any] = {"valid_running_over_batch": _ratio(valid, valid_bs)}
    gap = largest_running_gap([e.model_dump() for e in metrics.epochs])
    if gap is not None:
        out.update(
            bn_gap=gap.value,
            bn_gap_where=f"{short_name(gap.layer)} ({gap.statistic}, epoch {fmt(gap.epoch)})",
        )
    return out


# ---------------------------------------------------------------- thresholds and verdicts


@dataclass(frozen=True)
class Threshold:
    level: str  # "unhealthy" | "warning"
    measure: str  # a Health field
    limit: float  # a run passes when the measure is <= limit (missing measures pass)
    why: str  # what crossing it means, completing "A run whose <measure> is above <limit> ..."


# Not fitted to data: set loose enough that a well-scaled network (stds near 1) does not trip them on
# noise, and tight enough that exploding activations do.
THRESHOLDS: dict[str, Threshold] = {
    "unhealthy_max_std": Threshold("unhealthy", "max_std", 50.0, "has exploding activations"),
    "unhealthy_std_growth": Threshold("unhealthy", "std_growth", 20.0, "has runaway activations"),
    "unhealthy_loss_ratio": Threshold("unhealthy", "max_loss_ratio", 5.0, "had its loss rocket"),
    "unhealthy_nonfinite": Threshold("unhealthy", "nonfinite_steps", 0.0, "overflowed"),
    "warning_max_std": Threshold(
        "warning", "max_std", 5.0, "is far from the near-unit stds of a well-scaled network"
    ),
    "warning_std_growth": Threshold("warning", "std_growth", 4.0, "is drifting rather than steady"),
    "warning_mean_drift": Threshold("warning", "mean_drift", 3.0, "has shifted a whole distribution"),
    "warning_dead_late": Threshold("warning", "dead_late", 0.5, "wastes capacity on near-zero activations"),
    "warning_valid_gap": Threshold(
        "warning", "valid_gap", 2.0, "points at a train/eval mismatch such as BatchNorm running statistics"
    ),
    # The limit is runner.bngap's (its docstring says why): one number for the chart, verdict and Method page.
    "warning_bn_gap": Threshold(
        "warning",
        "bn_gap",
        RUNNING_GAP_LIMIT,
        "evaluates with BatchNorm running statistics unlike the validation batches' own: "
        "a train/eval mismatch",
    ),
    "warning_loss_spikes": Threshold(
        "warning", "loss_spikes", 2.0, "has more loss spikes than an unlucky batch explains"
    ),
}

MEASURE_NAMES = {
    "max_std": "max std",
    "std_growth": "std growth",
    "max_loss_ratio": "max loss ratio",
    "nonfinite_steps": "non-finite steps",
    "mean_drift": "mean drift",
    "dead_late": "dead share late",
    "valid_gap": "valid ÷ train loss",
    "loss_spikes": "loss spikes",
    "bn_gap": "BatchNorm running gap",
}
_MEASURE_MODULE = {
    "max_std": "max_std_module",
    "std_growth": "std_growth_module",
    "mean_drift": "mean_drift_module",
    "bn_gap": "bn_gap_where",
}


@dataclass(frozen=True)
class Verdict:
    level: str  # "healthy" | "warning" | "unhealthy"
    reasons: tuple[str, ...] = ()


def _reason(h: Health, t: Threshold) -> str:
    module = getattr(h, _MEASURE_MODULE[t.measure]) if t.measure in _MEASURE_MODULE else None
    where = f" in {module}" if module else ""
    extra = ""
    if t.measure == "bn_gap" and h.valid_running_over_batch is not None:
        ratio = fmt(h.valid_running_over_batch)
        extra = f"; final valid loss with running statistics {ratio}× that with batch statistics"
    return f"{MEASURE_NAMES[t.measure]} {fmt(getattr(h, t.measure))}{where} (threshold {fmt(t.limit)}){extra}"


def verdict(health: Health) -> Verdict:
    """Healthy, warning or unhealthy, with one reason per crossed threshold (unhealthy ones first)."""
    bad: list[str] = []
    warn: list[str] = []
    if health.status not in ("completed", "diverged"):
        lines = (health.error or "").strip().splitlines()
        bad.append(f"the run {health.status}: {lines[0][:160] if lines else 'no error message recorded'}")
    if health.diverged:
        at = f" at step {fmt(health.diverged_at_step)}" if health.diverged_at_step is not None else ""
        bad.append(f"training diverged{at}")
    crossed: set[str] = set()
    # Unhealthy thresholds first, so a measure past both limits gives one reason, the stricter one.
    for t in sorted(THRESHOLDS.values(), key=lambda t: t.level != "unhealthy"):
        value = getattr(health, t.measure)
        if value is not None and value > t.limit and t.measure not in crossed:
            crossed.add(t.measure)
            (bad if t.level == "unhealthy" else warn).append(_reason(health, t))
    if not health.has_stats and health.status == "completed":
        warn.append("no activation statistics were recorded, so the activations cannot be judged")
    level = "unhealthy" if bad else "warning" if warn else "healthy"
    return Verdict(level, tuple(bad + warn))


def score(health: Health) -> float | None:
    """Health score (lower is healthier; see runner.prose.SCORE_TEXT); None without statistics."""
    if health.max_std is None:
        return None
    parts = (health.max_std, health.std_growth, health.max_loss_ratio)
    total = sum(max(math.log10(p), 0.0) for p in parts if p is not None and p > 0)
    return total + (health.dead_late or 0.0)


# ---------------------------------------------------------------- assessed runs, ranking, tables


@dataclass(frozen=True)
class Assessed:
    """A sound (not damaged) run with its health, verdict and score."""

    run: Run
    health: Health
    verdict: Verdict

    @property
    def id(self) -> str:
        return self.run.id

    @property
    def spec(self) -> Spec:
        assert self.run.spec is not None
        return self.run.spec

    @property
    def score(self) -> float | None:
        return score(self.health)

    @property
    def level(self) -> str:
        return self.verdict.level

    @property
    def rank_key(self) -> tuple[int, bool, float, str]:
        s = self.score
        return LEVELS.index(self.level), s is None, s or 0.0, self.id


def assess(run: Run) -> Assessed:
    """Measure and judge one sound run (its statistics are read here, once)."""
    assert run.metrics is not None and not run.damaged, run.id
    health = measure(run.metrics, run.stats)
    return Assessed(run, health, verdict(health))


def ranking(items: Iterable[Assessed]) -> list[Assessed]:
    """Healthiest first: by verdict level, then by score (runs without a score last), then id."""
    return sorted(items, key=lambda i: i.rank_key)


def loss_scale(spec: Spec) -> str:
    """What puts a loss on its scale: schedule (and beta_end), latent normalisation and scale."""
    noise, data = spec.noise, spec.data
    schedule = noise.schedule
    if schedule == "ddim":
        schedule += f" β_end {fmt(noise.beta_end if noise.beta_end is not None else 0.02)}"
    if noise.num_train_timesteps != 1000:
        schedule += f" over {fmt(noise.num_train_timesteps)} steps"
    latents = ("standardised, " if data.normalize == "standardize" else "") + f"×{fmt(data.scale)}"
    return f"{schedule}, latents {latents}"


# Columns of an axis table and the value of each for one run (formatted by `fmt`, strings as they are).
COLUMNS: dict[str, Any] = {
    "max std": lambda i: i.health.max_std,
    "in module": lambda i: i.health.max_std_module,
    "std growth": lambda i: i.health.std_growth,
    "mean drift": lambda i: i.health.mean_drift,
    "dead early": lambda i: i.health.dead_early,
    "dead late": lambda i: i.health.dead_late,
    "loss spikes": lambda i: i.health.loss_spikes,
    "max loss ratio": lambda i: i.health.max_loss_ratio,
    "non-finite steps": lambda i: i.health.nonfinite_steps,
    "noise / latents": lambda i: loss_scale(i.spec),
    "profile": lambda i: i.spec.profile,
    "steps": lambda i: i.health.steps,
    "train loss": lambda i: i.health.train_loss,
    "valid loss": lambda i: i.health.valid_loss,
    "valid ÷ train": lambda i: i.health.valid_gap,
    "valid ÷ train (batch stats)": lambda i: i.health.valid_gap_batch_stats,
    "BN running gap": lambda i: i.health.bn_gap,
    "diverged at step": lambda i: i.health.diverged_at_step,
}


@dataclass(frozen=True)
class Row:
    item: Assessed
    role: str  # "" | "reference" | "course reference"
    cells: tuple[str, ...]  # formatted, aligned with COLUMNS
    sort_keys: tuple[str, ...]  # raw values for a sortable table's data-sort

    @property
    def id(self) -> str:
        return self.item.id

    @property
    def health(self) -> Health:
        return self.item.health

    @property
    def level(self) -> str:
        return self.item.level


@dataclass(frozen=True)
class AxisTable:
    group: str
    axis: str
    rows: tuple[Row, ...]
    columns: tuple[str, ...] = tuple(COLUMNS)


def _row(item: Assessed) -> Row:
    raw = [value(item) for value in COLUMNS.values()]
    cells = tuple(DASH if v is None else v if isinstance(v, str) else fmt(v) for v in raw)
    keys = tuple("" if v is None else v if isinstance(v, str) else repr(float(v)) for v in raw)
    return Row(item, ROLES.get(item.id, ""), cells, keys)


def axis_tables(items: list[Assessed]) -> list[AxisTable]:
    """One table per (spec.group, spec.axis), in order of first appearance. Rows keep the runs' order with
    the reference runs first; hyperparameter axes also get diffusers_baseline as a reference row."""
    reference = next((i for i in items if i.id == REFERENCE_ID), None)
    groups: dict[tuple[str, str], list[Assessed]] = {}
    for item in items:
        groups.setdefault((item.spec.group, item.spec.axis), []).append(item)
    tables = []
    for (group, axis), members in groups.items():
        if group == "hyperparameters" and reference is not None and reference not in members:
            members = [reference, *members]
        members = sorted(members, key=lambda i: list(ROLES).index(i.id) if i.id in ROLES else len(ROLES))
        tables.append(AxisTable(group, axis, tuple(_row(i) for i in members)))
    return tables


DEAD_BELOW = BIN_WIDTH  # |a| below this counts as dead (the lowest histogram bin)
