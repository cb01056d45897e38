"""Images -> latents on disk: the real-data path behind `python -m runner encode`.

Reads images from a folder, a tar archive (the fast.ai ``bedroom.tgz``, read member by member
without unpacking) or a Hugging Face dataset, squashes each to ``size`` x ``size`` RGB, scales it to
[0, 1] ("nonorm", as the bundled data) or [-1, 1], and keeps the VAE's ``latent_dist.mean``.

The output folder gets the layout ``runner.data`` reads: ``latents_<range>_f16.npy`` (float16,
``[N, 4, size/8, size/8]``, rows sorted by key), ``keys.txt`` and ``stats.json``. Work is saved in
``partial/`` every few batches (each chunk written atomically), so an interrupted run resumes
where it stopped; keys already in the folder (final or partial) are never encoded again, which
also lets a later run with a larger ``--limit`` add images to an existing folder.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from runner.data import DATA_DIR, KEYS_FILE, STATS_FILE, read_stats, split_sizes
from runner.files import write_atomic, write_text
from runner.manifest import sha256_file

MODEL_ID = "stabilityai/sd-vae-ft-ema"
BEDROOM_URL = "https://s3.amazonaws.com/fast-ai-imageclas/bedroom.tgz"
INPUT_RANGES = ("nonorm", "minus1_1")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
TAR_SUFFIXES = (".tgz", ".tar", ".tar.gz", ".tar.bz2", ".tar.xz")
PARTIAL_DIR = "partial"
# torchvision's Resize and fastai's squash both use PIL bilinear; kept so the latents match theirs.
RESAMPLE = Image.Resampling.BILINEAR

# A source yields (key, load); load() returns the image and must be called before advancing
# (tar members are streamed), and is not called at all for keys that are already encoded.
Item = tuple[str, Callable[[], Image.Image]]


class EncodeError(RuntimeError):
    """Encoding cannot start or continue: bad source, mismatched settings in out_dir, missing package."""


@dataclass(frozen=True)
class EncodeReport:
    """What a run did: rows now in the folder, images encoded by this run, source images skipped as done."""

    out_dir: Path
    rows: int
    encoded: int
    skipped: int


def latents_file(input_range: str) -> str:
    """File name of the latents for an input range ("nonorm" gives the bundled name)."""
    return f"latents_{input_range}_f16.npy"


# ---------------------------------------------------------------- sources


def iter_folder(folder: Path) -> Iterator[Item]:
    """Image files under `folder` (recursively) in path order; the key is the file name's stem."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    for path in files:
        yield path.stem, lambda path=path: Image.open(path)


def iter_tar(path: Path) -> Iterator[Item]:
    """Image members of a tar archive in archive order, streamed (no index pass, nothing unpacked)."""
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            if member.isfile() and Path(member.name).suffix.lower() in IMAGE_SUFFIXES:

                def load(member: tarfile.TarInfo = member) -> Image.Image:
                    return Image.open(io.BytesIO(tar.extractfile(member).read()))  # type: ignore[union-attr]

                yield Path(member.name).stem, load


def iter_hf(name: str, split: str = "train", key_column: str | None = None) -> Iterator[Item]:
    """Rows of a Hugging Face dataset (streamed); the key is `key_column` or the row number (8 digits)."""
    try:
        import datasets  # lazy: an optional dependency, only this source needs it
    except ImportError:
        raise EncodeError(
            f"{name!r} is not a folder or archive here, so it was taken as a Hugging Face dataset name, "
            "but the `datasets` package is not installed; `pip install datasets`, "
            "or pass a folder or bedroom.tgz"
        ) from None
    # Checked and opened here, not in the generator, so a bad name fails before the VAE loads.
    return _hf_items(name, datasets.load_dataset(name, split=split, streaming=True), key_column)


def _hf_items(name: str, rows: Any, key_column: str | None) -> Iterator[Item]:
    for i, row in enumerate(rows):
        image = row.get("image")
        if image is None:
            image = next((v for v in row.values() if isinstance(v, Image.Image)), None)
        if image is None:
            raise EncodeError(f"{name}: row {i} has no image column (columns: {sorted(row)})")
        key = str(row[key_column]) if key_column else f"{i:08d}"
        yield key, lambda image=image: image


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or source.lower().endswith(TAR_SUFFIXES)


def iter_source(source: str | Path, split: str = "train", key_column: str | None = None) -> Iterator[Item]:
    """Items of a folder, a tar archive, or (prefix ``hf:`` or any other name) a Hugging Face dataset."""
    text = str(source)
    if text.startswith("hf:"):
        return iter_hf(text[3:], split, key_column)
    path = Path(text).expanduser()
    if path.is_dir():
        return iter_folder(path)
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise EncodeError(f"{path}: not a tar archive; expected a folder of images or a .tgz/.tar")
        return iter_tar(path)
    if isinstance(source, Path) or _looks_like_path(text):
        raise EncodeError(f"{path}: no such folder or archive (--download fetches the fast.ai bedroom.tgz)")
    return iter_hf(text, split, key_column)


