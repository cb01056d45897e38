"""Charts drawn from synthetic run folders (metrics.json + stats.npz in the contract's format)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib import _pylab_helpers
from matplotlib.image import imread

from runner import charts
from runner.charts import (
    CAPTIONS,
    CHART_KINDS,
    DIAGNOSTIC_KINDS,
    TITLES,
    WRAP,
    comparison_chart,
    run_charts,
    short_name,
)
from runner.results import load_run
from runner.spec import build_spec

NAMES = ["unet.down_blocks.0.resnets.0", "unet.mid_block.resnets.0", "unet.up_blocks.1.resnets.1"]
STEPS = 60
SPE = 30  # steps per epoch: 2 epochs


def _metrics(
    status: str = "completed",
    losses: list[float | None] | None = None,
    diverged_at: int | None = None,
    batch_stats: bool = False,
) -> dict:
    if losses is None:
        losses = list(1.0 / (1 + 0.05 * np.arange(STEPS)) + 0.02 * np.sin(np.arange(STEPS)))
    epochs = [
        {
            "epoch": e,
            "step": e * SPE,
            "train_loss": 0.5,
            "valid_loss": 0.6 / e,
            "valid_loss_batch_stats": 0.9 / e if batch_stats else None,
        }
        for e in (1, 2)
        if e * SPE <= len(losses)
    ]
    return {
        "title": "x",
        "spec_hash": "h",
        "profile": "smoke",
        "status": status,
        "diverged_at_step": diverged_at,
        "error": "boom" if status == "failed" else None,
        "params": 10,
        "steps_per_epoch": SPE,
        "steps_completed": len(losses),
        "steps_total": STEPS,
        "schedule_steps": STEPS,
        "batches": {"loss": losses, "lr": [1e-3] * len(losses), "grad_norm": [1.0] * len(losses)},
        "epochs": epochs,
        "final": {"train_loss": None, "valid_loss": None, "valid_loss_batch_stats": None},
        "timings": {"total_s": 1.0, "step_s": 0.01},
        "environment": {
            "device": "cpu",
            "precision": "fp32",
            "torch": "t",
            "diffusers": "d",
            "python": "3",
            "runner": "r",
        },
    }


def _stats(path: Path, steps: int = STEPS, names: list[str] = NAMES, grow: bool = False) -> None:
    rng = np.random.default_rng(0)
    m = len(names)
    # grow=True: stds rise exponentially into the hundreds, like a diverging run.
    std = np.exp(np.linspace(0, 6, steps))[:, None] * np.ones(m) if grow else 1 + 0.1 * rng.random((steps, m))
    hist = (
        np.stack(
            [
                np.stack(
                    [
                        np.histogram(np.abs(rng.normal(0, std[s, j], 300)), bins=40, range=(0, 10))[0]
                        for s in range(steps)
                    ],
                    axis=1,
                )
                for j in range(m)
            ]
        )
        if steps
        else np.zeros((m, 40, 0))
    )
    mean = 0.1 * rng.standard_normal((steps, m))
    if grow:  # a diverging run ends with non-finite activations
        mean[-3:, 1] = std[-3:, 1] = np.nan
    np.savez_compressed(path, mean=mean, std=std, hist=hist, names=np.array(names))


def _run(
    tmp_path: Path, name: str, metrics: dict | None, stats: dict | None = None, run_id: str = ""
) -> Path:
    d = tmp_path / name
    d.mkdir()
    run_id = run_id or name
    (d / "spec.yaml").write_text(build_spec({"id": run_id}, "test", profile="smoke").to_yaml())
    if metrics is not None:  # a run's metrics carry its id, which charts use as the default label
        (d / "metrics.json").write_text(json.dumps({**metrics, "id": run_id}))
    if stats is not None:
        _stats(d / "stats.npz", **stats)
    return d


def _load(folder: Path) -> charts._Run:
    return charts._Run.of(load_run(folder))


def _assert_png(path: Path, min_w: int = 900) -> None:
    img = imread(path)  # raises on a broken file
    h, w = img.shape[:2]
    assert min_w <= w <= 4000 and 200 <= h <= 4000, (w, h)


@pytest.fixture
def ok_run(tmp_path: Path) -> Path:
    return _run(tmp_path, "ok-run", _metrics(batch_stats=True), {})


@pytest.fixture
def diverged_run(tmp_path: Path) -> Path:
    losses = [float(v) for v in np.exp(np.linspace(0, 12, 40))] + [None]
    metrics = _metrics("diverged", losses, diverged_at=41)
    return _run(tmp_path, "diverged", metrics, {"steps": 41, "grow": True})


@pytest.fixture
def failed_run(tmp_path: Path) -> Path:
    return _run(tmp_path, "failed", _metrics("failed", losses=[]))


def test_run_charts_writes_all_four_pngs(ok_run: Path) -> None:
    figures_before = _pylab_helpers.Gcf.get_num_fig_managers()
    written = run_charts(ok_run)
    assert list(written) == list(CHART_KINDS)
    for kind, path in written.items():
        assert path == ok_run / "charts" / f"{kind}.png"
        _assert_png(path)
    assert sorted(p.name for p in (ok_run / "charts").iterdir()) == sorted(f"{k}.png" for k in CHART_KINDS)
    assert _pylab_helpers.Gcf.get_num_fig_managers() == figures_before  # nothing leaked into pyplot


def test_loss_chart_has_both_validation_series_and_smoothing(ok_run: Path) -> None:
    ax = charts._loss_chart([_load(ok_run)]).axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["train (per batch)", "train (smoothed)", "valid", "valid (batch statistics)"]
    raw, smooth = ax.lines[0].get_ydata(), ax.lines[1].get_ydata()
    assert np.std(np.diff(smooth)) < np.std(np.diff(raw))
    assert list(ax.lines[2].get_xdata()) == [SPE, 2 * SPE]  # valid markers at the epoch-end steps
    assert ax.get_yscale() == "linear"


def test_diverged_run_with_nans_marks_step_and_uses_log_scales(diverged_run: Path) -> None:
    written = run_charts(diverged_run)
    assert set(written) == set(CHART_KINDS)
    run = _load(diverged_run)
    loss_ax = charts._loss_chart([run]).axes[0]
    std_ax = charts._stats_chart([run]).axes[1]
    for ax in (loss_ax, std_ax):
        assert ax.get_yscale() == "log"
        assert any(list(line.get_xdata()) == [41, 41] for line in ax.lines), "no divergence line"


def test_failed_run_without_data_writes_nothing(failed_run: Path) -> None:
    (failed_run / "charts").mkdir()
    (failed_run / "charts" / "loss.png").write_bytes(b"stale")  # from an earlier attempt
    assert run_charts(failed_run) == {}
    assert not (failed_run / "charts" / "loss.png").exists()


def test_failed_run_with_some_steps_gets_only_loss(tmp_path: Path) -> None:
    d = _run(tmp_path, "early-fail", _metrics("failed", losses=[1.0, None, 0.8]), {"steps": 0})
    written = run_charts(d)
    assert list(written) == ["loss"]
    _assert_png(written["loss"])


def test_broken_files_give_no_charts(ok_run: Path) -> None:
    (ok_run / "stats.npz").write_bytes(b"not a zip")
    (ok_run / "metrics.json").write_text("{truncated")
    assert run_charts(ok_run) == {}


def test_inconsistent_stats_damage_the_run_and_give_no_charts(tmp_path: Path) -> None:
    d = _run(tmp_path, "bad-shapes", _metrics(), {})
    with np.load(d / "stats.npz") as f:
        data = dict(f)
    np.savez_compressed(d / "stats.npz", **{**data, "names": np.array(NAMES[:2])})
    assert run_charts(d) == {}


@pytest.mark.parametrize(
    ("name", "short"),
    [
        ("unet.down_blocks.0.resnets.1", "down0.res1"),
        ("unet.up_blocks.2.attentions.0", "up2.attn0"),
        ("unet.mid_block.resnets.0", "mid.res0"),
        ("down_blocks.3.downsamplers.0", "down3.dsamp0"),
        ("downs.1.resnets.0", "down1.res0"),
        ("conv_in", "conv_in"),
    ],
)
def test_short_name(name: str, short: str) -> None:
    assert short_name(name) == short


@pytest.mark.parametrize("kind", CHART_KINDS)
def test_comparison_with_missing_stats_run(
    tmp_path: Path, ok_run: Path, diverged_run: Path, failed_run: Path, kind: str
) -> None:
    # A fourth run with a different module set: hist/dead columns use each run's own modules.
    other = _run(tmp_path, "two-modules", _metrics(), {"names": ["conv_in", "unet.mid_block.attentions.0"]})
    runs = [load_run(d) for d in (ok_run, diverged_run, failed_run, other)]
    out = comparison_chart(runs, kind, tmp_path / "cmp" / f"{kind}.png")
    assert out == tmp_path / "cmp" / f"{kind}.png"
    _assert_png(out)


def test_comparison_annotates_missing_run_and_shares_axes(
    ok_run: Path, diverged_run: Path, failed_run: Path
) -> None:
    runs = [_load(d) for d in (ok_run, diverged_run, failed_run)]
    fig = charts._stats_chart(runs)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any("no statistics: failed" in t for t in texts)
    mean_axes = [ax for ax in fig.axes if ax.get_subplotspec().colspan.start == 0]
    assert mean_axes[0].get_ylim() == mean_axes[1].get_ylim()  # shared y per column
    assert fig.axes[1].get_yscale() == "log"  # the diverged run's stds span > 2 decades
    labels = [t.get_text() for t in charts._loss_chart(runs).axes[0].get_legend().get_texts()]
    assert "failed: no loss data (failed)" in labels and "ok-run" in labels


def test_comparison_hist_shares_colour_scale_per_column(ok_run: Path, diverged_run: Path) -> None:
    fig = charts._module_chart([_load(ok_run), _load(diverged_run)], "hist")
    images = [ax.images[0] for ax in fig.axes]
    assert len(images) == 2 * len(NAMES)
    assert len({im.get_clim() for im in images[:: len(NAMES)]}) == 1
    assert images[0].origin == "lower"
    assert fig.axes[0].get_xlim() == (0.5, STEPS + 0.5)  # the longer run sets the shared time axis


def test_comparison_rejects_bad_arguments(ok_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown chart kind"):
        comparison_chart([load_run(ok_run)], "nope", tmp_path / "x.png")
    with pytest.raises(ValueError, match="at least one run"):
        comparison_chart([], "loss", tmp_path / "x.png")


def test_captions_cover_every_kind() -> None:
    kinds = set(CHART_KINDS) | set(DIAGNOSTIC_KINDS)
    assert set(CAPTIONS) == set(TITLES) == kinds and all(len(c) > 40 for c in CAPTIONS.values())


def test_default_label_is_the_runs_id_not_its_folder(tmp_path):
    # Charts are drawn while a run sits in a temporary folder; the title must name the run.
    d = _run(tmp_path, ".tmp-abc123", _metrics(), {}, run_id="real-id")
    assert _load(d).label == "real-id"


@pytest.mark.parametrize("kind", ["hist", "dead"])
def test_comparison_of_many_modules_wraps_with_shared_axes_and_labels(tmp_path: Path, kind: str) -> None:
    names = [f"unet.down_blocks.{i // 2}.resnets.{i % 2}" for i in range(22)]  # 22 panels per run
    dirs = [_run(tmp_path, n, _metrics(), {"names": names, "steps": 8}) for n in ("run-a", "run-b")]
    fig = charts._module_chart([_load(d) for d in dirs], kind)
    drawn = [ax for ax in fig.axes if ax.get_title()]
    assert len(drawn) == 2 * len(names)
    columns = {ax.get_subplotspec().colspan.start for ax in drawn}
    assert max(columns) < WRAP  # at most WRAP panels a row
    assert [ax.get_title() for ax in drawn[: len(names)]] == [short_name(n) for n in names]
    assert len({ax.get_xlim() for ax in drawn}) == 1 and len({ax.get_ylim() for ax in drawn}) == 1
    ylabels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert any(label.startswith("run-a\n") for label in ylabels) and any(
        label.startswith("run-b\n") for label in ylabels
    )
    # Each run's block starts a new row: run-b's first module is in the first column.
    b_first = drawn[len(names)]
    assert b_first.get_subplotspec().colspan.start == 0 and b_first.get_title() == short_name(names[0])
