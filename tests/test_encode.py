"""runner.encode offline: a few bundled JPEGs through a tiny, randomly initialised AutoencoderKL."""

from __future__ import annotations

import argparse
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from runner import encode as enc
from runner.data import DATA_DIR, load_splits
from runner.encode import EncodeError, add_encode_arguments, encode, latent_stats, run_encode
from runner.spec import DataSpec

SIZE = 64  # four encoder levels downsample by 8: 64 px -> 8x8 latents, as 256 px -> 32x32
N_IMAGES = 6


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae(tiny_vae) -> AutoencoderKL:
    return tiny_vae


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    # Train and valid rows of the bundled data, in varied original sizes (341x256, 256x256, ...).
    folder = tmp_path_factory.mktemp("images")
    bundled = sorted((DATA_DIR / "images").glob("*.jpg"))
    for path in bundled[:3] + bundled[-3:]:
        shutil.copy(path, folder / path.name)
    return folder


def run(source, out: Path, vae, **kw) -> enc.EncodeReport:
    return encode(source, out, vae, size=SIZE, batch_size=2, chunk_batches=1, progress=False, **kw)


def read(out: Path, name: str = "latents_nonorm_f16.npy") -> tuple[np.ndarray, list[str]]:
    return np.load(out / name), (out / "keys.txt").read_text().split()


def direct(vae, path: Path, minus1_1: bool = False) -> np.ndarray:
    # The reference pipeline written out independently: RGB, bilinear squash, /255, VAE mean.
    rgb = Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    x = torch.tensor(np.array(rgb), dtype=torch.float32).permute(2, 0, 1)[None] / 255
    with torch.no_grad():
        return vae.encode(x * 2 - 1 if minus1_1 else x).latent_dist.mean[0].numpy()


