"""Site pages rendered from fabricated run folders, and the real `mkdocs build --strict` over them.

Golden files live in tests/golden/; after an intended change to a page, rewrite them with
``RUNNER_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_site.py`` and review the diff.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import numpy as np
import pytest
import yaml
from jinja2 import UndefinedError
from matplotlib.image import imsave

from runner import site, views
from runner.model_notes import model_notes
from runner.report import Report
from runner.results import load_runs
from runner.site import SiteError, render_site
from runner.spec import build_spec
from runner.templating import environment, md_text
from runner.text import fmt

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden"
XSS = "<script>alert(1)</script>"
KINDS = ("loss", "stats", "hist", "dead")
INSIGHT_PAGES = (
    "index", "summary", "architecture", "hyperparameters", "ablations", "reproductions", "reading"
)


# ---------------------------------------------------------------- fabricated run folders


def _spec(run_id: str, **over):
    raw = {
        "id": run_id,
        "title": f"Run {run_id}",
        "notes": "",
        "group": "architecture",
        "axis": "norm",
        **over,
    }
    return build_spec(raw, "test", profile="smoke")


def _stats(path: Path, std_peak: float, steps: int = 6, names=("down0.res0", "up0.res0")) -> None:
    m = len(names)
    std = np.linspace(1.0, std_peak, steps)[:, None] * np.ones(m)
    hist = np.zeros((m, 40, steps))
    hist[:, 0, :], hist[:, 5, :] = 10, 30
    np.savez_compressed(path, mean=np.zeros((steps, m)), std=std, hist=hist, names=np.array(names))


def _notebook(path: Path, error: bool = False) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_markdown_cell("# Experiment notebook"))
    cell = nbformat.v4.new_code_cell("print('hi')", execution_count=1)
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hi\n")]
    if error:
        cell.outputs.append(
            nbformat.v4.new_output("error", ename="ValueError", evalue="\x1b[0;31mbad <b>", traceback=[])
        )
    nb.cells.append(cell)
    nbformat.write(nb, path)


def _metrics(spec, status: str, train: float | None, valid: float | None, error: str | None = None) -> dict:
    steps = 6 if status != "failed" else 0
    return {
        "id": spec.id,
        "title": spec.title,
        "spec_hash": spec.content_hash(),
        "profile": spec.profile,
        "status": status,
        "diverged_at_step": 4 if status == "diverged" else None,
        "error": error,
        "params": 123456,
        "steps_per_epoch": 6,
        "steps_completed": steps,
        "steps_total": 6,
        "schedule_steps": 6,
        "batches": {
            "loss": [1.0, 0.8, 0.7, 0.6, 0.55, 0.5][:steps],
            "lr": [1e-3] * steps,
            "grad_norm": [1.0] * steps,
        },
        "epochs": [
            {"epoch": 1, "step": 6, "train_loss": train, "valid_loss": valid, "valid_loss_batch_stats": None}
        ]
        if steps
        else [],
        "final": {"train_loss": train, "valid_loss": valid, "valid_loss_batch_stats": None},
        "timings": {"total_s": 12.345, "step_s": 0.2},
        "environment": {
            "device": "cpu",
            "precision": "fp32",
            "torch": "2.x",
            "diffusers": "0.x",
            "python": "3.x",
            "runner": "0.x",
        },
    }


def _run(
    results: Path,
    spec,
    status: str,
    train=None,
    valid=None,
    error=None,
    std_peak=None,
    charts=False,
    notebook: str | None = None,
) -> Path:
    d = results / spec.id
    (d / "charts").mkdir(parents=True)
    (d / "spec.yaml").write_text(spec.to_yaml())
    (d / "metrics.json").write_text(json.dumps(_metrics(spec, status, train, valid, error)))
    if std_peak is not None:
        _stats(d / "stats.npz", std_peak)
    if charts:  # placeholder PNGs: the site copies whatever runner.charts drew
        for i, kind in enumerate(KINDS):
            imsave(d / "charts" / f"{kind}.png", np.full((4, 6), float(i)), vmin=0, vmax=3)
    if notebook:
        _notebook(d / "notebook.ipynb", error=notebook == "error")
    return d


def make_results(root: Path) -> Path:
    results = root / "results"
    good = _spec(
        "good-run", title="Baseline *GroupNorm* & friends", notes="Course-like.\n\nSecond | para <i>x</i>."
    )
    bad = _spec(
        "bad-run",
        title="BatchNorm in resnets",
        model={"resnet_norm": "batch", "out_norm": "batch"},
        train={"lr": 2e-4, "batch_size": 16},
    )
    failed = _spec(
        "failed-run",
        title=f"Failed </title>{XSS}",
        group="hyperparameters",
        axis=f"noise {XSS}",
        noise={"schedule": "ddim", "beta_end": 0.01},
    )
    _run(results, good, "completed", 0.1234567, 0.2, std_peak=1.5, charts=True, notebook="ok")
    _run(results, bad, "completed", 0.3, None, std_peak=250.0, charts=True, notebook="error")
    _run(results, failed, "failed", error=f"RuntimeError: boom {XSS}\nsecond line")
    (results / ".tmp-partial").mkdir()  # temporary folder of a run in progress: skipped
    damaged = _run(results, _spec("no-metrics"), "completed", 0.1, 0.1)
    (damaged / "metrics.json").unlink()  # an interrupted copy: the folder is damaged
    return results


def placeholder_draw(calls: list | None = None):
    """A chart drawer that writes a placeholder PNG (real charts take seconds each;
    test_comparisons_with_real_charts covers the real one) and records its arguments."""

    def draw(runs, kind, out):
        assert kind in KINDS and all(not r.damaged for r in runs)
        if calls is not None:
            calls.append((Path(out).parent.name, kind, [r.id for r in runs]))
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        imsave(out, np.zeros((4, 6)))
        return Path(out)

    return draw


draw = placeholder_draw()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """Results rendered once into a project-like tmp layout (docs/ with the committed assets)."""
    root = tmp_path_factory.mktemp("site")
    results = make_results(root)
    docs = root / "docs"
    shutil.copytree(ROOT / "docs" / "assets", docs / "assets")
    calls: list = []
    pages = render_site(results, docs, placeholder_draw(calls))
    return {"root": root, "results": results, "docs": docs, "pages": pages, "calls": calls}


def _pages(docs: Path) -> dict[str, str]:
    return {p.relative_to(docs).as_posix(): p.read_text() for p in docs.rglob("*.md")}


# ---------------------------------------------------------------- pages


def test_experiments_index_matches_golden(built) -> None:
    text = (built["docs"] / "experiments" / "index.md").read_text()
    golden = GOLDEN / "experiments_index.md"
    if os.environ.get("RUNNER_UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text(), "page changed: review, then RUNNER_UPDATE_GOLDEN=1 to accept"


def test_page_list_and_copied_files(built) -> None:
    docs = built["docs"]
    rel = sorted(p.relative_to(docs).as_posix() for p in built["pages"])
    assert rel == sorted(
        [
            "index.md",
            "method.md",
            "experiments/index.md",
            "comparisons/index.md",
            *(f"insights/{p}.md" for p in INSIGHT_PAGES),
            *(f"comparisons/{k}.md" for k in (*KINDS, "timestep")),
            "reproduction.md",
            *(f"experiments/{i}/index.md" for i in ("good-run", "bad-run", "failed-run", "no-metrics")),
        ]
    )
    assert {p.name for p in (docs / "experiments" / "good-run").iterdir()} == {
        "index.md",
        "notebook.ipynb",
        *(f"{k}.png" for k in KINDS),
    }
    assert {p.name for p in (docs / "experiments" / "failed-run").iterdir()} == {"index.md"}
    assert not [p for p in docs.iterdir() if p.name.startswith(".")]
    assert not list(docs.parent.glob(".docs.staging-*")), "staging folder left behind"


def test_damaged_run_is_listed_and_explained(built) -> None:
    pages = _pages(built["docs"])
    table = pages["experiments/index.md"]
    row = table[table.index('<a href="no-metrics/index.html">') :].split("</tr>")[0]
    assert "damaged" in row and "metrics.json: unreadable" in row
    page = pages["experiments/no-metrics/index.md"]
    assert "Damaged run folder" in page and "metrics.json: unreadable" in page
    assert "no-metrics" not in pages["insights/summary.md"]  # left out of every statement


def test_untrusted_text_is_escaped_everywhere(built) -> None:
    pages = _pages(built["docs"])
    for name, text in pages.items():
        assert "<script" not in text.lower(), name
        assert "<i>" not in text and "<b>" not in text, name
    failed = pages["experiments/failed-run/index.md"]
    assert '<div class="admonition failure">' in failed
    assert "RuntimeError: boom &lt;script&gt;alert(1)&lt;/script&gt;\nsecond line" in failed
    # Markdown punctuation in a title is inert: no emphasis, no table breakout.
    assert r"# Baseline \*GroupNorm\* &amp; friends" in pages["experiments/good-run/index.md"]
    assert r"Second \| para &lt;i&gt;x&lt;/i&gt;\." in pages["experiments/good-run/index.md"]


def test_experiment_pages_show_status_notebook_errors_and_spec(built) -> None:
    pages = _pages(built["docs"])
    good, bad = pages["experiments/good-run/index.md"], pages["experiments/bad-run/index.md"]
    assert '!!! success "Completed"' in good and "error output" not in good
    assert "The executed notebook has 1 error output(s)" in bad
    assert "ValueError: bad &lt;b&gt;" in bad  # ANSI colour codes stripped, HTML escaped
    assert "Original notebook name: `(32,64,64,128)_(DAAA)_BN_Bs16_Lr2e-4_160_1e`" in bad
    assert "<tr><td><code>model.resnet_norm</code></td><td>batch</td></tr>" in bad
    assert "<tr><th>parameters</th><td>123,456</td></tr>" in good
    assert "### Loss" in good and "![loss chart of good\\-run](loss.png)" in good
    assert "[The executed notebook](notebook.ipynb)" in good


def test_home_examples_are_the_insights_healthiest_and_least_healthy(built) -> None:
    home = _pages(built["docs"])["index.md"]
    for kind in ("stats", "hist", "dead"):
        assert f"](experiments/good-run/{kind}.png)" in home
        assert f"](experiments/bad-run/{kind}.png)" in home
    assert home.index("**Healthiest:** [Baseline") < home.index("**Least healthy:** [BatchNorm")
    assert "*healthy*, max std 1.5" in home and "*unhealthy*, max std 250" in home
    # The writeup is announced near the top, before the first section.
    assert home.index('!!! abstract "Writeup') < home.index("## How to read the charts")
    assert "[Read the writeup](insights/summary.md)" in home
    assert "1 of 3 runs was judged healthy" in home


def test_verdicts_in_experiments_table_and_pages_come_from_insights(built) -> None:
    docs = built["docs"]
    items = Report.build(load_runs(built["results"])).assessed
    table = (docs / "experiments" / "index.md").read_text()
    for run_id, level in (("good-run", "healthy"), ("bad-run", "unhealthy"), ("failed-run", "unhealthy")):
        assert items[run_id].verdict.level == level
        row = table[table.index(f'<a href="{run_id}/index.html">') :].split("</tr>")[0]
        assert f'<td class="verdict verdict-{level}"' in row, row
    assert 'title="max std 250 in down0.res0 (threshold 50)' in table
    bad = (docs / "experiments" / "bad-run" / "index.md").read_text()
    assert '<span class="verdict-unhealthy">unhealthy</span>: max std 250 in down0.res0 (threshold 50)' in bad
    assert "<tr><th>max activation std</th><td>250 in down0.res0</td></tr>" in bad
    # The run page links its axis section on the insight page.
    assert "axis norm ([compared with the other variants](../../insights/architecture.md#norm))" in bad


def test_comparisons_group_runs_by_spec_group(built) -> None:
    docs = built["docs"]
    page = (docs / "comparisons" / "stats.md").read_text()
    assert page.index("## architecture") < page.index("## hyperparameters")
    assert (
        "[bad\\-run](../experiments/bad-run/index.md), [good\\-run](../experiments/good-run/index.md)" in page
    )
    assert "![Activation mean and std for group hyperparameters](stats/hyperparameters.png)" in page
    calls = [c[1:] for c in built["calls"] if c[0] in KINDS]  # comparisons/<kind>/<group>.png
    assert sorted(calls) == sorted(
        (kind, ids) for kind in KINDS for ids in (["bad-run", "good-run"], ["failed-run"])
    )
    for kind in KINDS:
        assert (docs / "comparisons" / kind / "hyperparameters.png").is_file()


def test_insight_charts_per_axis_with_safe_names(built) -> None:
    calls = sorted(c[1:] for c in built["calls"] if c[0] == "charts")  # insights/charts/*.png
    assert calls == sorted(
        (kind, ids) for kind in KINDS for ids in (["bad-run", "good-run"], ["failed-run"])
    )
    names = sorted(p.name for p in (built["docs"] / "insights" / "charts").iterdir())
    slug = "noise-script-alert-1-script"  # the axis "noise <script>alert(1)</script>", made safe
    assert names == sorted(
        f"{stem}-{kind}.png" for kind in KINDS for stem in ("architecture-norm", f"hyperparameters-{slug}")
    )
    hyp = (built["docs"] / "insights" / "hyperparameters.md").read_text()
    assert f"## noise &lt;script&gt;alert\\(1\\)&lt;/script&gt; {{ #{slug} }}" in hyp
    assert f"](charts/hyperparameters-{slug}-stats.png)" in hyp


@pytest.mark.slow
def test_comparisons_with_real_charts(tmp_path, monkeypatch) -> None:
    from runner.charts import comparison_chart

    monkeypatch.setattr(views, "INSIGHT_KINDS", ("stats",))  # the same function: one kind checks the path
    results = tmp_path / "results"
    _run(results, _spec("a"), "completed", 0.1, 0.1, std_peak=1.5)
    _run(results, _spec("b"), "failed", error="boom")
    render_site(results, tmp_path / "docs", comparison_chart)
    png_magic = b"\x89PNG\r\n\x1a\n"
    for kind in KINDS:
        png = tmp_path / "docs" / "comparisons" / kind / "architecture.png"
        assert png.read_bytes()[:8] == png_magic, kind
        assert "No chart" not in (tmp_path / "docs" / "comparisons" / f"{kind}.md").read_text()
    insight_png = tmp_path / "docs" / "insights" / "charts" / "architecture-norm-stats.png"
    assert insight_png.read_bytes()[:8] == png_magic
    assert (
        "](charts/architecture-norm-stats.png)" in (insight_png.parent.parent / "architecture.md").read_text()
    )


def test_diverged_run_shows_the_step(tmp_path) -> None:
    results = tmp_path / "results"
    _run(results, _spec("boom"), "diverged", 0.5, None, std_peak=900.0, charts=True)
    render_site(results, tmp_path / "docs", draw)
    docs = tmp_path / "docs"
    assert '<td class="status">diverged at step 4</td>' in (docs / "experiments" / "index.md").read_text()
    page = (docs / "experiments" / "boom" / "index.md").read_text()
    assert '!!! warning "Diverged at step 4"' in page and "<td>900 in down0.res0</td>" in page
    assert "No executed notebook" in page


def test_home_without_two_completed_runs_says_so(tmp_path) -> None:
    results = tmp_path / "results"
    spec = _spec("only")
    _run(results, spec, "completed", 0.1, 0.1, std_peak=2.0, charts=True)
    render_site(results, tmp_path / "docs", draw)
    home = (tmp_path / "docs" / "index.md").read_text()
    assert "No examples yet" in home and "1 run has them so far" in home


# ---------------------------------------------------------------- environment and filters


def test_strict_undefined_raises_on_missing_variable() -> None:
    env = environment()
    with pytest.raises(UndefinedError):
        env.from_string("{{ missing }}").render()
    with pytest.raises(UndefinedError):
        env.get_template("experiment.md.j2").render(run={"title": "x"})


def test_filters() -> None:
    assert fmt(None) == fmt(float("nan")) == fmt("x") == "\u2014"
    assert fmt(0.000123456) == "0.000123" and fmt(250.0) == "250" and fmt(1234567) == "1,234,567"
    assert fmt(1234.5) == "1,230" and fmt(123456.0) == "1.23e+05" and fmt(np.int64(7)) == "7"
    assert str(md_text("a_b *c* <x> & [l](u)\n  # h")) == r"a\_b \*c\* &lt;x&gt; &amp; \[l\]\(u\) \# h"
    assert str(md_text("it's")) == "it&#39;s"  # the entity keeps its '#'


# ---------------------------------------------------------------- safety


def test_unsafe_and_mismatched_folders_are_damaged(tmp_path) -> None:
    results = tmp_path / "results"
    (results / "Bad Id").mkdir(parents=True)
    (results / "Bad Id" / "metrics.json").write_text("{}")
    d = _run(results, _spec("one"), "completed", 0.1, 0.1)
    d.rename(results / "two")
    runs = {r.folder.name: r for r in load_runs(results)}
    assert "not a safe id" in runs["Bad Id"].damage and runs["Bad Id"].id.startswith("unsafe-")
    assert "expected the folder name 'two'" in runs["two"].damage
    docs = tmp_path / "docs"
    render_site(results, docs, draw)
    assert "Damaged run folder" in (docs / "experiments" / runs["Bad Id"].id / "index.md").read_text()


def test_metrics_are_parsed_strictly(tmp_path) -> None:
    results = tmp_path / "results"
    d = _run(results, _spec("one"), "completed", 0.1, 0.1)
    metrics = json.loads((d / "metrics.json").read_text())
    for broken in ({**metrics, "extra": 1}, {**metrics, "params": "many"}, {k: v for k, v in metrics.items()
                                                                           if k != "final"}):
        (d / "metrics.json").write_text(json.dumps(broken))
        (run,) = load_runs(results)
        assert run.damaged and "not the metrics contract" in run.damage
    (d / "metrics.json").write_text(json.dumps(metrics))
    _stats(d / "stats.npz", 2.0)
    (d / "stats.npz").write_bytes((d / "stats.npz").read_bytes()[:100])  # truncated
    (run,) = load_runs(results)
    assert run.metrics is not None and run.damaged and "unreadable statistics" in run.damage


def test_rerender_replaces_generated_pages_and_keeps_assets(tmp_path) -> None:
    results = tmp_path / "results"
    _run(results, _spec("first"), "completed", 0.1, 0.1)
    docs = tmp_path / "docs"
    (docs / "assets").mkdir(parents=True)
    (docs / "assets" / "extra.css").write_text("keep")
    outside = tmp_path / "outside.md"
    outside.write_text("keep")
    (tmp_path / ".docs.staging-killed").mkdir()  # staging folder of a render that was killed
    render_site(results, docs, draw)
    assert (docs / "experiments" / "first" / "index.md").is_file()
    assert not (tmp_path / ".docs.staging-killed").exists()
    shutil.rmtree(results / "first")
    _run(results, _spec("second"), "completed", 0.1, 0.1)
    render_site(results, docs, draw)
    assert not (docs / "experiments" / "first").exists()
    assert (docs / "experiments" / "second" / "index.md").is_file()
    assert (docs / "assets" / "extra.css").read_text() == "keep" and outside.read_text() == "keep"


def test_failed_render_leaves_previous_pages(tmp_path, monkeypatch) -> None:
    results = tmp_path / "results"
    _run(results, _spec("first"), "completed", 0.1, 0.1)
    docs = tmp_path / "docs"
    render_site(results, docs, draw)
    before = _pages(docs)

    def boom(*a, **k):
        raise RuntimeError("template exploded")

    monkeypatch.setattr(views, "reading", boom)
    with pytest.raises(RuntimeError):
        render_site(results, docs, draw)
    assert _pages(docs) == before
    assert not list(tmp_path.glob(".docs.staging-*"))


def test_refuses_docs_dir_that_looks_like_a_project_root(tmp_path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text("")
    with pytest.raises(SiteError, match="project root"):
        render_site(tmp_path / "results", project, draw)
    with pytest.raises(SiteError, match="contains the results folder"):
        render_site(tmp_path / "results", tmp_path, draw)
    assert [p.name for p in project.iterdir()] == ["pyproject.toml"]


def _spec_file(folder: Path, name: str, **raw) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({"group": "architecture", "axis": "norm",
                                                         "suites": ["smoke"], **raw}))


def test_every_spec_is_listed_and_stale_runs_are_marked(tmp_path) -> None:
    results = tmp_path / "results"
    _run(results, _spec("ran", title="Old title"), "completed", 0.1, 0.1)
    experiments = tmp_path / "experiments"
    _spec_file(experiments, "pending", title="Pending")
    _spec_file(experiments, "ran", title="New title", train={"lr": 5e-4})  # new hash: results are stale
    files = views.spec_files(experiments, tmp_path)
    assert [f.path for f in files] == ["experiments/pending.yaml", "experiments/ran.yaml"]
    render_site(results, tmp_path / "docs", draw, spec_files=files)
    table = (tmp_path / "docs" / "experiments" / "index.md").read_text()
    assert table.index("<td>pending</td>") < table.index('<a href="ran/index.html">ran</a>')
    assert "not run<br><code>python -m runner run experiments/pending.yaml --profile smoke</code>" in table
    assert "completed (stale)" in table
    page = (tmp_path / "docs" / "experiments" / "ran" / "index.md").read_text()
    assert "# New title" in page and "Stale results" in page
    assert "<tr><td><code>train.lr</code></td><td>0.001</td></tr>" in page  # what actually ran
    _spec_file(experiments, "ran", title="New title only")  # text changes do not change the hash
    render_site(results, tmp_path / "docs", draw, spec_files=views.spec_files(experiments, tmp_path))
    assert "(stale)" not in (tmp_path / "docs" / "experiments" / "index.md").read_text()


def test_insight_pages_for_runs_in_two_groups(tmp_path) -> None:
    results = tmp_path / "results"
    _run(results, _spec("arch-a", axis="norm"), "completed", 0.2, 0.25, std_peak=1.2, charts=True)
    hyper = _spec("hyper-b", group="hyperparameters", axis="learning rate", train={"lr": 1e-4})
    _run(results, hyper, "completed", 0.3, 0.35, std_peak=80.0, charts=True)
    render_site(results, tmp_path / "docs", draw)
    insights = tmp_path / "docs" / "insights"
    index = (insights / "index.md").read_text()
    for page in ("summary", "architecture", "hyperparameters", "reading"):
        assert f"]({page}.md)" in index
    assert "2 runs judged: 1 healthy, 0 warning, 1 unhealthy" in index
    arch, hyp = (insights / "architecture.md").read_text(), (insights / "hyperparameters.md").read_text()
    assert "# Layer architecture insights" in arch and "## norm { #norm }" in arch
    assert "arch-a/index.html" in arch and "hyper-b" not in arch
    assert "# Hyperparameter insights" in hyp and "## learning rate { #learning-rate }" in hyp
    assert "Only one run on learning rate so far (hyper-b)" in hyp
    for page in (arch, hyp):  # the scale the statements hold at
        assert "of the smoke profile on 160 latents, 1 epoch, 6 optimiser steps" in page
    for kind in views.INSIGHT_KINDS:
        assert f"](charts/hyperparameters-learning-rate-{kind}.png)" in hyp
        assert (insights / "charts" / f"hyperparameters-learning-rate-{kind}.png").is_file()
    summary = (insights / "summary.md").read_text()
    assert "# Writeup: what makes training healthy" in summary
    assert summary.index("hyper-b/index.html") > summary.index("arch-a/index.html")  # healthiest first
    assert '<a href="hyperparameters.html#learning-rate">learning rate</a>' in summary
    reading = (insights / "reading.md").read_text()
    assert 'Healthiest run: <a href="../experiments/arch-a/index.html">' in reading
    assert "](../experiments/hyper-b/dead.png)" in reading


def test_insight_pages_without_runs_say_so(tmp_path) -> None:
    render_site(tmp_path / "none", tmp_path / "docs", draw)
    insights = tmp_path / "docs" / "insights"
    for group in ("architecture", "hyperparameters"):
        assert "No runs in this group yet" in (insights / f"{group}.md").read_text()
    assert "No runs yet" in (insights / "summary.md").read_text()
    assert "No examples yet" in (insights / "reading.md").read_text()
    assert "no runs yet." in (insights / "index.md").read_text()
    # One group empty, the other not: only the empty one says so, and it states no scale.
    results = tmp_path / "results"
    _run(results, _spec("only-arch"), "completed", 0.2, 0.2, std_peak=1.2)
    render_site(results, tmp_path / "docs", draw)
    hyp = (insights / "hyperparameters.md").read_text()
    assert "No runs in this group yet" in hyp and "Measured on" not in hyp
    assert "No runs in this group yet" not in (insights / "architecture.md").read_text()


_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[+-]?\d+)?")


def _without(text: str, words: tuple[str, ...]) -> str:
    for w in words:
        text = text.replace(w, " ")
    return text


def test_numbers_in_sentences_are_in_the_page_table(built) -> None:
    page = (built["docs"] / "insights" / "architecture.md").read_text()
    section = page[page.index("## norm") :]
    sentences = re.findall(r"<li>(.*?)</li>", section.split("</ul>")[0])
    cells = " ".join(re.findall(r"<td[^>]*>(.*?)</td>", section.split("</table>")[0]))
    assert len(sentences) >= 3, sentences  # two runs compared: std, growth, verdicts at least
    assert "good-run kept its largest std lowest (1.5, against 250 for bad-run" in sentences[0]
    strip = ("good-run", "bad-run", "down0.res0", "up0.res0")
    table_numbers = set(_NUMBER.findall(_without(cells, strip)))
    for sentence in sentences:
        assert set(_NUMBER.findall(_without(sentence, strip))) <= table_numbers, sentence


# ---------------------------------------------------------------- the real MkDocs build


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        a = dict(attrs)
        if tag == "img" and a.get("src"):
            self.refs.append(a["src"])
        if tag == "a" and a.get("href"):
            self.refs.append(a["href"])


def _unresolved(site_dir: Path) -> list[str]:
    bad = []
    for page in site_dir.rglob("*.html"):
        parser = _Links()
        parser.feed(page.read_text(encoding="utf-8"))
        for ref in parser.refs:
            parts = urlsplit(ref)
            if (
                parts.scheme
                or parts.netloc
                or ref.startswith(("#", "/", "data:", "mailto:"))
                or not parts.path
            ):
                continue
            target = (page.parent / unquote(parts.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                bad.append(f"{page.relative_to(site_dir)} -> {ref}")
    return bad


def build_strict(root: Path, docs: Path) -> Path:
    """`mkdocs build --strict` of `docs` with the project's mkdocs.yml into root/site; asserts that it
    succeeds without warnings and returns the site folder."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    config.update(docs_dir=str(docs), site_dir=str(root / "site"))
    (root / "mkdocs.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    proc = site.build_site(root / "mkdocs.yml", capture=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not re.search(r"^WARNING", proc.stderr, re.M), proc.stderr[-4000:]
    return root / "site"


@pytest.mark.slow
def test_mkdocs_build_strict_and_links_resolve(built) -> None:
    root = built["root"]
    site_dir = build_strict(root, built["docs"])
    for page in built["pages"]:
        assert (site_dir / page.relative_to(built["docs"]).with_suffix(".html")).is_file(), page
    for run_id in ("good-run", "bad-run"):
        assert (site_dir / "experiments" / run_id / "notebook.html").is_file()
        assert (site_dir / "experiments" / run_id / "notebook.ipynb").is_file()
    assert _unresolved(site_dir) == []
    html = (site_dir / "experiments" / "failed-run" / "index.html").read_text()
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    table = (site_dir / "experiments" / "index.html").read_text()
    assert '<div class="sortable runs">' in table and "assets/sort.js" in table
    # The insight pages are in the navigation (not just reachable), the writeup links resolve (above).
    home = (site_dir / "index.html").read_text()
    for page in INSIGHT_PAGES:
        assert f'href="insights/{page}.html"' in home, page
    summary = (site_dir / "insights" / "summary.html").read_text()
    assert 'href="../experiments/good-run/index.html"' in summary
    assert (
        'href="architecture.html#norm"' in summary
        and 'id="norm"' in (site_dir / "insights" / "architecture.html").read_text()
    )


def test_spec_page_notes_say_what_fields_do_to_the_model() -> None:
    from runner.model_notes import CONV_FLAG_NOTE
    from runner.spec import from_seed_name

    with_conv = model_notes(from_seed_name("(32,64,64,128)_(DAAA)_Conv_Lr1e-3_10k_5e"))
    plain = model_notes(from_seed_name("(32,64,64,128)_(DAAA)_Lr1e-3_10k_5e"))
    assert CONV_FLAG_NOTE in with_conv and CONV_FLAG_NOTE not in plain
    assert "integer" in plain[0].lower() or "ddim" in plain[0].lower(), plain[0]
