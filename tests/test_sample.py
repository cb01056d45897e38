"""Sampling after training and decoding: closed-form DDIM checks, the files a run gets, the decoders."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from runner.cli import main
from runner.data import DATA_DIR, load_splits, open_latents
from runner.decode import (
    PAIRS_DIR,
    PREVIEW_FILE,
    R2_FLOOR,
    DecoderError,
    VaeDecoder,
    load_preview,
    to_raw,
)
from runner.results import read_samples
from runner.sample import SAMPLE_COUNT, draw, sample_run
from runner.spec import SpecError, build_spec, load_spec
from runner.train import Result, train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_MODEL = {"block_out_channels": [32, 64], "blocks": "DA", "layers_per_block": 1}


def tiny(name: str, **sections) -> object:
    raw = {
        "id": name,
        "data": {"size": 96},
        "model": sections.pop("model", TINY_MODEL),
        "train": {"batch_size": 16, "epochs": 1},
        **sections,
    }
    return build_spec(raw, "test")


class PerfectPredictor(nn.Module):
    """Returns the exact noise that turns a known x0 into x at the alpha-bar `alpha_bar_of(t)`.

    Records every t it receives and every noise it returns. Its alpha-bar comes from the test's own
    formulas. Deterministic DDIM keeps x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps with one eps all along,
    so with eta 0 every returned noise must be the same: a sampler that passed another t, or stepped on
    another schedule, would change it (and miss x0).
    """

    def __init__(self, x0: torch.Tensor, alpha_bar_of):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # the sampler finds the device through a parameter
        self.x0, self.alpha_bar_of, self.seen, self.returned = x0, alpha_bar_of, [], []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(t.clone())
        ab = self.alpha_bar_of(t).view(-1, 1, 1, 1).to(x.dtype)
        eps = (x - ab.sqrt() * self.x0) / (1 - ab).sqrt()
        self.returned.append(eps)
        return eps

    def assert_one_noise_all_along(self) -> None:
        for eps in self.returned[1:]:
            torch.testing.assert_close(eps, self.returned[0], atol=2e-3, rtol=1e-3)


def cosine_oracle(factor: float):
    return lambda t: torch.cos(t.double() / factor * math.pi / 2) ** 2


def ddim_oracle(beta_end: float):
    # diffusers' "linear" schedule: betas evenly spaced from 1e-4 to beta_end over 1000 steps.
    ab = torch.cumprod(1 - torch.linspace(1e-4, beta_end, 1000, dtype=torch.float64), 0)
    return lambda t: ab[t.long()]


X0 = 3 * torch.randn(SAMPLE_COUNT, 4, 32, 32, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize(
    ("family", "timestep_input", "factor"),
    [("diffusers", "raw", 1.0), ("diffusers", "scaled", 1000.0), ("course", "raw", 1.0)],
)
def test_matched_cosine_ddim_recovers_x0_and_feeds_the_training_t(family, timestep_input, factor):
    course = {"family": "course", "block_out_channels": [32, 64], "attention_start": 1}
    model = course if family == "course" else TINY_MODEL
    spec = tiny("cos", model=model, noise={"timestep_input": timestep_input}, sample={"steps": 10})
    oracle = PerfectPredictor(X0, cosine_oracle(factor))
    out = draw(oracle, spec, "matched")
    torch.testing.assert_close(out, X0, atol=1e-4, rtol=1e-4)
    oracle.assert_one_noise_all_along()
    ts = torch.stack([t[0] for t in oracle.seen]).double() / factor
    # The course's start, 1 - 1/steps, down to one step above 0, in equal steps.
    torch.testing.assert_close(ts, torch.linspace(0.9, 0.0, 11, dtype=torch.float64)[:-1], atol=1e-6, rtol=0)
    assert all(t.dtype == torch.float32 for t in oracle.seen)


def test_matched_ddim_spec_uses_its_own_scheduler_without_clipping():
    spec = tiny("ddim", noise={"schedule": "ddim", "beta_end": 0.012}, sample={"steps": 8})
    oracle = PerfectPredictor(X0, ddim_oracle(0.012))  # X0 reaches |x| > 1: clipping would spoil it
    torch.testing.assert_close(draw(oracle, spec, "matched"), X0, atol=1e-3, rtol=1e-3)
    oracle.assert_one_noise_all_along()
    assert all(t.dtype == torch.long for t in oracle.seen) and len(oracle.seen) == 8


def test_originals_sampler_calls_a_cosine_model_with_integer_timesteps_of_beta_end_001():
    x0 = X0.clamp(-1, 1)  # the originals' scheduler clips x0 to [-1, 1]
    spec = tiny("orig", sample={"steps": 5, "samplers": ["matched", "originals"]})
    oracle = PerfectPredictor(x0, ddim_oracle(0.01))
    # eta 1 adds noise at every step, but a perfect predictor still lands on x0 (the last step has none).
    torch.testing.assert_close(draw(oracle, spec, "originals"), x0, atol=1e-3, rtol=1e-3)
    seen = [int(t[0]) for t in oracle.seen]
    assert all(t.dtype == torch.long for t in oracle.seen)
    assert seen == sorted(seen, reverse=True) and seen[0] > 100 and seen[-1] == 0


def test_sample_spec_fields_profiles_and_reference_specs():
    assert load_spec("experiments/architecture/diffusers_baseline.yaml", "quick").sample.samplers == (
        "matched",
        "originals",
    )
    assert load_spec("experiments/architecture/course_baseline.yaml", "smoke").sample.steps == 3
    bn = load_spec("experiments/architecture/batchnorm_resnets.yaml", "full")
    assert bn.sample.samplers == ("matched",) and bn.sample.steps == 100
    with pytest.raises(SpecError, match="sample.samplers"):
        tiny("bad", sample={"samplers": ["matched", "matched"]})
    with pytest.raises(SpecError, match="sample.samplers"):
        tiny("bad", sample={"samplers": ["ddpm"]})
    a, b = tiny("h", sample={"steps": 4}), tiny("h", sample={"steps": 5})
    assert a.content_hash() != b.content_hash(), "samples are part of a run's files: a cache must miss"


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    spec = tiny("sampled", sample={"steps": 2, "samplers": ["matched", "originals"]})
    result = train(spec, out, device="cpu", progress=False)
    assert result.status == "completed" and result.model is not None
    return spec, result, sample_run(spec, result)


def test_sample_run_writes_latents_grids_and_measures(sampled_run):
    spec, result, record = sampled_run
    folder = result.out_dir / "samples"
    with np.load(folder / "samples.npz") as f:
        assert sorted(f.files) == ["matched", "originals"]
        assert all(f[k].shape == (16, 4, 32, 32) and f[k].dtype == np.float32 for k in f.files)
        matched = f["matched"]
    saved = json.loads((folder / "samples.json").read_text())
    assert saved == json.loads(json.dumps(record)) and saved["status"] == "completed"
    assert saved["count"] == 16 and saved["steps"] == 2 and saved["decoder"]["name"] == "preview"
    for name in ("matched", "originals", "real"):
        with Image.open(folder / saved["grids"][name]) as im:
            assert im.size == (4 * 64 + 3 * 2, 4 * 64 + 3 * 2) and im.mode == "RGB"
    measured = saved["samplers"]["matched"]
    assert measured["mean"] == pytest.approx(float(matched.astype(np.float64).mean()), rel=1e-6)
    assert measured["std"] == pytest.approx(float(matched.astype(np.float64).std(ddof=1)), rel=1e-6)
    train_x = load_splits(spec.data).train.double()
    assert saved["data"]["std"] == pytest.approx(float(train_x.std()), rel=1e-6)
    assert saved["samplers"]["originals"]["eta"] == 1.0 and measured["eta"] == 0.0
    assert measured["seconds"] > 0 and measured["nonfinite"] == 0
    # The run-folder contract reads what sampling wrote (a format change fails here, not on a page).
    typed = read_samples(result.out_dir)
    assert typed is not None and typed.decoder.name == "preview" and set(typed.grids) == set(saved["grids"])
    assert typed.std_ratio("matched") == pytest.approx(measured["std"] / saved["data"]["std"])


def test_sampling_is_repeatable_and_leaves_the_model_mode(sampled_run):
    spec, result, _ = sampled_run
    result.model.train()
    a, b = draw(result.model, spec, "matched"), draw(result.model, spec, "matched")
    assert torch.equal(a, b) and result.model.training
    with np.load(result.out_dir / "samples" / "samples.npz") as f:
        np.testing.assert_array_equal(f["matched"], a.numpy())


def test_a_diverged_run_is_not_sampled_and_says_why(tmp_path):
    spec = tiny("div")
    result = Result("diverged", {"diverged_at_step": 7}, tmp_path, model=nn.Linear(1, 1))
    record = sample_run(spec, result)
    saved = json.loads((tmp_path / "samples" / "samples.json").read_text())
    assert saved == record and saved["status"] == "skipped" and "step 7" in saved["reason"]
    assert read_samples(tmp_path).reason == saved["reason"]
    assert not (tmp_path / "samples" / "samples.npz").exists()
    assert main(["samples", str(tmp_path)]) == 2, "nothing to redraw: a clear refusal"


def test_a_sampling_error_is_recorded_not_raised(tmp_path, sampled_run):
    spec, result, _ = sampled_run
    shutil.copy(result.out_dir / "spec.yaml", tmp_path)
    moved = Result("completed", result.metrics, tmp_path, result.model)
    record = sample_run(spec, moved, vae=tmp_path / "no_vae_here")
    saved = json.loads((tmp_path / "samples" / "samples.json").read_text())
    assert saved == record and saved["status"] == "failed" and "no_vae_here" in saved["reason"]


# ---------------------------------------------------------------- decoders


def test_fit_decoder_command_refits_on_bundled_pairs_above_the_floor_as_committed(tmp_path, capsys):
    assert main(["fit-decoder", "--out", str(tmp_path / "d.npz")]) == 0
    refit = load_preview(tmp_path / "d.npz")
    assert refit.report["r2_heldout"] >= R2_FLOOR
    assert refit.report["heldout_pairs"] >= 100 and refit.report["train_pairs"] >= 100
    assert f"held-out R^2 {refit.report['r2_heldout']}" in capsys.readouterr().out
    committed = load_preview()
    torch.testing.assert_close(committed.weight, refit.weight, atol=1e-4, rtol=1e-3)
    assert committed.report["r2_heldout"] == refit.report["r2_heldout"]


def test_committed_preview_decoder_r2_on_held_out_pictures_by_hand():
    # Independent of the fit code: read the valid-split pictures and their rows, score with numpy.
    keys = (DATA_DIR / "keys.txt").read_text().split()
    row_of = {k: i for i, k in enumerate(keys)}
    files = sorted(p for p in PAIRS_DIR.glob("*.jpg") if row_of[p.stem] >= 9000)
    latents = open_latents()
    x = torch.from_numpy(np.stack([np.asarray(latents[row_of[p.stem]], dtype=np.float32) for p in files]))
    target = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) / 255 for p in files])
    pred = load_preview()(x).permute(0, 2, 3, 1).double().numpy()
    sse = ((pred - target) ** 2).sum()
    sst = ((target - target.mean(axis=(0, 1, 2))) ** 2).sum()
    assert 1 - sse / sst >= R2_FLOOR
    assert PREVIEW_FILE.stat().st_size < 10_000


def test_to_raw_undoes_standardisation_and_scale():
    spec = tiny("std", data={"size": 96, "normalize": "standardize", "scale": 0.18215})
    valid = load_splits(spec.data).valid
    raw = np.asarray(open_latents()[9000 : 9000 + len(valid)], dtype=np.float32)
    np.testing.assert_allclose(to_raw(valid, spec.data).numpy(), raw, atol=1e-4, rtol=1e-5)


def test_vae_decoder_loads_local_weights_only_and_redraws_grids(tmp_path, sampled_run, tiny_vae):
    with pytest.raises(DecoderError, match="no such folder"):
        VaeDecoder(tmp_path / "missing")
    tiny_vae.save_pretrained(tmp_path / "vae")
    decoded = VaeDecoder(tmp_path / "vae")(torch.randn(2, 4, 32, 32))
    assert decoded.shape == (2, 3, 128, 128) and decoded.min() >= 0 and decoded.max() <= 1
    run = shutil.copytree(sampled_run[1].out_dir, tmp_path / "run")
    assert main(["samples", str(run), "--vae", str(tmp_path / "vae")]) == 0
    record = json.loads((run / "samples" / "samples.json").read_text())
    assert record["decoder"] == {"name": "vae", "path": str(tmp_path / "vae"), "resolution": 128}
    with Image.open(run / "samples" / "grid_matched.png") as im:
        assert im.size == (4 * 128 + 3 * 2,) * 2
