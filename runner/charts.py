"""PNG charts from the files in a run folder (metrics.json, stats.npz).

Every chart kind is built by one function that takes a list of runs, so a single run's chart and the
side-by-side comparison of several runs share the same panel drawers and layout code: a single-run chart
is just the one-run case. Module small multiples wrap at WRAP panels a row, one block of rows per run.
Runs are `runner.results.Run`s: this module never parses a run file itself.

Figures are made with ``matplotlib.figure.Figure`` and an explicit Agg canvas, never with pyplot, so
nothing leaks into pyplot's global figure list or changes the backend of a notebook that imports us.
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from PIL import Image

from runner.bngap import RUNNING_GAP_LIMIT, gap_series
from runner.files import write_atomic
from runner.insights import _window  # the health measures' early/late window
from runner.results import Metrics, Run, load_run
from runner.statsfile import BIN_WIDTH, HIST_RANGE, Stats
from runner.text import fmt

CHART_KINDS = ("loss", "stats", "hist", "dead")
TITLES = {"loss": "Loss", "stats": "Activation mean and std", "hist": "Activation histograms",
          "dead": "Dead activations"}

CAPTIONS = {
    "loss": "Training loss per optimiser step (light: every batch, dark: smoothed) with validation loss "
    "as markers at each epoch end; a dashed red line marks where training diverged.",
    "stats": "Mean (left) and standard deviation (right) of each module's activations at every training "
    "step; healthy layers keep stds near 1, while stds that climb steadily or explode point to instability.",
    "hist": "The 'colorful dimension': for each module, a histogram of |activation| per step (time left to "
    "right, small values at the bottom, brighter = more activations); a bright band stuck at the bottom "
    "means most activations are near zero.",
    "dead": f"Share of each module's activations in the lowest histogram bin (|a| < {fmt(BIN_WIDTH)}, nearly "
    "zero) at every step; a share creeping towards one would mean the layer is dying or collapsing.",
}

DPI = 120
PALETTE_COLOURS = 48  # see _save
WIDTH = 11.0  # inches: fills a laptop screen at DPI without being scaled down by the browser
MAX_WIDTH = 30.0  # a cap on figure width (grids wrap at WRAP panels, so this is rarely reached)
WRAP = 6  # module small multiples per row: legible at the site's content width
LOG_DECADES = 2.0  # switch to a log axis when the data spans more than this many decades
DIVERGED_COLOR = "#d62728"


# ---------------------------------------------------------------------------------------------------
# names


_PREFIX = re.compile(r"^(?:(?:unet|model|module|_orig_mod)\.)+")
_REPLACEMENTS = (
    (re.compile(r"\bdown_blocks\.(\d+)"), r"down\1"),
    (re.compile(r"\bup_blocks\.(\d+)"), r"up\1"),
    (re.compile(r"\bdowns\.(\d+)"), r"down\1"),  # course UNet
    (re.compile(r"\bups\.(\d+)"), r"up\1"),
    (re.compile(r"\bmid_block\b"), "mid"),
    (re.compile(r"\bresnets\.(\d+)"), r"res\1"),
    (re.compile(r"\battentions\.(\d+)"), r"attn\1"),
    (re.compile(r"\bdownsamplers\.(\d+)"), r"dsamp\1"),
    (re.compile(r"\bupsamplers\.(\d+)"), r"usamp\1"),
)


def short_name(name: str) -> str:
    """Shorten a module path for legends and titles: ``unet.down_blocks.0.resnets.1`` -> ``down0.res1``.

    ``up_blocks.N`` -> ``upN``, ``mid_block`` -> ``mid``, ``attentions.N`` -> ``attnN``; wrapper prefixes
    (``unet.``, ``model.``, ``module.``, ``_orig_mod.``) are dropped. Unknown names are returned unchanged.
    """
    short = _PREFIX.sub("", name)
    for pattern, repl in _REPLACEMENTS:
        short = pattern.sub(repl, short)
    return short or name


# ---------------------------------------------------------------------------------------------------
# loading


@dataclass
class _Run:
    """What a chart needs of a run: its label and, when readable, its metrics and statistics."""

    label: str
    metrics: Metrics | None
    stats: Stats | None
    status: str

    @classmethod
    def of(cls, run: Run) -> _Run:
        """Nothing of a damaged run is drawn: it is shown as an empty panel saying it is damaged."""
        if run.damaged:
            return cls(run.id, None, None, "damaged")
        return cls(run.id, run.metrics, run.stats, run.status)

    @property
    def diverged_at(self) -> int | None:
        return self.metrics.diverged_at_step if self.metrics else None

    @property
    def names(self) -> list[str]:
        return list(self.stats.names) if self.stats else []

    @cached_property
    def dead(self) -> np.ndarray:
        """Dead share [modules, steps] (only meaningful when stats are present)."""
        return self.stats.dead if self.stats else np.zeros((0, 0))

    @property
    def x(self) -> np.ndarray:
        """Optimiser step (1-based, as in metrics.json) of each recorded statistics row."""
        return self.stats.steps + 1 if self.stats else np.zeros(0)

    def has(self, kind: str) -> bool:
        """Whether this run has anything to draw for a chart kind."""
        if kind == "loss":
            if self.metrics is None:
                return False
            return _finite(_losses(self.metrics)).size > 0 or bool(_valid(self.metrics)[0])
        return self.stats is not None and len(self.stats) > 0 and len(self.names) > 0


# ---------------------------------------------------------------------------------------------------
# data helpers


def _as_float(values: Sequence[Any] | None) -> np.ndarray:
    """JSON numbers (null for non-finite) -> float array with NaN for null."""
    return np.array([np.nan if v is None else float(v) for v in (values or [])], dtype=float)


def _finite(a: np.ndarray) -> np.ndarray:
    return a[np.isfinite(a)]


def _losses(metrics: Metrics) -> np.ndarray:
    return _as_float(metrics.batches.loss)


def _valid(metrics: Metrics, key: str = "valid_loss") -> tuple[list[float], list[float]]:
    """(steps, values) of an epoch-level validation series, skipping epochs without a finite value."""
    pairs = [(float(e.step), v) for e in metrics.epochs
             if (v := getattr(e, key)) is not None and math.isfinite(v)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _ema(values: np.ndarray) -> np.ndarray:
    """Debiased exponential moving average that steps over NaNs (left as gaps, so a non-finite loss is
    not drawn as a plateau); the span grows with run length."""
    span = min(max(len(values) // 15, 5), 200)
    beta = 1 - 2 / (span + 1)
    out = np.full_like(values, np.nan)
    avg, weight = 0.0, 0.0
    for i, v in enumerate(values):
        if np.isfinite(v):
            avg, weight = beta * avg + (1 - beta) * v, beta * weight + (1 - beta)
            out[i] = avg / weight
    return out


def _wants_log(*arrays: np.ndarray) -> bool:
    """True when the positive finite values span more than LOG_DECADES decades."""
    values = np.concatenate([_finite(np.ravel(a)) for a in arrays] or [np.zeros(0)])
    values = values[values > 0]
    return values.size > 1 and math.log10(values.max() / values.min()) > LOG_DECADES


def _steps(n: int) -> np.ndarray:
    # Step i of the batch arrays is optimiser step i + 1, matching the epoch-end "step" in metrics.json.
    return np.arange(1, n + 1)


def _module_colors(n: int) -> list[Any]:
    # Depth order (down -> mid -> up) maps to a continuous colormap once tab10/20 run out of colours.
    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["turbo"](i / max(n - 1, 1)) for i in range(n)]


# ---------------------------------------------------------------------------------------------------
# panel drawers (shared by single-run and comparison charts)


def _empty(ax: Axes, message: str, spill: bool = False) -> None:
    """Grey panel with a message; spill=True starts the text at the left edge so it may run on into the
    (removed) neighbouring cells of a small-multiples row instead of being squeezed into one small panel."""
    ax.text(0.05 if spill else 0.5, 0.5, message, ha="left" if spill else "center", va="center",
            transform=ax.transAxes, color="0.4", fontsize=9, clip_on=False)
    ax.set_facecolor("0.96")
    ax.tick_params(which="both", left=False, bottom=False, labelleft=False, labelbottom=False)


def _mark_divergence(ax: Axes, run: _Run) -> None:
    if run.diverged_at is not None:
        ax.axvline(run.diverged_at, color=DIVERGED_COLOR, ls="--", lw=1.2, label="diverged")


def _draw_loss(ax: Axes, run: _Run, color: Any = None) -> None:
    """Batch loss (light), its EMA (dark) and validation markers; color=None is the detailed one-run style."""
    assert run.metrics is not None
    loss = _losses(run.metrics)
    x = _steps(len(loss))
    single = color is None
    ax.plot(x, loss, color=color or "C0", alpha=0.3 if single else 0.15, lw=0.8,
            label="train (per batch)" if single else None)
    ax.plot(x, _ema(loss), color=color or "C0", lw=1.8, label="train (smoothed)" if single else run.label)
    for key, marker, fill, name in (("valid_loss", "o", True, "valid"),
                                    ("valid_loss_batch_stats", "s", False, "valid (batch statistics)")):
        steps, values = _valid(run.metrics, key)
        if steps:
            c = (color or ("C1" if key == "valid_loss" else "C2"))
            ax.plot(steps, values, ls="none", marker=marker, ms=7, mec=c, mew=1.5, zorder=3,
                    mfc=c if fill else "white", label=name if single else None)
    if run.diverged_at is not None:
        ax.axvline(run.diverged_at, color=color or DIVERGED_COLOR, ls="--", lw=1.2,
                   label="diverged" if single else None)


def _draw_module_lines(ax: Axes, run: _Run, key: str) -> None:
    assert run.stats is not None
    values = getattr(run.stats, key)
    x = run.x
    for m, (name, color) in enumerate(zip(run.names, _module_colors(len(run.names)), strict=True)):
        ax.plot(x, values[:, m], color=color, lw=1.0, label=short_name(name))
    _mark_divergence(ax, run)


def _draw_hist(ax: Axes, hist: np.ndarray, x: np.ndarray, vmax: float | None) -> None:
    """imshow of log1p(counts) [bins, steps]: x = step, y = |activation| (low values at the bottom)."""
    ax.imshow(np.log1p(np.nan_to_num(hist)), origin="lower", aspect="auto", interpolation="nearest",
              extent=(x[0] - 0.5, x[-1] + 0.5, *HIST_RANGE), vmin=0.0, vmax=vmax, cmap="viridis")


def _draw_dead(ax: Axes, share: np.ndarray, x: np.ndarray) -> None:
    ax.fill_between(x, share, color="C3", alpha=0.25, lw=0)
    ax.plot(x, share, color="C3", lw=1.2)
    ax.set_ylim(0, 1)


# ---------------------------------------------------------------------------------------------------
# layout helpers


@dataclass(frozen=True)
class _Margins:
    """Figure margins and gaps between panels, in inches."""

    left: float = 0.95
    right: float = 0.15
    top: float = 0.65
    bottom: float = 0.6
    gap_w: float = 0.12
    gap_h: float = 0.4


def _figure(nrows: int, ncols: int, panel_w: float, panel_h: float, margins: _Margins = _Margins(),
            **share: Any) -> tuple[Figure, np.ndarray]:
    """A Figure on its own Agg canvas (no pyplot) with a 2-D array of axes, laid out with fixed margins
    in inches: constrained layout costs about a second per figure (seconds for a dozen axes), and
    regular grids with outer-only tick labels do not need it."""
    m = margins
    width = min(max(WIDTH, panel_w * ncols + m.left + m.right), MAX_WIDTH)
    height = panel_h * nrows + m.top + m.bottom
    axes_w = (width - m.left - m.right - m.gap_w * (ncols - 1)) / ncols
    axes_h = (height - m.top - m.bottom - m.gap_h * (nrows - 1)) / nrows
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **share, gridspec_kw=dict(
        left=m.left / width, right=1 - m.right / width, top=1 - m.top / height, bottom=m.bottom / height,
        wspace=m.gap_w / axes_w, hspace=m.gap_h / axes_h))
    return fig, axes


def _small_multiples(nrows: int, ncols: int, panel_w: float, panel_h: float,
                     margins: _Margins = _Margins()) -> tuple[Figure, np.ndarray]:
    fig, axes = _figure(nrows, ncols, panel_w, panel_h, margins, sharex="all", sharey="all")
    # Shared axes share one locator: few ticks keep small panels legible and drawing fast.
    axes[0, 0].xaxis.set_major_locator(MaxNLocator(4, integer=True))
    axes[0, 0].yaxis.set_major_locator(MaxNLocator(5))
    for ax in axes.flat:
        ax.tick_params(labelsize=7)
    return fig, axes


def _legend_width(labels: list[str], ncol: int) -> float:
    """Rough width in inches of a fontsize-7 legend (there is no layout engine to measure it for us)."""
    return ncol * (0.5 + 0.06 * max((len(label) for label in labels), default=0))


def _title(fig: Figure, runs: list[_Run], what: str, xlabel: str = "step") -> None:
    """Suptitle a fixed distance from the top and a shared x label a fixed distance from the bottom."""
    if len(runs) == 1:
        run = runs[0]
        status = f"diverged at step {run.diverged_at}" if run.diverged_at is not None else run.status
        title = f"{run.label} - {what} ({status})"
    else:
        title = f"{what}: " + ", ".join(r.label for r in runs)
    height = fig.get_figheight()
    fig.suptitle(title, fontsize=12, y=1 - 0.1 / height, va="top")
    if xlabel:
        fig.supxlabel(xlabel, fontsize=10, y=0.06 / height, va="bottom")


def _missing(run: _Run, what: str) -> str:
    return f"{run.label}\nno {what}: {run.status}"


def _fix_outer_labels(axes: np.ndarray, drawn: np.ndarray) -> None:
    """Shared-x subplots only label the bottom row; relabel the lowest drawn panel of each column and
    remove panels that hold nothing, so gaps in a ragged grid do not swallow the tick labels."""
    for col in range(axes.shape[1]):
        rows = np.flatnonzero(drawn[:, col])
        if rows.size:
            axes[rows[-1], col].tick_params(labelbottom=True)
    for ax, used in zip(axes.flat, drawn.flat, strict=True):
        if not used and not ax.texts:  # annotated empty panels stay visible
            ax.remove()


def _save(fig: Figure, path: Path) -> Path:
    """Write the PNG atomically (a page never links half a chart), as a 48-colour palette image.

    Charts are flat colours, lines and one colormap, so a palette loses nothing a reader sees and makes
    the file about 3x smaller: the published snapshot stores every figure and must stay small.
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    image = Image.open(buffer).convert("RGB").quantize(PALETTE_COLOURS, method=Image.Quantize.MEDIANCUT)
    return write_atomic(path, lambda tmp: image.save(tmp, format="PNG", optimize=True))


