"""Kill -9 the runner at named points of a 3-spec smoke suite; each rerun goes on from what is left.

Each kill uses the test instrumentation in `runner/faults.py`: with RUNNER_KILL_AT=POINT[:N] the
process that reaches kill point POINT for the N-th time SIGKILLs the runner's process group (the
runner and its notebook kernel), like `kill -9`. The kills form one chain (each killed run is the
rerun of the one before, so every finished run is trained once), then an ordinary run finishes:

- after every kill, no published run is half written (every results/<id>/ has a manifest that
  verifies) and no suite.json claims the killed run;
- each run trains exactly the specs that had not finished (nothing finished is retrained);
- the last run trains nothing and ends with all three runs current and a fresh, complete suite.json.

Run `b` starts with a previous run already in place (made by hand, with a stale key), so its
install swaps an old complete run for the new one. Adding a point: put `kill_point("NAME")` in the
code and a `Point` in CHAIN (or SITE_CHAIN), with the command it runs in.

Then `python -m runner site` (the project's own mkdocs.yml, docs/ and site/) is killed at the site's
points, each kill followed by a rerun: while rendering pages (`render`), and in the swaps of docs/ and
site/ (`swap`, in runner.files.replace_dir: reached before each swap and after the exchange, before the
previous folder is deleted). After each kill the previous complete site is still there (untouched when
the kill came before site/ was swapped), docs/ is complete; each rerun ends with a complete site (every
page present, every link resolving) and no staging folder left.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_site import _unresolved  # the link and image checker of the site tests

from runner.execute import cache_key, cache_miss
from runner.files import read_json, write_json
from runner.manifest import verify, write_manifest
from runner.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
IDS = ("a", "b", "c")
# 160 smoke latents -> 144 train: two steps of 72 per run; the smallest model the spec allows.
SPEC = (
    "title: Kill test {id}\ngroup: architecture\naxis: norm\n"
    "model: {{block_out_channels: [32, 64], blocks: DA, layers_per_block: 1}}\n"
    "train: {{batch_size: 72, seed: {seed}}}\n"
)

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Point:
    kill_at: str  # RUNNER_KILL_AT: the kill point's name and which hit (1 = the first)
    trains: tuple[str, ...]  # the specs this run starts training before it is killed
    command: str = "run"


CHAIN = [
    Point("train:1", trains=("a",)),  # in the notebook kernel, after a's first optimiser step
    Point("write-run:2", trains=("a", "b")),  # a installed; b's notebook done, manifest not written
    Point("install:1", trains=("b",)),  # b complete and verified, not yet moved into results/
    # Recovery installs b's finished run, swapping out the old b: killed before removing it.
    Point("installed:1", trains=()),
    Point("suite:1", trains=("c",)),  # every run installed, suite.json not yet written
]


# (RUNNER_KILL_AT, what was there before): each kill of `python -m runner site` is followed by a rerun.
SITE_CHAIN = [
    Point("render:2", trains=(), command="site"),  # the first site: no docs/ or site/ yet
    # A complete site is in place from here on. (swap:1, before docs/ is swapped, leaves what a kill
    # while rendering leaves: a staging folder; left out to keep CI time down.)
    Point("swap:2", trains=(), command="site"),  # docs/ exchanged, the previous one not yet deleted
    Point("swap:3", trains=(), command="site"),  # site/ built and checked, not swapped in
    Point("swap:4", trains=(), command="site"),  # site/ exchanged: the new one is in place
]
MARK = ".complete-before-the-kill"  # put into each complete site/: still there if the kill kept it


def _env(kill_at: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("RUNNER_KILL_AT", None)
    if kill_at:
        env["RUNNER_KILL_AT"] = kill_at
    return env


def _run(project: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    specs = [str(project / "experiments" / f"{i}.yaml") for i in IDS]
    command = [sys.executable, "-m", "runner", "run", *specs, "--profile", "smoke"]
    command += ["--results", str(project / "results")]
    # A session of its own: the kill takes the runner's group, never pytest.
    return subprocess.run(
        command,
        cwd=project,
        env=_env(kill_at),
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,
    )


def _site(project: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "runner", "site", "--results", str(project / "results")]
    command += ["--config", str(project / "mkdocs.yml")]
    return subprocess.run(command, cwd=project, env=_env(kill_at), capture_output=True, text=True,
                          timeout=600, start_new_session=True)


def _complete_site(project: Path) -> None:
    """docs/ and site/ each hold every page, and every link and image of the site resolves."""
    docs, site = project / "docs", project / "site"
    for spec_id in IDS:
        assert (docs / "experiments" / spec_id / "index.md").is_file(), spec_id
        assert (site / "experiments" / spec_id / "index.html").is_file(), spec_id
        assert (site / "experiments" / spec_id / "notebook.html").is_file(), spec_id
    for page in ("index", "experiments/index", "method", "insights/index", "comparisons/index"):
        assert (docs / f"{page}.md").is_file() and (site / f"{page}.html").is_file(), page
    assert (docs / "assets" / "sort.js").is_file(), "the hand-written assets were lost"
    assert _unresolved(site) == []


def _leftovers(project: Path) -> list[str]:
    return sorted(p.name for p in project.iterdir() if ".staging-" in p.name or p.name.endswith(".old"))


def _published(results: Path) -> list[Path]:
    return sorted(p for p in results.iterdir() if p.is_dir() and not p.name.startswith("."))


def _trained(output: str) -> tuple[str, ...]:
    return tuple(i for i in IDS if f"] {i}: running" in output)


def _old_run(project: Path, spec_id: str) -> None:
    """A complete previous run of `spec_id` made under other source code (so it must be redone)."""
    spec = load_spec(project / "experiments" / f"{spec_id}.yaml", "smoke")
    run = project / "results" / spec_id
    run.mkdir(parents=True)
    (run / "spec.yaml").write_text(spec.to_yaml())
    write_json(run / "metrics.json", {"id": spec_id, "status": "completed", "diverged_at_step": None})
    write_manifest(run, {**cache_key(spec), "source": "an older runner"})


def test_kills_lose_nothing_and_retrain_nothing_finished(tmp_path):
    project = tmp_path
    (project / "experiments").mkdir()
    for seed, spec_id in enumerate(IDS):
        (project / "experiments" / f"{spec_id}.yaml").write_text(SPEC.format(id=spec_id, seed=seed))
    _old_run(project, "b")
    results = project / "results"
    finished: dict[str, int] = {}  # id -> its notebook's mtime when it was published
    for point in CHAIN:
        killed = _run(project, kill_at=point.kill_at)
        out = killed.stdout + killed.stderr
        assert killed.returncode == -9, f"not killed at {point.kill_at}:\n{out[-3000:]}"
        assert _trained(killed.stdout) == point.trains, f"{point.kill_at}:\n{out[-3000:]}"
        assert not (results / "suite.json").exists(), "no suite.json from a killed run"
        for run in _published(results):
            assert verify(run) is None, f"after the kill at {point.kill_at}, {run.name} is half written"
            stamp = (run / "notebook.ipynb").stat().st_mtime_ns if (run / "notebook.ipynb").exists() else 0
            # The hand-made old run has no notebook (0); a trained run's notebook never changes again.
            assert finished.get(run.name, 0) in (0, stamp), f"{run.name} was retrained"
            finished[run.name] = stamp

    start = time.time()
    last = _run(project)
    assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
    assert _trained(last.stdout) == (), "a finished run was retrained:\n" + last.stdout[-2000:]
    assert [p.name for p in _published(results)] == list(IDS)
    for spec_id in IDS:
        spec = load_spec(project / "experiments" / f"{spec_id}.yaml", "smoke")
        assert cache_miss(spec, results / spec_id) is None, spec_id
        assert (results / spec_id / "notebook.ipynb").stat().st_mtime_ns == finished[spec_id], spec_id
    suite = read_json(results / "suite.json")
    assert (results / "suite.json").stat().st_mtime >= start - 1 and suite["complete"]
    assert [(r["status"], r["cached"]) for r in suite["runs"]] == [("completed", True)] * 3
    assert not [p.name for p in results.iterdir() if p.name.startswith(".") and p.is_dir()]

    shutil.copy(ROOT / "mkdocs.yml", project / "mkdocs.yml")
    shutil.copytree(ROOT / "docs" / "assets", project / "docs" / "assets")
    for point in SITE_CHAIN:
        had_site = (project / "site").is_dir()
        killed = _site(project, kill_at=point.kill_at)
        assert killed.returncode == -9, f"not killed at {point.kill_at}:\n{killed.stderr[-3000:]}"
        if had_site:
            _complete_site(project)
            kept = (project / "site" / MARK).is_file()
            assert kept == (point.kill_at != "swap:4"), f"{point.kill_at}: previous site kept: {kept}"
        else:
            assert not (project / "site").exists(), "a site from a killed first build"
        rerun = _site(project)
        assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
        _complete_site(project)
        assert _leftovers(project) == [], f"after the kill at {point.kill_at}"
        assert not (project / "site" / MARK).exists(), "the rerun did not publish a new site"
        (project / "site" / MARK).write_text(point.kill_at)