def _count(source: str | Path) -> int | None:
    # Only a folder can be counted cheaply; archives and streams are read once, not twice.
    path = Path(str(source)).expanduser()
    if not str(source).startswith("hf:") and path.is_dir():
        return sum(1 for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return None


# ---------------------------------------------------------------- images -> latents


def preprocess(image: Image.Image, size: int = 256, input_range: str = "nonorm") -> torch.Tensor:
    """An image as a float32 [3, size, size] tensor: RGB, squashed to a square, in [0, 1] or [-1, 1]."""
    rgb = image.convert("RGB").resize((size, size), RESAMPLE)
    x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return x * 2 - 1 if input_range == "minus1_1" else x


@torch.inference_mode()
def encode_batch(vae: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """``latent_dist.mean`` of a [B, 3, H, W] batch, as float16 numpy on the CPU."""
    p = next(vae.parameters())
    mean = vae.encode(x.to(p.device, p.dtype)).latent_dist.mean  # type: ignore[operator]
    return mean.float().cpu().numpy().astype(np.float16)


def resolve_device(device: str | None) -> torch.device:
    """`device` as given, or the best one available for "auto"/None (cuda, then mps, then cpu)."""
    if device not in (None, "auto"):
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_vae(model_id: str = MODEL_ID, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The pretrained VAE (downloaded to the Hugging Face cache on first use), in eval mode on `device`."""
    from diffusers import AutoencoderKL  # lazy: importing diffusers is slow and only encoding needs it

    return AutoencoderKL.from_pretrained(model_id).to(device).eval()


# ---------------------------------------------------------------- partial chunks and the final folder


def _chunks(out_dir: Path) -> list[Path]:
    return sorted((out_dir / PARTIAL_DIR).glob("chunk_*.npz"))


def _write_chunk(out_dir: Path, keys: list[str], latents: np.ndarray) -> None:
    existing = _chunks(out_dir)
    index = int(existing[-1].stem.split("_")[1]) + 1 if existing else 0
    path = out_dir / PARTIAL_DIR / f"chunk_{index:06d}.npz"
    write_atomic(path, lambda tmp: np.savez(tmp, keys=np.array(keys), latents=latents))


def _final_parts(out_dir: Path, latents: bool = True) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(keys, latents) arrays of what the folder holds: the final file first, then the partial chunks."""
    keys: list[np.ndarray] = []
    lats: list[np.ndarray] = []
    file = read_stats(out_dir).get("file")
    if file and (out_dir / file).exists() and (out_dir / KEYS_FILE).exists():
        keys.append(np.array((out_dir / KEYS_FILE).read_text().split()))
        if latents:
            lats.append(np.load(out_dir / file, mmap_mode="r"))
    for chunk in _chunks(out_dir):
        with np.load(chunk) as z:
            keys.append(z["keys"])
            if latents:
                lats.append(z["latents"])
    return keys, lats


def _done_keys(out_dir: Path) -> set[str]:
    keys, _ = _final_parts(out_dir, latents=False)
    return {str(k) for part in keys for k in part}


def latent_stats(latents: np.ndarray, n_train: int, block: int = 1024) -> dict[str, Any]:
    """Mean/std of the first `n_train` rows, computed in float64 blocks (the file may be large).

    ``std`` follows the original experiments: the mean over latents of each latent's std (ddof=1);
    on the bundled data it gives their constant 4.8114. ``std_overall`` is the plain std of all values.
    """
    c = latents.shape[1]
    total, total_sq, per_latent_std = np.zeros(c), np.zeros(c), 0.0
    for lo in range(0, n_train, block):
        x = np.asarray(latents[lo : min(lo + block, n_train)], dtype=np.float64)
        total += x.sum(axis=(0, 2, 3))
        total_sq += (x * x).sum(axis=(0, 2, 3))
        per_latent_std += x.reshape(len(x), -1).std(axis=1, ddof=1).sum()
    count = n_train * latents[0].size / c
    ch_mean = total / count
    ch_std = np.sqrt(np.maximum(total_sq / count - ch_mean**2, 0))
    mean = ch_mean.mean()
    return {
        "mean": round(float(mean), 6),
        "std": round(float(per_latent_std / n_train), 6),
        "std_definition": "mean over train latents of each latent's standard deviation (ddof=1), "
        "as the original experiments computed it",
        "std_overall": round(float(np.sqrt(max(total_sq.sum() / (count * c) - mean**2, 0))), 6),
        "channel_mean": [round(float(v), 6) for v in ch_mean],
        "channel_std": [round(float(v), 6) for v in ch_std],
        "stats_rows": "train",
    }


def finalise(out_dir: Path, settings: dict[str, Any]) -> int:
    """Merge the final file and partial chunks into sorted latents + keys.txt + stats.json; rows written."""
    keys_parts, lat_parts = _final_parts(out_dir)
    if not keys_parts:
        raise EncodeError(f"{out_dir}: nothing encoded (the source had no images?)")
    all_keys = np.concatenate(keys_parts)
    # np.unique sorts the keys and drops repeats (a crash after the final write but before the
    # partial folder was removed leaves every key twice; both copies hold the same latent).
    keys, first = np.unique(all_keys, return_index=True)
    latents = np.concatenate([np.asarray(p) for p in lat_parts])[first]
    n_train, _ = split_sizes(len(keys))
    name = latents_file(settings["input_range"])
    write_atomic(out_dir / name, lambda tmp: np.save(tmp, latents))
    write_text(out_dir / KEYS_FILE, "".join(f"{k}\n" for k in keys))
    stats = {
        **latent_stats(latents, n_train),
        "file": name,
        "sha256": sha256_file(out_dir / name),  # recorded once; runner.data.latents_sha256 checks it
        "shape": list(latents.shape),
        "dtype": "float16",
        "split": {"train": [0, n_train], "valid": [n_train, len(keys)]},
        "split_note": "half-open row ranges [start, stop); rows sorted by key",
        **settings,
    }
    write_text(out_dir / STATS_FILE, json.dumps(stats, indent=2) + "\n")
    shutil.rmtree(out_dir / PARTIAL_DIR, ignore_errors=True)
    return len(keys)


def _check_settings(out_dir: Path, settings: dict[str, Any]) -> None:
    # Mixing latents made at another size, range or with another VAE would silently corrupt the data.
    saved = out_dir / PARTIAL_DIR / "settings.json"
    for source, found in (
        (out_dir / STATS_FILE, read_stats(out_dir)),
        (saved, json.loads(saved.read_text()) if saved.exists() else {}),
    ):
        differ = {k: (found[k], v) for k, v in settings.items() if k in found and found[k] != v}
        if differ:
            detail = ", ".join(f"{k}: folder has {a!r}, this run {b!r}" for k, (a, b) in differ.items())
            raise EncodeError(f"{source}: latents here were made differently ({detail}); use another --out")
    (out_dir / PARTIAL_DIR).mkdir(parents=True, exist_ok=True)
    write_text(saved, json.dumps(settings, indent=2))


# ---------------------------------------------------------------- the run


def encode(
    source: str | Path,
    out_dir: str | Path = DATA_DIR,
    vae: torch.nn.Module | None = None,
    *,
    model_id: str = MODEL_ID,
    size: int = 256,
    input_range: str = "nonorm",
    batch_size: int = 16,
    chunk_batches: int = 8,
    limit: int | None = None,
    device: str | None = None,
    split: str = "train",
    key_column: str | None = None,
    progress: bool = True,
    on_chunk: Callable[[int], None] | None = None,
) -> EncodeReport:
    """Encode the first `limit` images of `source` into `out_dir` (resumable); see the module docstring.

    `vae`: an already-built AutoencoderKL (tests); otherwise `model_id` is loaded on `device`
    ("auto"/None: cuda if available). Every `chunk_batches` batches the new latents are saved to
    ``out_dir/partial`` and `on_chunk(images_encoded_so_far)` is called. Keys already in `out_dir`
    are skipped; at the end everything is merged into the final files and ``partial/`` is removed.
    """
    if input_range not in INPUT_RANGES:
        raise EncodeError(f"input_range: expected one of {INPUT_RANGES}, got {input_range!r}")
    if size <= 0 or batch_size <= 0 or chunk_batches <= 0:
        raise EncodeError("size, batch_size and chunk_batches must be positive")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = iter_source(source, split, key_column)  # fail on a bad source before loading a model
    if vae is None:
        vae = load_vae(model_id, resolve_device(device))
    elif device is not None:
        vae = vae.to(resolve_device(device))
    vae.eval()
    # A loaded VAE remembers its model id; a hand-built one (tests) is recorded as "custom".
    label = dict(getattr(vae, "config", None) or {}).get("_name_or_path") or "custom"
    settings = {"model": label, "image_size": size, "input_range": input_range, "latent": "latent_dist.mean"}
    _check_settings(out_dir, settings)
    done = _done_keys(out_dir)
    counted = _count(source)
    total = limit if counted is None else counted if limit is None else min(counted, limit)

    encoded = skipped = 0
    batch_keys: list[str] = []
    batch_x: list[torch.Tensor] = []
    chunk_keys: list[str] = []
    chunk_lat: list[np.ndarray] = []

    def flush_batch() -> None:
        chunk_lat.append(encode_batch(vae, torch.stack(batch_x)))
        chunk_keys.extend(batch_keys)
        batch_keys.clear()
        batch_x.clear()

    def flush_chunk() -> None:
        if chunk_keys:
            _write_chunk(out_dir, chunk_keys, np.concatenate(chunk_lat))
            chunk_keys.clear()
            chunk_lat.clear()
            if on_chunk is not None:
                on_chunk(encoded)

    bar = tqdm(islice(items, limit), total=total, unit="img", desc="encode", disable=not progress)
    for key, load in bar:
        if key in done:
            skipped += 1
            continue
        done.add(key)
        batch_keys.append(key)
        batch_x.append(preprocess(load(), size, input_range))
        encoded += 1
        if len(batch_keys) == batch_size:
            flush_batch()
            if len(chunk_lat) == chunk_batches:
                flush_chunk()
    if batch_keys:
        flush_batch()
    flush_chunk()
    bar.close()
    if _chunks(out_dir) or not (out_dir / KEYS_FILE).exists():
        rows = finalise(out_dir, settings)
    else:  # nothing new: leave the final files untouched
        rows = len((out_dir / KEYS_FILE).read_text().split())
        shutil.rmtree(out_dir / PARTIAL_DIR, ignore_errors=True)
    return EncodeReport(out_dir=out_dir, rows=rows, encoded=encoded, skipped=skipped)


# ---------------------------------------------------------------- download


def download(dest: str | Path, url: str = BEDROOM_URL, progress: bool = True) -> Path:
    """Download `url` (default: the fast.ai bedroom.tgz) to `dest` unless it exists; resumes a .part file."""
    dest = Path(dest).expanduser()
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request) as response:
        if have and response.status != 206:  # the server ignored the range: start over
            have = 0
        length = int(response.headers.get("Content-Length") or 0)
        bar = tqdm(total=have + length or None, initial=have, unit="B", unit_scale=True, disable=not progress)
        with open(part, "ab" if have else "wb") as f, bar:
            while block := response.read(1 << 20):
                f.write(block)
                bar.update(len(block))
    os.replace(part, dest)
    return dest


# ---------------------------------------------------------------- command line


def add_encode_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `python -m runner encode` (runner/cli.py adds them to its subcommand)."""
    parser.add_argument(
        "source", help="a folder of images, a tar archive such as bedroom.tgz, or a Hugging Face dataset name"
    )
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="output folder (default: bundled data)")
    parser.add_argument("--limit", type=int, default=None, help="encode only the first N source images")
    parser.add_argument("--size", type=int, default=256, help="squash images to SIZE x SIZE (default 256)")
    parser.add_argument(
        "--input-range", choices=INPUT_RANGES, default="nonorm", help="pixels in [0,1] (nonorm) or [-1,1]"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--chunk-batches", type=int, default=8, help="save progress every N batches")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda, mps or cpu")
    parser.add_argument("--model-id", default=MODEL_ID, help=f"VAE to load (default {MODEL_ID})")
    parser.add_argument("--split", default="train", help="Hugging Face dataset split")
    parser.add_argument("--key-column", default=None, help="Hugging Face column naming each image")
    parser.add_argument(
        "--download", action="store_true", help=f"first download {BEDROOM_URL} to SOURCE if it is missing"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_encode(args: argparse.Namespace) -> int:
    """Run `python -m runner encode` with parsed `args`; returns the exit status."""
    try:
        if args.download:
            if not str(args.source).lower().endswith(TAR_SUFFIXES):
                msg = f"--download saves bedroom.tgz as SOURCE; expected a .tgz path, got {args.source}"
                raise EncodeError(msg)
            try:
                download(args.source, progress=not args.no_progress)
            except OSError as e:  # URLError is an OSError; a partial download stays resumable
                raise EncodeError(f"download of {BEDROOM_URL} failed: {e}; rerun to resume") from None
        report = encode(
            args.source,
            args.out,
            model_id=args.model_id,
            size=args.size,
            input_range=args.input_range,
            batch_size=args.batch_size,
            chunk_batches=args.chunk_batches,
            limit=args.limit,
            device=args.device,
            split=args.split,
            key_column=args.key_column,
            progress=not args.no_progress,
        )
    except EncodeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    r = report
    print(f"{r.out_dir}: {r.rows} latents ({r.encoded} encoded now, {r.skipped} already done)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m runner.encode ...`: the same as `python -m runner encode ...`."""
    parser = argparse.ArgumentParser(prog="python -m runner.encode", description=__doc__.splitlines()[0])
    add_encode_arguments(parser)
    return run_encode(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