# ---------------------------------------------------------------------------------------------------
# chart builders: each takes one or more runs (one run = the single-run chart)


def _loss_chart(runs: list[_Run]) -> Figure:
    # Comparisons overlay all runs on one panel rather than one panel per run: loss gaps of a few percent
    # (the usual difference between variants) are only visible when the curves lie on top of each other.
    # The per-batch loss is drawn faint so the smoothed lines stay readable with several runs.
    fig, axes = _figure(1, 1, WIDTH - 1.1, 5.0, _Margins(left=0.85, right=0.25, top=0.45, bottom=0.55))
    ax = axes[0, 0]
    drawable = [r for r in runs if r.has("loss")]
    if not drawable:
        _empty(ax, "\n".join(_missing(r, "loss data") for r in runs))
        return fig
    for i, run in enumerate(runs):
        if run.has("loss"):
            _draw_loss(ax, run, None if len(runs) == 1 else f"C{i % 10}")
    if _wants_log(*(np.r_[_losses(r.metrics), _valid(r.metrics)[1]] for r in drawable)):
        ax.set_yscale("log")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    if len(runs) > 1:
        handles += _comparison_proxies(runs)
    ax.legend(handles=handles, fontsize=9, loc="best")
    _title(fig, runs, "loss", xlabel="optimiser step")
    return fig


