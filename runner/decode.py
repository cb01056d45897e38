"""Latents -> RGB pictures: the Stable Diffusion VAE when its weights are on disk, else a preview decoder.

Both decoders take *raw* latents (as the VAE encoded them, before a spec's normalisation and scale);
``to_raw`` undoes a spec's ``(raw - shift) * factor`` first (see ``runner.data.normalization``).

The preview decoder is a 3x3 convolution from the 4 latent channels to 12 outputs followed by a 2x
pixel shuffle: each latent position gives a 2x2 block of RGB pixels, so a (4, 32, 32) latent becomes
a 64x64 picture. It is fitted by closed-form least squares on the bundled image<->latent pairs
(``data/lsun_bedroom_10k/images_64``: the source JPEGs squashed to 256x256 as for encoding, then
box-averaged to 64x64), on the train-split rows, and scored by R^2 on the valid-split rows. It shows
layout and colour, not detail: the site shows real latents through the same decoder for comparison.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from runner.data import DATA_DIR, KEYS_FILE, DataError, normalization, open_latents, read_stats, split_ranges
from runner.files import write_atomic, write_json
from runner.spec import DataSpec

PAIRS_DIR = DATA_DIR / "images_64"
PREVIEW_FILE = DATA_DIR.parent / "preview_decoder.npz"
PREVIEW_SIZE = 64
KERNEL = 3
FACTOR = 2  # output pixels per latent position along each axis (32 -> 64)
# The refit must explain at least this share of held-out pixel variance (measured: 0.89; see data/README.md).
R2_FLOOR = 0.85
# Bundled pairs: the first MAX_TRAIN_PAIRS train rows of the source images, and every valid row there.
MAX_TRAIN_PAIRS = 400
VAE_TILE = 128  # VAE pictures (256x256) are box-averaged to this size for the grids


class DecoderError(RuntimeError):
    """A decoder cannot be built: missing weights or pairs, or latents it was not fitted for."""


def to_raw(latents: torch.Tensor, data_spec: DataSpec, root: str | Path = DATA_DIR) -> torch.Tensor:
    """Training-space latents -> the VAE's raw latents: divide by the scale, un-standardise."""
    shift, factor = normalization(data_spec, root)
    return latents / factor + shift


# ---------------------------------------------------------------- the preview decoder


