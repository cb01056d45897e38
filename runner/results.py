"""The run-folder contract: the one reader of `results/<id>/` (spec.yaml, metrics.json, stats.npz).

`Metrics` has exactly the fields runner.train writes (strict: an unknown, missing or mistyped field is a
parse error, so a format change is noticed here and not half-read somewhere downstream). A new field is
added by adding it to the model below. A `Run` holds the spec, the metrics, the folder and the statistics,
loaded on first use. `load_runs(results_dir)` reads every folder; a folder that cannot be read (spec.yaml
missing or invalid, metrics.json not valid JSON or not the contract, stats.npz truncated, manifest not
verifying) becomes a run with `damage` set to the reason, so pages show it as damaged and never crash.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from runner import __version__
from runner.spec import SAFE_ID, Spec, SpecError, load_resolved
from runner.statsfile import Stats, StatsFileError, load_stats

SPEC_FILE, METRICS_FILE, STATS_FILE, MANIFEST_FILE = "spec.yaml", "metrics.json", "stats.npz", "manifest.json"
STATUSES = ("completed", "diverged", "failed")


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class Batches(_Strict):
    loss: list[float | None]  # null: a non-finite loss (JSON has no NaN)
    lr: list[float | None]
    grad_norm: list[float | None]


class BnGap(_Strict):
    mean: float | None
    var: float | None


class Epoch(_Strict):
    epoch: int
    step: int  # optimiser steps completed at the end of the epoch
    train_loss: float | None
    valid_loss: float | None
    valid_loss_batch_stats: float | None
    # BatchNorm running statistics vs the validation batches' own (defined where train computes it).
    bn_running_gap: dict[str, BnGap] | None = None


class Final(_Strict):
    train_loss: float | None
    valid_loss: float | None
    valid_loss_batch_stats: float | None


class Timings(_Strict):
    total_s: float
    step_s: float | None


class Environment(_Strict):
    device: str | None  # None: the run failed before a device was chosen
    precision: str
    torch: str | None
    diffusers: str | None
    python: str
    runner: str


class Metrics(_Strict):
    """metrics.json, field for field as runner.train writes it."""

    id: str
    title: str | None
    spec_hash: str
    profile: str
    status: Literal["completed", "diverged", "failed"]
    diverged_at_step: int | None
    error: str | None
    params: int
    steps_per_epoch: int
    steps_completed: int
    steps_total: int  # steps this run trains (stop_after_epochs of the schedule, or all of it)
    schedule_steps: int  # the OneCycle schedule's length (steps_total unless the run stops early)
    batches: Batches
    epochs: list[Epoch]
    final: Final
    timings: Timings
    environment: Environment

    @classmethod
    def failed(cls, spec: Spec, error: str, seconds: float = 0.0) -> Metrics:
        """The record of a run that failed before training wrote one (no torch import needed)."""
        return cls(
            id=spec.id,
            title=spec.title,
            spec_hash=spec.content_hash(),
            profile=spec.profile,
            status="failed",
            diverged_at_step=None,
            error=error,
            params=0,
            steps_per_epoch=0,
            steps_completed=0,
            steps_total=0,
            schedule_steps=0,
            batches=Batches(loss=[], lr=[], grad_norm=[]),
            epochs=[],
            final=Final(train_loss=None, valid_loss=None, valid_loss_batch_stats=None),
            timings=Timings(total_s=round(seconds, 3), step_s=None),
            environment=Environment(
                device=None,
                precision=spec.train.precision,
                torch=_version("torch"),
                diffusers=_version("diffusers"),
                python=platform.python_version(),
                runner=__version__,
            ),
        )

    @property
    def status_text(self) -> str:
        if self.status == "diverged" and self.diverged_at_step is not None:
            return f"diverged at step {self.diverged_at_step}"
        return self.status


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def parse_metrics(text: str, where: str) -> Metrics:
    """metrics.json text -> Metrics; ValueError naming `where` and the first fields that do not fit."""
    try:
        return Metrics.model_validate(json.loads(text))
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    except ValidationError as e:
        detail = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or '(top)'}: {err['msg']}" for err in e.errors()[:3]
        )
        raise ValueError(f"{where}: not the metrics contract ({detail})") from None


def read_metrics(folder: Path) -> Metrics:
    path = Path(folder) / METRICS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{path}: unreadable ({e.strerror or e})") from None
    return parse_metrics(text, str(path))


def write_metrics(folder: Path, metrics: Metrics) -> Path:
    from runner.files import write_text

    return write_text(Path(folder) / METRICS_FILE, metrics.model_dump_json(indent=1) + "\n")


@dataclass(eq=False)
class Run:
    """One run folder. `spec`/`metrics` are None only when the run is damaged; `stats` loads stats.npz on
    first use (None when there is none); a damaged stats file sets `damage` when it is first read."""

    id: str
    folder: Path
    spec: Spec | None
    metrics: Metrics | None
    _damage: str | None = None
    _stats: Stats | None = field(default=None, repr=False)
    _stats_read: bool = field(default=False, repr=False)

    @property
    def stats(self) -> Stats | None:
        if not self._stats_read:
            self._stats_read = True
            path = self.folder / STATS_FILE
            if path.is_file():
                try:
                    self._stats = load_stats(path)
                except StatsFileError as e:
                    self._damage = self._damage or _relative(str(e), self.folder)
        return self._stats

    @property
    def damage(self) -> str | None:
        """Why this folder cannot be trusted (None: it can). Reads the statistics to find out."""
        _ = self.stats
        return self._damage

    @property
    def damaged(self) -> bool:
        return self.damage is not None

    @property
    def status(self) -> str:
        """completed | diverged | failed, or damaged."""
        return "damaged" if self.damaged or self.metrics is None else self.metrics.status

    @property
    def charts(self) -> dict[str, Path]:
        """Chart PNGs of the run folder by file stem (only safe stems: they become file names)."""
        return {p.stem: p for p in sorted((self.folder / "charts").glob("*.png")) if SAFE_ID.match(p.stem)}


def load_run(folder: Path, expect_id: str | None = None) -> Run:
    """Read one run folder; never raises for its content (see the module docstring). `expect_id`: the
    id the folder must hold (its name, in results/); None for a run still in its temporary folder."""
    folder = Path(folder)
    run_id = expect_id or folder.name
    try:
        spec = load_resolved(folder / SPEC_FILE)
    except SpecError as e:
        return Run(run_id, folder, None, None, _damage=_relative(str(e), folder))
    if expect_id is not None and spec.id != expect_id:
        return Run(
            run_id,
            folder,
            None,
            None,
            _damage=f"{folder.name}/{SPEC_FILE}: id {spec.id!r}, expected the folder name {expect_id!r}",
        )
    run_id = spec.id
    try:
        metrics = read_metrics(folder)
        _verify_manifest(folder)
    except ValueError as e:  # the spec is still shown: it says what the run was meant to be
        return Run(run_id, folder, spec, None, _damage=_relative(str(e), folder))
    if metrics.id != spec.id:
        return Run(
            run_id,
            folder,
            spec,
            None,
            _damage=f"{folder.name}/{METRICS_FILE}: id {metrics.id!r}, expected {spec.id!r}",
        )
    return Run(run_id, folder, spec, metrics)


def load_runs(results_dir: Path) -> list[Run]:
    """Every run folder under `results_dir`, sorted by id. Entries starting with '.' or '_' (staging,
    in progress) and plain files are skipped; a folder whose name is not a safe id is skipped as well,
    since its name becomes a URL (it is reported as damaged under a safe placeholder name)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return []
    runs = []
    for folder in sorted(results_dir.iterdir()):
        if folder.name.startswith((".", "_")) or not folder.is_dir():
            continue
        if not SAFE_ID.match(folder.name):
            runs.append(
                Run(
                    _placeholder_id(folder.name),
                    folder,
                    None,
                    None,
                    _damage=f"folder name {folder.name!r} is not a safe id",
                )
            )
            continue
        runs.append(load_run(folder, folder.name))
    return runs


def _relative(message: str, folder: Path) -> str:
    """Damage reasons name files relative to results/ (pages must not show the machine's paths)."""
    return message.replace(str(folder), folder.name).replace(str(folder.resolve()), folder.name)


def _placeholder_id(name: str) -> str:
    return "unsafe-" + hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def _verify_manifest(folder: Path) -> None:
    """manifest.json, when present: {"files": {relative path: {"size": int, "sha256": hex}}}; every listed
    file must exist with that size and hash (ValueError naming the first that does not)."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        entries = [(str(rel), int(e["size"]), str(e["sha256"])) for rel, e in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: unreadable manifest ({type(e).__name__}: {e})") from None
    root = folder.resolve()
    for rel, size, digest in entries:
        target = (folder / rel).resolve()
        if root not in target.parents:
            raise ValueError(f"{path}: {rel!r} lies outside the run folder")
        if not target.is_file() or target.stat().st_size != size:
            raise ValueError(f"{path}: {rel} is missing or not {size} bytes")
        if hashlib.sha256(target.read_bytes()).hexdigest() != digest:
            raise ValueError(f"{path}: {rel} does not match its sha256")
