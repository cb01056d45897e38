"""The figure cache (runner.figcache): `runner publish` draws a snapshot's figures once into
published/NAME/_figures/; `runner site` serves them, verified, instead of drawing; a tampered figure is
redrawn, never served; a change to what a chart is drawn from is a new key."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from PIL import Image
from test_publish import ROOT, make_results

from runner import charts
from runner.cli import main
from runner.figcache import FIGURES, INDEX, FigureCache, FigureCacheWarning
from runner.publish import publish
from runner.results import load_runs
from runner.statsfile import load_stats, save_stats


@pytest.fixture(scope="module")
def snap(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("figcache")
    publish(make_results(root), "quick", out_root=root / "published")
    return root / "published" / "quick"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _project(tmp: Path, snap: Path) -> Path:
    """A project folder (mkdocs.yml, docs/assets, experiments/, published/quick) for `runner site`."""
    shutil.copytree(snap, tmp / "published" / "quick")
    shutil.copytree(ROOT / "docs" / "assets", tmp / "docs" / "assets")
    (tmp / "experiments").mkdir()
    (tmp / "results").mkdir()
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    config.update(docs_dir="docs", site_dir="site")
    (tmp / "mkdocs.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    return tmp


class _Spy:
    """Counts the calls to the real drawers (runner site looks them up in runner.charts when it runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        self.inside = False  # writeup_figure draws through comparison_chart: one call, not two
        real_chart, real_figure = charts.comparison_chart, charts.writeup_figure

        def chart(runs, kind, out):
            if not self.inside:
                self.calls.append(kind)
            return real_chart(runs, kind, out)

        def figure(name, runs, out, **options):
            self.calls.append(name)
            self.inside = True
            try:
                return real_figure(name, runs, out, **options)
            finally:
                self.inside = False

        monkeypatch.setattr(charts, "comparison_chart", chart)
        monkeypatch.setattr(charts, "writeup_figure", figure)


def _site(project: Path) -> int:
    return main(["site", "--config", str(project / "mkdocs.yml"), "--results", str(project / "results"),
                 "--no-build"])


def _pngs(docs: Path) -> dict[str, str]:
    """Every drawn figure of a rendered docs/ (run folders' own charts and sample grids are copies)."""
    return {p.relative_to(docs).as_posix(): _sha(p) for p in docs.rglob("*.png")
            if "samples" not in p.parts and "assets" not in p.parts}


def test_publish_stores_every_figure_with_its_sha256_and_counts_them_in_the_size(snap) -> None:
    index = json.loads((snap / FIGURES / INDEX).read_text())["files"]
    stored = sorted(p.name for p in (snap / FIGURES).glob("*.png"))
    assert stored == sorted(index) and len(stored) > 20
    for name, entry in index.items():
        png = snap / FIGURES / name
        assert entry["sha256"] == _sha(png) and entry["size"] == png.stat().st_size
        assert name == f"{png.stem}.png" and len(png.stem) == 64
    manifest = json.loads((snap / "manifest.json").read_text())
    assert manifest["figures"] == {"figures": len(index), "bytes": sum(e["size"] for e in index.values())}
    everything = [p for p in snap.rglob("*") if p.is_file() and p != snap / "manifest.json"]
    assert manifest["size_bytes"] == sum({_sha(p): p.stat().st_size for p in everything}.values())
    assert all(not r.id.startswith("_") for r in load_runs(snap))  # the store is not taken for a run


def test_site_serves_the_stored_figures_and_draws_nothing(snap, tmp_path, monkeypatch) -> None:
    project = _project(tmp_path / "cached", snap)
    spy = _Spy(monkeypatch)
    assert _site(project) == 0
    assert spy.calls == []
    served = _pngs(project / "docs")
    assert len(served) > 20 and any(k.startswith("insights/writeup/") for k in served)
    # The same site drawn without the store: the very same images, every one drawn.
    bare = _project(tmp_path / "bare", snap)
    shutil.rmtree(bare / "published" / "quick" / FIGURES)
    assert _site(bare) == 0
    assert len(spy.calls) == len(set(json.loads((snap / FIGURES / INDEX).read_text())["files"]))
    assert _pngs(bare / "docs") == served


def test_a_tampered_figure_is_redrawn_not_served(snap, tmp_path, monkeypatch) -> None:
    project = _project(tmp_path, snap)
    store = project / "published" / "quick" / FIGURES
    victim = sorted(store.glob("*.png"))[0]
    original = victim.read_bytes()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(victim)
    forged = _sha(victim)
    spy = _Spy(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _site(project) == 0
    reports = [w for w in caught if issubclass(w.category, FigureCacheWarning)]
    assert len(reports) == 1 and victim.name in str(reports[0].message)
    assert len(spy.calls) == 1  # that figure alone is drawn (once, however many pages show it)
    shown = _pngs(project / "docs").values()
    assert forged not in shown and hashlib.sha256(original).hexdigest() in shown
    assert _sha(victim) == forged  # the committed snapshot is not written by building its site


def test_the_key_follows_what_a_chart_is_drawn_from(snap, tmp_path) -> None:
    copy = tmp_path / "quick"
    shutil.copytree(snap, copy)

    def key(folder: Path, ids: tuple[str, ...] = ("good", "bad"), name: str = "stats", **options) -> str:
        runs = {r.id: r for r in load_runs(folder)}
        return FigureCache([folder]).key("chart", name, options, [runs[i] for i in ids])

    before = key(snap)
    assert key(copy) == before  # the same files elsewhere: the same key (a snapshot can move)
    assert key(snap, ("bad", "good")) != before and key(snap, name="hist") != before
    assert key(snap, module="a") != key(snap, module="b")
    stats = load_stats(copy / "good" / "stats.npz")
    save_stats(replace(stats, std=stats.std * 1.01), copy / "good" / "stats.npz")
    assert key(copy) != before
    assert key(copy, ("bad", "prec_fp16")) == key(snap, ("bad", "prec_fp16"))  # other runs: unchanged


def test_figures_of_runs_outside_a_store_are_drawn(snap, tmp_path) -> None:
    local = make_results(tmp_path)
    runs = [r for r in load_runs(local) if r.id in ("good", "bad")]
    mixed = [runs[0], next(r for r in load_runs(snap) if r.id == "bad")]
    cache = FigureCache([snap])
    drawn: list[str] = []

    def draw(rs, kind, out):
        drawn.append(kind)
        return charts.comparison_chart(rs, kind, out)

    chart = cache.chart(draw)
    for i, group in enumerate((runs, mixed, mixed)):
        chart(group, "loss", tmp_path / f"{i}.png")
    assert drawn == ["loss", "loss"] and cache.counts == {"served": 0, "reused": 1, "drawn": 2,
                                                          "rejected": 0}
    assert (tmp_path / "1.png").read_bytes() == (tmp_path / "2.png").read_bytes()
