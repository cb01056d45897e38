"""`python -m runner publish --name NAME`: a compact, committed snapshot of the runs in results/.

    results/<id>/ --runner.results.load_runs + runner.manifest.verify--> sound runs
      --> staging folder: per run spec.yaml, metrics.json, stats.npz (at most MAX_ROWS rows, with their
          step indices), samples/ (samples.json and the grids), charts/ (redrawn from the snapshot's
          statistics), manifest.json;
          _figures/ (every figure the site shows of this snapshot alone, drawn once: runner.figcache)
      --> published/NAME/manifest.json (commit, date, device, profile, precision, wall time per run,
          versions, the runs and the runs left out) --runner.files.replace_dir--> published/NAME/

Each run folder of a snapshot is a run folder of the contract (`runner.results.load_runs` reads it, and
its own manifest.json lists its files), so the Report, the charts and the pages work on it unchanged.
Runs whose folder is damaged, or whose manifest does not verify, are reported and left out. A snapshot
larger than the limit is refused (nothing is written): the site is meant to be cloned and built. Its
size is that of its distinct file contents, which is what the repository stores; each run's own charts
are redrawn from the snapshot's statistics (small palette PNGs, the same rows the pages read) and kept
when they fit (--charts auto), dropped with --charts none.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runner import __version__
from runner.figcache import FIGURES
from runner.files import replace_dir, write_json
from runner.manifest import MANIFEST, manifest_key, sha256_file, verify, write_manifest
from runner.results import (
    METRICS_FILE,
    SAMPLES_DIR,
    SAMPLES_FILE,
    SPEC_FILE,
    STATS_FILE,
    Run,
    load_runs,
)
from runner.spec import SAFE_ID
from runner.statsfile import Buckets, Stats, save_stats
from runner.text import fmt

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = ROOT / "published"
MAX_ROWS = 300
MAX_MB = 20.0
CHART_MODES = ("auto", "draw", "none")
SNAPSHOT_MANIFEST = MANIFEST  # published/NAME/manifest.json (the run folders have their own)


class PublishError(ValueError):
    """A snapshot cannot be written: the message names what and why."""


# ---------------------------------------------------------------- statistics


def kept_rows(n: int, limit: int = MAX_ROWS) -> np.ndarray:
    """Indices of at most `limit` evenly spaced rows of `n`, the first and last included: row i of k is
    round-half-up(i (n - 1) / (k - 1)), in integers (distinct, since the spacing is at least one)."""
    if n <= limit:
        return np.arange(n, dtype=np.int64)
    if limit < 2:
        raise PublishError(f"at least two rows are kept (the first and the last); got a limit of {limit}")
    i = np.arange(limit, dtype=np.int64)
    return (2 * i * (n - 1) + (limit - 1)) // (2 * (limit - 1))


def downsample(stats: Stats, limit: int = MAX_ROWS) -> Stats:
    """The statistics at `kept_rows` (their step indices kept in `steps`; bucket arrays alike)."""
    rows = kept_rows(len(stats), limit)
    b = stats.buckets
    buckets = None if b is None else Buckets(b.edges, b.mean[rows], b.std[rows], b.dead[rows], b.count[rows])
    return Stats(stats.mean[rows], stats.std[rows], stats.hist[:, :, rows], stats.names, stats.steps[rows],
                 buckets)


# ---------------------------------------------------------------- one run


def _publish_run(run: Run, out: Path, limit: int) -> dict[str, Any]:
    """Write the snapshot folder of one sound run (charts and manifest come later: see `publish`); its
    entry in the snapshot manifest."""
    assert run.metrics is not None
    out.mkdir(parents=True)
    for name in (SPEC_FILE, METRICS_FILE):
        shutil.copyfile(run.folder / name, out / name)
    rows = (0, 0)
    if run.stats is not None:
        small = downsample(run.stats, limit)
        save_stats(small, out / STATS_FILE)
        rows = (len(run.stats), len(small))
    samples = run.samples
    if samples is not None:
        (out / SAMPLES_DIR).mkdir()
        shutil.copyfile(run.folder / SAMPLES_FILE, out / SAMPLES_FILE)
        for grid in samples.grids.values():
            shutil.copyfile(run.folder / SAMPLES_DIR / grid, out / SAMPLES_DIR / grid)
    m, env = run.metrics, run.metrics.environment
    return {
        "id": run.id,
        "status": m.status,
        "profile": m.profile,
        "device": env.device,
        "precision": env.precision,
        "wall_s": m.timings.total_s,
        "steps": m.steps_completed,
        "stats_rows": {"recorded": rows[0], "kept": rows[1]},
        "samples": samples.status if samples is not None else None,
    }


def _draw_run_charts(out: Path) -> None:
    """The run's own charts (loss, stats, hist, dead), drawn from the snapshot run folder `out` itself."""
    from runner.charts import run_charts

    run_charts(out)


