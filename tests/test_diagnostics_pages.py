"""The BatchNorm mismatch measure, the timestep-bucket charts, the Reproduction page and the ablation
insight page, rendered from run folders written through the real contract (tests/diag_fixtures.py)."""

from __future__ import annotations

import html
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from diag_fixtures import LAYERS, gap_epochs, metrics, run_folder, spec
from matplotlib.image import imread, imsave
from test_site import _unresolved, build_strict

from runner import charts, insights, prose, views
from runner.bngap import RUNNING_GAP_LIMIT
from runner.results import load_runs
from runner.site import render_site
from runner.spec import describe_precision
from runner.text import fmt

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "image_generator_nonorm_batchnorm_resnets"
BN = {"resnet_norm": "batch"}


def _printed(notebook: str) -> list[tuple[float, float]]:
    """(train, valid) rows of a notebook's first table, read straight from the reference file."""
    text = (ROOT / "data" / "reference" / "original_results.md").read_text()
    section = text.split(f"## {notebook}\n", 1)[1].split("\n## ", 1)[0]
    return [(float(t), float(v)) for _, t, v in re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \|$", section,
                                                          re.M)]


def _plain(page: str) -> str:
    """A page's text with the Markdown and HTML escapes of untrusted text undone, whitespace collapsed."""
    return html.unescape(" ".join(page.replace("\\", "").split()))


def placeholder_or_real(kinds_drawn: list):
    """Real diagnostic charts (what is tested here), placeholders for the other kinds (tested elsewhere)."""

    def draw(runs, kind, out):
        kinds_drawn.append((kind, [r.id for r in runs]))
        if kind in charts.DIAGNOSTIC_KINDS:
            return charts.comparison_chart(runs, kind, out)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        imsave(out, np.zeros((4, 6)))
        return Path(out)

    return draw


# ---------------------------------------------------------------- the mismatch measure


@pytest.mark.parametrize("last_gap, fires",
                         [(RUNNING_GAP_LIMIT + 0.1, True), (RUNNING_GAP_LIMIT - 0.1, False)])
def test_mismatch_reason_fires_above_the_limit_only(last_gap, fires) -> None:
    s = spec("bn", model=BN)
    # An earlier epoch far above the limit: the measure is the last measured epoch's (the state evaluated).
    m = metrics(s, gap_epochs([5.0, last_gap], [0.6, 0.8], [0.4, 0.4]))
    health = insights.measure(m, None)
    assert health.bn_gap == pytest.approx(last_gap)
    assert health.bn_gap_where == f"{charts.short_name(LAYERS[0])} (var, epoch 2)"
    assert health.valid_running_over_batch == pytest.approx(0.8 / 0.4)
    reasons = [r for r in insights.verdict(health).reasons if r.startswith("BatchNorm running gap")]
    if fires:
        assert reasons == [f"BatchNorm running gap {fmt(last_gap)} in {health.bn_gap_where} (threshold "
                           f"{fmt(RUNNING_GAP_LIMIT)}); final valid loss with running statistics 2× that "
                           "with batch statistics"]
        assert insights.verdict(health).level == "warning"
    else:
        assert reasons == []
    assert ("above the limit" in prose.bn_gap_sentence(health)) is fires


def test_run_without_batchnorm_has_no_mismatch_measure() -> None:
    s = spec("gn")
    health = insights.measure(metrics(s, [{"epoch": 1, "train_loss": 0.3, "valid_loss": 0.3}]), None)
    assert health.bn_gap is None and health.valid_running_over_batch is None
    assert prose.bn_gap_sentence(health) is None


def test_method_text_states_the_limit_from_its_constant() -> None:
    assert f"against {fmt(RUNNING_GAP_LIMIT)}:" in prose.BN_GAP_LIMIT_TEXT
    assert f"= {fmt(math.exp(RUNNING_GAP_LIMIT))} times" in prose.BN_GAP_LIMIT_TEXT
    limits = {t["measure"]: t["limit"] for t in prose.threshold_texts()}
    assert limits["BatchNorm running gap"] == fmt(RUNNING_GAP_LIMIT)


