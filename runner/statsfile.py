"""The activation statistics file `stats.npz`: its constants, writer, reader and the dead share.

numpy only (no torch), so the reporting side reads statistics without importing the training stack.
The torch recorder (runner.stats) writes through `save_stats`; everything downstream reads through
`load_stats`. Layout (the project's agreed format):

- ``mean``, ``std``  [S, M] float32: per recorded step and watched module;
- ``hist``           [M, BINS, S] counts of |activation| in BINS equal bins over HIST_RANGE (values
  above the range are not counted);
- ``names``          [M] str: the watched modules;
- ``steps``          [S] int64: the optimiser step index of each row (older files: arange(S));
- optional timestep buckets, all or none: ``bucket_edges`` [K+1] f64 (over the training t range,
  normalised to [0, 1]), ``bucket_mean``/``bucket_std``/``bucket_dead`` [S, M, K] f32 and
  ``bucket_count`` [S, K] int; NaN where a bucket had no sample at a step.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runner.files import write_atomic

HIST_BINS = 40
HIST_RANGE = (0.0, 10.0)
BIN_WIDTH = (HIST_RANGE[1] - HIST_RANGE[0]) / HIST_BINS  # |a| below this is "dead" (the lowest bin)
BUCKET_KEYS = ("bucket_edges", "bucket_mean", "bucket_std", "bucket_dead", "bucket_count")


class StatsFileError(ValueError):
    """stats.npz is unreadable, truncated or has inconsistent shapes; the message says which."""


@dataclass(frozen=True)
class Buckets:
    """Per-timestep-bucket statistics (see the module docstring for shapes)."""

    edges: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    dead: np.ndarray
    count: np.ndarray


@dataclass(frozen=True)
class Stats:
    """One run's statistics, shapes checked on load."""

    mean: np.ndarray
    std: np.ndarray
    hist: np.ndarray
    names: tuple[str, ...]
    steps: np.ndarray
    buckets: Buckets | None = None

    @property
    def dead(self) -> np.ndarray:
        """Dead share [M, S] (see `dead_share`)."""
        return dead_share(self.hist)

    def __len__(self) -> int:
        return int(self.mean.shape[0])


def dead_share(hist: np.ndarray) -> np.ndarray:
    """Share of |activations| in the lowest bin, hist [modules, BINS, steps] -> [modules, steps].

    miniai's ``get_min``: bin 0 over the histogram's total (values above the range are not counted);
    NaN where a module recorded nothing at a step.
    """
    h = np.asarray(hist, dtype=np.float64)
    total = h.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, h[:, 0] / np.where(total > 0, total, 1), np.nan)


def save_stats(stats: Mapping[str, Any] | Stats, path: str | Path) -> Path:
    """Write statistics (a Stats, or a mapping with mean, std, hist, names and optionally steps and the
    bucket arrays) to a compressed .npz atomically. Shapes are checked first: nothing malformed is
    written."""
    data = _as_mapping(stats)
    arrays = {
        "mean": np.asarray(data["mean"], np.float32),
        "std": np.asarray(data["std"], np.float32),
        "hist": np.asarray(data["hist"]),
        "names": np.array([str(n) for n in data["names"]], dtype=str),
    }
    steps = data.get("steps")
    arrays["steps"] = (
        np.arange(arrays["mean"].shape[0], dtype=np.int64) if steps is None else np.asarray(steps, np.int64)
    )
    present = [k for k in BUCKET_KEYS if data.get(k) is not None]
    if present:
        if len(present) != len(BUCKET_KEYS):
            raise StatsFileError(f"bucket arrays are all or none; got only {present}")
        arrays.update({k: np.asarray(data[k]) for k in BUCKET_KEYS})
    _parse(arrays, "statistics to save")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would otherwise append ".npz" to the name
            np.savez_compressed(f, **arrays)

    return write_atomic(Path(path), write)


def _as_mapping(stats: Mapping[str, Any] | Stats) -> Mapping[str, Any]:
    if not isinstance(stats, Stats):
        return stats
    out: dict[str, Any] = {
        "mean": stats.mean,
        "std": stats.std,
        "hist": stats.hist,
        "names": stats.names,
        "steps": stats.steps,
    }
    if stats.buckets is not None:
        b = stats.buckets
        out.update(
            bucket_edges=b.edges,
            bucket_mean=b.mean,
            bucket_std=b.std,
            bucket_dead=b.dead,
            bucket_count=b.count,
        )
    return out


def load_stats(path: str | Path) -> Stats:
    """Read stats.npz; raise StatsFileError (naming the file) when it is unreadable or inconsistent."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as e:
        raise StatsFileError(f"{path}: unreadable statistics file ({type(e).__name__}: {e})") from None
    return _parse(arrays, str(path))


def _parse(a: Mapping[str, np.ndarray], where: str) -> Stats:
    missing = [k for k in ("mean", "std", "hist", "names") if k not in a]
    if missing:
        raise StatsFileError(f"{where}: missing arrays {missing}")
    mean, std, hist, names = (np.asarray(a[k]) for k in ("mean", "std", "hist", "names"))
    if mean.ndim != 2 or std.shape != mean.shape:
        raise StatsFileError(
            f"{where}: mean and std must both be [steps, modules]; got {mean.shape}, {std.shape}"
        )
    s, m = mean.shape
    if hist.shape != (m, HIST_BINS, s):
        raise StatsFileError(f"{where}: hist has shape {hist.shape}; expected {(m, HIST_BINS, s)}")
    if names.shape != (m,):
        raise StatsFileError(f"{where}: {names.shape[0] if names.ndim else 0} names for {m} modules")
    steps = np.asarray(a["steps"], np.int64) if "steps" in a else np.arange(s, dtype=np.int64)
    if steps.shape != (s,):
        raise StatsFileError(f"{where}: steps has shape {steps.shape}; expected {(s,)}")
    return Stats(mean, std, hist, tuple(str(n) for n in names), steps, _buckets(a, s, m, where))


def _buckets(a: Mapping[str, np.ndarray], s: int, m: int, where: str) -> Buckets | None:
    present = [k for k in BUCKET_KEYS if k in a]
    if not present:
        return None
    if len(present) != len(BUCKET_KEYS):
        raise StatsFileError(f"{where}: bucket arrays are all or none; found only {present}")
    edges = np.asarray(a["bucket_edges"], np.float64)
    k = edges.shape[0] - 1
    if edges.ndim != 1 or k < 1:
        raise StatsFileError(f"{where}: bucket_edges must be [K+1] with K >= 1; got {edges.shape}")
    for key in ("bucket_mean", "bucket_std", "bucket_dead"):
        if a[key].shape != (s, m, k):
            raise StatsFileError(f"{where}: {key} has shape {a[key].shape}; expected {(s, m, k)}")
    if a["bucket_count"].shape != (s, k):
        raise StatsFileError(f"{where}: bucket_count has shape {a['bucket_count'].shape}; expected {(s, k)}")
    return Buckets(edges, *(np.asarray(a[key]) for key in BUCKET_KEYS[1:]))