def _draw_figures(stage: Path) -> dict[str, int]:
    """Draw every figure the site shows of this snapshot alone into its _figures/ store (the site is
    rendered into a temporary folder and thrown away), so that `runner site` serves them instead of
    drawing them (runner.figcache). The number of figures and their bytes."""
    import tempfile

    from runner import views
    from runner.charts import comparison_chart, writeup_figure
    from runner.figcache import FigureCache
    from runner.site import render_site

    cache = FigureCache([stage], mode="store")
    with tempfile.TemporaryDirectory() as tmp:
        render_site(Path(tmp) / "results", Path(tmp) / "docs", cache.chart(comparison_chart),
                    spec_files=views.spec_files(ROOT / "experiments", ROOT), published=[stage],
                    figures=cache.figure(writeup_figure))
    return cache.save()


def content_size(paths: list[Path]) -> int:
    """Bytes of the distinct file contents among `paths`: what a repository stores (identical files, such
    as the real-latent grid every run of one data set shares, are stored once)."""
    sizes = {sha256_file(p): p.stat().st_size for p in paths if p.is_file()}
    return sum(sizes.values())


def _files(folder: Path) -> list[Path]:
    return [p for p in Path(folder).rglob("*") if p.is_file()]


def _left_out(run: Run) -> str | None:
    """Why a run is not published (None: it is)."""
    if run.damaged or run.metrics is None:
        return f"damaged: {run.damage}"
    problem = verify(run.folder)
    return f"manifest does not verify: {problem}" if problem else None


def _charts_decision(mode: str, runs: list[Run], stage: Path, max_bytes: float) -> str:
    """Draw each run's charts into the staging folder unless --charts none; with --charts auto they are
    kept only when the snapshot still fits the size limit with them. Returns what happened."""
    if mode == "none":
        return "left out (--charts none)"
    for run in runs:
        _draw_run_charts(stage / run.id)
    with_charts = content_size(_files(stage))
    if mode == "draw" or with_charts <= max_bytes:
        return "drawn from the snapshot's statistics"
    for run in runs:
        shutil.rmtree(stage / run.id / "charts", ignore_errors=True)
    return f"left out: {fmt(with_charts / 1e6)} MB with them is over the limit"


# ---------------------------------------------------------------- the snapshot


def git_commit(root: Path = ROOT) -> str | None:
    """HEAD's commit, "+dirty" when the working tree has changes; None outside a git checkout."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def _one_or_all(values: list[Any]) -> str:
    """A field's value when every run shares it, else the distinct values joined."""
    distinct = sorted({str(v) for v in values if v is not None})
    return ", ".join(distinct) if distinct else "unknown"


@dataclass(frozen=True)
class Snapshot:
    path: Path
    manifest: dict[str, Any]

    @property
    def size_bytes(self) -> int:
        return int(self.manifest["size_bytes"])


