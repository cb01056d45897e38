"""`python -m runner site`: run folders -> Markdown pages in docs/ -> MkDocs site in site/.

    results/<id>/ --runner.results.load_runs--> runs --runner.report.Report.build--> report (analysed once)
      --runner.views--> page variables --runner.templating--> pages in a staging folder
      --runner.files.replace_dir--> docs/ --mkdocs build (staging)--> replace_dir --> site/

Pages (all generated; docs/assets/ is hand-written, tracked, and carried into every new docs/):
``index.md`` (home), ``experiments/index.md`` (every spec under experiments/ and every run folder),
``experiments/<id>/index.md`` (one run, or why its folder is damaged), ``comparisons/``, ``insights/``
(writeup, one page per group in views.PAGE_TITLES, reading guide) and ``method.md``.

docs/ and site/ are each built complete in a staging folder beside them and swapped in with one atomic
exchange, so a kill at any instant leaves the previous complete folder or the new one; staging folders
a killed render left behind are removed at the next start. One render at a time per project.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from runner import views, writeup
from runner.faults import kill_point
from runner.files import read_json, recover_dir, replace_dir, write_text
from runner.originals import OriginalRun, OriginalsError, load_original_results
from runner.publish import PUBLISHED, find_snapshots, read_snapshot_manifest
from runner.report import Report
from runner.results import SAMPLES_DIR, Run, load_runs, with_published
from runner.sanitize import check_site, sanitize_site
from runner.spec import SAFE_ID
from runner.templating import environment

ROOT = Path(__file__).resolve().parent.parent
KEEP = ("assets",)  # hand-written entries of docs/ carried into each new docs/
STAGING = ".staging-"  # "<dir>/../.<name>.staging-*": never built by MkDocs, cleaned at the next start
DATA_STATS = ROOT / "data" / "lsun_bedroom_10k" / "stats.json"

# draw(runs, kind, out) -> the written PNG (runner.charts.comparison_chart is the real one).
Drawer = Callable[[Sequence[Run], str, Path], Path]


class SiteError(ValueError):
    """Results could not be turned into pages: the message names the folder and what was expected."""


# ---------------------------------------------------------------- staging


def _staging_prefix(target: Path) -> str:
    return f".{target.name}{STAGING}"


def clean_staging(target: Path) -> None:
    """Remove staging folders a killed render or build left beside `target`, and undo a half-done
    fallback swap (runner.files.recover_dir)."""
    target = Path(target)
    if target.parent.is_dir():
        for old in target.parent.glob(_staging_prefix(target) + "*"):
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
    recover_dir(target)


def _new_stage(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=_staging_prefix(target), dir=target.parent))


class _Writer:
    """Renders pages and draws charts into a staging folder; remembers the pages (relative to docs/)."""

    def __init__(self, stage: Path, draw: Drawer, figures: views.Figures | None = None):
        self.env, self.stage, self.draw, self.pages = environment(), stage, draw, []
        self.figures = figures

    def page(self, rel: str, template: str, **context: Any) -> None:
        kill_point("render")
        write_text(self.stage / rel, self.env.get_template(template).render(**context))
        self.pages.append(rel)

    def copy(self, src: Path, rel: str) -> None:
        dst = self.stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)

    def chart(self, runs: Sequence[Run], kind: str, rel: str) -> str | None:
        """Draw one comparison chart; its error text when it fails (shown on its page; the site builds)."""
        try:
            self.draw(runs, kind, self.stage / rel)
        except Exception as e:  # noqa: BLE001 - one bad chart shows on its page, the site still builds
            warnings.warn(f"chart {rel}: {type(e).__name__}: {e}", stacklevel=2)
            return f"{type(e).__name__}: {e}"
        return None

    def figure(self, name: str, runs: Sequence[Run], rel: str, **options: Any) -> str | None:
        """Draw one writeup figure (runner.charts.writeup_figure); its error text when it fails or
        no figure drawer was given."""
        if self.figures is None:
            return "no figure drawer was given to this render"
        try:
            self.figures(name, runs, self.stage / rel, **options)
        except Exception as e:  # noqa: BLE001 - one bad figure shows on the writeup, the site still builds
            warnings.warn(f"figure {rel}: {type(e).__name__}: {e}", stacklevel=2)
            return f"{type(e).__name__}: {e}"
        return None


# ---------------------------------------------------------------- rendering


def render_site(
    results_dir: Path,
    docs_dir: Path,
    draw: Drawer,
    spec_files: Sequence[views.SpecFile] = (),
    suite_record: dict[str, Any] | None = None,
    data_stats: dict[str, Any] | None = None,
    published: Sequence[Path] = (),
    figures: views.Figures | None = None,
) -> list[Path]:
    """Render every page from the run folders in `results_dir` and swap them in as `docs_dir`; return
    the pages written. `spec_files` (views.spec_files) adds specs not run yet and marks stale runs;
    `suite_record` is results/suite.json; `data_stats` the data's stats.json (Method page figures);
    `published` snapshot folders (runner.publish) whose runs are shown beside the local ones, labelled;
    `figures` draws the writeup's figures (runner.charts.writeup_figure; None: the writeup lists them
    as not drawn)."""
    results_dir, docs_dir = Path(results_dir), Path(docs_dir)
    _check_docs_dir(docs_dir, results_dir)
    clean_staging(docs_dir)
    report = Report.build(with_published(load_runs(results_dir), [Path(p) for p in published]))
    snapshots = [(Path(p).name, read_snapshot_manifest(Path(p)) or {}) for p in published]
    stage = _new_stage(docs_dir)
    try:
        for keep in KEEP:
            if (docs_dir / keep).is_dir():
                shutil.copytree(docs_dir / keep, stage / keep)
        writer = _Writer(stage, draw, figures)
        _render_all(writer, report, list(spec_files), suite_record, data_stats or {}, snapshots)
        replace_dir(stage, docs_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return [docs_dir / rel for rel in writer.pages]


def _check_docs_dir(docs_dir: Path, results_dir: Path) -> None:
    """Refuse folders where replacing generated pages could destroy something else."""
    d, r = docs_dir.resolve(), results_dir.resolve()
    if d == r or d in r.parents:
        raise SiteError(f"docs folder {docs_dir} contains the results folder {results_dir}")
    for marker in (".git", "pyproject.toml", "mkdocs.yml"):
        if (d / marker).exists():
            raise SiteError(f"docs folder {docs_dir} holds {marker}: looks like a project root, not docs/")


def _render_all(
    w: _Writer,
    report: Report,
    files: list[views.SpecFile],
    suite: dict[str, Any] | None,
    data_stats: dict[str, Any],
    snapshots: list[tuple[str, dict[str, Any]]],
) -> None:
    entries = views.entries(report, files)
    rows = [views.row(e, report) for e in entries]
    for e in entries:
        if e.run is not None:
            _render_run(w, e, report)
    w.page("experiments/index.md", "experiments.md.j2", **views.experiments_index(report, rows))
    w.page("index.md", "home.md.j2", **views.home(report, rows))
    for rel, template, context in views.comparisons(report, w.chart):
        w.page(rel, template, **context)
    timestep = views.timestep_comparison(report, w.chart)
    w.page("comparisons/timestep.md", "comparison_timestep.md.j2", **timestep)
    for group in views.PAGE_TITLES:
        w.page(f"insights/{group}.md", "insights_axis.md.j2", **views.axis_page(report, group, w.chart))
    w.page("reproduction.md", "reproduction.md.j2", **views.reproduction(report, files, _originals()))
    w.page("insights/reading.md", "insights_reading.md.j2", **views.reading(report))
    w.page("insights/summary.md", "writeup.md.j2", **writeup.writeup(report, snapshots, w.figure, files))
    w.page("insights/index.md", "insights.md.j2", **views.insights_index(report))
    w.page("method.md", "method.md.j2", **views.method(report, data_stats, suite))


def _render_run(w: _Writer, e: views.Entry, report: Report) -> None:
    run = e.run
    assert run is not None and SAFE_ID.match(run.id), run.id
    base = f"experiments/{run.id}"
    if run.damaged or e.id not in report.assessed:
        w.page(f"{base}/index.md", "damaged.md.j2", run=views.damaged_page(e))
        return
    for stem, png in run.charts.items():
        w.copy(png, f"{base}/{stem}.png")
    samples = run.samples
    for grid in (samples.grids.values() if samples and samples.status == "completed" else ()):
        w.copy(run.folder / SAMPLES_DIR / grid, f"{base}/{SAMPLES_DIR}/{grid}")
    nb_path = run.folder / "notebook.ipynb"
    notebook = views.notebook_check(nb_path) if nb_path.is_file() else None
    if notebook is not None and notebook[0]:
        w.copy(nb_path, f"{base}/notebook.ipynb")
    diagnostics = views.run_diagnostics(run, w.chart, base)
    page = views.experiment_page(e, report, notebook, diagnostics)
    w.page(f"{base}/index.md", "experiment.md.j2", run=page)


def _originals() -> dict[str, OriginalRun] | OriginalsError:
    """The originals' printed losses (data/reference/); a malformed file is shown on the page, not fatal."""
    try:
        return load_original_results()
    except (OriginalsError, OSError) as e:
        return OriginalsError(str(e))


