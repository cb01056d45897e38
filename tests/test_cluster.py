"""The Dask scale-out on loopback: local clusters, a killed worker, an external scheduler.

Every cluster here is real (Nanny worker processes, the template notebook through papermill) and
small: smoke-profile specs of the smallest model, workers with one torch thread each.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from runner import cluster, execute
from runner.cli import parser
from runner.files import read_json
from runner.manifest import verify
from runner.spec import load_spec
from runner.stats import load_stats

ROOT = Path(__file__).resolve().parent.parent
# 160 smoke latents -> 144 train: two steps of 72 per run; the smallest model the spec allows.
SPEC = (
    "title: Cluster test {id}\ngroup: architecture\naxis: norm\nsuites: [smoke]\n"
    "model: {{block_out_channels: [32, 64], blocks: DA, layers_per_block: 1}}\n"
    "train: {{batch_size: {batch}, seed: {seed}}}\n"
)
# Fails in its first training step: BatchNorm cannot normalise one item on the 1x1 map of level six.
FAILING_SPEC = (
    "title: Made to fail\ngroup: architecture\naxis: norm\nsuites: [smoke]\n"
    "model: {block_out_channels: [32, 32, 32, 32, 32, 32], blocks: DDDDDD, layers_per_block: 1, "
    "resnet_norm: batch}\ntrain: {batch_size: 1}\n"
)


def write_specs(folder: Path, batches: dict[str, int | None]) -> list:
    """Smoke specs by name and batch size; a batch of None writes the spec made to fail."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, (name, batch) in enumerate(batches.items()):
        text = FAILING_SPEC if batch is None else SPEC.format(id=name, batch=batch, seed=k)
        (folder / f"{name}.yaml").write_text(text)
    return execute.collect_specs([folder], "smoke")


@pytest.fixture
def one_thread_kernels(monkeypatch):
    """Sequential runs' kernels on one thread, as the clusters' workers: same arithmetic, same losses."""
    for name in cluster.THREAD_VARIABLES:
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


# ---------------------------------------------------------------- layout and packing (no cluster)


def test_workers_spread_evenly_over_gpus_and_never_oversubscribe_cores():
    plans = cluster.plan_workers(5, cores=16, gpus=["0", "3"])
    assert [p.gpu for p in plans] == ["0", "3", "0", "3", "0"]
    assert all(p.threads == 3 for p in plans)  # 5 x 3 <= 16
    assert plans[1].env()["CUDA_VISIBLE_DEVICES"] == "3" and plans[1].env()["OMP_NUM_THREADS"] == "3"
    cpu = cluster.plan_workers(2, cores=2, gpus=[])
    assert [p.threads for p in cpu] == [1, 1] and "CUDA_VISIBLE_DEVICES" not in cpu[0].env()
    assert cluster.plan_workers(1, cores=2, gpus=[])[0].threads == 2
    with pytest.raises(cluster.ClusterError, match="at most 2 workers"):
        cluster.plan_workers(3, cores=2, gpus=[])
    # auto: the measured better CPU layout (one 1-thread worker per core), never more than the work
    assert cluster.auto_workers(cores=2, gpus=[], pending=5) == 2
    assert cluster.auto_workers(cores=2, gpus=[], pending=1) == 1
    assert cluster.auto_workers(cores=16, gpus=["0", "1"], pending=9) == 2


def test_run_folder_round_trips_as_bytes_and_hostile_archives_are_refused(tmp_path):
    src = tmp_path / "src"
    (src / "charts").mkdir(parents=True)
    (src / "metrics.json").write_text('{"status": "completed"}')
    (src / "charts" / "loss.png").write_bytes(bytes(range(256)) * 50)
    out = cluster.unpack_folder(cluster.pack_folder(src), tmp_path / "out")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "charts",
        "charts/loss.png",
        "metrics.json",
    ]
    assert (out / "charts" / "loss.png").read_bytes() == (src / "charts" / "loss.png").read_bytes()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    (tmp_path / "hostile").mkdir()
    with pytest.raises(ValueError, match="refusing"):
        cluster.unpack_folder(buf.getvalue(), tmp_path / "hostile")
    assert not (tmp_path / "escape.txt").exists()


def test_run_command_takes_workers_or_a_scheduler_not_both(capsys):
    args = parser().parse_args(["run", "experiments", "--workers", "2"])
    assert args.workers == 2 and args.scheduler is None
    assert parser().parse_args(["run", "x", "--workers", "auto"]).workers == "auto"
    for bad in (["--workers", "0"], ["--workers", "two"], ["--workers", "2", "--scheduler", "tcp://h:1"]):
        with pytest.raises(SystemExit):
            parser().parse_args(["run", "x", *bad])
    assert "expected a positive number of workers" in capsys.readouterr().err


# ---------------------------------------------------------------- loopback clusters

COMPARED = ("status", "error", "steps_completed", "batches", "epochs", "final", "spec_hash")