def publish(results: Path, name: str, out_root: Path = PUBLISHED, charts: str = "auto",
            max_mb: float = MAX_MB, limit: int = MAX_ROWS) -> Snapshot:
    """Write `out_root/name/` from the sound runs in `results` (see the module docstring)."""
    from runner.site import _new_stage, clean_staging  # the site's staging: one scheme for both

    if not SAFE_ID.match(name):
        raise PublishError(f"--name {name!r}: expected lowercase letters, digits, '_' and '-' "
                           "(it becomes a folder name)")
    if charts not in CHART_MODES:
        raise PublishError(f"--charts {charts!r}: expected one of {', '.join(CHART_MODES)}")
    if not 2 <= limit <= MAX_ROWS:
        raise PublishError(f"--max-rows {limit}: expected 2 to {MAX_ROWS} (the first and last rows are kept)")
    runs = load_runs(results)
    if not runs:
        raise PublishError(f"{results}: no run folders to publish")
    target = Path(out_root) / name
    clean_staging(target)
    stage = _new_stage(target)
    try:
        entries, left_out, sound = [], [], []
        for run in runs:
            why = _left_out(run)
            if why:
                left_out.append({"id": run.id, "reason": why})
                print(f"{run.id}: left out ({why})", file=sys.stderr)
                continue
            print(f"{run.id}: publishing", flush=True)
            entries.append(_publish_run(run, stage / run.id, limit))
            sound.append(run)
        if not entries:
            raise PublishError(f"{results}: no run folder is sound enough to publish "
                               f"({len(left_out)} left out)")
        print(f"drawing the site's figures of these {len(sound)} runs into {FIGURES}/", flush=True)
        figures = _draw_figures(stage)
        print(f"{figures['figures']} figures, {fmt(figures['bytes'] / 1e6)} MB", flush=True)
        decision = _charts_decision(charts, sound, stage, max_mb * 1e6)
        for run, entry in zip(sound, entries, strict=True):
            write_manifest(stage / run.id, {"published_from": manifest_key(run.folder) or {}})
            entry["bytes"] = content_size(_files(stage / run.id))
        size = content_size(_files(stage))
        if size > max_mb * 1e6:
            biggest = sorted(entries, key=lambda e: -e["bytes"])[:3]
            names = ", ".join(f"{e['id']} {fmt(e['bytes'] / 1e6)} MB" for e in biggest)
            raise PublishError(f"snapshot {name}: {fmt(size / 1e6)} MB is over the {fmt(max_mb)} MB limit "
                               f"(largest: {names}; figures {fmt(figures['bytes'] / 1e6)} MB); try --charts "
                               "none, fewer --max-rows, or fewer runs")
        if decision.startswith("left out"):
            print(f"charts {decision}", file=sys.stderr)
        manifest = _manifest(name, runs, entries, left_out, decision)
        manifest["figures"] = figures
        manifest.update(size_bytes=size, size_on_disk_bytes=sum(p.stat().st_size for p in _files(stage)),
                        max_rows=limit)
        write_json(stage / SNAPSHOT_MANIFEST, manifest)
        replace_dir(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return Snapshot(target, manifest)


def _manifest(name: str, runs: list[Run], entries: list[dict[str, Any]], left_out: list[dict[str, str]],
              charts: str) -> dict[str, Any]:
    published = {e["id"] for e in entries}
    envs = [r.metrics.environment for r in runs if r.id in published and r.metrics is not None]
    return {
        "name": name,
        "git_commit": git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "device": _one_or_all([e["device"] for e in entries]),
        "profile": _one_or_all([e["profile"] for e in entries]),
        "precision": _one_or_all([e["precision"] for e in entries]),
        "wall_s": round(sum(e["wall_s"] for e in entries), 3),
        "versions": {
            "torch": _one_or_all([e.torch for e in envs]),
            "diffusers": _one_or_all([e.diffusers for e in envs]),
            "python": _one_or_all([e.python for e in envs]),
            "runner": _one_or_all([e.runner for e in envs]),
            "published_by": __version__,
        },
        "charts": charts,
        "runs": entries,
        "left_out": left_out,
    }


# ---------------------------------------------------------------- reading snapshots back


def read_snapshot_manifest(folder: Path) -> dict[str, Any] | None:
    """published/NAME/manifest.json, or None when the folder holds no readable one."""
    from runner.files import read_json

    try:
        data = read_json(Path(folder) / SNAPSHOT_MANIFEST)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("runs"), list) else None


def find_snapshots(root: Path = PUBLISHED) -> list[Path]:
    """Every snapshot folder under `root` (one holding a snapshot manifest), by name."""
    if not Path(root).is_dir():
        return []
    return [d for d in sorted(Path(root).iterdir())
            if d.is_dir() and SAFE_ID.match(d.name) and read_snapshot_manifest(d) is not None]


def main(args: argparse.Namespace) -> int:
    try:
        snap = publish(Path(args.results), args.name, Path(args.out), args.charts, args.max_mb,
                       args.max_rows)
    except PublishError as e:
        print(e, file=sys.stderr)
        return 2
    m = snap.manifest
    print(f"published {len(m['runs'])} runs into {snap.path}: {fmt(snap.size_bytes / 1e6)} MB of distinct "
          f"files ({fmt(m['size_on_disk_bytes'] / 1e6)} MB on disk); profile {m['profile']}, device "
          f"{m['device']}; charts {m['charts']}; {m['figures']['figures']} figures "
          f"({fmt(m['figures']['bytes'] / 1e6)} MB); {len(m['left_out'])} left out")
    return 0