# ---------------------------------------------------------------- building and the command line


def build_site(config: Path, capture: bool = False) -> subprocess.CompletedProcess[str]:
    """`mkdocs build --strict -f config` into a staging folder, swapped in as the config's site_dir
    only when the build succeeded (a failed build keeps the previous site)."""
    config = Path(config)
    site_dir = config_dir(config, "site_dir", "site")
    clean_staging(site_dir)
    stage = _new_stage(site_dir)
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "--site-dir", str(stage)]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # silence Material's end-of-life banner in logs
    try:
        proc = subprocess.run(cmd, cwd=config.parent, env=env, capture_output=capture, text=True, check=False)
        if proc.returncode == 0:
            proc = _sanitized(proc, stage)
        if proc.returncode == 0:
            replace_dir(stage, site_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return proc


def published_folders(choices: Sequence[str], root: Path = PUBLISHED) -> list[Path]:
    """--published values -> snapshot folders: "auto" every snapshot under `root`, "none" nothing (it
    cannot be combined), else each named folder, which must hold a snapshot manifest."""
    if "none" in choices:
        if len(choices) > 1:
            raise SiteError("--published none cannot be combined with other --published values")
        return []
    out: list[Path] = []
    for choice in choices:
        found = find_snapshots(root) if choice == "auto" else [Path(choice)]
        for folder in found:
            if read_snapshot_manifest(folder) is None:
                raise SiteError(f"--published {folder}: no snapshot manifest.json there "
                                "(make one with `python -m runner publish --name NAME`)")
            if folder.resolve() not in [f.resolve() for f in out]:
                out.append(folder)
    return out


def config_dir(config: Path, key: str, default: str) -> Path:
    """A folder named in an mkdocs.yml (docs_dir, site_dir), relative to the config's folder."""
    import yaml

    config = Path(config)
    return config.parent / str((yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get(key, default))


def _sanitized(proc: subprocess.CompletedProcess[str], stage: Path) -> subprocess.CompletedProcess[str]:
    """Sanitise the notebook pages of a built site, then scan every page (runner.sanitize); a problem
    left fails the build loudly, with each page and what it holds, and the site is not swapped in."""
    sanitize_site(stage)
    problems = check_site(stage)
    if not problems:
        return proc
    report = "unsafe HTML in the built site (not published):\n" + "\n".join(f"  {p}" for p in problems)
    print(report, file=sys.stderr)
    return subprocess.CompletedProcess(proc.args, 1, proc.stdout, (proc.stderr or "") + report + "\n")


def main(args: argparse.Namespace) -> int:
    """`python -m runner site`: render docs/ from --results, then build site/ (skipped with --no-build).
    Exit status: 0 ok, 2 results that cannot become pages, else mkdocs' own."""
    from runner.charts import comparison_chart, writeup_figure
    from runner.figcache import FigureCache

    results = Path(args.results)
    suite_path = results / "suite.json"
    # --config: another project's mkdocs.yml (its docs/, site/ and experiments/ beside it), e.g. in tests.
    config = Path(getattr(args, "config", None) or ROOT / "mkdocs.yml")
    if getattr(args, "config", None) and not config.is_file():
        print(f"--config {config}: no such file (expected the project's mkdocs.yml)", file=sys.stderr)
        return 2
    project = config.parent
    docs = config_dir(config, "docs_dir", "docs") if config.is_file() else project / "docs"
    try:
        published = published_folders(getattr(args, "published", None) or ["auto"], project / "published")
        cache = FigureCache(published)  # the figures `runner publish` drew for each snapshot
        pages = render_site(
            results,
            docs,
            cache.chart(comparison_chart),
            spec_files=views.spec_files(project / "experiments", project),
            suite_record=read_json(suite_path) if suite_path.is_file() else None,
            data_stats=read_json(DATA_STATS) if DATA_STATS.is_file() else None,
            published=published,
            figures=cache.figure(writeup_figure),
        )
    except SiteError as e:
        print(e, file=sys.stderr)
        return 2
    shown = f" and {len(published)} published snapshot(s)" if published else ""
    n = cache.counts
    print(f"rendered {len(pages)} pages into {docs} from {results}{shown}; figures: {n['served']} from "
          f"the snapshots' stores, {n['drawn']} drawn, {n['reused']} reused"
          + (f" ({n['rejected']} stored ones failed their check and were redrawn)" if n["rejected"] else ""))
    if getattr(args, "no_build", False):
        return 0
    return build_site(config).returncode