def _comparison_proxies(runs: list[_Run]) -> list[Line2D]:
    """Legend entries explaining marker shapes and listing runs that have no loss to draw."""
    proxies = [
        Line2D([], [], ls="none", marker="o", color="0.3", label="valid"),
        Line2D([], [], ls="none", marker="s", mfc="white", mec="0.3", label="valid (batch statistics)"),
    ]
    if any(r.diverged_at is not None for r in runs):
        proxies.append(Line2D([], [], ls="--", color="0.3", label="diverged"))
    proxies += [Line2D([], [], ls="none", label=f"{r.label}: no loss data ({r.status})")
                for r in runs if not r.has("loss")]
    return proxies


def _stats_chart(runs: list[_Run]) -> Figure:
    """Rows = runs, columns = (mean, std); y shared per column so runs compare directly."""
    labels = [short_name(n) for r in runs for n in r.names]
    ncol = math.ceil(max([len(r.names) for r in runs] or [1]) / 16)
    margins = _Margins(left=0.95 if len(runs) > 1 else 0.7, right=_legend_width(labels, ncol) + 0.1,
                       top=0.75, bottom=0.6, gap_w=0.65, gap_h=0.3)
    fig, axes = _figure(len(runs), 2, (WIDTH - 2) / 2, 4.2 if len(runs) == 1 else 3.0, margins,
                        sharex="all", sharey="col")
    drawn = np.zeros(axes.shape, dtype=bool)
    for row, run in enumerate(runs):
        if not run.has("stats"):
            _empty(axes[row, 0], _missing(run, "statistics"))
            _empty(axes[row, 1], _missing(run, "statistics"))
            continue
        for col, key in enumerate(("mean", "std")):
            _draw_module_lines(axes[row, col], run, key)
            axes[row, col].grid(alpha=0.3)
            drawn[row, col] = True
        axes[row, 1].legend(fontsize=7, ncol=math.ceil(len(run.names) / 16), loc="upper left",
                            bbox_to_anchor=(1.0, 1.0), frameon=False, borderaxespad=0.3)
        if len(runs) > 1:
            axes[row, 0].set_ylabel(run.label, fontweight="bold")
    if _wants_log(*(r.stats.std for r in runs if r.stats is not None and r.has("stats"))):
        axes[0, 1].set_yscale("log")  # shared y: applies to the whole column
    axes[0, 0].set_title("activation mean")
    axes[0, 1].set_title("activation std")
    _fix_outer_labels(axes, drawn)
    _title(fig, runs, "activation statistics")
    return fig


