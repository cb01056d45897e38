"""Run specs through the template notebook with papermill, one result folder per spec.

Each run is executed in a temporary folder beside its final place and moved into
`results/<id>/` only when complete, so an interrupted suite never leaves a half-written run
that looks finished. A cache keyed by the resolved spec's hash and the project version skips
experiments whose inputs did not change. A failed or diverged experiment is recorded and the
suite goes on.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager
from traitlets import default

from runner import __version__
from runner.files import write_json
from runner.results import Metrics, read_metrics, write_metrics
from runner.spec import Spec, SpecError, discover, load_resolved, load_spec

TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "experiment.ipynb"
KERNEL = "python3"
# Statuses that a rerun would only repeat: a cached completed or diverged run is kept.
# A failed run is retried, since failures are usually about the environment.
CACHEABLE = ("completed", "diverged")

log = logging.getLogger("runner.execute")


class _IpcKernelManager(AsyncKernelManager):
    """Kernels talk to papermill over Unix sockets (IPC) instead of TCP on localhost: no open port, and
    no "Kernel is running over TCP without encryption" warning printed for every experiment."""

    @default("transport")
    def _default_transport(self) -> str:
        return "ipc"


def kernel_spec(spec_path: str, profile: str, expected_python: str) -> Spec:
    """The notebook's first call: check that the kernel runs the interpreter `runner run` expects (or the
    run would use other packages), then load the spec. `runner run` always passes a resolved spec.yaml;
    a spec file (someone running the notebook by hand) is resolved with `profile`."""
    if expected_python and Path(sys.executable).resolve() != Path(expected_python).resolve():
        raise RuntimeError(f"kernel runs {sys.executable}, expected {expected_python}: "
                           "install ipykernel in the project's environment")
    return load_resolved(spec_path) if Path(spec_path).name == "spec.yaml" else load_spec(spec_path, profile)


class _CellChatter(logging.Filter):
    """Keep the kernel's own output (training progress) from papermill's log, drop its cell bookkeeping."""

    NOISE = (
        "Executing Cell",
        "Ending Cell",
        "<IPython.core.display",
        "Executing notebook",
        "Input Notebook",
        "Output Notebook",
        "Black is not installed",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage().strip()
        return bool(text) and not text.startswith(self.NOISE)


@dataclass
class Outcome:
    id: str
    status: str  # completed | diverged | failed
    cached: bool
    seconds: float
    detail: str = ""  # divergence step or error message


def collect_specs(paths: list[str | Path], profile: str) -> list[Spec]:
    """Load every spec named (files, or folders searched recursively), all before any work starts."""
    # Files named explicitly always run; a folder runs the specs whose `suites` include the profile.
    chosen: list[tuple[Path, bool]] = []
    for p in map(Path, paths):
        chosen += [(f, True) for f in discover(p)] if p.is_dir() else [(p, False)]
    errors, specs = [], []
    for f, from_folder in chosen:
        try:
            spec = load_spec(f, profile)
        except SpecError as e:
            errors.append(str(e))
            continue
        if not from_folder or profile in spec.suites:
            specs.append(spec)
    ids = [s.id for s in specs]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        errors.append(f"duplicate experiment ids (file names must be unique across folders): {dupes}")
    if errors:
        raise SpecError("\n".join(errors))
    return specs


def cache_hit(spec: Spec, run_dir: Path) -> bool:
    try:
        metrics = read_metrics(run_dir)
    except ValueError:
        return False
    return (
        metrics.spec_hash == spec.content_hash()
        and metrics.environment.runner == __version__
        and metrics.status in CACHEABLE
        and (run_dir / "notebook.ipynb").exists()
    )


def run_one(spec: Spec, results: Path, device: str | None = None) -> Outcome:
    """Execute the template notebook for `spec` into results/<id>/, atomically."""
    import papermill

    from runner.charts import run_charts

    start = time.perf_counter()
    results = results.resolve()  # the kernel runs in the run's folder: paths handed to it are absolute
    results.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.id}-", dir=results))
    try:
        (tmp / "spec.yaml").write_text(spec.to_yaml())
        try:
            papermill.execute_notebook(
                str(TEMPLATE),
                str(tmp / "notebook.ipynb"),
                parameters={
                    "spec_path": str(tmp / "spec.yaml"),
                    "out_dir": str(tmp),
                    "device": device or "",
                    "expected_python": sys.executable,
                },
                kernel_name=KERNEL,
                progress_bar=False,
                log_output=True,
                cwd=str(tmp),
                kernel_manager_class=_IpcKernelManager,
            )
        except Exception as e:  # the notebook failed: record why, keep what it wrote
            _record_failure(spec, tmp, e)
        metrics = read_metrics(tmp)
        if not (tmp / "charts").exists():
            run_charts(tmp)  # the notebook stopped before drawing: draw what the files allow
        _move_into_place(tmp, results / spec.id)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    detail = metrics.status_text if metrics.status == "diverged" else metrics.error or ""
    return Outcome(spec.id, metrics.status, False, time.perf_counter() - start, detail)


def _record_failure(spec: Spec, run_dir: Path, error: Exception) -> None:
    """Make sure a failed run has metrics.json saying so, with the error that stopped it."""
    message = _error_message(error)
    try:
        metrics = read_metrics(run_dir)
    except ValueError:  # the notebook stopped before training wrote its record
        metrics = Metrics.failed(spec, message)
    write_metrics(run_dir, metrics.model_copy(update={"status": "failed", "error": metrics.error or message}))


def _error_message(error: Exception) -> str:
    ename, evalue = getattr(error, "ename", None), getattr(error, "evalue", None)
    if ename:  # papermill's PapermillExecutionError carries the kernel's exception
        return f"{ename}: {evalue}"
    return "".join(traceback.format_exception_only(type(error), error)).strip()


def _move_into_place(tmp: Path, final: Path) -> None:
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{time.time_ns()}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run_suite(
    specs: list[Spec], results: Path, force: bool = False, device: str | None = None
) -> list[Outcome]:
    outcomes: list[Outcome] = []
    start = time.perf_counter()
    for k, spec in enumerate(specs, 1):
        elapsed = time.perf_counter() - start
        head = f"[{k}/{len(specs)}] {spec.id}"
        if not force and cache_hit(spec, results / spec.id):
            status = read_metrics(results / spec.id).status
            outcomes.append(Outcome(spec.id, status, True, 0.0))
            print(f"{head}: cached ({status}), elapsed {elapsed:.0f}s", flush=True)
            continue
        print(f"{head}: running ({spec.profile} profile), elapsed {elapsed:.0f}s", flush=True)
        outcome = run_one(spec, results, device)
        outcomes.append(outcome)
        extra = f": {outcome.detail}" if outcome.detail else ""
        print(f"{head}: {outcome.status} in {outcome.seconds:.0f}s{extra}", flush=True)
    write_json(
        results / "suite.json",
        {
            "profile": specs[0].profile if specs else None,
            "elapsed_s": time.perf_counter() - start,
            "runs": [asdict(o) for o in outcomes],
        },
    )
    return outcomes


def summary(outcomes: list[Outcome]) -> str:
    counts = {s: sum(o.status == s for o in outcomes) for s in ("completed", "diverged", "failed")}
    lines = [
        f"{len(outcomes)} experiments: {counts['completed']} completed, {counts['diverged']} diverged, "
        f"{counts['failed']} failed ({sum(o.cached for o in outcomes)} from cache)"
    ]
    lines += [f"  FAILED {o.id}: {o.detail}" for o in outcomes if o.status == "failed"]
    lines += [f"  diverged {o.id}: {o.detail}" for o in outcomes if o.status == "diverged"]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """`python -m runner run`: exit 2 on invalid specs (nothing runs), 1 if any experiment failed."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_CellChatter())
    try:
        specs = collect_specs(args.specs, args.profile)
    except SpecError as e:
        print(e, file=sys.stderr)
        return 2
    outcomes = run_suite(specs, Path(args.results), force=args.force, device=getattr(args, "device", None))
    print(summary(outcomes))
    return 1 if any(o.status == "failed" for o in outcomes) else 0
