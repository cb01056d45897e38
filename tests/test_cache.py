"""The run cache and crash safety without notebooks: manifests, the cache key, installs, recovery,
the per-spec guard and the runner's exit codes. (tests/test_kills.py kills real runs.)"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner import data, execute
from runner.execute import (
    EXIT_BAD_INPUT,
    EXIT_EXPERIMENT_FAILED,
    EXIT_INTERNAL,
    EXIT_OK,
    RunError,
    cache_key,
    cache_miss,
    install_run,
    recover_results,
    run_suite,
)
from runner.files import exchange_dirs, read_json
from runner.manifest import verify, write_manifest
from runner.results import Metrics, write_metrics
from runner.spec import build_spec

ROOT = Path(__file__).resolve().parent.parent


def spec(name: str, lr: float = 1e-3):
    return build_spec({"id": name, "train": {"lr": lr}}, "test", profile="smoke")


def fake_run(folder: Path, s, status: str = "completed", key: dict | None = None) -> Path:
    """A run folder as execute_spec leaves it, without training (metrics, a chart, manifest last)."""
    folder.mkdir(parents=True)
    (folder / "spec.yaml").write_text(s.to_yaml())
    record = Metrics.failed(s, "").model_copy(update={"status": status, "error": None, "diverged_at_step": 3})
    write_metrics(folder, record)
    (folder / "charts").mkdir()
    (folder / "charts" / "loss.png").write_bytes(b"png" * 100)
    write_manifest(folder, key if key is not None else cache_key(s))
    return folder


def test_manifest_lists_every_file_with_an_independently_computed_hash(tmp_path):
    run = fake_run(tmp_path / "r", spec("a"))
    files = read_json(run / "manifest.json")["files"]
    assert set(files) == {"spec.yaml", "metrics.json", "charts/loss.png"}
    body = (run / "charts" / "loss.png").read_bytes()
    assert files["charts/loss.png"] == {"size": 300, "sha256": hashlib.sha256(body).hexdigest()}
    assert verify(run) is None


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda r: (r / "manifest.json").unlink(), "no manifest"),
        (lambda r: (r / "manifest.json").write_text('{"files": '), "unreadable"),
        (lambda r: (r / "spec.yaml").unlink(), "missing"),
        (lambda r: (r / "notebook.ipynb").write_text("{}"), "not in the manifest"),
        (lambda r: (r / "charts" / "loss.png").write_bytes(b"pnG" * 100), "does not match"),
        (lambda r: (r / "metrics.json").write_text(""), "does not match"),
    ],
)
def test_a_damaged_run_does_not_verify_and_is_never_a_cache_hit(tmp_path, damage, words):
    s = spec("a")
    run = fake_run(tmp_path / "a", s)
    assert cache_miss(s, run) is None
    damage(run)
    assert words in verify(run)
    assert "damaged" in cache_miss(s, run)


@pytest.mark.parametrize("part", ["spec", "source", "data", "torch", "diffusers", "device", "precision"])
def test_a_change_in_any_key_part_is_a_miss_that_names_it(tmp_path, part):
    s = spec("a")
    key = {**cache_key(s), part: "something else"}
    assert cache_miss(s, fake_run(tmp_path / "a", s, key=key)) == f"inputs changed: {part}"


def test_key_follows_spec_and_device_and_a_failed_run_is_retried(tmp_path):
    s = spec("a")
    assert cache_key(s)["spec"] != cache_key(spec("a", lr=2e-3))["spec"]
    assert cache_key(s, "cuda:1")["device"] == "cuda" and cache_key(s, "cpu")["device"] == "cpu"
    assert cache_miss(s, fake_run(tmp_path / "a", s, status="failed")) == "previous run failed"
    assert cache_miss(s, fake_run(tmp_path / "b", s, status="diverged")) is None
    assert cache_miss(s, tmp_path / "none") == ""


def test_source_hash_covers_the_notebook_and_the_modules_a_run_imports():
    """Modules left out of the key must be ones no experiment imports: the notebook's imports,
    run in a fresh interpreter, must not load them."""
    nb = json.loads((ROOT / "templates" / "experiment.ipynb").read_text())
    imports = [
        line
        for cell in nb["cells"]
        if cell["cell_type"] == "code"
        for line in "".join(cell["source"]).splitlines()
        if line.startswith(("from runner", "import runner"))
    ]
    assert imports, "the notebook imports the runner"
    probe = "\n".join([*imports, "import runner.execute, sys", "print(sorted(sys.modules))"])
    loaded = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    for name in execute.REPORT_ONLY:
        assert f"'runner.{name.removesuffix('.py')}'" not in loaded, name


def test_data_hash_is_recorded_once_and_a_changed_file_is_refused(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    latents = folder / data.LATENTS_FILE
    latents.write_bytes(b"\x01" * 1000)
    truth = hashlib.sha256(latents.read_bytes()).hexdigest()
    (folder / data.STATS_FILE).write_text(json.dumps({"sha256": truth}))
    assert data.latents_sha256(folder) == truth
    stamp = json.loads((folder / f".{data.LATENTS_FILE}.sha256").read_text())
    assert stamp["sha256"] == truth and stamp["size"] == 1000
    latents.write_bytes(b"\x02" * 1000)  # same size; the new mtime sends it to be hashed again
    os.utime(latents, ns=(stamp["mtime_ns"] + 10**9, stamp["mtime_ns"] + 10**9))
    with pytest.raises(data.DataError, match="differs from"):
        data.latents_sha256(folder)


def test_bundled_data_matches_its_recorded_hash():
    recorded = data.read_stats()["sha256"]
    assert data.latents_sha256() == recorded


def test_install_replaces_the_previous_run_and_refuses_an_unverified_one(tmp_path):
    s = spec("a")
    results = tmp_path / "results"
    fake_run(results / "a", s, status="failed")
    new = fake_run(results / ".a.run-x", s, status="completed")
    outcome = install_run(new, results, "a")
    assert (outcome.id, outcome.status, outcome.cached) == ("a", "completed", False)
    assert read_json(results / "a" / "metrics.json")["status"] == "completed"
    assert sorted(p.name for p in results.iterdir()) == ["a"]
    partial = fake_run(results / ".a.run-y", s)
    (partial / "manifest.json").unlink()
    with pytest.raises(RunError, match="no manifest"):
        install_run(partial, results, "a")
    assert verify(results / "a") is None


def test_install_without_an_atomic_swap_is_recoverable(tmp_path, monkeypatch):
    """The two-rename fallback: a crash between the renames leaves no results/a, and the next
    start puts the new run (or, without one, the previous run) back."""
    s = spec("a")
    results = tmp_path / "results"
    fake_run(results / ".a.old-1" / "a", s, status="diverged")
    fake_run(results / ".a.run-2", s, status="completed")
    damaged = fake_run(results / ".a.run-3", s)
    (damaged / "spec.yaml").unlink()
    recover_results(results)
    assert sorted(p.name for p in results.iterdir()) == ["a"]
    assert read_json(results / "a" / "metrics.json")["status"] == "completed"

    (results / ".a.old-4").mkdir()  # killed after setting the previous run aside, before the new came
    (results / "a").rename(results / ".a.old-4" / "a")
    recover_results(results)
    assert verify(results / "a") is None and sorted(p.name for p in results.iterdir()) == ["a"]

    def no_exchange(a, b):
        raise execute.ExchangeUnsupported(95, "not here")

    monkeypatch.setattr(execute, "exchange_dirs", no_exchange)
    install_run(fake_run(results / ".a.run-5", s, status="failed"), results, "a")
    assert read_json(results / "a" / "metrics.json")["status"] == "failed"
    assert sorted(p.name for p in results.iterdir()) == ["a"]


def test_exchange_dirs_swaps_two_folders(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    (tmp_path / "x" / "from_x").touch()
    exchange_dirs(tmp_path / "x", tmp_path / "y")
    assert [p.name for p in (tmp_path / "y").iterdir()] == ["from_x"]
    assert not list((tmp_path / "x").iterdir())


def fake_execute(fail: str):
    def run(s, work, device=None):
        if s.id == fail:
            raise OSError("disk full (simulated)")
        work.rmdir()  # execute_spec is handed an empty folder
        fake_run(work, s)

    return run


def test_a_crash_handling_one_spec_is_its_failure_and_the_suite_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(execute, "execute_spec", fake_execute(fail="b"))
    results = tmp_path / "results"
    (results / ".a.run-orphan").mkdir(parents=True)  # left by a killed runner
    outcomes = run_suite([spec("a"), spec("b"), spec("c")], results)
    assert [(o.id, o.status) for o in outcomes] == [("a", "completed"), ("b", "failed"), ("c", "completed")]
    assert "disk full" in outcomes[1].detail
    suite = read_json(results / "suite.json")
    assert suite["complete"] and [r["status"] for r in suite["runs"]] == ["completed", "failed", "completed"]
    assert sorted(p.name for p in results.iterdir()) == [".lock", "a", "c", "suite.json"]
    again = run_suite([spec("a"), spec("c")], results)
    assert all(o.cached for o in again)


def args_for(tmp_path: Path, *specs: str) -> argparse.Namespace:
    (tmp_path / "exp").mkdir(exist_ok=True)
    for name in specs:
        (tmp_path / "exp" / f"{name}.yaml").write_text("title: t\n")
    files = [str(tmp_path / "exp" / f"{n}.yaml") for n in specs]
    return argparse.Namespace(specs=files, profile="smoke", results=str(tmp_path / "results"), force=False)


def test_exit_codes(tmp_path, monkeypatch):
    monkeypatch.setattr(execute, "execute_spec", fake_execute(fail="bad"))
    assert execute.main(args_for(tmp_path, "good")) == EXIT_OK
    assert execute.main(args_for(tmp_path, "good", "bad")) == EXIT_EXPERIMENT_FAILED
    (tmp_path / "exp" / "broken.yaml").write_text("train: {lr: fast}\n")  # nothing runs
    broken = args_for(tmp_path, "good")
    broken.specs.append(str(tmp_path / "exp" / "broken.yaml"))
    assert execute.main(broken) == EXIT_BAD_INPUT

    def crash(*a, **k):
        raise RuntimeError("bug")

    monkeypatch.setattr(execute, "write_json", crash)  # suite.json cannot be written: not a spec's fault
    assert execute.main(args_for(tmp_path, "good")) == EXIT_INTERNAL


def test_diverged_run_exits_1(tmp_path, monkeypatch):
    def diverge(s, work, device=None):
        work.rmdir()
        fake_run(work, s, status="diverged")

    monkeypatch.setattr(execute, "execute_spec", diverge)
    assert execute.main(args_for(tmp_path, "d")) == EXIT_EXPERIMENT_FAILED


def test_a_second_runner_on_the_same_results_is_refused(tmp_path):
    results = tmp_path / "results"
    with execute.open_results(results):
        with pytest.raises(execute.ResultsBusy):
            with execute.open_results(results):
                pass


def test_a_finished_run_killed_before_its_install_is_installed_not_retrained(tmp_path):
    s = spec("a")
    results = tmp_path / "results"
    # Manifest times set by hand: writes within one clock tick can share an mtime.
    for name, status, when in (("a", "failed", 2), (".a.run-1", "diverged", 1), (".a.run-2", "completed", 3)):
        os.utime(fake_run(results / name, s, status=status) / "manifest.json", ns=(when, when))
    recover_results(results)
    assert sorted(p.name for p in results.iterdir()) == ["a"]
    assert read_json(results / "a" / "metrics.json")["status"] == "completed"
    recover_results(results)
    assert read_json(results / "a" / "metrics.json")["status"] == "completed"


def test_a_run_written_elsewhere_is_copied_then_installed(tmp_path):
    s = spec("a")
    outside = fake_run(tmp_path / "worker" / "a", s)
    results = tmp_path / "results"
    assert install_run(outside, results, "a").status == "completed"
    assert verify(results / "a") is None and sorted(p.name for p in results.iterdir()) == ["a"]
    assert outside.is_dir(), "the caller's folder is the caller's to remove"


def test_recovery_removes_only_the_runners_own_temporary_folders(tmp_path):
    names = [".a.run-k2j_x9q1", ".a.old-abc", ".a-k2j_x9q1", ".old-a-1733000000000", ".git", ".venv", ".x-y"]
    for name in names:
        (tmp_path / name).mkdir()
    recover_results(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".git", ".venv", ".x-y"]
