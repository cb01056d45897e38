"""runner.data on the bundled latents: which rows, normalisation, dtype, and the batch loader."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from runner.data import DATA_DIR, BatchLoader, DataError, Splits, load_splits
from runner.spec import DataSpec

# The originals' constants, typed here rather than read from stats.json so the test is independent.
MEAN, STD = 1.7197, 4.8114


@pytest.fixture(scope="module")
def raw() -> np.ndarray:
    return np.load(DATA_DIR / "latents_nonorm_f16.npy")


def test_stats_json_describes_the_file(raw: np.ndarray) -> None:
    stats = json.loads((DATA_DIR / "stats.json").read_text())
    assert (stats["mean"], stats["std"]) == (MEAN, STD)
    assert stats["shape"] == list(raw.shape) == [10000, 4, 32, 32]
    assert stats["dtype"] == str(raw.dtype) == "float16"
    assert stats["split"] == {"train": [0, 9000], "valid": [9000, 10000]}
    keys = (DATA_DIR / "keys.txt").read_text().split()
    assert len(keys) == len(raw) and keys == sorted(keys)


SIZES = [(10000, 9000, 1000), (2000, 1800, 200), (160, 144, 16), (11, 10, 1)]


@pytest.mark.parametrize(("n", "n_train", "n_valid"), SIZES)
def test_split_sizes_and_rows(raw: np.ndarray, n: int, n_train: int, n_valid: int) -> None:
    splits = load_splits(DataSpec(size=n, scale=1.0))
    assert splits.train.shape == (n_train, 4, 32, 32) and splits.valid.shape == (n_valid, 4, 32, 32)
    assert splits.train.dtype == splits.valid.dtype == torch.float32
    # float16 -> float32 and x 1.0 are exact, so the rows must match bit for bit.
    assert torch.equal(splits.train, torch.from_numpy(raw[:n_train]).float())
    assert torch.equal(splits.valid, torch.from_numpy(raw[9000 : 9000 + n_valid]).float())


def test_scale_without_normalisation(raw: np.ndarray) -> None:
    splits = load_splits(DataSpec(size=200, scale=0.2))
    expected = raw[:180].astype(np.float64) * 0.2
    np.testing.assert_allclose(splits.train.numpy(), expected, rtol=1e-6, atol=1e-6)
    expected_valid = raw[9000:9020].astype(np.float64) * 0.2
    np.testing.assert_allclose(splits.valid.numpy(), expected_valid, rtol=1e-6, atol=1e-6)


def test_standardize_then_scale(raw: np.ndarray) -> None:
    splits = load_splits(DataSpec(size=200, scale=0.18215, normalize="standardize"))
    expected = (raw[:180].astype(np.float64) - MEAN) / STD * 0.18215
    np.testing.assert_allclose(splits.train.numpy(), expected, rtol=1e-5, atol=1e-6)
    expected_valid = (raw[9000:9020].astype(np.float64) - MEAN) / STD * 0.18215
    np.testing.assert_allclose(splits.valid.numpy(), expected_valid, rtol=1e-5, atol=1e-6)


def test_standardized_train_set_is_centred() -> None:
    train = load_splits(DataSpec(size=10000, scale=1.0, normalize="standardize")).train
    assert abs(train.mean().item()) < 1e-4
    # The originals' std is the mean per-latent std (ddof=1), so that is what becomes 1.
    assert train.flatten(1).std(dim=1).mean().item() == pytest.approx(1.0, abs=1e-4)


def test_splits_is_frozen_and_independent_of_cwd(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    splits = load_splits(DataSpec(size=10))
    assert isinstance(splits, Splits)
    with pytest.raises(dataclasses.FrozenInstanceError):
        splits.train = splits.valid  # type: ignore[misc]


def test_too_large_size_says_how_to_encode_more() -> None:
    with pytest.raises(DataError) as err:
        load_splits(DataSpec(size=100000))
    msg = str(err.value)
    assert "90000" in msg and "9000" in msg and "python -m runner encode" in msg and "--limit 100000" in msg


def test_standardize_without_stats_is_an_error(tmp_path, raw: np.ndarray) -> None:
    np.save(tmp_path / "latents_nonorm_f16.npy", raw[:20])
    # Without stats.json the folder splits 90/10 by rows and has no mean/std to standardise with.
    assert load_splits(DataSpec(size=20), root=tmp_path).train.shape[0] == 18
    with pytest.raises(DataError, match="standardize"):
        load_splits(DataSpec(size=20, normalize="standardize"), root=tmp_path)


# ---------------------------------------------------------------- BatchLoader


def ids(n: int = 100) -> torch.Tensor:
    # Row i holds the value i, so a batch tells which items it holds.
    return torch.arange(n, dtype=torch.float32).unsqueeze(1)


def epoch_order(loader: BatchLoader) -> list[int]:
    return torch.cat(list(loader)).squeeze(1).long().tolist()


def test_batch_shapes_and_len() -> None:
    x = load_splits(DataSpec(size=160)).train  # 144 rows
    loader = BatchLoader(x, 32, shuffle=True, seed=0, drop_last=False)
    batches = list(loader)
    assert len(loader) == len(batches) == 5
    assert [b.shape[0] for b in batches] == [32, 32, 32, 32, 16]
    assert all(b.shape[1:] == (4, 32, 32) and b.dtype == torch.float32 for b in batches)


def test_drop_last() -> None:
    loader = BatchLoader(ids(100), 32, shuffle=True, seed=0, drop_last=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 3 and all(len(b) == 32 for b in batches)
    seen = torch.cat(batches).squeeze(1).tolist()
    assert len(set(seen)) == 96  # no item twice, the 4 left over are dropped


def test_every_item_once_per_epoch() -> None:
    loader = BatchLoader(ids(100), 32, shuffle=True, seed=3, drop_last=False)
    for _ in range(3):
        assert sorted(epoch_order(loader)) == list(range(100))


def test_deterministic_for_a_seed_and_new_order_each_epoch() -> None:
    a, b = (BatchLoader(ids(), 32, shuffle=True, seed=7, drop_last=False) for _ in range(2))
    a0, a1 = epoch_order(a), epoch_order(a)
    assert (a0, a1) == (epoch_order(b), epoch_order(b))
    assert a0 != a1 and a0 != list(range(100))
    assert epoch_order(BatchLoader(ids(), 32, shuffle=True, seed=8, drop_last=False)) != a0
    # Setting epoch resumes the sequence (what a restarted run would do).
    c = BatchLoader(ids(), 32, shuffle=True, seed=7, drop_last=False)
    c.epoch = 1
    assert epoch_order(c) == a1


def test_no_shuffle_keeps_row_order() -> None:
    loader = BatchLoader(ids(70), 32, shuffle=False, seed=0, drop_last=False)
    assert epoch_order(loader) == list(range(70)) == epoch_order(loader)


def test_bad_batch_size() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(ids(), 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loader_keeps_cuda_data_on_the_device() -> None:
    cpu = BatchLoader(ids(), 32, shuffle=True, seed=1, drop_last=False)
    gpu = BatchLoader(ids().cuda(), 32, shuffle=True, seed=1, drop_last=False)
    batches = list(gpu)
    assert all(b.is_cuda for b in batches)
    assert torch.cat(batches).cpu().squeeze(1).long().tolist() == epoch_order(cpu)
