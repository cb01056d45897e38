"""Latents on disk -> float32 tensors and batches.

A data folder holds ``latents_nonorm_f16.npy`` (float16, ``[N, 4, H, W]``, rows sorted by key),
``keys.txt`` (one key per row) and ``stats.json`` (train mean/std, the train/valid row ranges and
how the latents were made). ``runner.encode`` writes the same layout from images.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runner.files import write_text
from runner.spec import DataSpec

# Found from this file, not the working directory, so notebooks and tests run from anywhere.
DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "lsun_bedroom_10k"
LATENTS_FILE = "latents_nonorm_f16.npy"
KEYS_FILE = "keys.txt"
STATS_FILE = "stats.json"
TRAIN_FRACTION = 0.9


class DataError(ValueError):
    """The data folder cannot give what a DataSpec asks for (too few rows, missing files or stats)."""


@dataclass(frozen=True)
class Splits:
    """Train and valid latents as float32 tensors, already normalised and scaled."""

    train: torch.Tensor
    valid: torch.Tensor


def split_sizes(n: int) -> tuple[int, int]:
    """(train, valid) item counts for a dataset of `n` items: the originals' 90/10 split."""
    train = round(TRAIN_FRACTION * n)
    return train, n - train


def read_stats(root: str | Path = DATA_DIR) -> dict[str, Any]:
    """The folder's stats.json as a dict ({} when the folder has none)."""
    path = Path(root) / STATS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def open_latents(root: str | Path = DATA_DIR) -> np.ndarray:
    """The folder's latents, memory-mapped (nothing is read until rows are sliced)."""
    root = Path(root)
    path = root / read_stats(root).get("file", LATENTS_FILE)
    if not path.exists():
        raise DataError(f"{path}: no latents file; encode images first with `python -m runner encode`")
    return np.load(path, mmap_mode="r")


def latents_sha256(root: str | Path = DATA_DIR) -> str:
    """The latents file's sha256, checked against the one recorded in stats.json (`sha256`).

    Hashing 80 MB on every run would be wasted work, so the verified hash is remembered in a
    sidecar stamp (`.<file>.sha256`, git-ignored) with the file's size and mtime: the file is
    hashed again only when it may have changed. Raises DataError when the file no longer matches
    stats.json (the statistics there may then be stale too).
    """
    root = Path(root)
    recorded = read_stats(root).get("sha256")
    path = root / read_stats(root).get("file", LATENTS_FILE)
    if not path.exists():
        raise DataError(f"{path}: no latents file; encode images first with `python -m runner encode`")
    stat = path.stat()
    stamp_path = root / f".{path.name}.sha256"
    seen = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        stamp = json.loads(stamp_path.read_text())
    except (OSError, ValueError):
        stamp = {}
    if isinstance(stamp, dict) and {k: stamp.get(k) for k in seen} == seen and stamp.get("sha256"):
        digest = stamp["sha256"]
    else:
        from runner.manifest import sha256_file

        digest = sha256_file(path)
        try:
            write_text(stamp_path, json.dumps({**seen, "sha256": digest}) + "\n")
        except OSError:  # a read-only data folder: hash again next time
            pass
    if recorded and recorded != digest:
        raise DataError(
            f"{path}: its sha256 {digest[:12]}... differs from the {recorded[:12]}... recorded in "
            f"{root / STATS_FILE}; the data changed: re-encode it, or record the new hash there"
        )
    return digest


def _split_ranges(stats: dict[str, Any], n_rows: int) -> tuple[tuple[int, int], tuple[int, int]]:
    # stats.json stores half-open [start, stop) row ranges; a folder without them splits 90/10.
    split = stats.get("split")
    if split:
        return tuple(split["train"]), tuple(split["valid"])  # type: ignore[return-value]
    n_train, _ = split_sizes(n_rows)
    return (0, n_train), (n_train, n_rows)


def _encode_hint(n: int, root: Path) -> str:
    out = "" if root == DATA_DIR else f" --out {root}"
    return (
        f"encode more images first: `python -m runner encode bedroom.tgz --download --limit {n}{out}` "
        "(see data/README.md)"
    )


def load_splits(data_spec: DataSpec, root: str | Path = DATA_DIR) -> Splits:
    """Train/valid float32 tensors for `data_spec`: the first rows of each split, normalised, then scaled.

    ``size`` n gives ``round(0.9 n)`` train rows and ``n - round(0.9 n)`` valid rows (10k -> 9000/1000).
    ``normalize="standardize"`` applies ``(x - mean) / std`` with the folder's train statistics;
    the result is multiplied by ``scale``. Raises DataError when the folder holds too few rows.
    """
    root = Path(root)
    stats = read_stats(root)
    latents = open_latents(root)
    (t0, t1), (v0, v1) = _split_ranges(stats, len(latents))
    n_train, n_valid = split_sizes(data_spec.size)
    if n_train > t1 - t0 or n_valid > v1 - v0:
        raise DataError(
            f"data.size={data_spec.size} needs {n_train} train + {n_valid} valid latents, but {root} holds "
            f"{t1 - t0} train + {v1 - v0} valid ({len(latents)} rows); {_encode_hint(data_spec.size, root)}"
        )
    shift, divide = 0.0, 1.0
    if data_spec.normalize == "standardize":
        if "mean" not in stats or "std" not in stats:
            raise DataError(f"{root / STATS_FILE}: normalize=standardize needs 'mean' and 'std'")
        shift, divide = float(stats["mean"]), float(stats["std"])
    factor = data_spec.scale / divide

    def rows(start: int, count: int) -> torch.Tensor:
        # One contiguous read from the memory map, converted once; no per-item work.
        x = torch.from_numpy(np.asarray(latents[start : start + count], dtype=np.float32))
        return (x - shift).mul_(factor) if shift else x.mul_(factor)

    return Splits(train=rows(t0, n_train), valid=rows(v0, n_valid))


class BatchLoader:
    """Batches of an in-memory tensor: one permutation per epoch, then index_select; no per-item work.

    The permutation comes from a CPU ``torch.Generator`` seeded with ``seed + epoch``, so every epoch
    has its own order, a given seed always gives the same orders, and CPU and CUDA runs see the same
    batches. Only the index vector moves to ``x.device``; the data stays where it is.
    Each ``iter()`` is one epoch; ``epoch`` counts them (set it to resume at a given epoch).
    """

    def __init__(
        self, x: torch.Tensor, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size: expected a positive number, got {batch_size}")
        self.x, self.batch_size, self.shuffle, self.seed = x, batch_size, shuffle, seed
        self.drop_last = drop_last
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """The row order of `epoch` (on the data's device)."""
        n = len(self.x)
        if not self.shuffle:
            return torch.arange(n, device=self.x.device)
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(n, generator=gen).to(self.x.device)

    def __iter__(self) -> Iterator[torch.Tensor]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        perm = self.order(epoch) if self.shuffle else None
        for i in range(len(self)):
            lo, hi = i * self.batch_size, (i + 1) * self.batch_size
            # Unshuffled batches are slices (views): no copy at all.
            yield self.x[lo:hi] if perm is None else self.x.index_select(0, perm[lo:hi])