# ---------------------------------------------------------------- pages


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict:
    """Three runs of one ablation axis (BatchNorm with a gap above the limit and buckets, BatchNorm below,
    GroupNorm without buckets), one of them reproducing a notebook, plus a reproducing spec not run."""
    root = tmp_path_factory.mktemp("diag")
    results, experiments = root / "results", root / "experiments"
    question = "Question: does the running average matter?"
    notes = f"What this variant changes.\n\n{question}"
    raw = {"group": "ablations", "axis": "BatchNorm running statistics", "suites": ["quick"], "notes": notes}
    experiments.mkdir()
    (experiments / "repro.yaml").write_text(yaml.safe_dump({**raw, "reproduces": NOTEBOOK, "model": BN}))
    (experiments / "pending.yaml").write_text(yaml.safe_dump({**raw, "reproduces": NOTEBOOK}))
    ours = [(0.5, 0.6, 0.45), (0.34, 0.9, 0.33), (0.33, 1.1, 0.32)]  # train, valid, valid with batch stats
    repro = spec("repro", profile="quick", model=BN, reproduces=NOTEBOOK, notes=notes)
    epochs = gap_epochs([0.2, 0.7, 1.3], [v for _, v, _ in ours], [b for *_, b in ours])
    for e, (train, *_rest) in zip(epochs, ours, strict=True):
        e["train_loss"] = train
    run_folder(results, repro, metrics(repro, epochs))
    calm = spec("calm", profile="quick", model={**BN, "batchnorm_momentum": 0.01}, notes=notes)
    run_folder(results, calm, metrics(calm, gap_epochs([0.1, 0.2], [0.4, 0.35], [0.38, 0.34])))
    plain = spec("plain", profile="quick", notes=notes)
    plain_epochs = [{"epoch": 1, "train_loss": 0.3, "valid_loss": 0.3}]
    run_folder(results, plain, metrics(plain, plain_epochs), buckets=None)
    docs = root / "docs"
    shutil.copytree(ROOT / "docs" / "assets", docs / "assets")
    drawn: list = []
    files = views.spec_files(experiments, root)
    pages = render_site(results, docs, placeholder_or_real(drawn), spec_files=files)
    text = {p.relative_to(docs).as_posix(): p.read_text() for p in docs.rglob("*.md")}
    return {"root": root, "docs": docs, "pages": pages, "text": text, "drawn": drawn, "ours": ours}


def test_reproduction_page_puts_our_epochs_beside_the_printed_ones(project) -> None:
    page = project["text"]["reproduction.md"]
    theirs = _printed(NOTEBOOK)
    assert len(theirs) == 5
    for i, (train, valid, _) in enumerate(project["ours"]):
        t_train, t_valid = theirs[i]
        cells = [i, train, t_train, train - t_train, valid, t_valid, valid - t_valid]
        assert "<tr>" + "".join(f"<td>{fmt(c)}</td>" for c in cells) + "</tr>" in page, i
    for i in (3, 4):  # epochs only the notebook reached: their values, no difference
        t_train, t_valid = theirs[i]
        cells = [fmt(i), "—", fmt(t_train), "—", "—", fmt(t_valid), "—"]
        assert "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>" in page, i
    # The quick profile is not the notebook's scale: the page says what differs and how to run it.
    section = page.split("## [repro]", 1)[1].split("## ", 1)[0]
    assert "Not at the original scale" in section and "latents: 1,800 here" in section
    assert "python -m runner run experiments/repro.yaml --profile full" in section
    # The reproducing spec that was not run is listed with its command.
    assert re.search(r"<td>pending</td><td>" + NOTEBOOK + r"</td><td>not run</td><td><code>python -m runner "
                     r"run experiments/pending.yaml --profile full</code></td>", page)
    assert "calm" not in page  # no `reproduces`


def test_experiment_page_shows_precision_gap_and_bucket_charts(project) -> None:
    docs, text, drawn = project["docs"], project["text"], project["drawn"]
    page = text["experiments/repro/index.md"]
    assert "Precision: fp32" in page
    assert "[our losses beside its printed ones](../../reproduction.md#repro)" in page
    assert "{ #repro }" in text["reproduction.md"]
    ran = next(r.spec for r in load_runs(project["root"] / "results") if r.id == "repro")
    shown = _plain(page)
    assert describe_precision(ran) in shown
    assert f"was {fmt(1.3)}, in {charts.short_name(LAYERS[0])} (var, epoch 3): above the limit" in shown
    assert "<td>" + fmt(1.3) + "</td></tr>" in page  # the epoch table's largest gap column
    for kind in ("bn_gap", "buckets_std", "buckets_dead"):
        png = docs / "experiments" / "repro" / f"{kind}.png"
        assert f"]({kind}.png)" in page and imread(png).shape[0] > 100, kind
    plain = text["experiments/plain/index.md"]
    assert "Diagnostics" not in plain and not list((docs / "experiments" / "plain").glob("bucket*.png"))
    assert ("buckets_std", ["plain"]) not in drawn and ("bn_gap", ["plain"]) not in drawn