@pytest.mark.slow
def test_two_workers_produce_the_results_of_the_sequential_path(tmp_path, one_thread_kernels):
    specs = write_specs(tmp_path / "experiments", {"c_one": 72, "c_two": 72, "c_fails": None})
    seq, dask = tmp_path / "sequential", tmp_path / "dask"
    execute.run_suite(specs, seq)
    tic = time.perf_counter()
    execute.run_suite(specs, dask, dispatch=cluster.dispatcher(2, None))
    print(f"2-worker suite: {time.perf_counter() - tic:.0f}s")
    for spec in specs:
        a, b = read_json(seq / spec.id / "metrics.json"), read_json(dask / spec.id / "metrics.json")
        assert {k: a[k] for k in COMPARED} == {k: b[k] for k in COMPARED}, spec.id
        assert verify(dask / spec.id) is None
        assert sorted(p.name for p in (seq / spec.id).iterdir()) == sorted(
            p.name for p in (dask / spec.id).iterdir()
        )
        assert b["environment"]["device"] == "cpu (1 threads)"
        if a["status"] == "completed":
            sa, sb = load_stats(seq / spec.id / "stats.npz"), load_stats(dask / spec.id / "stats.npz")
            assert all((getattr(sa, k) == getattr(sb, k)).all() for k in ("mean", "std", "hist"))
    assert read_json(dask / "c_fails" / "metrics.json")["status"] == "failed"
    assert _runs(seq) == _runs(dask) and [r["id"] for r in _runs(dask)] == [s.id for s in specs]
    assert not [p for p in dask.iterdir() if p.name.startswith(".") and p.is_dir()]
    # The cache serves a cluster run as it serves a sequential one: only the failed spec is sent again.
    again = execute.run_suite(specs, dask, dispatch=_refuse_dispatch)
    assert [o.cached for o in again] == [s.id != "c_fails" for s in specs]


def _runs(results: Path) -> list[dict]:
    return [
        {k: r[k] for k in ("id", "status", "cached", "detail")}
        for r in read_json(results / "suite.json")["runs"]
    ]


def _refuse_dispatch(pending, results, device, done):
    """A dispatch that fails the test if the cache sent it anything but the failed spec."""
    assert [s.id for s in pending] == ["c_fails"], pending  # failed runs are retried, as in turn
    for spec in pending:
        done(spec, execute.read_outcome(results / spec.id, cached=False))


@pytest.mark.slow
def test_a_worker_killed_mid_experiment_is_retried_and_one_run_is_published(tmp_path):
    specs = write_specs(tmp_path / "experiments", {"k_only": 72})
    results = tmp_path / "results"
    outcomes: list = []
    with cluster.open_client(2, None, 2) as client:

        def dispatch(pending, res, device, done):
            cluster.run_on_cluster(pending, res, device, client, done)

        suite = threading.Thread(
            target=lambda: outcomes.extend(execute.run_suite(specs, results, dispatch=dispatch))
        )
        suite.start()
        address = _worker_running(client, "runner-k_only")
        pid = client.run(os.getpid, workers=[address])[address]
        _wait_for_notebook("k_only", timeout=120)  # the experiment is under way in the worker's kernel
        os.kill(pid, signal.SIGKILL)
        suite.join(timeout=400)
        assert not suite.is_alive()
        assert not _alive(pid)
    assert [(o.id, o.status) for o in outcomes] == [("k_only", "completed")]
    runs = [p for p in results.iterdir() if p.is_dir()]
    assert [p.name for p in runs] == ["k_only"], "exactly one run folder, no leftovers"
    assert verify(results / "k_only") is None
    assert read_json(results / "k_only" / "metrics.json")["steps_completed"] == 2


def _worker_running(client, prefix: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for address, keys in client.processing().items():
            if any(str(k).startswith(prefix) for k in keys):
                return address
        time.sleep(0.2)
    raise AssertionError(f"no worker started {prefix}")


def _wait_for_notebook(spec_id: str, timeout: float) -> None:
    """Wait until a worker's private run folder has its notebook (papermill writes it as it starts)."""
    import tempfile

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(Path(tempfile.gettempdir()).glob(f"runner-{spec_id}-*/{spec_id}/notebook.ipynb")):
            time.sleep(2.0)
            return
        time.sleep(0.2)
    raise AssertionError(f"{spec_id}: no notebook started")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_run_command_submits_to_an_external_scheduler(tmp_path):
    write_specs(tmp_path / "experiments", {"s_one": 72})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), **dict.fromkeys(cluster.THREAD_VARIABLES, "1")}
    dask = str(Path(sys.executable).parent / "dask")  # the documented commands: dask scheduler, dask worker
    quiet = {"env": env, "stderr": subprocess.DEVNULL}
    procs = [
        subprocess.Popen(
            [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"], **quiet
        )
    ]
    try:
        procs.append(
            subprocess.Popen([dask, "worker", address, "--nthreads", "1", "--no-dashboard"], **quiet)
        )
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "runner",
                "run",
                str(tmp_path / "experiments"),
                "--profile",
                "smoke",
                "--results",
                str(tmp_path / "results"),
                "--scheduler",
                address,
            ],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=400,
        )
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert f"at {address}" in run.stdout and "1 experiments: 1 completed" in run.stdout
    assert verify(tmp_path / "results" / "s_one") is None
    spec = load_spec(tmp_path / "experiments" / "s_one.yaml", "smoke")
    assert execute.cache_hit(spec, tmp_path / "results" / "s_one")


def test_unreachable_scheduler_is_a_clear_error(tmp_path, capsys):
    write_specs(tmp_path / "experiments", {"u_one": 72})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    args = parser().parse_args(
        [
            "run",
            str(tmp_path / "experiments"),
            "--profile",
            "smoke",
            "--results",
            str(tmp_path / "results"),
            "--scheduler",
            f"tcp://127.0.0.1:{port}",
        ]
    )
    assert execute.main(args) == execute.EXIT_BAD_INPUT
    assert "no Dask scheduler answered" in capsys.readouterr().err
