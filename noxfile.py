"""Project commands. `nox -s run_all` runs every experiment and builds the site; `nox -s tests` tests.

torch is installed first, on its own, because the build decides the download: `torch==2.13.0`
takes the local CPU wheel on the project's CI machines and the default (CUDA) wheel from PyPI on a
GPU machine. Override with RUNNER_TORCH (a pip requirement) and RUNNER_TORCH_INDEX (an index URL,
e.g. https://download.pytorch.org/whl/cpu for a CPU-only build elsewhere).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_venv = "yes"  # a second run skips the multi-minute install
nox.options.sessions = ["tests", "lint"]

TORCH = os.environ.get("RUNNER_TORCH", "torch==2.13.0")
TORCH_INDEX = os.environ.get("RUNNER_TORCH_INDEX")


def install_project(session: nox.Session, extras: str = "") -> None:
    index = ["--index-url", TORCH_INDEX] if TORCH_INDEX else []
    session.install(TORCH, *index)
    session.install("-e", f".{extras}")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (CPU, under 20 minutes on 2 cores)."""
    install_project(session, "[test]")
    session.run("pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.5")
    session.run("ruff", "check", "runner", "tests", "benchmarks", "noxfile.py")


@nox.session
def run_all(session: nox.Session) -> None:
    """Every spec under experiments/ with a profile (default quick), then the site.

    `nox -s run_all -- --profile full` runs the original scale (for a GPU). The experiments run on a
    local Dask cluster laid out by `--workers auto` (one 1-thread worker per CPU core, which measured
    1.13x the throughput of one 2-thread process on 2 cores; one worker per GPU); `-- --workers N`
    or `-- --scheduler ADDRESS` choose otherwise.
    """
    install_project(session)
    started = time.time()
    chosen = {"--workers", "--scheduler"} & {a.split("=")[0] for a in session.posargs}
    where = [] if chosen else ["--workers", "auto"]
    # Exit status 1: some experiment failed or diverged. Still build the site (it shows why), then judge.
    # 2 (bad input) and 3 (internal error) stop the session here.
    session.run(
        "python", "-m", "runner", "run", "experiments", *where, *session.posargs, success_codes=[0, 1]
    )
    suite = _results_dir(session.posargs) / "suite.json"
    # A suite.json from an earlier run would report that run's outcomes as this one's.
    if not suite.exists() or suite.stat().st_mtime < started:
        session.error(f"{suite} is missing or older than this run: the runner stopped before finishing")
    session.run("python", "-m", "runner", "site")
    runs = json.loads(suite.read_text())["runs"]
    failed = [r["id"] for r in runs if r["status"] == "failed"]
    if failed:
        session.error(f"experiments failed: {', '.join(failed)} (the site's experiments page shows why)")


def _results_dir(args: list[str]) -> Path:
    """The --results folder among the runner's arguments (default results/)."""
    for i, arg in enumerate(args):
        if arg.startswith("--results="):
            return Path(arg.split("=", 1)[1])
        if arg == "--results" and i + 1 < len(args):
            return Path(args[i + 1])
    return Path("results")


@nox.session
def run(session: nox.Session) -> None:
    """`nox -s run -- SPEC... [--profile P] [--force]`: run chosen specs."""
    install_project(session)
    session.run("python", "-m", "runner", "run", *session.posargs)


@nox.session
def site(session: nox.Session) -> None:
    """Render pages from existing results and build the site (no training)."""
    install_project(session)
    session.run("python", "-m", "runner", "site", *session.posargs)


# What rendering and building the site imports (runner.site, views, charts, writeup): no torch, no
# diffusers, no papermill, so `nox -s publish` installs in seconds rather than minutes. Keep in step with
# pyproject.toml's dependencies (tests/test_publish.py checks the site imports neither torch nor diffusers).
SITE_DEPS = (
    "numpy>=1.24",
    "matplotlib>=3.7",
    "jinja2>=3.1",
    "markupsafe>=2.1",
    "nbformat>=5.9",
    "mkdocs>=1.6,<2",
    "mkdocs-material>=9.5",
    "mkdocs-jupyter>=0.24",
    "pyyaml>=6.0",
    "pydantic>=2.5",
    "pillow>=10",
    "bleach>=6",  # runner/sanitize.py cleans the built notebook pages
    "beautifulsoup4>=4.12",
)


@nox.session
def publish(session: nox.Session) -> None:
    """Build the site from the committed snapshot(s) under published/: no training, no torch.

    Local results/ are shown too, labelled, when there are any. `nox -s publish -- --published
    published/NAME` picks one snapshot; extra arguments go to `python -m runner site`.
    """
    session.install("--no-deps", "-e", ".")
    session.install(*SITE_DEPS)
    started = time.time()
    session.run("python", "-m", "runner", "site", *(session.posargs or ["--published", "auto"]))
    session.log(f"site built in {time.time() - started:.0f} s: open site/index.html")


@nox.session
def serve(session: nox.Session) -> None:
    """Render pages and serve the site at http://127.0.0.1:8000 with live reload."""
    install_project(session)
    session.run("python", "-m", "runner", "site", "--no-build")
    session.run("mkdocs", "serve")


@nox.session
def benchmarks(session: nox.Session) -> None:
    """Print the measured ratios of the data-loading and statistics-overhead benchmarks."""
    install_project(session)
    session.run("python", "benchmarks/data_loading.py")
    session.run("python", "benchmarks/stats_overhead.py")
    session.run("python", "benchmarks/suite_throughput.py", *session.posargs)
