"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_vae():
    """A randomly initialised AutoencoderKL with the SD VAE's shape: 4 levels (x8), 4 latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        norm_num_groups=4,
        latent_channels=4,
        sample_size=64,
    )
    return model.eval()


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tests made of many tiny ops.

    On a 2-core machine shared with other work, OpenMP's spin-waiting second thread made such
    tests up to 15x slower; the previous setting is restored afterwards.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
