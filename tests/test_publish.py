"""`python -m runner publish` and the published site: a fixture snapshot made by the real command from
run folders written through the real contract (spec, metrics, statsfile, samples.json, manifest), then
rendered beside local runs and built with `mkdocs build --strict`."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_site import _unresolved, build_strict

from runner import site
from runner.charts import writeup_figure
from runner.cli import main
from runner.manifest import write_manifest
from runner.publish import kept_rows, publish
from runner.results import Metrics, load_runs, write_metrics
from runner.spec import build_spec
from runner.statsfile import HIST_BINS, load_stats, save_stats

ROOT = Path(__file__).resolve().parent.parent
ROWS, MODULES, K = 1001, 3, 4
NAMES = ("unet.down_blocks.0.resnets.0", "unet.mid_block.resnets.0", "unet.up_blocks.0.resnets.0")


def _spec(run_id: str, profile: str = "smoke", **over):
    raw = {"id": run_id, "title": f"Run {run_id}", "notes": "", "group": "architecture", "axis": "norm",
           **over}
    return build_spec(raw, "test", profile=profile)


def _metrics(spec, status="completed", valid=0.2, batch_stats=None, epochs=1) -> Metrics:
    base = Metrics.failed(spec, "").model_dump()
    per_epoch = [
        {"epoch": e, "step": 5 * e, "train_loss": 0.15, "valid_loss": valid,
         "valid_loss_batch_stats": batch_stats}
        for e in range(1, epochs + 1)
    ]
    base.update(
        status=status, error=None, params=1000, steps_per_epoch=5, steps_completed=5 * epochs,
        steps_total=5 * epochs, diverged_at_step=3 if status == "diverged" else None,
        batches={"loss": [1.0, 0.5, 0.4, 0.3, 0.2] * epochs, "lr": [1e-3] * 5 * epochs,
                 "grad_norm": [1.0] * 5 * epochs},
        epochs=per_epoch,
        final={"train_loss": 0.15, "valid_loss": valid, "valid_loss_batch_stats": batch_stats},
        timings={"total_s": 61.5, "step_s": 0.3},
    )
    base["environment"].update(device="cuda", torch="2.x", diffusers="0.x")
    return Metrics.model_validate(base)


def _stats(peak: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    std = np.linspace(1.0, peak, ROWS)[:, None] * np.ones(MODULES)
    hist = rng.integers(0, 50, (MODULES, HIST_BINS, ROWS))
    bucket_std = np.linspace(0.5, peak, ROWS * MODULES * K).reshape(ROWS, MODULES, K)
    return {
        "mean": rng.normal(size=(ROWS, MODULES)), "std": std, "hist": hist, "names": NAMES,
        "steps": np.arange(ROWS, dtype=np.int64) * 7 + 3,  # recorded every 7th step, from step 3
        "bucket_edges": np.linspace(0, 1, K + 1), "bucket_mean": np.zeros((ROWS, MODULES, K)),
        "bucket_std": bucket_std, "bucket_dead": np.zeros((ROWS, MODULES, K)),
        "bucket_count": np.full((ROWS, K), 8),
    }


def _summary(std: float) -> dict:
    return {"mean": 0.1, "std": std, "channel_mean": [0.1] * 4, "channel_std": [std] * 4, "nonfinite": 0}


def _samples(folder: Path, status: str = "completed") -> None:
    out = folder / "samples"
    out.mkdir()
    if status != "completed":
        reason = "the run diverged at step 3: its model is not sampled"
        record = {"status": status, "reason": reason, "samplers": {}}
    else:
        for i, name in enumerate(("matched", "originals", "real")):
            Image.new("RGB", (8, 8), (40 * i, 90, 200)).save(out / f"grid_{name}.png")
        sampler = {"schedule": "cosine", "timestep": "raw", "eta": 0.0, "clip_sample": False, "seconds": 1.5}
        record = {
            "status": "completed", "reason": None, "count": 16, "seed": 0, "steps": 20, "device": "cuda",
            "precision": "fp32", "space": "training space",
            "data": {"rows": "the run's 90 train latents", **_summary(1.0)},
            "samplers": {"matched": {**sampler, **_summary(0.8)}, "originals": {**sampler, **_summary(2.5)}},
            "decoder": {"name": "preview", "resolution": 64, "file": "data/preview_decoder.npz",
                        "r2_heldout": 0.89, "train_pairs": 400, "heldout_pairs": 200},
            "grids": {name: f"grid_{name}.png" for name in ("matched", "originals", "real")},
            "real": "the first 16 validation latents, through the same decoder", "decode_seconds": 0.1,
        }
    (out / "samples.json").write_text(json.dumps(record))


def _run(results: Path, spec, peak: float, seed: int, samples: str = "completed", **metrics) -> Path:
    folder = results / spec.id
    folder.mkdir(parents=True)
    (folder / "spec.yaml").write_text(spec.to_yaml())
    write_metrics(folder, _metrics(spec, **metrics))
    save_stats(_stats(peak, seed), folder / "stats.npz")
    (folder / "charts").mkdir()
    pixels = np.random.default_rng(seed).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "charts" / "stats.png")  # distinct per run, some 7 kB
    _samples(folder, samples)
    write_manifest(folder, {"spec": spec.content_hash()})
    return folder


def make_results(root: Path) -> Path:
    results = root / "results"
    _run(results, _spec("good"), 1.5, 0, batch_stats=0.21)
    _run(results, _spec("bad", model={"resnet_norm": "batch"}), 90.0, 1, batch_stats=0.6)
    _run(results, _spec("diverged"), 3.0, 2, samples="skipped", status="diverged")
    axis = {"group": "ablations", "axis": "gradient scaling"}
    _run(results, _spec("prec_fp32", "full", train={"precision": "fp32"}, **axis), 2.0, 3)
    _run(results, _spec("prec_fp16", "full", train={"precision": "fp16_unscaled"}, **axis), 9.0, 4)
    _run(results, _spec("repro", "full", reproduces="image_generator_nonorm", group="reproductions"), 2.0, 5,
         epochs=2, valid=0.5)
    damaged = _run(results, _spec("tampered"), 1.0, 6)
    (damaged / "metrics.json").write_text((damaged / "metrics.json").read_text().replace("61.5", "62.5"))
    return results


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("publish")
    results = make_results(root)
    snap = publish(results, "quick", out_root=root / "published")
    return {"root": root, "results": results, "snap": snap, "folder": root / "published" / "quick"}


def _expected_rows(n: int, limit: int) -> list[int]:
    """Evenly spaced rows, first and last included, rounded half up: computed with exact fractions."""
    if n <= limit:
        return list(range(n))
    return [math.floor(Fraction(i * (n - 1), limit - 1) + Fraction(1, 2)) for i in range(limit)]


def test_kept_rows_match_an_exact_computation() -> None:
    for n, limit in ((1001, 300), (301, 300), (300, 300), (5, 300), (100_000, 300), (7, 2), (10, 4)):
        assert kept_rows(n, limit).tolist() == _expected_rows(n, limit), (n, limit)


def test_snapshot_holds_downsampled_stats_with_their_steps(snapshot) -> None:
    folder, results = snapshot["folder"], snapshot["results"]
    for run_id in ("good", "bad", "prec_fp16"):
        full, small = load_stats(results / run_id / "stats.npz"), load_stats(folder / run_id / "stats.npz")
        rows = _expected_rows(ROWS, 300)
        assert len(small) == 300 and rows[0] == 0 and rows[-1] == ROWS - 1
        np.testing.assert_array_equal(small.steps, np.arange(ROWS)[rows] * 7 + 3)
        np.testing.assert_array_equal(small.std, full.std[rows])
        np.testing.assert_array_equal(small.hist, full.hist[:, :, rows])
        np.testing.assert_array_equal(small.buckets.std, full.buckets.std[rows])
        np.testing.assert_array_equal(small.buckets.count, full.buckets.count[rows])
        assert (folder / run_id / "samples" / "grid_real.png").is_file()
        assert (folder / run_id / "charts" / "stats.png").is_file()
        assert not (folder / run_id / "samples" / "samples.npz").exists()


def test_snapshot_manifest_and_left_out_runs(snapshot) -> None:
    m = json.loads((snapshot["folder"] / "manifest.json").read_text())
    assert [r["id"] for r in m["runs"]] == ["bad", "diverged", "good", "prec_fp16", "prec_fp32", "repro"]
    assert [r["id"] for r in m["left_out"]] == ["tampered"] and "metrics.json" in m["left_out"][0]["reason"]
    assert m["device"] == "cuda" and m["profile"] == "full, smoke" and m["wall_s"] == pytest.approx(6 * 61.5)
    assert {"torch", "diffusers", "python", "runner"} <= set(m["versions"]) and m["date"]
    assert all(r["wall_s"] == 61.5 and r["stats_rows"] == {"recorded": ROWS, "kept": 300} for r in m["runs"])
    top = snapshot["folder"] / "manifest.json"
    files = [p for p in snapshot["folder"].rglob("*") if p.is_file() and p != top]
    distinct = {hashlib.sha256(p.read_bytes()).hexdigest(): p.stat().st_size for p in files}
    assert m["size_on_disk_bytes"] == sum(p.stat().st_size for p in files)
    # The real-latent grid is the same file in every run: stored (and counted) once.
    assert m["size_bytes"] == sum(distinct.values()) < m["size_on_disk_bytes"]
    assert snapshot["snap"].size_bytes == m["size_bytes"] < 20e6
    assert m["charts"] == "drawn from the snapshot's statistics"
    runs = load_runs(snapshot["folder"])  # every snapshot folder is a sound run folder of the contract
    assert [r.id for r in runs if r.damaged] == [] and len(runs) == 6
    assert not any(p.name.startswith(".") for p in snapshot["root"].joinpath("published").iterdir())


def test_publish_refuses_past_the_size_limit_and_keeps_the_previous_snapshot(snapshot, tmp_path, capsys):
    before = (snapshot["folder"] / "manifest.json").read_text()
    args = ["publish", "--name", "quick", "--results", str(snapshot["results"]),
            "--out", str(snapshot["root"] / "published"), "--max-mb", "0.001"]
    assert main(args) == 2
    assert "over the 0.001 MB limit" in capsys.readouterr().err
    assert (snapshot["folder"] / "manifest.json").read_text() == before
    assert main(["publish", "--name", "Bad/Name", "--results", str(snapshot["results"]),
                 "--out", str(tmp_path)]) == 2
    assert main(["publish", "--name", "x", "--results", str(snapshot["results"]), "--out", str(tmp_path),
                 "--max-rows", "301"]) == 2
    assert list(tmp_path.iterdir()) == []
    # --charts auto leaves the charts out when the snapshot fits only without them.
    without = [p for p in snapshot["folder"].rglob("*") if p.is_file() and "charts" not in p.parts
               and p != snapshot["folder"] / "manifest.json"]
    # (Distinct contents, as the limit counts them: some of the stored figures are the same image.)
    distinct = {hashlib.sha256(p.read_bytes()).hexdigest(): p.stat().st_size for p in without}
    limit = (sum(distinct.values()) + 1000) / 1e6  # fits without the charts only
    assert main(["publish", "--name", "auto", "--results", str(snapshot["results"]), "--out", str(tmp_path),
                 "--max-mb", str(limit)]) == 0
    m = json.loads((tmp_path / "auto" / "manifest.json").read_text())
    assert m["charts"].startswith("left out") and not list((tmp_path / "auto").glob("*/charts"))


def placeholder(runs, kind, out) -> Path:
    """Comparison and diagnostic charts as placeholders (the writeup's figures are drawn for real)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 4)).save(out)
    return Path(out)


@pytest.fixture(scope="module")
def built(snapshot) -> dict:
    """The snapshot and one local run (sharing an id with a published one) rendered and built."""
    root = snapshot["root"]
    local = root / "local"
    _run(local, _spec("good", title="My own variant"), 4.0, 9)
    docs = root / "docs"
    shutil.copytree(ROOT / "docs" / "assets", docs / "assets")
    pages = site.render_site(local, docs, placeholder, published=[snapshot["folder"]],
                             figures=writeup_figure)
    return {"site": build_strict(root, docs), "docs": docs, "pages": pages}


def test_every_published_experiment_shows_its_samples_beside_real_latents(built) -> None:
    out = built["site"] / "experiments"
    for run_id in ("good--quick", "bad", "prec_fp32", "prec_fp16", "repro"):
        html = (out / run_id / "index.html").read_text()
        assert 'src="samples/grid_matched.png"' in html and 'src="samples/grid_real.png"' in html, run_id
        assert (out / run_id / "samples" / "grid_real.png").is_file()
        assert "published run (quick)" in html and "held-out R² 0.89" in html
        assert "<td>0.8</td>" in html  # the matched sampler's std over the data's (0.8 / 1.0)
    diverged = (out / "diverged" / "index.html").read_text()
    assert "No samples for this run: the run diverged at step 3" in diverged
    assert "local run" in (out / "good" / "index.html").read_text()
    assert "My own variant" in (out / "good" / "index.html").read_text()
    assert not (out / "tampered").exists()
    assert _unresolved(built["site"]) == []


def test_index_labels_published_and_local_runs(built) -> None:
    index = (built["site"] / "experiments" / "index.html").read_text()
    row = r'<tr[^>]*>\s*<td><a href="([^/"]+)/index.html".*?</tr>'
    rows = {m.group(1): m.group(0) for m in re.finditer(row, index, re.S)}
    assert "local run" in rows["good"] and "published run (quick)" in rows["good--quick"]
    assert all("published run (quick)" in rows[i] for i in ("bad", "diverged", "prec_fp16", "repro"))


def test_writeup_has_its_figures_reproduction_table_and_samples(built) -> None:
    html = (built["site"] / "insights" / "summary.html").read_text()
    for stem in ("module", "extremes", "batchnorm", "precision", "buckets"):
        assert f'src="writeup/{stem}.png"' in html, stem
        with Image.open(built["site"] / "insights" / "writeup" / f"{stem}.png") as im:
            assert im.size[0] > 500  # a real drawn figure, not a placeholder
    table = re.search(r'<table class="reproduction">.*?</table>', html, re.S).group(0)
    assert "image_generator_nonorm" in table and ">repro<" in table
    assert "Published snapshot <code>quick</code>" in html and "Local runs" in html
    assert "unet.down_blocks" not in html and "down0.res0" in html  # module names as the charts show them
    assert 'src="../experiments/bad/samples/grid_originals.png"' in html
    # Every number of the "what was run" list comes from the snapshot manifest.
    text = " ".join(re.sub(r"<[^>]+>", "", html).split())
    wanted = ("Published snapshot quick: 6 runs, profile full, smoke, on cuda (fp16_unscaled, fp32), "
              "6 min 09 s")
    assert wanted in text


def test_publish_imports_neither_torch_nor_diffusers(snapshot, tmp_path) -> None:
    """(Rendering a site, published runs included, is checked torch-free by tests/test_cli.py.)"""
    from test_cli import _NO_TORCH

    argv = ["publish", "--name", "again", "--results", str(snapshot["results"]),
            "--out", str(tmp_path / "pub")]
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, str(tmp_path), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert "RC 0 HEAVY []" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(load_runs(tmp_path / "pub" / "again")) == 6
