"""Run a suite's experiments on a Dask cluster: one experiment is one Dask task.

`python -m runner run ... --workers N` starts a local cluster of N worker processes (one
experiment at a time each); `--scheduler ADDRESS` submits to a cluster that already runs
(`dask scheduler` + `dask worker` on several machines, or dask-jobqueue on SLURM; see README).

Each task runs the template notebook into a private temporary folder on its worker
(`execute.execute_spec`, which records a failed experiment in the folder and writes
manifest.json last), then sends the folder back to the client as bytes: workers need no
shared filesystem. The client unpacks it beside `results/`, and `execute.install_run`
verifies it against its manifest and moves it into `results/<id>` atomically. A worker that
dies mid-experiment (killed, out of memory) takes only its private folder with it: the
scheduler runs the task again on another worker, and the client installs the one folder that
came back complete. Caching, failure records and suite.json stay in `execute.run_suite`.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from runner.spec import Spec

ROOT = Path(__file__).resolve().parent.parent
# A task whose worker died is run again elsewhere this many times before the experiment is
# recorded as failed (Dask's `allowed-failures`); `RETRIES` covers exceptions raised by the task
# itself outside the notebook (the notebook's own errors are recorded failures, not exceptions).
ALLOWED_WORKER_DEATHS = 3
RETRIES = 2
CONNECT_TIMEOUT = "10s"
REFRESH_S = 1.0  # how often the suite's progress line is redrawn while experiments run
# Environment variables that set a worker's compute threads (torch reads OMP_NUM_THREADS at start).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class ClusterError(RuntimeError):
    """A cluster layout that cannot work (more 1-thread workers than cores, an unreachable scheduler)."""


# ---------------------------------------------------------------- layout


@dataclass(frozen=True)
class WorkerPlan:
    name: str
    threads: int  # torch threads of the worker's experiment
    gpu: str | None  # the CUDA device it sees (CUDA_VISIBLE_DEVICES), None on a CPU

    def env(self) -> dict[str, str]:
        env = dict.fromkeys(THREAD_VARIABLES, str(self.threads))
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu
        # Workers are fresh processes: they must import this checkout's runner, as the client does.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        return env


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, by the ids CUDA_VISIBLE_DEVICES gives them."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in listed.split(",") if d.strip()] if listed else []
    return ids[:count] if len(ids) >= count else [str(i) for i in range(count)]


def plan_workers(n: int, cores: int, gpus: list[str]) -> list[WorkerPlan]:
    """N workers sharing `cores` CPU threads evenly and spread round-robin over `gpus`.

    N x threads never exceeds the cores: oversubscribed OpenMP threads spin against each other
    (measured on 2 cores: two 1-thread processes gave 1.13x the throughput of one 2-thread one).
    """
    if n < 1:
        raise ClusterError(f"--workers: expected at least 1 worker, got {n}")
    if not gpus and n > cores:
        raise ClusterError(
            f"--workers {n}: this machine has {cores} CPU cores and no GPU; at most {cores} workers "
            "(one torch thread each) fit without oversubscribing the cores"
        )
    threads = max(1, cores // n)
    return [WorkerPlan(f"worker-{i}", threads, gpus[i % len(gpus)] if gpus else None) for i in range(n)]


def auto_workers(cores: int, gpus: list[str], pending: int) -> int:
    """The default layout for `--workers auto`: one 1-thread worker per core on a CPU (the measured
    better layout), one worker per GPU on a GPU machine; never more workers than experiments."""
    return max(1, min(pending, len(gpus) if gpus else cores))


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------- run folders as bytes


def pack_folder(folder: Path) -> bytes:
    """The folder's files as an uncompressed tar (stats.npz and PNGs are compressed already)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
    return buf.getvalue()


