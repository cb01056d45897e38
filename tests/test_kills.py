"""Kill -9 the runner at named points of a 3-spec smoke suite, then rerun it.

Each kill uses the test instrumentation in `runner/faults.py`: with RUNNER_KILL_AT=POINT[:N] the
process that reaches kill point POINT for the N-th time SIGKILLs the runner's process group (the
runner and its notebook kernel), like `kill -9`. After each kill, and again after an ordinary
rerun:

- no published run is half written: every results/<id>/ has a manifest that verifies;
- the rerun retrains no finished run (finished before the kill, or finished and killed while
  being installed) and ends with all three runs current and a fresh, complete suite.json.

One baseline suite is trained once; each point starts from a copy of it in which run `b` is stale
(its recorded key names other source code), so the killed run retrains only `b`.

Adding a point (e.g. the site's `render` and `swap`): put `kill_point("NAME")` in the code and a
`Point` below; `command` says which command of the scenario carries the kill, `retrains` whether
the rerun must train `b` again.
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

from runner.execute import cache_miss
from runner.files import read_json, write_json
from runner.manifest import verify
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
    name: str  # the kill_point name (RUNNER_KILL_AT)
    retrains: bool  # the rerun must train `b` again (it had not finished when killed)
    command: str = "run"


POINTS = [
    Point("train", retrains=True),  # inside the notebook kernel, after the first optimiser step
    Point("write-run", retrains=True),  # notebook done, charts and manifest not yet written
    Point("install", retrains=False),  # run complete and verified, not yet moved into results/
    Point("installed", retrains=False),  # swapped into place, previous run not yet removed
    Point("suite", retrains=False),  # every run installed, suite.json not yet written
]


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


def _published(results: Path) -> list[Path]:
    return sorted(p for p in results.iterdir() if p.is_dir() and not p.name.startswith("."))


def _stamps(results: Path) -> dict[str, int]:
    return {p.name: (p / "notebook.ipynb").stat().st_mtime_ns for p in _published(results)}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("kills")
    (project / "experiments").mkdir()
    for seed, spec_id in enumerate(IDS):
        (project / "experiments" / f"{spec_id}.yaml").write_text(SPEC.format(id=spec_id, seed=seed))
    done = _run(project)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return project


@pytest.mark.parametrize("point", POINTS, ids=lambda p: p.name)
def test_a_kill_loses_nothing_and_the_rerun_finishes_the_suite(baseline, tmp_path, point):
    project = tmp_path / "project"
    shutil.copytree(baseline, project, symlinks=True)
    results = project / "results"
    manifest = read_json(results / "b" / "manifest.json")
    write_json(results / "b" / "manifest.json", {**manifest, "key": {**manifest["key"], "source": "old"}})
    kept = {k: v for k, v in _stamps(results).items() if k != "b"}
    suite_before = (results / "suite.json").stat().st_mtime_ns

    killed = _run(project, kill_at=point.name)
    assert killed.returncode == -9, f"the runner was not killed at {point.name}:\n{killed.stdout[-3000:]}"
    for run in _published(results):
        assert verify(run) is None, f"after the kill at {point.name}, {run.name} is published half written"
    assert (results / "suite.json").stat().st_mtime_ns == suite_before, "no suite.json from a killed run"

    start = time.time()
    rerun = _run(project)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    trained = {i for i in IDS if f"] {i}: running" in rerun.stdout}
    assert trained == ({"b"} if point.retrains else set()), rerun.stdout[-2000:]
    assert {k: v for k, v in _stamps(results).items() if k != "b"} == kept, "a finished run was retrained"
    assert [p.name for p in _published(results)] == list(IDS)
    for spec_id in IDS:
        spec = load_spec(project / "experiments" / f"{spec_id}.yaml", "smoke")
        assert cache_miss(spec, results / spec_id) is None, spec_id
    suite = read_json(results / "suite.json")
    assert (results / "suite.json").stat().st_mtime >= start - 1 and suite["complete"]
    assert [r["status"] for r in suite["runs"]] == ["completed"] * 3
    assert not [p.name for p in results.iterdir() if p.name.startswith(".") and p.is_dir()]
