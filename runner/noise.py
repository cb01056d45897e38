"""Forward diffusion: clean latents -> (noisy latents, the timestep the model sees), target noise.

Two schedules, as the originals ran them:

- ``cosine`` (fast.ai course): continuous t ~ U(0, 1) clamped to 0.999 (the course's ``noisify``),
  alpha-bar = cos^2(t*pi/2), x_t = sqrt(ab)*x0 + sqrt(1-ab)*noise.
- ``ddim``: diffusers ``DDIMScheduler`` (linear betas from 1e-4 to ``beta_end``), integer
  t ~ randint[0, num_train_timesteps), ``scheduler.add_noise``.

What the model receives as t (``timestep_input``): the originals fed the cosine t in [0, 1) to
the diffusers UNet as is, although its sinusoidal embedding was designed for 0..1000, so at
init the embedding barely varies with t; ``raw`` keeps that (faithful), ``scaled`` multiplies
by ``num_train_timesteps`` for the diffusers family only. The course UNet always gets the raw t,
because its own embedding (``timestep_embedding``) is designed for [0, 1). For ``ddim`` the
model gets the integer t for both families, so ``scaled`` changes nothing there (the course UNet
then sees 0..999, which is what feeding it DDIM timesteps would do).
"""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler

from runner.model_notes import describe_timestep  # torch-free: the site renders it
from runner.spec import NoiseSpec

__all__ = ["T_MAX", "Noiser", "alpha_bar", "describe_timestep"]

T_MAX = 0.999  # the course clamps t so that alpha-bar never reaches exactly 0


def alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """Cosine schedule: the share of signal variance left at continuous time t."""
    return (t * math.pi / 2).cos() ** 2


class Noiser:
    """``noiser(x0, generator=None) -> ((x_t, t_model), noise)``; all randomness from ``generator``.

    Pass a ``torch.Generator`` on ``x0``'s device for reproducible noise (validation uses a fixed
    seed); ``None`` draws from torch's global generator. Outputs are on ``x0``'s device; x_t and
    noise have ``x0``'s dtype, t_model is x0's dtype for cosine and int64 for ddim.
    """

    def __init__(self, noise_spec: NoiseSpec, family: str):
        self.spec = noise_spec
        self.family = family
        self.scheduler: DDIMScheduler | None = None
        if noise_spec.schedule == "ddim":
            kwargs = {} if noise_spec.beta_end is None else {"beta_end": noise_spec.beta_end}
            self.scheduler = DDIMScheduler(num_train_timesteps=noise_spec.num_train_timesteps, **kwargs)
        # Only the diffusers UNet's embedding expects 0..num_train_timesteps (see module docstring).
        self.t_factor = (
            float(noise_spec.num_train_timesteps)
            if noise_spec.timestep_input == "scaled" and family == "diffusers"
            else 1.0
        )

    def __call__(
        self, x0: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        if self.scheduler is not None:
            return self._ddim(x0, generator)
        return self._cosine(x0, generator)

    def unit_time(self, t_model: torch.Tensor) -> torch.Tensor:
        """The model's t mapped back onto the training t range normalised to [0, 1] (float32): the
        cosine t itself, or the DDIM step over num_train_timesteps. Statistics bucket samples by it."""
        scale = self.spec.num_train_timesteps if self.scheduler is not None else self.t_factor
        return t_model.float() / scale

    def _cosine(self, x0: torch.Tensor, g: torch.Generator | None):
        n = x0.shape[0]
        # t first, then noise: the course's order of draws.
        t = torch.rand(n, generator=g, device=x0.device, dtype=x0.dtype).clamp(0, T_MAX)
        noise = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
        ab = alpha_bar(t).view(-1, *([1] * (x0.dim() - 1)))
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        return (x_t, t * self.t_factor), noise

    def _ddim(self, x0: torch.Tensor, g: torch.Generator | None):
        n = x0.shape[0]
        t = torch.randint(0, self.spec.num_train_timesteps, (n,), generator=g, device=x0.device)
        noise = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
        x_t = self.scheduler.add_noise(x0, noise, t)
        return (x_t, t), noise