def _module_grid(runs: list[_Run]) -> tuple[Figure, np.ndarray, list[list[tuple[_Run, int] | None]]]:
    """Small multiples wrapped at WRAP panels a row: each run gets a block of rows holding its modules
    in order (the same module at the same place in every block), so panels stay readable at page width."""
    ncols = min(max([len(r.names) for r in runs] or [1]), WRAP) or 1
    cells: list[list[tuple[_Run, int] | None]] = []
    for run in runs:
        m = len(run.names) if run.has("hist") else 0
        for start in range(0, max(m, 1), ncols):
            cells.append([(run, start + c) if start + c < m else None for c in range(ncols)])
    fig, axes = _small_multiples(len(cells), ncols, 1.7, 1.9 if len(runs) == 1 else 1.7)
    return fig, axes, cells


def _module_chart(runs: list[_Run], kind: str) -> Figure:
    """The hist ("colorful dimension") and dead-share small multiples, every panel titled with its
    module (and, in comparisons, the first panel of each run's block with the run)."""
    fig, axes, cells = _module_grid(runs)
    drawn = np.array([[cell is not None for cell in row] for row in cells])
    vmax = _module_vmax(runs) if kind == "hist" else {}
    owners = _row_owners(runs, cells)
    for r, c in np.ndindex(axes.shape):
        ax, cell = axes[r, c], cells[r][c]
        if cell is None:
            if c == 0 and not owners[r].has(kind):
                _empty(ax, f"{owners[r].label}: no statistics ({owners[r].status})", spill=True)
            continue
        run, m = cell
        if kind == "hist":
            _draw_hist(ax, run.stats.hist[m], run.x, vmax.get(m))
        else:
            _draw_dead(ax, run.dead[m], run.x)
            ax.grid(alpha=0.3)
        # A fixed title position skips matplotlib's per-axes title auto-placement (slow with many axes).
        ax.set_title(short_name(run.names[m]), fontsize=9, y=1.0, pad=3)
    last = max((int(r.x[-1]) for r in runs if r.has(kind)), default=1)
    axes[0, 0].set_xlim(0.5, last + 0.5)  # else the shared x ends where the last image drawn ends
    _label_module_rows(axes, runs, owners, "|activation|" if kind == "hist" else "dead share")
    _fix_outer_labels(axes, drawn)
    _title(fig, runs, "activation histograms" if kind == "hist" else "dead share (|a| in lowest bin)")
    return fig


