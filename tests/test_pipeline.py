"""End to end: specs -> papermill notebooks -> results/ -> pages -> `mkdocs build --strict`.

Two tiny experiments and one made to fail run through the real template notebook; a second
invocation must come from the cache; the built site must have every page, and every image
and link in it must resolve.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from test_site import _unresolved, build_strict  # the site tests' link checker and strict build

from runner import execute, site, views
from runner.charts import comparison_chart
from runner.spec import SpecError

ROOT = Path(__file__).resolve().parent.parent
TINY = "model: {block_out_channels: [32, 64], blocks: DA, layers_per_block: 1}\ntrain: {batch_size: 16}\n"
SPECS = {
    "tiny_group": "title: Tiny GroupNorm\ngroup: architecture\naxis: norm\n" + TINY,
    "tiny_batch": "title: Tiny BatchNorm\ngroup: architecture\naxis: norm\n"
    "model: {block_out_channels: [32, 64], blocks: DA, layers_per_block: 1, resnet_norm: batch}\n"
    "train: {batch_size: 16}\n",
    # Valid as a spec, but BatchNorm at the 1x1 bottom level of six gets one value per channel from a
    # batch of 1: torch raises in the first step inside train() (spec loading refuses batch > split).
    "tiny_fails": "title: Made to fail\ngroup: hyperparameters\naxis: batch size\n"
    "model: {block_out_channels: [32, 32, 32, 32, 32, 32], blocks: DDDDDD, layers_per_block: 1, "
    "resnet_norm: batch}\ntrain: {batch_size: 1}\n",
}

pytestmark = pytest.mark.slow


@contextmanager
def console(into: list[str]):
    """Capture what a user's terminal would show: this process's prints and logging (Python level) and
    what the kernels write to the inherited file descriptors; echoed afterwards."""
    text = io.StringIO()
    handler = logging.StreamHandler(text)
    logging.getLogger().addHandler(handler)  # pytest holds the root logger: basicConfig adds nothing
    sys.stdout.flush(), sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 1), os.dup2(tmp.fileno(), 2)
        try:
            with redirect_stdout(text), redirect_stderr(text):
                yield
        finally:
            logging.getLogger().removeHandler(handler)
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            tmp.seek(0)
            into.append(text.getvalue() + tmp.read().decode(errors="replace"))
            sys.stdout.write(into[-1])


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("project")
    for name, text in SPECS.items():
        (root / "experiments").mkdir(exist_ok=True)
        (root / "experiments" / f"{name}.yaml").write_text(text)
    results = root / "results"
    args = argparse.Namespace(
        specs=[str(root / "experiments")], profile="smoke", results=str(results), force=False
    )
    # A folder runs the specs whose suites include the profile: add smoke to each.
    for path in (root / "experiments").glob("*.yaml"):
        path.write_text(path.read_text() + "suites: [smoke]\n")
    out: list[str] = []
    with console(out):
        first = execute.main(args)
    stamps = {p: p.stat().st_mtime_ns for p in results.glob("*/notebook.ipynb")}
    second = execute.main(args)
    return {"root": root, "results": results, "args": args, "codes": (first, second), "stamps": stamps,
            "console": out[0]}


def test_console_shows_progress_and_results_only(suite):
    text = suite["console"]
    assert "[1/3] tiny_batch: running (smoke profile)" in text and "3 experiments:" in text
    assert "tiny_group: completed" in text  # progress and results are shown
    assert "without encryption" not in text and "Executing Cell" not in text


def test_notebook_prints_the_verdict_the_site_uses(suite):
    nb = json.loads((suite["results"] / "tiny_group" / "notebook.ipynb").read_text())
    text = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert "max std:" in text and "verdict: " in text and "watched modules: " in text


def test_failed_experiment_is_recorded_and_the_suite_goes_on(suite):
    results = suite["results"]
    assert suite["codes"][0] == 1, "a failed experiment makes the exit status 1"
    failed = json.loads((results / "tiny_fails" / "metrics.json").read_text())
    assert failed["status"] == "failed" and "more than 1 value per channel" in failed["error"]
    for run_id in ("tiny_group", "tiny_batch"):
        run = results / run_id
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["status"] == "completed" and metrics["steps_completed"] == 9
        for name in (
            "spec.yaml",
            "stats.npz",
            "notebook.ipynb",
            *(f"charts/{k}.png" for k in ("loss", "stats", "hist", "dead")),
            *(f"samples/{k}" for k in ("samples.json", "samples.npz", "grid_matched.png", "grid_real.png")),
        ):
            assert (run / name).is_file(), f"{run_id}/{name}"
        nb = json.loads((run / "notebook.ipynb").read_text())
        assert not [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not [p for p in results.iterdir() if p.name.startswith(".") and p.is_dir()], "no temporary folder"
    summary = json.loads((results / "suite.json").read_text())
    assert {r["id"]: r["cached"] for r in summary["runs"]} == {
        "tiny_batch": True,
        "tiny_fails": False,
        "tiny_group": True,
    }


def test_second_invocation_runs_no_training(suite):
    results = suite["results"]
    assert len(suite["stamps"]) == 3
    for path, stamp in suite["stamps"].items():
        if "tiny_fails" not in str(path):
            assert path.stat().st_mtime_ns == stamp, f"{path} was re-executed"
    spec_a = execute.collect_specs([str(suite["root"] / "experiments")], "smoke")
    assert all(execute.cache_hit(s, results / s.id) for s in spec_a if s.id != "tiny_fails")


def test_site_builds_strict_with_every_page_and_link(suite):
    root = suite["root"]
    docs = root / "docs"
    # A copy of the results with one damaged folder (truncated statistics), and a spec not run yet.
    results = root / "results-site"
    shutil.copytree(suite["results"], results)
    stats = results / "tiny_batch" / "stats.npz"
    stats.write_bytes(stats.read_bytes()[: stats.stat().st_size // 2])
    experiments = root / "experiments-site"
    shutil.copytree(root / "experiments", experiments)
    (experiments / "tiny_later.yaml").write_text("title: Not run yet\nsuites: [smoke]\n" + TINY)
    files = views.spec_files(experiments, root)
    pages = site.render_site(results, docs, comparison_chart, spec_files=files,
                             suite_record=json.loads((results / "suite.json").read_text()))
    built = build_strict(root, docs)
    for page in pages:
        assert (built / page.relative_to(docs).with_suffix(".html")).is_file(), page
    assert _unresolved(built) == []
    index = (built / "experiments" / "index.html").read_text()
    row = re.search(r"<tr[^>]*>(?:(?!</tr>).)*tiny_fails(?:(?!</tr>).)*</tr>", index, re.S)
    assert row and "failed" in row.group(0)
    damaged = re.search(r"<tr[^>]*>(?:(?!</tr>).)*tiny_batch(?:(?!</tr>).)*</tr>", index, re.S)
    # The manifest (written last) no longer matches the truncated file: the reason names it.
    assert damaged and "damaged" in damaged.group(0) and "stats.npz" in damaged.group(0)
    assert "Damaged run folder" in (built / "experiments" / "tiny_batch" / "index.html").read_text()
    later = re.search(r"<tr[^>]*>(?:(?!</tr>).)*tiny_later(?:(?!</tr>).)*</tr>", index, re.S)
    assert later and "not run" in later.group(0)
    assert "python -m runner run experiments-site/tiny_later.yaml --profile smoke" in later.group(0)
    page = (built / "experiments" / "tiny_group" / "index.html").read_text()
    for kind in ("loss", "stats", "hist", "dead"):
        assert f"{kind}.png" in page
    assert (built / "experiments" / "tiny_group" / "notebook.html").is_file()


def test_invalid_spec_stops_everything_before_work(tmp_path, capsys):
    (tmp_path / "good.yaml").write_text(TINY)
    (tmp_path / "bad.yaml").write_text("train: {lr: -1}\n")
    args = argparse.Namespace(
        specs=[str(tmp_path / "good.yaml"), str(tmp_path / "bad.yaml")],
        profile="smoke",
        results=str(tmp_path / "results"),
        force=False,
    )
    assert execute.main(args) == 2
    assert "bad.yaml" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()
    with pytest.raises(SpecError, match="duplicate experiment ids"):
        (tmp_path / "sub").mkdir()
        (tmp_path / "sub" / "good.yaml").write_text(TINY)
        execute.collect_specs([str(tmp_path / "good.yaml"), str(tmp_path / "sub" / "good.yaml")], "smoke")