@pytest.fixture(scope="module")
def encoded(vae, images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("encoded")
    report = run(images, out, vae)
    assert (report.rows, report.encoded, report.skipped) == (N_IMAGES, N_IMAGES, 0)
    return out


def test_output_format(encoded: Path, images: Path) -> None:
    latents, keys = read(encoded)
    assert latents.shape == (N_IMAGES, 4, SIZE // 8, SIZE // 8) and latents.dtype == np.float16
    assert keys == sorted(p.stem for p in images.glob("*.jpg"))
    assert not (encoded / "partial").exists()
    stats = json.loads((encoded / "stats.json").read_text())
    assert stats["split"] == {"train": [0, 5], "valid": [5, 6]}  # round(0.9 * 6) = 5
    assert (stats["shape"], stats["dtype"], stats["input_range"]) == ([6, 4, 8, 8], "float16", "nonorm")
    train = latents[:5].astype(np.float64)
    assert stats["mean"] == pytest.approx(train.mean(), abs=1e-5)
    assert stats["std"] == pytest.approx(train.reshape(5, -1).std(axis=1, ddof=1).mean(), abs=1e-5)


def test_rows_equal_the_vae_called_directly(vae, encoded: Path, images: Path) -> None:
    latents, keys = read(encoded)
    for row in (0, 4):
        expected = direct(vae, images / f"{keys[row]}.jpg")
        np.testing.assert_allclose(latents[row].astype(np.float32), expected, atol=2e-3, rtol=2e-3)


def test_minus1_1_input_range(vae, encoded: Path, images: Path, tmp_path: Path) -> None:
    run(images, tmp_path, vae, input_range="minus1_1")
    shifted, keys = read(tmp_path, "latents_minus1_1_f16.npy")
    nonorm, _ = read(encoded)
    expected = direct(vae, images / f"{keys[1]}.jpg", minus1_1=True)
    np.testing.assert_allclose(shifted[1].astype(np.float32), expected, atol=2e-3, rtol=2e-3)
    assert np.abs(shifted.astype(np.float32) - nonorm).max() > 0.01
    # load_splits follows stats.json to the file of this range.
    assert load_splits(DataSpec(size=6), root=tmp_path).train.shape == (5, 4, 8, 8)


def test_load_splits_reads_an_encoded_folder(encoded: Path) -> None:
    latents, _ = read(encoded)
    stats = json.loads((encoded / "stats.json").read_text())
    splits = load_splits(DataSpec(size=6, scale=0.5, normalize="standardize"), root=encoded)
    expected = (latents.astype(np.float64) - stats["mean"]) / stats["std"] * 0.5
    np.testing.assert_allclose(splits.train.numpy(), expected[:5], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(splits.valid.numpy(), expected[5:], rtol=1e-5, atol=1e-5)


def test_resume_after_interruption(vae, encoded: Path, images: Path, tmp_path: Path, monkeypatch) -> None:
    def stop(done: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(images, tmp_path, vae, on_chunk=stop)
    assert len(list((tmp_path / "partial").glob("chunk_*.npz"))) == 1
    assert not (tmp_path / "keys.txt").exists()

    seen: list[int] = []
    original = vae.encode
    monkeypatch.setattr(vae, "encode", lambda x: (seen.append(len(x)), original(x))[1])
    report = run(images, tmp_path, vae)
    assert (report.encoded, report.skipped, sum(seen)) == (N_IMAGES - 2, 2, N_IMAGES - 2)
    (a, keys_a), (b, keys_b) = read(tmp_path), read(encoded)
    assert keys_a == keys_b
    np.testing.assert_array_equal(a, b)
    assert not (tmp_path / "partial").exists()


def test_larger_limit_adds_to_a_folder(vae, encoded: Path, images: Path, tmp_path: Path) -> None:
    first = run(images, tmp_path, vae, limit=3)
    assert (first.rows, first.encoded) == (3, 3)
    second = run(images, tmp_path, vae, limit=N_IMAGES)
    assert (second.rows, second.encoded, second.skipped) == (N_IMAGES, 3, 3)
    # Batches were split differently (a batch of one), so allow last-bit float16 differences.
    np.testing.assert_allclose(read(tmp_path)[0], read(encoded)[0], rtol=2e-3, atol=1e-4)


def test_tar_archive_input(vae, encoded: Path, images: Path, tmp_path: Path) -> None:
    archive = tmp_path / "bedroom.tgz"
    files = sorted(images.glob("*.jpg"), reverse=True)  # archive order differs from key order
    (tmp_path / "notes.txt").write_text("not an image")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "notes.txt", "bedroom/notes.txt")  # skipped: not an image
        for path in files:
            tar.add(path, f"bedroom/{path.name}")
    out = tmp_path / "out"
    assert run(archive, out, vae, limit=4).rows == 4  # the first 4 images in archive order
    latents, keys = read(out)
    assert keys == sorted(p.stem for p in files[:4])
    full, full_keys = read(encoded)
    np.testing.assert_array_equal(latents, full[[full_keys.index(k) for k in keys]])


def test_mismatched_settings_are_refused(vae, encoded: Path, images: Path) -> None:
    with pytest.raises(EncodeError, match="image_size"):
        encode(images, encoded, vae, size=32, progress=False)


def test_bad_sources(vae, tmp_path: Path) -> None:
    with pytest.raises(EncodeError, match="no such folder"):
        encode(tmp_path / "missing.tgz", tmp_path / "out", vae, progress=False)
    with pytest.raises(EncodeError, match="input_range"):
        encode(tmp_path, tmp_path / "out", vae, input_range="0_1", progress=False)


def test_hugging_face_name_without_datasets(tmp_path: Path, monkeypatch) -> None:
    try:
        import datasets  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("datasets is installed; this checks the message when it is not")

    def no_model(*args, **kwargs):
        raise AssertionError("the source must be checked before the VAE is loaded")

    monkeypatch.setattr(enc, "load_vae", no_model)
    with pytest.raises(EncodeError, match="pip install datasets"):
        encode("someone/lsun-bedroom", tmp_path, progress=False)


def test_stats_reproduce_the_originals_constants() -> None:
    stats = latent_stats(np.load(DATA_DIR / "latents_nonorm_f16.npy", mmap_mode="r"), 9000)
    assert stats["mean"] == pytest.approx(1.7197, abs=5e-5)
    assert stats["std"] == pytest.approx(4.8114, abs=5e-5)


def test_command_line(vae, encoded: Path, images: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(enc, "load_vae", lambda model_id, device: vae)
    parser = argparse.ArgumentParser()
    add_encode_arguments(parser)
    argv = [str(images), "--out", str(tmp_path), "--size", str(SIZE), "--batch-size", "4", "--no-progress"]
    assert run_encode(parser.parse_args(argv)) == 0
    assert "6 latents" in capsys.readouterr().out
    np.testing.assert_array_equal(read(tmp_path)[0], read(encoded)[0])
    assert run_encode(parser.parse_args([str(images), "--out", str(tmp_path), "--no-progress"])) == 2
    assert "image_size" in capsys.readouterr().err
    # --download only ever writes the archive path it is given, never a folder or dataset name.
    assert run_encode(parser.parse_args([str(images), "--download", "--out", str(tmp_path)])) == 2
    assert "expected a .tgz" in capsys.readouterr().err