def _row_owners(runs: list[_Run], cells: list[list[tuple[_Run, int] | None]]) -> list[_Run]:
    """The run each grid row belongs to (rows of a run without statistics hold no cell)."""
    owners: list[_Run] = []
    for run in runs:
        owners += [run] * (max(math.ceil(len(run.names) / len(cells[0])), 1) if run.has("hist") else 1)
    return owners


def _module_vmax(runs: list[_Run]) -> dict[int, float | None]:
    """One colour scale per module position, so brightness compares across runs."""
    out: dict[int, float | None] = {}
    for m in range(max((len(r.names) for r in runs), default=0)):
        peaks = [float(np.nanmax(np.log1p(r.stats.hist[m]), initial=0.0))
                 for r in runs if r.stats is not None and m < len(r.names)]
        out[m] = max(peaks) if peaks and max(peaks) > 0 else None
    return out


def _label_module_rows(axes: np.ndarray, runs: list[_Run], owners: list[_Run], what: str) -> None:
    for r in range(axes.shape[0]):
        first = r == 0 or owners[r] is not owners[r - 1]
        label = what if len(runs) == 1 or not first else f"{owners[r].label}\n{what}"
        axes[r, 0].set_ylabel(label, fontsize=8, fontweight="bold" if len(runs) > 1 and first else "normal")


_BUILDERS: dict[str, Callable[[list[_Run]], Figure]] = {
    "loss": _loss_chart,
    "stats": _stats_chart,
    "hist": lambda runs: _module_chart(runs, "hist"),
    "dead": lambda runs: _module_chart(runs, "dead"),
}


# ---------------------------------------------------------------------------------------------------
# public API


def run_charts(run_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Draw loss.png, stats.png, hist.png and dead.png into ``run_dir/charts`` from the run's files (read
    through runner.results; the folder may still be a temporary one, so its name is not checked); charts
    without data (failed or damaged run, no stats, zero steps) are skipped and a stale PNG of a skipped
    kind is removed. Returns the written paths by kind."""
    run_dir = Path(run_dir)
    run = _Run.of(load_run(run_dir))
    written: dict[str, Path] = {}
    for kind in CHART_KINDS:
        path = run_dir / "charts" / f"{kind}.png"
        if run.has(kind):
            written[kind] = _save(_BUILDERS[kind]([run]), path)
        else:
            path.unlink(missing_ok=True)
    return written


def comparison_chart(runs: Sequence[Run], kind: str, out: str | os.PathLike[str]) -> Path:
    """Draw one chart kind for several runs with shared axes and write it to ``out``; runs without
    metrics or statistics appear as annotated empty panels."""
    if kind in DIAGNOSTIC_KINDS:
        return diagnostic_chart(runs, kind, out)
    if kind not in CHART_KINDS:
        raise ValueError(f"unknown chart kind {kind!r}; expected one of {CHART_KINDS + DIAGNOSTIC_KINDS}")
    if not runs:
        raise ValueError("comparison_chart needs at least one run")
    return _save(_BUILDERS[kind]([_Run.of(r) for r in runs]), Path(out))


# ---------------------------------------------------------------------------------------------------
# diagnostics: the BatchNorm running gap and the statistics by diffusion timestep (runner.bngap,
# statsfile.Buckets). The site draws these from the run folders at render time, so runs recorded before
# they existed are drawn too; each takes `runner.results.Run`s and writes one PNG.

BUCKET_STATS = {"std": "activation std", "dead": "dead share", "mean": "activation mean"}
DIAGNOSTIC_KINDS = ("bn_gap", "buckets_std", "buckets_dead", "bucket_comparison_std",
                    "bucket_comparison_dead")
TITLES.update({
    "bn_gap": "BatchNorm: running vs batch statistics",
    "buckets_std": "Activation std by timestep",
    "buckets_dead": "Dead share by timestep",
    "bucket_comparison_std": "Activation std by timestep, variants compared",
    "bucket_comparison_dead": "Dead share by timestep, variants compared",
})
CAPTIONS.update({
    "bn_gap": "Left: validation loss at each epoch end with BatchNorm's running statistics (as evaluated) "
    "and with each batch's own statistics. Middle and right: for each BatchNorm layer, how far its running "
    "mean (in validation standard deviations) and variance (as a log ratio) are from its input's on the "
    f"validation batches; the dashed line is the mismatch limit ({fmt(RUNNING_GAP_LIMIT)}).",
    "buckets_std": "Each watched module's activation std at every training step, split by the noise level t "
    "of the samples (one line per bucket of t, darker = noisier; smoothed with a moving average over the "
    "steps at which the bucket had samples).",
    "buckets_dead": "Each watched module's dead share (|a| in the lowest histogram bin) at every training "
    "step, split by the noise level t of the samples (one line per bucket of t; smoothed over the steps "
    "at which the bucket had samples).",
    "bucket_comparison_std": "For each module, its activation std per bucket of the noise level t, one line "
    "per run: solid = mean over the last steps recorded, dotted = over the first (the windows of the "
    "health measures).",
    "bucket_comparison_dead": "For each module, its dead share per bucket of the noise level t, one line per "
    "run: solid = mean over the last steps recorded, dotted = over the first (the windows of the health "
    "measures).",
})


def has_bn_gap(run: Run) -> bool:
    """Whether a sound run recorded a BatchNorm running gap at some epoch."""
    return not run.damaged and run.metrics is not None and any(e.bn_running_gap for e in run.metrics.epochs)


def has_buckets(run: Run) -> bool:
    """Whether a sound run's statistics hold timestep buckets (with at least one recorded step)."""
    return not run.damaged and run.stats is not None and run.stats.buckets is not None and len(run.stats) > 0


