"""A data folder's layout and its ``stats.json``, without torch: the spec stage checks sizes against it.

A data folder holds ``latents_nonorm_f16.npy`` (float16, ``[N, 4, H, W]``, rows sorted by key),
``keys.txt`` (one key per row) and ``stats.json`` (train mean/std, the train/valid row ranges, the
latents' shape and how they were made). ``runner.data`` reads the latents; this module only the JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Found from this file, not the working directory, so notebooks and tests run from anywhere.
DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "lsun_bedroom_10k"
LATENTS_FILE = "latents_nonorm_f16.npy"
KEYS_FILE = "keys.txt"
STATS_FILE = "stats.json"
TRAIN_FRACTION = 0.9


def split_sizes(n: int) -> tuple[int, int]:
    """(train, valid) item counts for a dataset of `n` items: the originals' 90/10 split."""
    train = round(TRAIN_FRACTION * n)
    return train, n - train


def read_stats(root: str | Path = DATA_DIR) -> dict[str, Any]:
    """The folder's stats.json as a dict ({} when the folder has none)."""
    path = Path(root) / STATS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def split_ranges(stats: dict[str, Any], n_rows: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Half-open [start, stop) train and valid row ranges; a folder without them splits 90/10."""
    split = stats.get("split")
    if split:
        return tuple(split["train"]), tuple(split["valid"])  # type: ignore[return-value]
    n_train, _ = split_sizes(n_rows)
    return (0, n_train), (n_train, n_rows)


def capacity(root: str | Path = DATA_DIR) -> tuple[int, int]:
    """(train, valid) rows the folder holds, from stats.json alone (its ``shape`` and ``split``).

    Raises ValueError (naming the file) when stats.json is missing or does not say.
    """
    path = Path(root) / STATS_FILE
    try:
        stats = read_stats(root)
        if not stats:
            raise ValueError("missing")
        (t0, t1), (v0, v1) = split_ranges(stats, int(stats["shape"][0]))
        return int(t1) - int(t0), int(v1) - int(v0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        why = type(e).__name__
        raise ValueError(f"{path}: cannot read the row counts ({why}); re-encode the data") from None