def test_timestep_comparison_draws_only_runs_with_buckets(project) -> None:
    page, drawn = project["text"]["comparisons/timestep.md"], project["drawn"]
    assert ("bucket_comparison_std", ["calm", "repro"]) in drawn
    assert "Without statistics by timestep: [plain]" in page
    assert imread(project["docs"] / "comparisons" / "timestep" / "ablations-bucket_comparison_std.png").size


def test_ablation_page_shows_the_question_and_the_table(project) -> None:
    page = project["text"]["insights/ablations.md"]
    assert page.count("<strong>Question:</strong> does the running average matter?") == 1
    assert "<th>BN running gap</th>" in page and "warning" in page
    assert any(k == "bn_gap" and len(ids) == 3 for k, ids in project["drawn"])
    method = project["text"]["method.md"]
    assert prose.BN_GAP_LIMIT_TEXT.split(":")[0] in method


@pytest.mark.slow
def test_site_with_diagnostics_builds_strict(project) -> None:
    site_dir = build_strict(project["root"], project["docs"])
    for rel in ("reproduction.html", "insights/ablations.html", "comparisons/timestep.html"):
        assert (site_dir / rel).is_file(), rel
    assert _unresolved(site_dir) == []


# ---------------------------------------------------------------- the bucket charts' data


def _lines(fig) -> dict[str, list]:
    """Panel title -> its lines' (x, y) data."""
    return {ax.get_title(): [(np.asarray(ln.get_xdata(), float), np.asarray(ln.get_ydata(), float))
                             for ln in ax.get_lines()] for ax in fig.axes if ax.get_title()}


def test_bucket_charts_draw_the_stats_file_and_skip_runs_without_buckets(tmp_path) -> None:
    a, b = spec("with-a", model=BN), spec("with-b")
    plain = spec("without")
    for s in (a, b):
        run_folder(tmp_path, s, metrics(s, gap_epochs([0.1], [0.3], [0.3])), steps=20)  # windows of 2
    run_folder(tmp_path, plain, metrics(plain, [{"epoch": 1, "train_loss": 0.3, "valid_loss": 0.3}]),
               buckets=None)
    runs = {r.id: r for r in load_runs(tmp_path)}
    with np.load(tmp_path / "with-a" / "stats.npz") as f:  # the file itself, not the reader
        std, edges, names = f["bucket_std"], f["bucket_edges"], list(f["names"])
    steps, modules, k = std.shape
    window = max(1, math.ceil(insights.WINDOW_SHARE * steps))
    assert window == 2
    fig = charts._bucket_comparison_figure([runs["with-a"], runs["without"]], "std")
    panels = _lines(fig)
    assert set(panels) == {charts.short_name(n) for n in names}
    x, late = panels[charts.short_name(names[1])][0]  # run with-a, solid line: the last window's means
    assert np.allclose(x, (edges[:-1] + edges[1:]) / 2)
    assert np.allclose(late, std[-window:, 1].mean(axis=0))
    first_x, early = panels[charts.short_name(names[0])][1]  # dotted: the first window (one NaN skipped)
    expected = [np.mean([v for v in std[:window, 0, j] if not np.isnan(v)]) for j in range(k)]
    assert np.allclose(early, expected)
    over_time = _lines(charts._bucket_figure(runs["with-a"], "dead"))
    assert all(len(lines) == k for lines in over_time.values()) and len(over_time) == modules
    assert not charts.has_buckets(runs["without"]) and charts.has_buckets(runs["with-b"])
    with pytest.raises(ValueError, match="no statistics by timestep"):
        charts.bucket_chart(runs["without"], "std", tmp_path / "x.png")
    with pytest.raises(ValueError, match="none of the runs"):
        charts.bucket_comparison([runs["without"]], "std", tmp_path / "x.png")
