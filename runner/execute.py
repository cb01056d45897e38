"""Run specs through the template notebook with papermill, one result folder per spec.

The API (the sequential suite and the distributed one both use it):

- `execute_spec(spec, work, device)` runs one spec into an empty temporary folder and writes
  `manifest.json` last (every file's size and sha256, and the cache key of the run);
- `install_run(work, results, id)` moves a verified run folder to `results/<id>/` in one atomic
  swap (Linux) or a rename scheme that `recover_results` completes after a crash;
- `cache_hit(spec, run_dir)` is true only for a folder whose manifest verifies and whose key
  (`cache_key`: spec, package source, data, torch and diffusers versions, device, precision) matches.

A failed or diverged experiment is recorded and the suite goes on; so is any crash while handling
one spec. Exit codes of `python -m runner run`: 0 all completed, 1 some experiment failed or
diverged, 2 bad input (specs, data, results folder in use), 3 internal error.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import importlib.metadata
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager
from traitlets import default

from runner.faults import kill_point
from runner.files import ExchangeUnsupported, exchange_dirs, write_json, write_text
from runner.manifest import MANIFEST, manifest_key, verify, write_manifest
from runner.results import Metrics, read_metrics, write_metrics
from runner.spec import SAFE_ID, Spec, SpecError, discover, load_resolved, load_spec

TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "experiment.ipynb"
KERNEL = "python3"
# Statuses that a rerun would only repeat: a cached completed or diverged run is kept.
# A failed run is retried, since failures are usually about the environment.
CACHEABLE = ("completed", "diverged")
# Modules that only render reports from finished runs: their source is not part of the cache key.
# (The notebook prints a run's verdict through runner.report, so the analysis modules are in the key.)
REPORT_ONLY = frozenset({"site.py", "views.py", "templating.py", "sanitize.py"})
# Temporary folders in results/: `.<id>.run-XXXX` (a run being written), `.<id>.old-XXXX` (a
# previous run set aside during an install). Ids never contain a dot, so the id is recoverable.
RUN_TAG, OLD_TAG = ".run-", ".old-"
# Only folders named like these are ever removed (also those of runners before the tags: `.<id>-XXXXXXXX`
# and `.old-<id>-<ns>`), so `--results .` never touches `.git` or `.venv`.
ORPHAN = re.compile(
    r"^\.(?:[a-z0-9][a-z0-9_-]{0,99}\.(?:run|old)-[a-z0-9_]+|[a-z0-9][a-z0-9_-]{0,99}-[a-z0-9_]{8}"
    r"|old-[a-z0-9][a-z0-9_-]{0,99}-\d+)$"
)
LOCK = ".lock"

EXIT_OK, EXIT_EXPERIMENT_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3

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


class RunError(RuntimeError):
    """A run folder cannot be installed (its manifest does not verify)."""


class ResultsBusy(RuntimeError):
    """Another runner holds the results folder."""


def collect_specs(paths: list[str | Path], profile: str) -> list[Spec]:
    """Load every spec named (files, or folders searched recursively), all before any work starts."""
    # Files named explicitly always run; a folder runs the specs whose `suites` include the profile.
    chosen: list[tuple[Path, bool]] = []
    for p in map(Path, paths):
        chosen += [(f, True) for f in discover(p)] if p.is_dir() else [(p, False)]
    errors, specs = [], []
    for f, from_folder in chosen:
        try:
            # A folder holds specs of every scale: whether the data folder holds enough latents is
            # checked only for the specs that will run (a 100k spec outside the suite must not block it).
            spec = load_spec(f, profile, data_root=None)
            if not from_folder or profile in spec.suites:
                specs.append(load_spec(f, profile))
        except SpecError as e:
            errors.append(str(e))
    ids = [s.id for s in specs]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        errors.append(f"duplicate experiment ids (file names must be unique across folders): {dupes}")
    if errors:
        raise SpecError("\n".join(errors))
    return specs


def work_dir(results: Path, spec_id: str) -> Path:
    """A new, empty temporary folder for one run, beside its final place (same filesystem: one rename)."""
    results.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{spec_id}{RUN_TAG}", dir=results.resolve()))


def execute_spec(spec: Spec, work: Path, device: str | None = None) -> None:
    """Run the template notebook for `spec` into the empty folder `work`; manifest.json is written last.

    An experiment's failure is recorded in metrics.json (status "failed", with the error) and never
    raised; an exception here means the run folder could not be written at all.
    """
    import papermill

    work = work.resolve()  # the kernel runs in the run's folder: paths handed to it are absolute
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        raise ValueError(f"{work}: a run needs an empty folder")
    key = cache_key(spec, device)  # before the run: the key names the inputs the run was made from
    write_text(work / "spec.yaml", spec.to_yaml())
    try:
        papermill.execute_notebook(
            str(TEMPLATE),
            str(work / "notebook.ipynb"),
            parameters={
                "spec_path": str(work / "spec.yaml"),
                "out_dir": str(work),
                "device": device or "",
                "expected_python": sys.executable,
            },
            kernel_name=KERNEL,
            progress_bar=False,
            log_output=True,
            cwd=str(work),
            kernel_manager_class=_IpcKernelManager,
        )
    except Exception as e:  # the notebook failed: record why, keep what it wrote
        _record_failure(spec, work, e)
    if not (work / "metrics.json").exists():  # a notebook that ends without training is no result
        _record_failure(spec, work, RuntimeError("the notebook ended without writing metrics.json"))
    kill_point("write-run")
    if not (work / "charts").exists():
        _fallback_charts(work)
    write_manifest(work, key)


def _fallback_charts(run_dir: Path) -> None:
    """The notebook stopped before drawing: draw what the files allow (a run without charts is a run)."""
    from runner.charts import run_charts

    try:
        run_charts(run_dir)
    except Exception as e:
        log.warning("%s: no fallback charts: %s", run_dir.name, _error_message(e))


def install_run(work: Path, results: Path, spec_id: str) -> Outcome:
    """Move the finished run `work` to results/<spec_id>, replacing any previous run in one step.

    Refuses a folder whose manifest does not verify. A `work` folder outside `results` (another
    filesystem) is copied into a temporary folder there first and left to its caller. Where the
    filesystem cannot swap two folders atomically, the previous run is renamed aside first;
    `recover_results` repairs a crash between the two renames at the next start, so a complete
    run is never lost.
    """
    results = results.resolve()
    if work.resolve().parent != results:
        staged = work_dir(results, spec_id)
        staged.rmdir()
        shutil.copytree(work, staged)
        work = staged
    problem = verify(work)
    if problem:
        raise RunError(f"{work.name}: not installed, {problem}")
    final = results / spec_id
    kill_point("install")
    if not os.path.lexists(final):
        os.rename(work, final)
    else:
        try:
            exchange_dirs(work, final)  # now `work` holds the previous run
        except ExchangeUnsupported:
            aside = Path(tempfile.mkdtemp(prefix=f".{spec_id}{OLD_TAG}", dir=results))
            os.rename(final, aside / spec_id)
            os.rename(work, final)
            work = aside
        kill_point("installed")
        shutil.rmtree(work, ignore_errors=True)
    return read_outcome(final, cached=False)


def read_outcome(run_dir: Path, cached: bool, seconds: float = 0.0) -> Outcome:
    """The one place the suite reads a run's metrics.json."""
    metrics = read_metrics(run_dir)
    detail = metrics.status_text if metrics.status == "diverged" else metrics.error or ""
    return Outcome(run_dir.name, metrics.status, cached, seconds, detail)


