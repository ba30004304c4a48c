"""Fixtures shared by the data tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SD-VAE-shaped AutoencoderKL (4 down/up blocks, 4 latent channels, factor 8), tiny widths,
    saved with ``save_pretrained`` so the loading-by-directory path is exercised."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    path = tmp_path_factory.mktemp("vae") / "tiny-sd-vae"
    vae.save_pretrained(path)
    return path