@dataclass(frozen=True)
class PreviewDecoder:
    weight: torch.Tensor  # [3 * FACTOR**2, 4, KERNEL, KERNEL]
    bias: torch.Tensor  # [3 * FACTOR**2]
    report: dict[str, Any]

    name = "preview"

    @torch.no_grad()
    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latents [B, 4, 32, 32] -> RGB [B, 3, 64, 64] in [0, 1]."""
        x = raw.detach().float().cpu().nan_to_num()
        y = F.conv2d(x, self.weight, self.bias, padding=KERNEL // 2)
        return F.pixel_shuffle(y, FACTOR).clamp(0, 1)

    def describe(self) -> dict[str, Any]:
        keys = ("file", "r2_heldout", "train_pairs", "heldout_pairs")
        return {"name": self.name, "resolution": PREVIEW_SIZE, **{k: self.report.get(k) for k in keys}}


def _features(latents: torch.Tensor) -> torch.Tensor:
    """[N, 4, 32, 32] -> [N * 1024, 4 * KERNEL**2 + 1]: each position's 3x3 neighbourhood and a 1."""
    patches = F.unfold(latents, KERNEL, padding=KERNEL // 2)  # [N, 36, 1024], channel-major like conv2d
    ones = torch.ones(patches.shape[0], 1, patches.shape[2])
    return torch.cat([patches, ones], 1).permute(0, 2, 1).reshape(-1, patches.shape[1] + 1)


def _targets(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, 64, 64] -> [N * 1024, 12]: each latent position's 2x2 RGB block, in pixel_shuffle order."""
    blocks = F.pixel_unshuffle(images, FACTOR)  # [N, 12, 32, 32]
    return blocks.permute(0, 2, 3, 1).reshape(-1, blocks.shape[1])


def r2_score(pred: torch.Tensor, target: torch.Tensor) -> float:
    """1 - SSE / SST over every pixel and channel, SST around the target's per-channel mean."""
    mean = target.mean(dim=(0, 2, 3), keepdim=True)
    return float(1 - ((pred - target) ** 2).sum() / ((target - mean) ** 2).sum())


def _load_pairs(pairs_dir: Path, root: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train"|"valid": (raw latents [N,4,32,32], images [N,3,64,64])} for the pictures in pairs_dir."""
    keys = (root / KEYS_FILE).read_text().split()
    row_of = {k: i for i, k in enumerate(keys)}
    files = sorted(pairs_dir.glob("*.jpg"))
    unknown = [f.name for f in files if f.stem not in row_of]
    if unknown:
        where = root / KEYS_FILE
        raise DecoderError(f"{pairs_dir}: {len(unknown)} pictures have no row in {where}: {unknown[:3]}")
    latents = open_latents(root)
    (t0, t1), (v0, v1) = split_ranges(read_stats(root), len(latents))
    out = {}
    for split, (lo, hi) in (("train", (t0, t1)), ("valid", (v0, v1))):
        chosen = [f for f in files if lo <= row_of[f.stem] < hi]
        if not chosen:
            hint = "rebuild them with `python -m runner fit-decoder --from-images DIR`"
            raise DecoderError(f"{pairs_dir}: no {split}-split pictures; {hint}")
        rows = [row_of[f.stem] for f in chosen]
        x = torch.from_numpy(np.stack([np.asarray(latents[r], dtype=np.float32) for r in rows]))
        y = torch.from_numpy(np.stack([_read_rgb(f) for f in chosen])).permute(0, 3, 1, 2)
        out[split] = (x, y)
    return out


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    if rgb.shape != (PREVIEW_SIZE, PREVIEW_SIZE, 3):
        raise DecoderError(f"{path}: expected a {PREVIEW_SIZE}x{PREVIEW_SIZE} picture, got {rgb.shape[:2]}")
    return rgb


def fit_preview(pairs_dir: str | Path = PAIRS_DIR, root: str | Path = DATA_DIR) -> PreviewDecoder:
    """Least-squares fit on the train-split pairs; R^2 measured on the valid-split pairs."""
    root = Path(root)
    if read_stats(root).get("input_range", "nonorm") != "nonorm":
        raise DecoderError(f"{root}: the preview decoder is fitted on 'nonorm' latents ([0, 1] images)")
    tic = time.perf_counter()
    pairs = _load_pairs(Path(pairs_dir), root)
    (xt, yt), (xv, yv) = pairs["train"], pairs["valid"]
    solution = torch.linalg.lstsq(_features(xt).double(), _targets(yt).double()).solution.float()
    weight = solution[:-1].T.reshape(3 * FACTOR**2, 4, KERNEL, KERNEL).contiguous()
    bias = solution[-1].contiguous()
    decoder = PreviewDecoder(weight, bias, {})
    report = {
        "model": f"{KERNEL}x{KERNEL} conv, 4 -> {3 * FACTOR**2} channels, pixel shuffle x{FACTOR}",
        "output": f"RGB {PREVIEW_SIZE}x{PREVIEW_SIZE} in [0, 1]",
        "r2_heldout": round(r2_score(decoder(xv), yv), 4),
        "r2_train": round(r2_score(decoder(xt), yt), 4),
        "r2_definition": "1 - SSE/SST over all pixels and channels, SST around the per-channel mean",
        "train_pairs": len(xt),
        "heldout_pairs": len(xv),
        "pairs": f"{Path(pairs_dir).name}: train-split rows fit, valid-split rows held out",
        "fit_seconds": round(time.perf_counter() - tic, 2),
    }
    return PreviewDecoder(weight, bias, report)


def save_preview(decoder: PreviewDecoder, path: str | Path = PREVIEW_FILE) -> Path:
    path = Path(path)
    write_atomic(path, lambda tmp: np.savez(
        tmp, weight=decoder.weight.numpy(), bias=decoder.bias.numpy()
    ))
    repo = DATA_DIR.parent.parent
    name = path.resolve().relative_to(repo) if path.resolve().is_relative_to(repo) else path
    write_json(path.with_suffix(".json"), {"file": str(name), **decoder.report})
    return path


def load_preview(path: str | Path = PREVIEW_FILE) -> PreviewDecoder:
    path = Path(path)
    if not path.exists():
        raise DecoderError(f"{path}: no preview decoder; fit it with `python -m runner fit-decoder`")
    with np.load(path) as f:
        weight, bias = torch.from_numpy(f["weight"]), torch.from_numpy(f["bias"])
    report = json.loads(path.with_suffix(".json").read_text())
    return PreviewDecoder(weight, bias, report)


def make_pairs(source: str | Path, out_dir: str | Path = PAIRS_DIR, root: str | Path = DATA_DIR,
               max_train: int = MAX_TRAIN_PAIRS) -> int:
    """Write 64x64 JPEGs of the source pictures (``<key>.jpg``): the first `max_train` train rows, all valid.

    Each picture goes through the encoding's squash to 256x256 (``runner.encode.preprocess``'s bilinear
    resize), then a box average to 64x64. Returns the number written.
    """
    from runner.encode import RESAMPLE

    source, out_dir, root = Path(source), Path(out_dir), Path(root)
    keys = (root / KEYS_FILE).read_text().split()
    (t0, t1), (v0, v1) = split_ranges(read_stats(root), len(keys))
    have = {p.stem for p in source.glob("*.jpg")}
    train = [k for k in keys[t0:t1] if k in have][:max_train]
    valid = [k for k in keys[v0:v1] if k in have]
    for key in train + valid:
        with Image.open(source / f"{key}.jpg") as im:
            small = im.convert("RGB").resize((256, 256), RESAMPLE).resize(
                (PREVIEW_SIZE, PREVIEW_SIZE), Image.Resampling.BOX
            )
        buf = io.BytesIO()
        small.save(buf, "JPEG", quality=90)
        data = buf.getvalue()
        write_atomic(out_dir / f"{key}.jpg", lambda tmp, data=data: tmp.write_bytes(data))
    return len(train) + len(valid)


# ---------------------------------------------------------------- the Stable Diffusion VAE


class VaeDecoder:
    """AutoencoderKL from a local folder (``save_pretrained`` layout); never downloads."""

    name = "vae"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", root: str | Path = DATA_DIR):
        from diffusers import AutoencoderKL  # lazy: only a run given --vae needs it

        self.path = Path(path)
        if not self.path.is_dir():
            raise DecoderError(f"--vae {self.path}: no such folder; expected AutoencoderKL weights on disk")
        try:
            self.vae = AutoencoderKL.from_pretrained(self.path, local_files_only=True).to(device).eval()
        except (OSError, ValueError) as e:
            raise DecoderError(f"--vae {self.path}: not loadable as AutoencoderKL: {e}") from None
        self.input_range = read_stats(root).get("input_range", "nonorm")

    @torch.no_grad()
    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        p = next(self.vae.parameters())
        images = self.vae.decode(raw.nan_to_num().to(p.device, p.dtype)).sample.float().cpu()
        if self.input_range == "minus1_1":
            images = (images + 1) / 2
        images = images.clamp(0, 1)
        return F.adaptive_avg_pool2d(images, VAE_TILE) if images.shape[-1] > VAE_TILE else images

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "resolution": VAE_TILE}


def decoder_for(vae: str | Path | None = None, device: str | torch.device = "cpu"):
    """The VAE when `vae` names a folder of weights, else the fitted preview decoder."""
    return VaeDecoder(vae, device) if vae else load_preview()


# ---------------------------------------------------------------- grids and the command


def save_grid(images: torch.Tensor, path: str | Path, columns: int = 4, gap: int = 2) -> Path:
    """[N, 3, H, W] in [0, 1] -> one PNG, `columns` wide, white gaps between tiles."""
    n, _, h, w = images.shape
    rows = -(-n // columns)
    canvas = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, 3), 255, np.uint8)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, tile in enumerate(pixels):
        r, c = divmod(i, columns)
        canvas[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = tile
    return write_atomic(Path(path), lambda tmp: Image.fromarray(canvas).save(tmp, format="PNG"))


def add_fit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from-images", help="first rebuild the 64x64 pairs from this folder of source JPEGs")
    p.add_argument("--max-train", type=int, default=MAX_TRAIN_PAIRS, help="train-split pictures to keep")
    p.add_argument("--out", default=str(PREVIEW_FILE), help="where the decoder goes (and its .json)")


def run_fit(args: argparse.Namespace) -> int:
    try:
        if args.from_images:
            n = make_pairs(args.from_images, max_train=args.max_train)
            print(f"wrote {n} pictures into {PAIRS_DIR}")
        decoder = fit_preview()
    except (DecoderError, DataError, FileNotFoundError) as e:
        print(e, file=sys.stderr)
        return 2
    path = save_preview(decoder, args.out)
    r = decoder.report
    print(f"{path}: held-out R^2 {r['r2_heldout']} on {r['heldout_pairs']} pairs "
          f"(fit on {r['train_pairs']}, {r['fit_seconds']} s)")
    return 0 if r["r2_heldout"] >= R2_FLOOR else 1