def _bucket_labels(edges: np.ndarray) -> list[str]:
    return [f"t {fmt(float(a))}–{fmt(float(b))}" for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _bucket_values(run: Run, stat: str) -> np.ndarray:
    """[steps, modules, buckets] of one bucket statistic (NaN where a bucket had no sample)."""
    if stat not in BUCKET_STATS:
        raise ValueError(f"unknown bucket statistic {stat!r}; expected one of {tuple(BUCKET_STATS)}")
    assert run.stats is not None and run.stats.buckets is not None
    return np.asarray(getattr(run.stats.buckets, stat), dtype=float)


def bn_gap_chart(runs: Sequence[Run], out: str | os.PathLike[str]) -> Path:
    """One row per run: valid loss with running vs batch statistics per epoch, then the mean gap and the
    variance gap of every BatchNorm layer per epoch against RUNNING_GAP_LIMIT (shared y per column)."""
    if not runs:
        raise ValueError("bn_gap_chart needs at least one run")
    layers = [n for r in runs if has_bn_gap(r) for n in gap_series(_epoch_dicts(r))[1]]
    labels = [short_name(n) for n in dict.fromkeys(layers)]
    ncol = max(1, math.ceil(len(labels) / 16))
    margins = _Margins(left=0.95, right=_legend_width(labels, ncol) + 0.1, top=0.75, bottom=0.6,
                       gap_w=0.55, gap_h=0.35)
    fig, axes = _figure(len(runs), 3, (WIDTH - 2.5) / 3, 3.6 if len(runs) == 1 else 2.8, margins,
                        sharex="all", sharey="col")
    axes[0, 0].xaxis.set_major_locator(MaxNLocator(6, integer=True))
    drawn = np.zeros(axes.shape, dtype=bool)
    for row, run in enumerate(runs):
        if not has_bn_gap(run):
            for col in range(3):
                _empty(axes[row, col], f"{run.id}\nno BatchNorm running gap recorded ({run.status})")
            continue
        assert run.metrics is not None
        for key, marker, name in (("valid_loss", "o-", "running statistics"),
                                  ("valid_loss_batch_stats", "s--", "batch statistics")):
            pairs = [(e.epoch, v) for e in run.metrics.epochs if (v := getattr(e, key)) is not None]
            if pairs:
                axes[row, 0].plot(*zip(*pairs, strict=True), marker, ms=5, lw=1.2, label=name)
        axes[row, 0].legend(fontsize=7, loc="best")
        epochs, series = gap_series(_epoch_dicts(run))
        colors = _module_colors(len(series))
        for col, stat in ((1, "mean"), (2, "var")):
            ax = axes[row, col]
            for (layer, values), color in zip(series.items(), colors, strict=True):
                ax.plot(epochs, values[stat], "o-", ms=3, lw=1.0, color=color, label=short_name(layer))
            ax.axhline(RUNNING_GAP_LIMIT, color=DIVERGED_COLOR, ls="--", lw=1.0)
        axes[row, 2].legend(fontsize=7, ncol=ncol, loc="upper left", bbox_to_anchor=(1.0, 1.0),
                            frameon=False, borderaxespad=0.3)
        for col in range(3):
            axes[row, col].grid(alpha=0.3)
            drawn[row, col] = True
        if len(runs) > 1:
            axes[row, 0].set_ylabel(run.id, fontweight="bold")
    axes[0, 0].set_title("valid loss", fontsize=10)
    axes[0, 1].set_title("running mean gap (valid stds)", fontsize=10)
    axes[0, 2].set_title("running variance gap (|log ratio|)", fontsize=10)
    _fix_outer_labels(axes, drawn)
    _title(fig, [_Run.of(r) for r in runs], "BatchNorm running vs batch statistics", xlabel="epoch")
    return _save(fig, Path(out))


_LEGEND_ON_TOP = _Margins(top=1.0)  # room for a legend row between the title and the panels


def _top_legend(fig: Figure, handles: list[Any], ncol: int) -> None:
    fig.legend(handles=handles, fontsize=7, ncol=ncol, loc="upper center",
               bbox_to_anchor=(0.5, 1.0 - 0.38 / fig.get_figheight()), frameon=False)


def _epoch_dicts(run: Run) -> list[dict[str, Any]]:
    return [e.model_dump() for e in run.metrics.epochs] if run.metrics else []


def bucket_chart(run: Run, stat: str, out: str | os.PathLike[str]) -> Path:
    """One run's statistic by timestep bucket over training: a panel per watched module (wrapped at WRAP
    a row, shared axes), a line per bucket of t (moving average over the recorded steps)."""
    return _save(_bucket_figure(run, stat), Path(out))


def _bucket_figure(run: Run, stat: str) -> Figure:
    if not has_buckets(run):
        raise ValueError(f"{run.id}: no statistics by timestep bucket to draw")
    assert run.stats is not None and run.stats.buckets is not None
    values = _bucket_values(run, stat)
    names = run.stats.names
    x = run.stats.steps + 1
    k = values.shape[2]
    colors = [colormaps["viridis"](0.85 * (1 - b / max(k - 1, 1))) for b in range(k)]
    ncols = min(len(names), WRAP)
    nrows = math.ceil(len(names) / ncols)
    fig, axes = _small_multiples(nrows, ncols, 1.7, 1.9, _LEGEND_ON_TOP)
    drawn = np.zeros(axes.shape, dtype=bool)
    for m, name in enumerate(names):
        ax = axes.flat[m]
        for b, (color, label) in enumerate(zip(colors, _bucket_labels(run.stats.buckets.edges), strict=True)):
            smooth = _ema(values[:, m, b])
            seen = np.isfinite(smooth)  # a step where the bucket had no sample is skipped, not a gap
            ax.plot(x[seen], smooth[seen], color=color, lw=1.0, label=label if m == 0 else None)
        ax.set_title(short_name(name), fontsize=9, y=1.0, pad=3)
        ax.grid(alpha=0.3)
        drawn.flat[m] = True
    if stat == "dead":
        axes[0, 0].set_ylim(0, 1)
    elif stat == "std" and _wants_log(values):
        axes[0, 0].set_yscale("log")
    for r in range(nrows):
        axes[r, 0].set_ylabel(BUCKET_STATS[stat], fontsize=8)
    _top_legend(fig, axes.flat[0].get_legend_handles_labels()[0], k)
    _fix_outer_labels(axes, drawn)
    _title(fig, [_Run.of(run)], f"{BUCKET_STATS[stat]} by timestep bucket")
    return fig


def bucket_comparison(runs: Sequence[Run], stat: str, out: str | os.PathLike[str]) -> Path:
    """Several runs' statistic per timestep bucket: a panel per module (names in order of first appearance,
    wrapped at WRAP a row, shared axes), x = the bucket's middle t, one colour per run; solid = the mean
    over the last WINDOW_SHARE of recorded steps, dotted = over the first (the health measures' windows)."""
    return _save(_bucket_comparison_figure(runs, stat), Path(out))


def _bucket_comparison_figure(runs: Sequence[Run], stat: str) -> Figure:
    drawable = [r for r in runs if has_buckets(r)]
    if not drawable:
        raise ValueError("bucket_comparison: none of the runs has statistics by timestep bucket")
    names = list(dict.fromkeys(n for r in drawable for n in r.stats.names))
    ncols = min(len(names), WRAP)
    nrows = math.ceil(len(names) / ncols)
    fig, axes = _small_multiples(nrows, ncols, 1.7, 1.9, _LEGEND_ON_TOP)
    axes[0, 0].xaxis.set_major_locator(MaxNLocator(5))
    drawn = np.zeros(axes.shape, dtype=bool)
    everything = []
    for i, run in enumerate(runs):
        if run not in drawable:
            continue
        values = _bucket_values(run, stat)
        edges = run.stats.buckets.edges
        mid = (edges[:-1] + edges[1:]) / 2
        k = _window(values.shape[0])
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN bucket gives NaN, drawn as a gap
            early, late = np.nanmean(values[:k], axis=0), np.nanmean(values[-k:], axis=0)
        everything += [early, late]
        for m, name in enumerate(run.stats.names):
            ax = axes.flat[names.index(name)]
            ax.plot(mid, late[m], "o-", ms=3, lw=1.2, color=f"C{i % 10}", label=run.id)
            ax.plot(mid, early[m], ":", lw=1.0, color=f"C{i % 10}")
            drawn.flat[names.index(name)] = True
    for m, name in enumerate(names):
        axes.flat[m].set_title(short_name(name), fontsize=9, y=1.0, pad=3)
        axes.flat[m].grid(alpha=0.3)
    if stat == "dead":
        axes[0, 0].set_ylim(0, 1)
    elif stat == "std" and _wants_log(*everything):
        axes[0, 0].set_yscale("log")
    for r in range(nrows):
        axes[r, 0].set_ylabel(BUCKET_STATS[stat], fontsize=8)
    handles = [Line2D([], [], color=f"C{i % 10}", marker="o", ms=3, label=r.id)
               for i, r in enumerate(runs) if r in drawable]
    handles += [Line2D([], [], ls="none", label=f"{r.id}: no buckets") for r in runs if r not in drawable]
    _top_legend(fig, handles, min(len(handles), 4))
    _fix_outer_labels(axes, drawn)
    _title(fig, [_Run.of(r) for r in runs], f"{BUCKET_STATS[stat]} by timestep bucket",
           xlabel="noise level t (bucket middle)")
    return fig


def diagnostic_chart(runs: Sequence[Run], kind: str, out: str | os.PathLike[str]) -> Path:
    """A DIAGNOSTIC_KINDS chart (the per-run kinds `buckets_*` take exactly one run)."""
    if kind == "bn_gap":
        return bn_gap_chart(runs, out)
    stat = kind.rsplit("_", 1)[-1]
    if kind.startswith("buckets_"):
        if len(runs) != 1:
            raise ValueError(f"{kind} is drawn for one run; got {len(runs)}")
        return bucket_chart(runs[0], stat, out)
    if kind.startswith("bucket_comparison_"):
        return bucket_comparison(runs, stat, out)
    raise ValueError(f"unknown diagnostic chart kind {kind!r}; expected one of {DIAGNOSTIC_KINDS}")


# ---------------------------------------------------------------------------------------------------
# writeup figures (runner.writeup): one module across runs; a module's std per timestep bucket


def module_index(stats: Stats | None, module: str) -> int | None:
    """Index of the watched module whose short name is `module` (None when the run did not watch it)."""
    names = [short_name(n) for n in stats.names] if stats is not None else []
    return names.index(module) if module in names else None


def module_overlay_chart(runs: Sequence[Run], module: str, out: str | os.PathLike[str]) -> Path:
    """One module's activation std over optimiser steps, one line per run, on one shared axis."""
    fig, axes = _figure(1, 1, WIDTH - 1.1, 4.6, _Margins(left=0.85, right=0.25, top=0.45, bottom=0.55))
    ax, drawn = axes[0, 0], []
    for i, run in enumerate(_Run.of(r) for r in runs):
        m = module_index(run.stats, module) if run.has("stats") else None
        if m is None:
            ax.plot([], [], ls="none", label=f"{run.label}: not recorded ({run.status})")
            continue
        ax.plot(run.x, run.stats.std[:, m], color=f"C{i % 10}", lw=1.4, label=run.label)
        drawn.append(run.stats.std[:, m])
    if _wants_log(*drawn):
        ax.set_yscale("log")
    ax.set_ylabel(f"std of {module}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"activation std of {module} across runs", fontsize=12, y=1 - 0.1 / fig.get_figheight(),
                 va="top")
    fig.supxlabel("optimiser step", fontsize=10, y=0.06 / fig.get_figheight(), va="bottom")
    return _save(fig, Path(out))


def bucket_profile(stats: Stats, module: str, share: float = 0.1) -> tuple[np.ndarray, np.ndarray] | None:
    """(bucket centres in normalised t, the module's std per bucket averaged over the last `share` of
    recorded rows, NaN where no sample fell); None without buckets or the module."""
    m = module_index(stats, module)
    if stats.buckets is None or m is None:
        return None
    b = stats.buckets
    late = b.std[-max(1, math.ceil(share * len(stats))):, m, :].astype(np.float64)
    with np.errstate(invalid="ignore"):
        counts = np.isfinite(late).sum(axis=0)
        values = np.where(counts > 0, np.nansum(late, axis=0) / np.maximum(counts, 1), np.nan)
    return (b.edges[:-1] + b.edges[1:]) / 2, values


def writeup_figure(name: str, runs: Sequence[Run], out: str | os.PathLike[str], **options: Any) -> Path:
    """The writeup's figures by name: a comparison chart kind (CHART_KINDS, DIAGNOSTIC_KINDS) or
    "module" (one module across runs; options: module)."""
    if name == "module":
        return module_overlay_chart(runs, options["module"], out)
    return comparison_chart(runs, name, out)
