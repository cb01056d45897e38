"""Noise: the cosine and DDIM forward processes, the timestep the model sees, reproducibility."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from runner.noise import Noiser, alpha_bar, describe_timestep
from runner.spec import NoiseSpec

LATENTS = Path(__file__).resolve().parents[1] / "data" / "lsun_bedroom_10k" / "latents_nonorm_f16.npy"


@pytest.fixture(scope="module")
def x0():
    rows = np.load(LATENTS, mmap_mode="r")[:8]
    return torch.from_numpy(np.asarray(rows, dtype=np.float32)) * 0.2


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_cosine_matches_the_formula(x0):
    (x_t, t), noise = Noiser(NoiseSpec(), "diffusers")(x0, gen(1))
    # Same draws in the same order (t, then noise), computed item by item in float64.
    g = gen(1)
    t_ref = torch.rand(len(x0), generator=g).clamp(0, 0.999)
    noise_ref = torch.randn(x0.shape, generator=g)
    assert torch.equal(t, t_ref) and torch.equal(noise, noise_ref)
    for i in range(len(x0)):
        ab = math.cos(t_ref[i].item() * math.pi / 2) ** 2
        expect = math.sqrt(ab) * x0[i].double() + math.sqrt(1 - ab) * noise_ref[i].double()
        assert torch.allclose(x_t[i].double(), expect, atol=1e-5)
    assert x_t.dtype == noise.dtype == t.dtype == torch.float32


def test_cosine_t_range_and_alpha_bar():
    x = torch.zeros(20_000, 1, 1, 1)
    (_, t), _ = Noiser(NoiseSpec(), "diffusers")(x, gen(2))
    assert t.min() >= 0 and t.max() <= 0.999
    assert abs(t.mean().item() - 0.5) < 0.01
    assert alpha_bar(torch.tensor(0.0)) == 1 and alpha_bar(torch.tensor(0.999)) < 1e-5


def test_timestep_raw_vs_scaled(x0):
    raw = NoiseSpec(timestep_input="raw")
    scaled = NoiseSpec(timestep_input="scaled", num_train_timesteps=500)
    (xr, tr), nr = Noiser(raw, "diffusers")(x0, gen(3))
    (xs, ts), ns = Noiser(scaled, "diffusers")(x0, gen(3))
    assert torch.equal(xr, xs) and torch.equal(nr, ns)  # only what the model is told changes
    assert torch.allclose(ts, tr * 500)
    (_, tc), _ = Noiser(scaled, "course")(x0, gen(3))
    assert torch.equal(tc, tr)  # the course UNet always gets the raw t
    texts = {describe_timestep(s, f) for s in (raw, scaled) for f in ("diffusers", "course")}
    assert len(texts) == 3 and all(texts)


def manual_alphas_cumprod(beta_end, n=1000):
    betas = torch.linspace(1e-4, beta_end, n, dtype=torch.float32)
    return torch.cumprod(1 - betas, dim=0)


@pytest.mark.parametrize("beta_end", [0.01, None])
def test_ddim_add_noise_matches_the_formula(x0, beta_end):
    noiser = Noiser(NoiseSpec(schedule="ddim", beta_end=beta_end), "diffusers")
    expected_end = 0.02 if beta_end is None else beta_end
    assert noiser.scheduler.betas[-1].item() == pytest.approx(expected_end)
    (x_t, t), noise = noiser(x0, gen(4))
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() < 1000
    ac = manual_alphas_cumprod(expected_end)[t].view(-1, 1, 1, 1)
    assert torch.allclose(x_t, ac.sqrt() * x0 + (1 - ac).sqrt() * noise, atol=1e-5)


def test_ddim_beta_end_changes_the_noise_level(x0):
    x = x0[:1].expand(64, -1, -1, -1)
    (a, _), _ = Noiser(NoiseSpec(schedule="ddim", beta_end=0.01), "diffusers")(x, gen(5))
    (b, _), _ = Noiser(NoiseSpec(schedule="ddim"), "diffusers")(x, gen(5))
    # Same t and noise; with the larger beta_end less signal survives, so x_t strays further from x0.
    assert (b - x).pow(2).mean() > (a - x).pow(2).mean()


def test_ddim_timesteps_are_integers_for_both_families(x0):
    spec = NoiseSpec(schedule="ddim", beta_end=0.01, timestep_input="scaled")
    (_, t), _ = Noiser(spec, "course")(x0, gen(6))
    (_, t2), _ = Noiser(spec, "diffusers")(x0, gen(6))
    assert torch.equal(t, t2) and t.dtype == torch.int64


@pytest.mark.parametrize("schedule", ["cosine", "ddim"])
def test_seeded_generator_is_deterministic(x0, schedule):
    noiser = Noiser(NoiseSpec(schedule=schedule), "diffusers")
    (a, ta), na = noiser(x0, gen(7))
    (b, tb), nb = noiser(x0, gen(7))
    (c, tc), nc = noiser(x0, gen(8))
    assert torch.equal(a, b) and torch.equal(ta, tb) and torch.equal(na, nb)
    assert not torch.equal(na, nc)


def test_keeps_input_dtype(x0):
    x = x0.double()
    (x_t, t), noise = Noiser(NoiseSpec(), "diffusers")(x, gen(9))
    assert x_t.dtype == t.dtype == noise.dtype == torch.float64
    (x_t, _), noise = Noiser(NoiseSpec(schedule="ddim"), "diffusers")(x, gen(9))
    assert x_t.dtype == noise.dtype == torch.float64


@pytest.mark.parametrize(("schedule", "timestep_input"),
                         [("cosine", "raw"), ("cosine", "scaled"), ("ddim", "raw")])
def test_unit_time_maps_the_model_t_back_to_0_1(x0, schedule, timestep_input):
    noiser = Noiser(NoiseSpec(schedule=schedule, timestep_input=timestep_input), "diffusers")
    g = gen(3)
    (_, t_model), _ = noiser(x0.repeat(64, 1, 1, 1), g)
    unit = noiser.unit_time(t_model)
    assert unit.dtype == torch.float32 and unit.min() >= 0 and unit.max() < 1
    # The same draw as the noiser's: t first (cosine), or the integer step (ddim).
    g = gen(3)
    if schedule == "cosine":
        want = torch.rand(len(unit), generator=g).clamp(0, 0.999)
    else:
        want = torch.randint(0, 1000, (len(unit),), generator=g).float() / 1000
    torch.testing.assert_close(unit, want)
