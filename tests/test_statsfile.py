"""runner.statsfile: the one reader/writer of stats.npz (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from runner.statsfile import BIN_WIDTH, HIST_BINS, HIST_RANGE, StatsFileError, load_stats, save_stats


def _arrays(steps: int = 3, modules: int = 2) -> dict:
    rng = np.random.default_rng(0)
    return {
        "mean": rng.normal(size=(steps, modules)),
        "std": rng.random((steps, modules)),
        "hist": rng.integers(0, 5, (modules, HIST_BINS, steps)),
        "names": [f"m{i}" for i in range(modules)],
    }


def test_round_trip_with_steps_and_buckets(tmp_path) -> None:
    data = _arrays()
    k = 4
    data.update(
        steps=[0, 2, 4],
        bucket_edges=np.linspace(0, 1, k + 1),
        bucket_mean=np.zeros((3, 2, k)),
        bucket_std=np.full((3, 2, k), np.nan),
        bucket_dead=np.ones((3, 2, k)),
        bucket_count=np.ones((3, k), np.int64),
    )
    got = load_stats(save_stats(data, tmp_path / "stats.npz"))
    assert got.steps.tolist() == [0, 2, 4] and got.names == ("m0", "m1")
    assert got.buckets is not None and got.buckets.mean.shape == (3, 2, k) and np.isnan(got.buckets.std).all()
    np.testing.assert_array_equal(got.hist, data["hist"])


def test_files_without_steps_mean_arange(tmp_path) -> None:
    path = tmp_path / "old.npz"
    d = _arrays(steps=5)
    np.savez(path, mean=d["mean"], std=d["std"], hist=d["hist"], names=np.array(d["names"]))
    got = load_stats(path)
    assert got.steps.tolist() == [0, 1, 2, 3, 4] and got.buckets is None


def test_truncated_and_inconsistent_files_raise(tmp_path) -> None:
    path = save_stats(_arrays(), tmp_path / "stats.npz")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(StatsFileError, match="unreadable"):
        load_stats(path)
    bad = _arrays()
    bad["names"] = ["only-one"]
    with pytest.raises(StatsFileError, match="names"):
        save_stats(bad, tmp_path / "bad.npz")
    partial = {**_arrays(), "bucket_edges": np.linspace(0, 1, 3)}
    with pytest.raises(StatsFileError, match="all or none"):
        save_stats(partial, tmp_path / "partial.npz")


def test_bin_width_is_range_over_bins() -> None:
    assert BIN_WIDTH * HIST_BINS == pytest.approx(HIST_RANGE[1] - HIST_RANGE[0])
