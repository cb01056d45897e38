"""Health measures, verdicts and measured sentences from run folders (metrics.json + stats.npz).

Pure analysis with numpy: nothing here plots or writes files. The data flow is

    runs (objects with .spec, .metrics and .health, or .stats / .run_dir to compute it)
      -> assess(runs)            one Assessed per run: Health (measure) + Verdict (verdict)
      -> axis_tables / ranking   tables of formatted cells, one per (spec.group, spec.axis)
      -> axis_sentences / takeaways / scale_note   sentences generated from the same numbers

Every number shown on a page goes through `fmt`, both in table cells and in sentences, so a sentence
never states a number the table does not show. `*_context` functions build the variables of the
templates templates/site/insights_*.md.j2 and method_measures.md.j2 (rendered by runner.site).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DASH = "\u2014"
REFERENCE_ID = "diffusers_baseline"  # the Diffusers UNet as first used: the configuration to explain
COURSE_ID = "course_baseline"  # the fast.ai course UNet: the run every variant is read against
ROLES = {REFERENCE_ID: "reference", COURSE_ID: "course reference"}

WINDOW_SHARE = 0.1  # "early" / "late" = the first / last 10% of recorded steps (at least one step)
SPIKE_FACTOR = 2.0  # a batch loss above this multiple of the running minimum is a spike
SPIKE_SMOOTH = 10  # steps in the trailing median whose running minimum is the spike baseline
STATS_FILE = "stats.npz"

MEASURES: dict[str, str] = {
    "max std": "The largest activation standard deviation of any watched module at any step, and the module.",
    "std growth": (
        "For the module with the largest mean std over the last 10% of steps, that mean divided by its "
        "mean std over the first 10% of steps."
    ),
    "mean drift": (
        "The largest absolute change of a module's mean activation between the first and last 10% of steps."
    ),
    "dead early / dead late": (
        "The share of |activations| in the lowest histogram bin (below 0.25), averaged over modules and "
        "over the first / last 10% of steps."
    ),
    "loss spikes": (
        f"The number of steps after the first 10% whose batch loss exceeds {SPIKE_FACTOR:g} times the "
        f"running minimum, over all earlier steps, of the {SPIKE_SMOOTH}-step trailing median of the "
        "batch loss."
    ),
    "max loss ratio": (
        "The largest ratio, after the first 10% of steps, of a batch loss to that same running minimum "
        f"(a spike when above {SPIKE_FACTOR:g})."
    ),
    "non-finite steps": (
        "The number of steps at which some module's activation std was infinite, or NaN although the "
        "module ran."
    ),
    "valid ÷ train": (
        "The final validation loss divided by the final train loss; with BatchNorm also with batch "
        "statistics instead of running statistics."
    ),
    "diverged": "Whether training was stopped because the loss became non-finite or exceeded its limit.",
}

SCORE = (
    "Health score (lower is healthier): log10 of max std, plus log10 of std growth, plus dead late, "
    "plus log10 of max loss ratio, each floored at zero and skipped when missing; runs are ordered by "
    "verdict first, then by this score."
)


@dataclass(frozen=True)
class Threshold:
    level: str  # "unhealthy" | "warning"
    measure: str  # a Health field
    limit: float  # a run passes when the measure is <= limit (missing measures pass)
    text: str  # one sentence for the Method page


# Not data-fitted: set from what the course UNet and the exploding Diffusers runs look like (stds near 1
# versus in the hundreds), loose enough that a healthy run does not trip them on noise.
THRESHOLDS: dict[str, Threshold] = {
    "unhealthy_max_std": Threshold("unhealthy", "max_std", 50.0,
        "A module std above 50 means the activations exploded."),
    "unhealthy_std_growth": Threshold("unhealthy", "std_growth", 20.0,
        "A largest std that grew more than 20-fold during training is runaway."),
    "unhealthy_loss_ratio": Threshold("unhealthy", "max_loss_ratio", 5.0,
        "A batch loss above 5 times its running minimum means the loss rocketed."),
    "unhealthy_nonfinite": Threshold("unhealthy", "nonfinite_steps", 0.0,
        "Any step with a non-finite activation std means the network overflowed."),
    "warning_max_std": Threshold("warning", "max_std", 5.0,
        "A module std above 5 is well beyond the near-1 of a well-scaled network."),
    "warning_std_growth": Threshold("warning", "std_growth", 4.0,
        "A largest std that grew more than 4-fold is drifting rather than steady."),
    "warning_mean_drift": Threshold("warning", "mean_drift", 3.0,
        "A module mean that moved by more than 3 has shifted its whole distribution."),
    "warning_dead_late": Threshold("warning", "dead_late", 0.5,
        "More than half of the activations near zero late in training wastes capacity."),
    "warning_valid_gap": Threshold("warning", "valid_gap", 2.0,
        "A valid loss above twice the train loss points at a train/eval mismatch such as "
        "BatchNorm running statistics."),
    "warning_loss_spikes": Threshold("warning", "loss_spikes", 2.0,
        "More than two loss spikes are more than an unlucky batch."),
}

LEVELS = ("healthy", "warning", "unhealthy")
# The groups with an insight page (insights/<group>.md), and the page titles.
PAGE_TITLES = {"architecture": "Layer architecture insights", "hyperparameters": "Hyperparameter insights"}
SUMMARY_TITLE = "Writeup: what makes training healthy"
READING_TITLE = "How to read activation statistics"
CHART_TITLES = {"loss": "Loss", "stats": "Activation mean and std", "hist": "Activation histograms",
                "dead": "Dead activations"}
_COUNT_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve")


# ---------------------------------------------------------------- formatting


def axis_slugs(axes: Iterable[str]) -> dict[str, str]:
    """A distinct, URL- and file-safe slug per axis name (for heading anchors and chart file names):
    lowercase letters, digits, '_' and '-' only, suffixed -2, -3 ... where two names would collide."""
    out: dict[str, str] = {}
    for axis in dict.fromkeys(axes):
        base = re.sub(r"[^a-z0-9_-]+", "-", axis.lower()).strip("-_")[:60] or "axis"
        slug, n = base, 2
        while slug in out.values():
            slug, n = f"{base}-{n}", n + 1
        out[axis] = slug
    return out



def fmt(x: Any) -> str:
    """The one number format of the insight pages: ints exactly, floats to 3 significant digits
    (trailing zeros dropped, scientific below 1e-4 or from 1e5), "∞" for +inf, DASH for None/NaN."""
    if x is None or isinstance(x, bool):
        return DASH
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    try:
        x = float(x)
    except (TypeError, ValueError):
        return DASH
    if math.isnan(x):
        return DASH
    if math.isinf(x):
        return "\u221e" if x > 0 else "-\u221e"
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    if mag >= 5 or mag < -4:
        return f"{x:.2e}"
    decimals = 2 - mag
    if decimals <= 0:
        return str(int(round(x, decimals)))
    return f"{round(x, decimals):.{decimals}f}".rstrip("0").rstrip(".")


def _count(n: int) -> str:
    # Counts are spelled out so that every digit in a sentence is a number from the table.
    return _COUNT_WORDS[n] if 0 <= n < len(_COUNT_WORDS) else str(n)


def _join(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _short(name: str) -> str:
    try:
        from runner.charts import short_name  # lazy: charts imports matplotlib
    except ImportError:
        return name
    return short_name(name)


# ---------------------------------------------------------------- health measures


@dataclass(frozen=True)
class Health:
    """Measures of one run; a field is None when it cannot be computed (e.g. no stats for a failed run)."""

    status: str
    steps: int | None = None  # optimiser steps completed
    has_stats: bool = False
    max_std: float | None = None
    max_std_module: str | None = None
    max_std_step: int | None = None  # 1-based optimiser step
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


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.number)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


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


def _stats_measures(stats: Mapping[str, Any]) -> dict[str, Any]:
    from runner.stats import dead_share  # torch only when statistics are read

    mean, std = _finite(stats["mean"]), _finite(stats["std"])
    if std.ndim != 2 or std.shape[0] == 0 or std.shape[1] == 0 or mean.shape != std.shape:
        return {}
    steps, modules = std.shape
    raw_names = stats.get("names")
    names = [str(n) for n in raw_names] if raw_names is not None else []
    if len(names) != modules:
        names = [f"module{i}" for i in range(modules)]
    k = _window(steps)
    out: dict[str, Any] = {"has_stats": True}
    out["nonfinite_steps"] = _nonfinite_steps(np.asarray(stats["std"], dtype=np.float64), stats.get("hist"))
    if np.isfinite(std).any():
        step, mod = np.unravel_index(np.nanargmax(std), std.shape)
        out.update(max_std=float(std[step, mod]), max_std_module=_short(names[mod]),
                   max_std_step=int(step) + 1)
    early, late = _nanmean(std[:k], axis=0), _nanmean(std[-k:], axis=0)
    if np.isfinite(late).any():
        m = int(np.nanargmax(late))
        if np.isfinite(early[m]) and early[m] > 0:
            out.update(std_growth=float(late[m] / early[m]), std_growth_module=_short(names[m]))
    drift = np.abs(_nanmean(mean[-k:], axis=0) - _nanmean(mean[:k], axis=0))
    if np.isfinite(drift).any():
        m = int(np.nanargmax(drift))
        out.update(mean_drift=float(drift[m]), mean_drift_module=_short(names[m]))
    hist = stats.get("hist")
    if hist is not None and np.ndim(hist) == 3 and np.shape(hist)[::2] == (modules, steps):
        dead = dead_share(hist)
        out["dead_early"] = _num(_nanmean(dead[:, :k]))
        out["dead_late"] = _num(_nanmean(dead[:, -k:]))
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def measure(metrics: Mapping[str, Any], stats: Mapping[str, Any] | None) -> Health:
    """Health of one run from its metrics.json dict and its stats dict (mean, std, hist, names) or None."""
    status = str(metrics.get("status") or "failed")
    final = metrics.get("final") or {}
    loss = (metrics.get("batches") or {}).get("loss") or []
    diverged_at = metrics.get("diverged_at_step")
    steps = metrics.get("steps_completed")
    train, valid, valid_bs = (_num(final.get(k))
                              for k in ("train_loss", "valid_loss", "valid_loss_batch_stats"))
    spikes, ratio = loss_spikes(loss)
    values: dict[str, Any] = {
        "status": status,
        "steps": int(steps) if isinstance(steps, (int, np.integer)) else (len(loss) or None),
        "loss_spikes": spikes,
        "max_loss_ratio": ratio,
        "diverged": status == "diverged" or diverged_at is not None,
        "diverged_at_step": int(diverged_at) if isinstance(diverged_at, (int, np.integer)) else None,
        "error": str(metrics["error"]) if metrics.get("error") else None,
        "train_loss": train,
        "valid_loss": valid,
        "valid_loss_batch_stats": valid_bs,
        "valid_gap": _ratio(valid, train),
        "valid_gap_batch_stats": _ratio(valid_bs, train),
    }
    if stats is not None and "std" in stats and "mean" in stats:
        values.update(_stats_measures(stats))
    return Health(**values)


def load_stats_npz(path: str | Path) -> dict[str, Any] | None:
    """The run's statistics file (runner.stats' reader), or None when it is missing or unreadable."""
    from runner.stats import load_stats

    try:
        return load_stats(path)
    except (OSError, ValueError, KeyError, EOFError):
        return None


# ---------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Verdict:
    level: str  # "healthy" | "warning" | "unhealthy"
    reasons: tuple[str, ...] = ()


_REASON_NAMES = {
    "max_std": "max std", "std_growth": "std growth", "max_loss_ratio": "max loss ratio",
    "nonfinite_steps": "non-finite steps", "mean_drift": "mean drift", "dead_late": "dead share late",
    "valid_gap": "valid ÷ train loss", "loss_spikes": "loss spikes",
}
_REASON_MODULE = {"max_std": "max_std_module", "std_growth": "std_growth_module",
                  "mean_drift": "mean_drift_module"}


def _reason(h: Health, t: Threshold) -> str:
    value = getattr(h, t.measure)
    module = getattr(h, _REASON_MODULE[t.measure]) if t.measure in _REASON_MODULE else None
    where = f" in {module}" if module else ""
    return f"{_REASON_NAMES[t.measure]} {fmt(value)}{where} (threshold {fmt(t.limit)})"


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
    """The health score of SCORE (lower is healthier); None without activation statistics."""
    if health.max_std is None:
        return None
    parts = (health.max_std, health.std_growth, health.max_loss_ratio)
    total = sum(max(math.log10(p), 0.0) for p in parts if p is not None and p > 0)
    return total + (health.dead_late or 0.0)


# ---------------------------------------------------------------- runs


@dataclass(frozen=True)
class Assessed:
    """A run with its health and verdict; `run` is the object it was made from."""

    id: str
    spec: Any
    metrics: Mapping[str, Any]
    health: Health
    verdict: Verdict
    run: Any = None
    charts: Mapping[str, Any] = field(default_factory=dict)


def _stats_of(run: Any) -> Mapping[str, Any] | None:
    stats = getattr(run, "stats", None)
    if stats is not None:
        return stats
    run_dir = getattr(run, "run_dir", None)
    if run_dir is not None and (Path(run_dir) / STATS_FILE).is_file():
        return load_stats_npz(Path(run_dir) / STATS_FILE)
    return None


def assess(runs: Iterable[Any]) -> list[Assessed]:
    """Health and verdict of each run (order kept). A run needs .spec and .metrics; its health comes from
    .health if present, else from .stats (dict) or .run_dir/stats.npz. Assessed items pass through."""
    out = []
    for run in runs:
        if isinstance(run, Assessed):
            out.append(run)
            continue
        health = getattr(run, "health", None)
        if health is None:
            health = measure(run.metrics or {}, _stats_of(run))
        run_id = getattr(run, "id", None) or run.spec.id
        out.append(Assessed(run_id, run.spec, run.metrics or {}, health, verdict(health), run,
                            dict(getattr(run, "charts", None) or {})))
    return out


def _loss_scale(spec: Any) -> str:
    """What puts a loss on its scale: schedule (and beta_end), latent normalisation and scale."""
    noise, data = spec.noise, spec.data
    schedule = noise.schedule
    if schedule == "ddim":
        schedule += f" β_end {fmt(noise.beta_end if noise.beta_end is not None else 0.02)}"
    if noise.num_train_timesteps != 1000:
        schedule += f" over {fmt(noise.num_train_timesteps)} steps"
    latents = ("standardised, " if data.normalize == "standardize" else "") + f"×{fmt(data.scale)}"
    return f"{schedule}, latents {latents}"


# ---------------------------------------------------------------- axis tables

COLUMNS = ("max std", "in module", "std growth", "mean drift", "dead early", "dead late", "loss spikes",
           "max loss ratio", "non-finite steps", "noise / latents", "profile", "steps", "train loss",
           "valid loss", "valid ÷ train", "valid ÷ train (batch stats)", "diverged at step")


@dataclass(frozen=True)
class Row:
    id: str
    title: str
    role: str  # "" | "reference" | "course reference"
    level: str
    reasons: tuple[str, ...]
    cells: tuple[str, ...]  # formatted with fmt, aligned with COLUMNS
    sort_keys: tuple[str, ...]  # raw values for a sortable table's data-sort
    loss_scale: str
    item: Assessed

    @property
    def health(self) -> Health:
        return self.item.health


@dataclass(frozen=True)
class AxisTable:
    group: str
    axis: str
    rows: tuple[Row, ...]
    columns: tuple[str, ...] = COLUMNS


def _cells(item: Assessed, scale: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    h = item.health
    raw = (h.max_std, h.max_std_module, h.std_growth, h.mean_drift, h.dead_early, h.dead_late, h.loss_spikes,
           h.max_loss_ratio, h.nonfinite_steps, scale, item.spec.profile, h.steps, h.train_loss, h.valid_loss,
           h.valid_gap, h.valid_gap_batch_stats, h.diverged_at_step)
    cells = tuple(DASH if v is None else v if isinstance(v, str) else fmt(v) for v in raw)
    keys = tuple("" if v is None else str(v) if isinstance(v, str) else repr(float(v)) for v in raw)
    return cells, keys


def _row(item: Assessed) -> Row:
    scale = _loss_scale(item.spec)
    cells, keys = _cells(item, scale)
    return Row(item.id, item.spec.title or item.id, ROLES.get(item.id, ""), item.verdict.level,
               item.verdict.reasons, cells, keys, scale, item)


def axis_tables(runs: Iterable[Any]) -> list[AxisTable]:
    """One table per (spec.group, spec.axis), in order of first appearance. Rows keep the runs' order with
    the reference runs first; hyperparameter axes also get diffusers_baseline as a reference row."""
    items = assess(runs)
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


def _fold(ratio: float) -> str:
    """A ratio in words (no digits, so the sentence's numbers stay those of the table)."""
    for limit, words in ((1000, "over a thousandfold lower"), (100, "over a hundredfold lower"),
                         (10, "over tenfold lower"), (5, "under a fifth of it"), (4, "under a quarter of it"),
                         (3, "under a third of it"), (2, "under half of it"), (1.25, "lower")):
        if ratio >= limit:
            return words
    return "slightly lower"


def _std_sentence(table: AxisTable) -> str | None:
    rows = [r for r in table.rows if r.health.max_std is not None]
    if len(rows) < 2:
        return None
    best = min(rows, key=lambda r: r.health.max_std)
    ref = next((r for r in rows if r.role == "reference" and r is not best), None)
    other = ref or max(rows, key=lambda r: r.health.max_std)
    lead = f"Of the {_count(len(table.rows))} runs on {table.axis}, {best.id} kept its largest std lowest"
    a, b = best.health.max_std, other.health.max_std
    if b <= a:
        return f"{lead} ({fmt(a)}), level with {other.id} ({fmt(b)})."
    return f"{lead} ({fmt(a)}, against {fmt(b)} for {other.id}: {_fold(b / a)})."


def _lowest(rows: list[Row], value: Callable[[Row], float]) -> tuple[list[str], Row, Row]:
    """Ids of the rows that share the lowest shown value (ties by `fmt`), that row, and the highest row."""
    low, high = min(rows, key=value), max(rows, key=value)
    return [r.id for r in rows if fmt(value(r)) == fmt(value(low))], low, high


def _growth_sentence(table: AxisTable) -> str | None:
    rows = [r for r in table.rows if r.health.std_growth is not None]
    if len(rows) < 2:
        return None
    ids, low, high = _lowest(rows, lambda r: r.health.std_growth)
    if len(ids) == len(rows):
        return f"Every run's largest std grew by the same factor ({fmt(low.health.std_growth)})."
    return (f"Std growth was lowest for {_join(ids)} ({fmt(low.health.std_growth)}) and highest for "
            f"{high.id} ({fmt(high.health.std_growth)}, in {high.health.std_growth_module}).")


def _dead_sentence(table: AxisTable) -> str | None:
    rows = [r for r in table.rows if r.health.dead_late is not None]
    if len(rows) < 2:
        return None
    ids, best, worst = _lowest(rows, lambda r: r.health.dead_late)
    if len(ids) == len(rows):
        return f"All runs ended with the same dead share ({fmt(best.health.dead_late)})."
    return (f"Fewest dead activations late in training: {_join(ids)} (dead share "
            f"{fmt(best.health.dead_late)}, against {fmt(worst.health.dead_late)} for {worst.id}).")


def _loss_sentences(table: AxisTable) -> list[str]:
    """Lowest final valid loss within each noise/latent scale; never across scales (the loss of another
    schedule or latent scale is on another scale, so comparing it would mislead)."""
    out = []
    done = [r for r in table.rows if r.health.status == "completed" and r.health.valid_loss is not None]
    left = [r.id for r in table.rows if r.health.status != "completed" and r.health.valid_loss is not None]
    scales: dict[str, list[Row]] = {}
    for r in done:
        scales.setdefault(r.loss_scale, []).append(r)
    for scale, rows in scales.items():
        if len(rows) < 2:
            continue
        ids, best, worst = _lowest(rows, lambda r: r.health.valid_loss)
        among = f" among the runs with {scale}" if len(scales) > 1 else ""
        if len(ids) == len(rows):
            out.append(f"All runs{among} ended at the same final valid loss ({fmt(best.health.valid_loss)}).")
            continue
        out.append(f"Lowest final valid loss{among}: {_join(ids)} ({fmt(best.health.valid_loss)}, against "
                   f"{fmt(worst.health.valid_loss)} for {worst.id}).")
    if len(scales) > 1:
        main = max(scales, key=lambda k: len(scales[k]))
        others = [(scale, [r.id for r in rows]) for scale, rows in scales.items() if scale != main]
        parts = "; ".join(f"{_join(ids)} ({scale})" for scale, ids in others)
        verb = "is" if len(others) == 1 and len(others[0][1]) == 1 else "are"
        out.append(f"Losses are not compared across noise schedules or latent scales, which change the scale "
                   f"of the loss: {parts} {verb} not compared with the runs with {main}.")
    if left:
        out.append(f"{_join(left)} stopped early, so {'its' if len(left) == 1 else 'their'} losses are left "
                   "out of the loss comparison.")
    return out


def _failure_sentences(table: AxisTable) -> list[str]:
    out = []
    for r in table.rows:
        h = r.health
        if h.diverged:
            at = f" at step {fmt(h.diverged_at_step)}" if h.diverged_at_step is not None else ""
            out.append(f"{r.id} diverged{at}.")
        elif h.status not in ("completed", "diverged"):
            tail = "" if h.has_stats else " before recording activation statistics"
            out.append(f"{r.id} failed{tail}.")
    return out


def _gap_sentences(table: AxisTable) -> list[str]:
    rows = [r for r in table.rows
            if r.health.valid_gap is not None and r.health.valid_gap_batch_stats is not None]
    return [f"With BatchNorm, {r.id}'s valid loss was {fmt(r.health.valid_gap)}× its train loss with running "
            f"statistics and {fmt(r.health.valid_gap_batch_stats)}× with batch statistics." for r in rows]


def _verdict_sentence(table: AxisTable) -> str:
    parts = []
    for level in LEVELS:
        ids = [r.id for r in table.rows if r.level == level]
        if ids:
            parts.append(f"{level}: {_join(ids)}")
    return "Verdicts: " + "; ".join(parts) + "."


def axis_sentences(table: AxisTable) -> list[str]:
    """Sentences generated from the table's numbers (each number as `fmt` shows it in the table)."""
    if not table.rows:
        return [f"No runs on {table.axis} yet: there is nothing to compare."]
    if len(table.rows) == 1:
        return [f"Only one run on {table.axis} so far ({table.rows[0].id}): there is nothing to compare."]
    out: list[str] = []
    profiles = sorted({r.item.spec.profile for r in table.rows})
    if len(profiles) > 1:
        out.append(f"These runs come from different profiles ({_join(profiles)}), so their numbers are not "
                   "directly comparable.")
    for sentence in (_std_sentence(table), _growth_sentence(table), _dead_sentence(table)):
        if sentence:
            out.append(sentence)
    out += _loss_sentences(table) + _gap_sentences(table) + _failure_sentences(table)
    out.append(_verdict_sentence(table))
    return out


# ---------------------------------------------------------------- ranking, takeaways, scale


@dataclass(frozen=True)
class RankedRun:
    rank: int
    id: str
    title: str
    group: str
    axis: str
    verdict: Verdict
    score: float | None
    item: Assessed

    @property
    def health(self) -> Health:
        return self.item.health


def ranking(runs: Iterable[Any]) -> list[RankedRun]:
    """Runs ordered healthiest first: by verdict level, then by `score` (runs without a score last)."""
    items = assess(runs)
    keyed = sorted(items, key=lambda i: (LEVELS.index(i.verdict.level), score(i.health) is None,
                                         score(i.health) or 0.0, i.id))
    return [RankedRun(n, i.id, i.spec.title or i.id, i.spec.group, i.spec.axis, i.verdict, score(i.health), i)
            for n, i in enumerate(keyed, start=1)]


@dataclass(frozen=True)
class Takeaway:
    text: str
    ids: tuple[str, ...]  # runs the sentence is about, to link

    def __str__(self) -> str:
        return self.text


def _baseline_takeaway(by_id: dict[str, Assessed]) -> Takeaway | None:
    course, ref = by_id.get(COURSE_ID), by_id.get(REFERENCE_ID)
    if not course or not ref or course.health.max_std is None or ref.health.max_std is None:
        return None
    where = f" in {ref.health.max_std_module}" if ref.health.max_std_module else ""
    return Takeaway(f"The course UNet's largest activation std stayed at {fmt(course.health.max_std)} "
                    f"({course.verdict.level}), while the Diffusers baseline reached "
                    f"{fmt(ref.health.max_std)}{where} ({ref.verdict.level}).", (COURSE_ID, REFERENCE_ID))


def _fix_takeaway(items: list[Assessed], by_id: dict[str, Assessed]) -> Takeaway | None:
    ref = by_id.get(REFERENCE_ID)
    if ref is None:
        return None
    variants = [i for i in items if i.spec.model.family == "diffusers" and i.id != REFERENCE_ID]
    if ref.verdict.level == "healthy":
        return Takeaway(f"The Diffusers baseline was judged healthy at this scale (largest std "
                        f"{fmt(ref.health.max_std)}), so its variants had nothing to fix here.",
                        (REFERENCE_ID,))
    fixed = [i.id for i in variants if LEVELS.index(i.verdict.level) < LEVELS.index(ref.verdict.level)]
    if not fixed:
        return Takeaway(f"No Diffusers variant was judged healthier than the baseline ({ref.verdict.level}).",
                        (REFERENCE_ID,))
    return Takeaway(f"Judged healthier than the Diffusers baseline ({ref.verdict.level}): {_join(fixed)}.",
                    (REFERENCE_ID, *fixed))


def _batchnorm_takeaway(items: list[Assessed]) -> Takeaway | None:
    both = [i for i in items if i.health.valid_gap is not None and i.health.valid_gap_batch_stats is not None]
    if not both:
        return None
    parts = [f"{i.id} {fmt(i.health.valid_gap)}× vs {fmt(i.health.valid_gap_batch_stats)}×" for i in both]
    return Takeaway("BatchNorm, valid loss as a multiple of train loss with running statistics vs with batch "
                    f"statistics: {'; '.join(parts)}.", tuple(i.id for i in both))


def _misleading_loss_takeaway(items: list[Assessed]) -> Takeaway | None:
    """The pair, within one loss scale, where the lower valid loss came with the larger std ratio."""
    done = [i for i in items if i.health.status == "completed" and i.health.valid_loss is not None
            and i.health.max_std]
    best: tuple[float, Assessed, Assessed] | None = None
    for a in done:
        for b in done:
            if (_loss_scale(a.spec) == _loss_scale(b.spec) and a.health.valid_loss < b.health.valid_loss
                    and a.health.max_std > b.health.max_std):
                ratio = a.health.max_std / b.health.max_std
                if best is None or ratio > best[0]:
                    best = (ratio, a, b)
    if best is None:
        return None
    _, a, b = best
    return Takeaway(f"Loss alone misleads: {a.id} reached a lower valid loss than {b.id} "
                    f"({fmt(a.health.valid_loss)} vs {fmt(b.health.valid_loss)}) while its largest std was "
                    f"{fmt(a.health.max_std)} against {fmt(b.health.max_std)}.", (a.id, b.id))


def _group_takeaways(items: list[Assessed]) -> list[Takeaway]:
    out = []
    for group in dict.fromkeys(i.spec.group for i in items):
        members = [r for r in ranking([i for i in items if i.spec.group == group]) if r.score is not None]
        if len(members) < 2:
            continue
        top = members[0]
        out.append(Takeaway(f"Healthiest in {group}: {top.id} ({top.verdict.level}, largest std "
                            f"{fmt(top.health.max_std)}, dead share late {fmt(top.health.dead_late)}).",
                            (top.id,)))
    return out


def _diverged_takeaway(items: list[Assessed]) -> Takeaway | None:
    div = [i for i in items if i.health.diverged]
    if not div:
        return None
    parts = [f"{i.id}" + (f" (step {fmt(i.health.diverged_at_step)})" if i.health.diverged_at_step else "")
             for i in div]
    return Takeaway(f"Diverged: {_join(parts)}.", tuple(i.id for i in div))


def takeaways(runs: Iterable[Any]) -> list[Takeaway]:
    """Measured takeaways for the summary page, each with the ids of the runs it is about."""
    items = assess(runs)
    by_id = {i.id: i for i in items}
    found = [_baseline_takeaway(by_id), _fix_takeaway(items, by_id), *_group_takeaways(items),
             _batchnorm_takeaway(items), _misleading_loss_takeaway(items), _diverged_takeaway(items)]
    return [t for t in found if t is not None]


def _plural(n: int, word: str, shown: str) -> str:
    return f"{shown} {word}{'' if n == 1 else 's'}"


def _span(values: Iterable[Any]) -> str:
    vals = sorted({v for v in values if v is not None})
    if not vals:
        return DASH
    return fmt(vals[0]) if len(vals) == 1 else f"{fmt(vals[0])} to {fmt(vals[-1])}"


def scale_note(runs: Iterable[Any]) -> str:
    """The scale the statements hold at: profile(s), data size, epochs and optimiser steps of the runs."""
    items = assess(runs)
    if not items:
        return "No runs yet, so no statements."
    parts = []
    for profile in dict.fromkeys(i.spec.profile for i in items):
        members = [i for i in items if i.spec.profile == profile]
        sizes = [i.spec.data.size for i in members]
        trains = [round(0.9 * s) for s in sizes]
        epochs = [i.spec.train.epochs for i in members]
        steps = [i.health.steps for i in members]
        parts.append(f"{_plural(len(members), 'run', _count(len(members)))} of the {profile} profile on "
                     f"{_span(sizes)} latents ({_span(trains)} for training), "
                     f"{_plural(max(epochs), 'epoch', _span(epochs))}, "
                     f"{_plural(max((s for s in steps if s), default=0), 'optimiser step', _span(steps))}, "
                     f"batch size {_span(i.spec.train.batch_size for i in members)}")
    return ("Measured on " + "; ".join(parts) + ". The statements hold at this scale; effects that need "
            "longer training or more data may not show.")


def examples(runs: Iterable[Any], need: Sequence[str] = ("stats", "hist", "dead")) -> tuple[
        RankedRun | None, RankedRun | None]:
    """(healthiest, least healthy) runs with activation statistics, for the reading guide. Runs that carry
    a `charts` mapping must have every chart kind in `need`; least healthy is None with only one run."""
    ranked = [r for r in ranking(runs) if r.score is not None
              and (not r.item.charts or all(k in r.item.charts for k in need))]
    if not ranked:
        return None, None
    return ranked[0], (ranked[-1] if len(ranked) > 1 else None)


# ---------------------------------------------------------------- template contexts

ChartLinks = Mapping[str, Sequence[tuple[str, str]]]


def _row_dict(row: Row) -> dict[str, Any]:
    return {"id": row.id, "title": row.title, "role": row.role, "level": row.level,
            "reasons": list(row.reasons), "cells": list(zip(row.cells, row.sort_keys, strict=True))}


def axis_page_context(runs: Iterable[Any], group: str, charts: ChartLinks | None = None) -> dict[str, Any]:
    """Variables of insights_axis.md.j2 for one group (e.g. "architecture"); `charts` maps an axis name to
    [(chart kind, image path relative to the page)]. Each axis has a `slug` (its heading's anchor)."""
    items = assess(runs)
    tables = [t for t in axis_tables(items) if t.group == group]
    slugs = axis_slugs(t.axis for t in tables)
    # The scale of what the page shows: its runs and the reference rows added to its tables (none: the
    # page makes no statements, so it names no scale either).
    scope = list({r.id: r.item for t in tables for r in t.rows}.values())
    return {
        "title": PAGE_TITLES.get(group, f"{group.capitalize()} insights"),
        "group": group,
        "scale_note": scale_note(scope),
        "axes": [{"name": t.axis, "slug": slugs[t.axis], "sentences": axis_sentences(t),
                  "columns": list(t.columns), "rows": [_row_dict(r) for r in t.rows],
                  "charts": [{"kind": kind, "title": CHART_TITLES.get(kind, kind), "src": src}
                             for kind, src in (charts or {}).get(t.axis, ())]} for t in tables],
    }


def axis_anchors(runs: Iterable[Any]) -> dict[tuple[str, str], tuple[str, str]]:
    """(group, axis) -> (insight page stem, heading anchor) of that axis's section, for the groups with a
    page (PAGE_TITLES); the template makes the link, as its file URLs depend on the site."""
    tables = axis_tables(runs)
    out = {}
    for group in PAGE_TITLES:
        slugs = axis_slugs(t.axis for t in tables if t.group == group)
        out.update({(group, axis): (group, slug) for axis, slug in slugs.items()})
    return out


def _example(r: RankedRun | None, charts: Mapping[str, Mapping[str, str]] | None) -> dict[str, Any] | None:
    if r is None:
        return None
    h = r.health
    return {"id": r.id, "title": r.title, "level": r.verdict.level, "reasons": list(r.verdict.reasons),
            "max_std": fmt(h.max_std), "max_std_module": h.max_std_module or DASH,
            "std_growth": fmt(h.std_growth),
            "dead_early": fmt(h.dead_early), "dead_late": fmt(h.dead_late),
            "charts": dict((charts or {}).get(r.id, {}))}


def reading_context(runs: Iterable[Any],
                    charts: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, Any]:
    """Variables of insights_reading.md.j2; `charts` maps a run id to {chart kind: image path}."""
    best, worst = examples(runs)
    return {"title": READING_TITLE, "healthiest": _example(best, charts),
            "least_healthy": _example(worst, charts)}


def summary_context(runs: Iterable[Any]) -> dict[str, Any]:
    """Variables of insights_summary.md.j2: ranking rows (with `axis_anchor`: (page stem, anchor) of the
    run's axis section, or None), takeaways (text + ids), verdict counts and the scale note."""
    items = assess(runs)
    anchors = axis_anchors(items)
    rows = [{"rank": r.rank, "id": r.id, "title": r.title, "group": r.group, "axis": r.axis,
             "axis_anchor": anchors.get((r.group, r.axis)), "level": r.verdict.level,
             "reasons": list(r.verdict.reasons), "score": fmt(r.score), "max_std": fmt(r.health.max_std),
             "dead_late": fmt(r.health.dead_late)} for r in ranking(items)]
    return {"title": SUMMARY_TITLE, "scale_note": scale_note(items), "ranking": rows, "score_text": SCORE,
            "counts": {level: sum(r["level"] == level for r in rows) for level in LEVELS},
            "takeaways": [{"text": t.text, "ids": list(t.ids)} for t in takeaways(items)]}


def method_context() -> dict[str, Any]:
    """Variables of method_measures.md.j2: the measures, thresholds and score, each with its sentence."""
    return {
        "measures": list(MEASURES.items()),
        "thresholds": [{"name": k, "level": t.level, "measure": _REASON_NAMES[t.measure],
                        "limit": fmt(t.limit), "text": t.text} for k, t in THRESHOLDS.items()],
        "score_text": SCORE,
        "window_share": f"{WINDOW_SHARE:.0%}",
    }