def _record_failure(spec: Spec, run_dir: Path, error: Exception) -> None:
    """Make sure a failed run has metrics.json saying so, with the error that stopped it."""
    message = _error_message(error)
    try:
        metrics = read_metrics(run_dir)
    except ValueError:  # the notebook stopped before training wrote its record
        metrics = Metrics.failed(spec, message)
    write_metrics(run_dir, metrics.model_copy(update={"status": "failed", "error": metrics.error or message}))


def _error_message(error: BaseException) -> str:
    ename, evalue = getattr(error, "ename", None), getattr(error, "evalue", None)
    if ename:  # papermill's PapermillExecutionError carries the kernel's exception
        return f"{ename}: {evalue}"
    return "".join(traceback.format_exception_only(type(error), error)).strip()


# ---------------------------------------------------------------- the cache


def cache_miss(spec: Spec, run_dir: Path, device: str | None = None) -> str | None:
    """Why `run_dir` cannot serve `spec` ("" when there is no run at all); None for a cache hit."""
    if not run_dir.exists():
        return ""
    problem = verify(run_dir)
    if problem:
        return f"damaged run folder: {problem}"
    key, want = manifest_key(run_dir) or {}, cache_key(spec, device)
    changed = sorted(k for k in set(key) | set(want) if key.get(k) != want.get(k))
    if changed:
        return f"inputs changed: {', '.join(changed)}"
    status = read_outcome(run_dir, cached=True).status
    if status not in CACHEABLE:
        return f"previous run {status}"
    return None


