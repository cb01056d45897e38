"""Batches/s of runner.data.BatchLoader against one .npy file per latent, as the originals loaded data.

Both serve one epoch of the 9000 train latents, batch 32, float32, scaled by 0.2, shuffled.
The per-file loader is a torch DataLoader over a Dataset that calls np.load per item (default
collate, num_workers=0); its files are written to a temporary folder first (not timed).

    .venv/bin/python benchmarks/data_loading.py [--items 9000] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from runner.data import BatchLoader, load_splits
from runner.spec import DataSpec

BATCH, SCALE = 32, 0.2


class PerFileDataset(Dataset):
    """One latent per .npy file, loaded and scaled item by item (the originals' way)."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.load(self.files[i])) * SCALE


def time_epoch(batches) -> tuple[float, int]:
    """Seconds for one pass over `batches`, and how many there were."""
    start, count = time.perf_counter(), 0
    for batch in batches:
        assert batch.dtype == torch.float32 and batch.shape[1:] == (4, 32, 32)
        count += 1
    return time.perf_counter() - start, count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=9000, help="train latents per epoch (at most 9000)")
    parser.add_argument("--repeats", type=int, default=5, help="BatchLoader epochs timed (median shown)")
    parser.add_argument("--slow-repeats", type=int, default=1, help="per-file epochs timed (seconds each)")
    # One thread by default: copying 32 latents gains nothing from more, and on a shared machine
    # a second thread makes timings swing tenfold.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    train = load_splits(DataSpec(size=10_000, scale=SCALE)).train[: args.items]
    load_s = time.perf_counter() - start
    loader = BatchLoader(train, BATCH, shuffle=True, seed=0, drop_last=False)
    fast = [time_epoch(loader) for _ in range(args.repeats)]

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        files = [Path(tmp) / f"{i:05d}.npy" for i in range(len(train))]
        raw = train.numpy() / SCALE  # back to the unscaled float32 latents the originals stored
        for path, latent in zip(files, raw, strict=True):
            np.save(path, latent)
        write_s = time.perf_counter() - start
        per_file = DataLoader(PerFileDataset(files), batch_size=BATCH, shuffle=True, num_workers=0)
        slow = [time_epoch(per_file) for _ in range(args.slow_repeats)]

    fast_s, n = statistics.median(t for t, _ in fast), fast[0][1]
    slow_s, m = statistics.median(t for t, _ in slow), slow[0][1]
    print(f"items {len(train)}, batch {BATCH}, {n} batches/epoch, torch threads {torch.get_num_threads()}")
    print(f"BatchLoader : {n / fast_s:10.1f} batches/s ({fast_s * 1e3:7.1f} ms/epoch, median of {len(fast)})")
    print(f"per-file npy: {m / slow_s:10.1f} batches/s ({slow_s * 1e3:7.1f} ms/epoch, median of {len(slow)})")
    print(f"speed-up    : {slow_s / fast_s:10.1f}x")
    print(f"(not timed above: load_splits once {load_s:.2f} s; writing the per-item files {write_s:.1f} s)")


if __name__ == "__main__":
    main()
