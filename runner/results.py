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
import re
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from runner import __version__
from runner.spec import SAFE_ID, Spec, SpecError, load_resolved
from runner.statsfile import Stats, StatsFileError, load_stats

SPEC_FILE, METRICS_FILE, STATS_FILE, MANIFEST_FILE = "spec.yaml", "metrics.json", "stats.npz", "manifest.json"
SAMPLES_DIR, SAMPLES_FILE = "samples", "samples/samples.json"  # written by runner.sample
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


class LatentSummary(_Strict):
    """Mean and std of latents in the training space (overall and per channel), as runner.sample writes
    them; None where JSON holds null (a statistic of no finite value)."""

    mean: float | None
    std: float | None
    channel_mean: list[float | None]
    channel_std: list[float | None]
    nonfinite: int


class SamplerRecord(LatentSummary):
    schedule: str
    timestep: str
    eta: float
    clip_sample: bool
    seconds: float


class DataSummary(LatentSummary):
    rows: str  # which latents, in words


class DecoderRecord(_Strict):
    """The decoder the grids were drawn with: the preview decoder (with its fit quality) or the VAE."""

    name: Literal["preview", "vae"]
    resolution: int
    file: str | None = None
    r2_heldout: float | None = None
    train_pairs: int | None = None
    heldout_pairs: int | None = None
    path: str | None = None


_GRID = re.compile(r"^grid_[a-z0-9_]{1,40}\.png$")


class Samples(_Strict):
    """samples/samples.json, field for field as runner.sample writes it. A run that was not sampled
    (skipped: it did not complete; failed: sampling raised) has only status, reason and no samplers."""

    status: Literal["completed", "skipped", "failed"]
    reason: str | None
    samplers: dict[str, SamplerRecord]
    count: int | None = None
    seed: int | None = None
    steps: int | None = None
    device: str | None = None
    precision: str | None = None
    space: str | None = None
    data: DataSummary | None = None
    decoder: DecoderRecord | None = None
    grids: dict[str, str] = {}  # sampler name (and "real") -> PNG file in samples/
    real: str | None = None
    decode_seconds: float | None = None

    def std_ratio(self, sampler: str) -> float | None:
        """The sampler's latent std over the data's (1: samples as spread as the data)."""
        got, data = self.samplers.get(sampler), self.data
        if got is None or data is None or got.std is None or not data.std:
            return None
        return got.std / data.std


def read_samples(folder: Path) -> Samples | None:
    """samples/samples.json of a run folder (None when the run has none); ValueError naming the file
    when it is not the contract or names a grid that is not in samples/."""
    path = Path(folder) / SAMPLES_FILE
    if not path.is_file():
        return None
    try:
        samples = Samples.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None
    except ValidationError as e:
        detail = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:3])
        raise ValueError(f"{path}: not the samples contract ({detail})") from None
    for name, grid in samples.grids.items():
        if not _GRID.match(grid) or not (path.parent / grid).is_file():
            raise ValueError(f"{path}: grid {name!r} names {grid!r}, not a grid_*.png file in samples/")
    if samples.status == "completed" and ("real" not in samples.grids or samples.decoder is None):
        raise ValueError(f"{path}: completed samples without the real grid or the decoder")
    return samples


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
    _samples: Samples | None = field(default=None, repr=False)
    _samples_read: bool = field(default=False, repr=False)
    # "local" (results/), or "published <name>" for a run of a committed snapshot (runner.publish).
    source: str = "local"

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
    def samples(self) -> Samples | None:
        """samples/samples.json (None when there is none); a malformed one sets `damage` when first read."""
        if not self._samples_read:
            self._samples_read = True
            try:
                self._samples = read_samples(self.folder)
            except ValueError as e:
                self._damage = self._damage or _relative(str(e), self.folder)
        return self._samples

    @property
    def damage(self) -> str | None:
        """Why this folder cannot be trusted (None: it can). Reads the statistics and samples to find out."""
        _ = self.stats, self.samples
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


PUBLISHED_SOURCE = "published "  # + the snapshot's name: Run.source of a run from published/<name>/


def with_published(local: list[Run], snapshots: list[Path]) -> list[Run]:
    """The local runs, then the runs of each snapshot folder (runner.publish) labelled with its name.

    Ids may collide (a user reruns a published spec): a published run whose id is already taken gets
    the id "<id>--<snapshot>" (then -2, -3 ...), so every run keeps its own page and report entry."""
    out, taken = list(local), {r.id for r in local}
    for folder in snapshots:
        for run in load_runs(folder):
            run.source = PUBLISHED_SOURCE + Path(folder).name
            if run.id in taken:
                base = f"{run.id[:60]}--{Path(folder).name[:36]}"
                run.id, n = base, 2
                while run.id in taken:
                    run.id, n = f"{base}-{n}", n + 1
            taken.add(run.id)
            out.append(run)
    return out


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