def unpack_folder(data: bytes, dest: Path) -> Path:
    """Extract a `pack_folder` tar into the empty folder `dest`: regular files and folders only,
    every path confined to `dest` (the bytes crossed the network)."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        members = tar.getmembers()
        for m in members:
            target = (dest / m.name).resolve()
            if not (m.isfile() or m.isdir()) or not target.is_relative_to(dest.resolve()):
                raise ValueError(f"run folder archive: refusing {m.name!r} (not a file inside the folder)")
        tar.extractall(dest, members=members, filter="data")
    return dest


# ---------------------------------------------------------------- the task (runs on a worker)


def run_task(spec: Spec, device: str | None) -> tuple[bytes, float]:
    """Run one experiment in a private temporary folder; return the finished folder and its seconds."""
    from runner.execute import execute_spec

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"runner-{spec.id}-") as tmp:
        work = Path(tmp) / spec.id
        work.mkdir()
        execute_spec(spec, work, device)
        return pack_folder(work), time.perf_counter() - start


# ---------------------------------------------------------------- the client


@contextmanager
def open_client(workers: int | None = None, scheduler: str | None = None, pending: int = 1):
    """A Dask client: on an existing cluster (`scheduler`) or on a local cluster of `workers` processes."""
    import dask
    from distributed import Client

    # The suite prints its own progress; Dask's INFO lines (workers starting, closing) would bury it.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    # worker-saturation 1.0: a worker gets its next experiment when it finishes one, not before
    # (the default 1.1 sends it one more, which then waits there while another worker may be idle).
    config = {
        "distributed.scheduler.allowed-failures": ALLOWED_WORKER_DEATHS,
        "distributed.scheduler.worker-saturation": 1.0,
    }
    with dask.config.set(config):
        if scheduler:
            try:
                client = Client(scheduler, timeout=CONNECT_TIMEOUT)
            except OSError as e:
                raise ClusterError(f"--scheduler {scheduler}: no Dask scheduler answered ({e})") from None
            with client:
                yield client
            return
        with local_cluster(workers, pending) as cluster, Client(cluster) as client:
            yield client


@contextmanager
def local_cluster(workers: int | None, pending: int):
    """A SpecCluster of Nanny-managed worker processes, one per `plan_workers` entry.

    Nannies restart a worker that dies; each worker has one Dask thread, so it runs one
    experiment at a time.
    """
    from distributed import Nanny, Scheduler, SpecCluster

    cores, gpus = cpu_cores(), visible_gpus()
    n = workers if workers is not None else auto_workers(cores, gpus, pending)
    plans = plan_workers(n, cores, gpus)
    specs = {
        p.name: {
            "cls": Nanny,
            # Workers' INFO lines (starting, connecting, closing) would bury the suite's progress line.
            "options": {"nthreads": 1, "name": p.name, "env": p.env(), "silence_logs": logging.WARNING},
        }
        for p in plans
    }
    # Dashboard on a free port: two suites on one machine must not collide.
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0"}}
    cluster = SpecCluster(workers=specs, scheduler=scheduler, silence_logs=40)
    try:
        yield cluster
    finally:
        cluster.close()


def describe(client) -> str:
    info = client.scheduler_info()
    workers = info.get("workers", {})
    threads = sum(w.get("nthreads", 0) for w in workers.values())
    link = client.dashboard_link or "no dashboard"
    where = client.scheduler.address
    return f"Dask: {len(workers)} workers ({threads} task slots) at {where}; dashboard {link}"


class _Bar:
    """One suite-level progress line: done / running / failed, elapsed and ETA (tqdm)."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.failed = 0
        # In a log (no terminal) every redraw would be kept: redraw only when an experiment ends.
        self.live = sys.stderr.isatty()
        self.bar = tqdm(total=total, desc="suite", unit="exp", mininterval=1.0, dynamic_ncols=True)

    def show(self, finished: int, running: int) -> None:
        self.bar.set_postfix_str(f"running {running}, failed {self.failed}", refresh=False)
        if finished:
            self.bar.update(finished)
        elif self.live:
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _running(client, futures) -> int:
    """Tasks of ours that workers are running now: those assigned to a worker, up to its threads
    (a scheduler may queue a task or two more on a worker than it has threads)."""
    keys = {f.key for f in futures}
    try:
        processing, threads = client.processing(), client.nthreads()
    except Exception:  # progress is best effort: never stop the suite for it
        return 0
    return sum(min(threads.get(w, 1), sum(k in keys for k in tasks)) for w, tasks in processing.items())


def dispatcher(workers: int | str | None, scheduler: str | None):
    """The `execute.run_suite` dispatch for `--workers`/`--scheduler`; None means run in turn, here."""
    if scheduler is None and workers is None:
        return None

    def dispatch(pending: list[Spec], results: Path, device: str | None, done) -> None:
        n = None if workers in (None, "auto") else int(workers)
        with open_client(n, scheduler, len(pending)) as client:
            run_on_cluster(pending, results, device, client, done)

    return dispatch


def run_on_cluster(
    specs: list[Spec],
    results: Path,
    device: str | None,
    client,
    done: Callable[[Spec, object], None],
) -> None:
    """Submit one task per spec; install each finished folder into results/ as it comes back.

    `done(spec, outcome)` is called on the client as each experiment is installed, in the order
    they finish. A spec whose task could not finish (its workers kept dying, or the task raised
    after its retries) or whose folder does not verify is that spec's failure, as a crash is in
    the sequential path: no folder is installed for it and the suite goes on.
    """
    from tqdm import tqdm

    print(describe(client), flush=True)
    submitted = {}
    for spec in specs:
        key = f"runner-{spec.id}-{time.time_ns()}"
        submitted[key] = (spec, client.submit(run_task, spec, device, key=key, pure=False, retries=RETRIES))
    futures = [f for _, f in submitted.values()]
    remaining = list(futures)
    bar = _Bar(len(specs))
    try:
        # Polled rather than blocking on the next result, so the bar's running count and clock move.
        while remaining:
            finished = [f for f in remaining if f.done()]
            for future in finished:
                remaining.remove(future)
                spec = submitted[future.key][0]
                outcome = _install(future, spec, results)
                with tqdm.external_write_mode():
                    done(spec, outcome)
                bar.failed += outcome.status == "failed"
            bar.show(len(finished), _running(client, remaining))
            if not finished:
                time.sleep(REFRESH_S)
    finally:
        bar.close()
        for f in futures:
            f.cancel()


def _install(future, spec: Spec, results: Path):
    """Unpack the task's folder beside results/ and install it (manifest verified); or the failure."""
    from runner import execute

    incoming = execute.work_dir(results, spec.id)  # recover_results cleans it up after a crash
    try:
        data, seconds = future.result()
        outcome = execute.install_run(unpack_folder(data, incoming), results, spec.id)
        outcome.seconds = seconds
        return outcome
    except Exception as e:
        outcome = execute.internal_error(spec, e)
        execute.log.error("%s: %s", spec.id, outcome.detail)
        return outcome
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