def cache_hit(spec: Spec, run_dir: Path, device: str | None = None) -> bool:
    return cache_miss(spec, run_dir, device) is None


def cache_key(spec: Spec, device: str | None = None) -> dict[str, str]:
    """Everything that changes a run's result, each part named so a miss can say which changed."""
    return {
        "spec": spec.content_hash(),
        "source": source_hash(),
        "data": data_sha256(),
        "torch": _version("torch"),
        "diffusers": _version("diffusers"),
        "device": device_type(device),
        "precision": spec.train.precision,
    }


@functools.cache
def source_hash() -> str:
    """sha256 over the package's source files and the template notebook (names and contents).

    The reporting modules (REPORT_ONLY) never run inside an experiment, so editing a page does not
    retrain the lab; tests/test_cache.py checks the notebook's imports load none of them.
    """
    package = Path(__file__).resolve().parent
    files = sorted(
        p for p in package.rglob("*.py") if "__pycache__" not in p.parts and p.name not in REPORT_ONLY
    )
    digest = hashlib.sha256()
    for path in [*files, TEMPLATE]:
        digest.update(path.relative_to(package.parent).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


@functools.cache
def data_sha256() -> str:
    from runner.data import latents_sha256  # imports torch: only when a key is needed

    return latents_sha256()


@functools.cache
def device_type(device: str | None) -> str:
    """The device kind a run lands on ("cpu", "cuda", ...), as the notebook picks it."""
    if device:
        return device.split(":", 1)[0]
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _version(package: str) -> str:
    return importlib.metadata.version(package)


# ---------------------------------------------------------------- the results folder


@contextmanager
def open_results(results: Path) -> Iterator[Path]:
    """Hold results/ for one runner (a lock file), after repairing what a killed runner left there."""
    results.mkdir(parents=True, exist_ok=True)
    with open(results / LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ResultsBusy(f"{results}: another runner is using this results folder") from None
        recover_results(results)
        yield results


def recover_results(results: Path) -> list[str]:
    """Remove the temporary folders of killed runs, first installing any that holds a newer finished run.

    A `.<id>.run-*` folder whose manifest verifies is a finished run killed before or during its
    install: it goes into place when results/<id> is missing, damaged or older. A `.<id>.old-*`
    folder holds a previous run set aside by the two-rename install: it goes back only when
    results/<id> is missing. Returns (and prints) what it did.
    """
    done: list[str] = []
    orphans = [p for p in results.iterdir() if ORPHAN.match(p.name) and p.is_dir()]
    orphans.sort(key=lambda p: (OLD_TAG in p.name, -p.stat().st_mtime_ns))
    for orphan in orphans:
        spec_id = orphan.name[1:].split(".", 1)[0]
        aside = OLD_TAG in orphan.name
        candidate = orphan / spec_id if aside else orphan
        if SAFE_ID.match(spec_id) and _restorable(candidate, results / spec_id, newer_wins=not aside):
            install_run(candidate, results, spec_id)
            done.append(f"{spec_id}: installed the finished run left in {orphan.name}")
        if orphan.exists():
            shutil.rmtree(orphan, ignore_errors=True)
            done.append(f"removed {orphan.name}")
    for line in done:
        print(line, flush=True)
    return done


def _restorable(candidate: Path, final: Path, newer_wins: bool) -> bool:
    if not candidate.is_dir() or verify(candidate):
        return False
    if not os.path.lexists(final):
        return True
    if not newer_wins:
        return False
    if verify(final):
        return True
    return (candidate / MANIFEST).stat().st_mtime_ns > (final / MANIFEST).stat().st_mtime_ns


# ---------------------------------------------------------------- the suite


# Runs the specs the cache cannot serve, somewhere else than in this loop (runner.cluster's Dask
# dispatch): dispatch(pending, results, device, done) calls done(spec, outcome) once per spec.
Dispatch = Callable[[list[Spec], Path, "str | None", Callable[[Spec, Outcome], None]], None]


def run_suite(
    specs: list[Spec],
    results: Path,
    force: bool = False,
    device: str | None = None,
    dispatch: Dispatch | None = None,
) -> list[Outcome]:
    """Run each spec (cached ones skipped); suite.json is always written, also for failures.

    Without `dispatch` the specs run in turn in this process; with it, the cache is consulted here
    and the rest is handed to `dispatch` at once. suite.json lists the runs in spec order either way.
    """
    outcomes: dict[str, Outcome] = {}
    start = time.perf_counter()
    results = results.resolve()
    heads = {spec.id: f"[{k}/{len(specs)}] {spec.id}" for k, spec in enumerate(specs, 1)}

    def done(spec: Spec, outcome: Outcome) -> None:
        outcomes[spec.id] = outcome
        extra = f": {outcome.detail}" if outcome.detail else ""
        print(
            f"{heads[spec.id]}: {outcome.status}{' (cached)' if outcome.cached else ''}"
            f" in {outcome.seconds:.0f}s{extra}",
            flush=True,
        )

    with open_results(results):
        try:
            if dispatch is None:
                _run_in_turn(specs, results, force, device, heads, start, done)
            else:
                pending = []
                for spec in specs:
                    reason = "forced" if force else cache_miss(spec, results / spec.id, device)
                    if reason is None:
                        done(spec, read_outcome(results / spec.id, cached=True))
                    else:
                        pending.append(spec)
                if pending:
                    dispatch(pending, results, device, done)
        finally:
            kill_point("suite")
            write_json(
                results / "suite.json",
                {
                    "profile": specs[0].profile if specs else None,
                    "complete": len(outcomes) == len(specs),
                    "elapsed_s": time.perf_counter() - start,
                    "runs": [asdict(outcomes[s.id]) for s in specs if s.id in outcomes],
                },
            )
    return [outcomes[s.id] for s in specs]


def _run_in_turn(specs, results, force, device, heads, start, done) -> None:
    for spec in specs:
        head = heads[spec.id]
        tic = time.perf_counter()
        try:
            outcome = _run_or_reuse(spec, results, force, device, head, tic - start)
        except Exception as e:  # a crash handling one spec is that spec's failure; the suite goes on
            log.error("%s: internal error\n%s", head, traceback.format_exc())
            outcome = internal_error(spec, e)
        outcome.seconds = 0.0 if outcome.cached else time.perf_counter() - tic
        done(spec, outcome)


def internal_error(spec: Spec, error: BaseException) -> Outcome:
    """The outcome of a spec whose handling crashed (no run folder is installed for it)."""
    return Outcome(spec.id, "failed", False, 0.0, f"internal error: {_error_message(error)}")


def _run_or_reuse(
    spec: Spec, results: Path, force: bool, device: str | None, head: str, elapsed: float
) -> Outcome:
    run_dir = results / spec.id
    reason = "forced" if force else cache_miss(spec, run_dir, device)
    if reason is None:
        return read_outcome(run_dir, cached=True)
    why = f", {reason}" if reason else ""
    print(f"{head}: running ({spec.profile} profile{why}), elapsed {elapsed:.0f}s", flush=True)
    work = work_dir(results, spec.id)
    try:
        execute_spec(spec, work, device)
        return install_run(work, results, spec.id)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # gone after a successful install


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
    """`python -m runner run`: see the module docstring for the exit codes."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_CellChatter())
    from runner.data import DataError

    try:
        specs = collect_specs(args.specs, args.profile)
        data_sha256()  # a data file that no longer matches its recorded hash is bad input
    except (SpecError, DataError) as e:
        print(e, file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception:
        return _internal_error()
    from runner.cluster import ClusterError, dispatcher

    workers, scheduler = getattr(args, "workers", None), getattr(args, "scheduler", None)
    if workers == "auto" and len(specs) <= 1:
        workers = None  # one experiment runs here, in turn: a cluster would only add its start-up
    try:
        outcomes = run_suite(
            specs,
            Path(args.results),
            force=args.force,
            device=getattr(args, "device", None),
            dispatch=dispatcher(workers, scheduler),
        )
    except (ResultsBusy, ClusterError) as e:
        print(e, file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception:
        return _internal_error()
    print(summary(outcomes))
    if any(o.status in ("failed", "diverged") for o in outcomes):
        return EXIT_EXPERIMENT_FAILED
    return EXIT_OK


def _internal_error() -> int:
    traceback.print_exc()
    print("internal error: the runner stopped (see above); please report it", file=sys.stderr)
    return EXIT_INTERNAL
