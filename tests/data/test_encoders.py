"""Pixel and SD-VAE encoders (docs/method.md §6.3) with a tiny randomly initialised AutoencoderKL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tvm.data.encoders import RAW_MEAN_256, RAW_STD_256, PixelEncoder, StabilityVAEEncoder, build_encoder

diffusers = pytest.importorskip("diffusers")

RAW_MEAN = torch.tensor(RAW_MEAN_256, dtype=torch.float32).view(1, 4, 1, 1)
RAW_STD = torch.tensor(RAW_STD_256, dtype=torch.float32).view(1, 4, 1, 1)


def _pixels(n: int = 3, res: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, res, res), generator=g, dtype=torch.uint8)


def test_pixel_encoder_round_trip() -> None:
    enc = PixelEncoder()
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    z = enc.encode(x)
    assert z.dtype == torch.float32 and z.min() == -1 and z.max() == 1
    torch.testing.assert_close(z, x.float() / 127.5 - 1, rtol=0, atol=0)
    assert torch.equal(enc.decode(z), x)
    # Round half up, clamped.
    assert enc.decode(torch.tensor([[-2.0, 1.5, 0.5 / 127.5 - 1, 0.49 / 127.5 - 1]])).tolist() == [[0, 255, 1, 0]]


def test_latent_shape_protocol() -> None:
    pixel, vae = PixelEncoder(), StabilityVAEEncoder(vae_name="unused")  # no VAE is loaded for shapes
    assert pixel.latent_shape((1, 8, 8)) == (1, 8, 8) and pixel.decoded_resolution(8) == 8
    assert vae.latent_shape((3, 256, 256)) == (4, 32, 32) and vae.latent_shape((8, 64, 64)) == (4, 64, 64)
    assert vae.decoded_resolution(32) == 256 and vae._vae is None
    with pytest.raises(ValueError, match="not 4"):
        vae.latent_shape((4, 32, 32))


def test_latent_item_normalisation_is_exact() -> None:
    enc = StabilityVAEEncoder(vae_name="unused")  # never touches the VAE for 8-channel items
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 4, 4, 4, generator=g) * 5
    zero_std = torch.cat([mean, torch.zeros_like(mean)], dim=1)
    torch.testing.assert_close(enc.encode(zero_std), (mean - RAW_MEAN) / RAW_STD, rtol=1e-6, atol=1e-6)
    # With a std, the noise is exactly N(0,1) from the given generator.
    std = torch.rand(2, 4, 4, 4, generator=g) + 0.5
    item = torch.cat([mean, std], dim=1)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    z = enc.encode(item, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z, (mean + eps * std - RAW_MEAN) / RAW_STD, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(enc.denormalize(enc.normalize(mean)), mean, rtol=1e-6, atol=1e-5)
    # final_mean / final_std: z = (z_raw - raw_mean) / raw_std * final_std + final_mean.
    enc2 = StabilityVAEEncoder(vae_name="unused", final_mean=0.5, final_std=2.0)
    torch.testing.assert_close(enc2.encode(zero_std), (mean - RAW_MEAN) / RAW_STD * 2 + 0.5, rtol=1e-6, atol=1e-5)


def test_vae_encode_decode_with_local_weights(tiny_vae_dir: Path) -> None:
    enc = StabilityVAEEncoder(vae_name=str(tiny_vae_dir), batch_size=2)
    rng_state = torch.get_rng_state()
    enc.vae("cpu")  # lazy load must leave the global RNG stream untouched
    assert torch.equal(torch.get_rng_state(), rng_state)
    ref = diffusers.AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    px = _pixels(3)
    moments = enc.encode_moments(px)
    assert moments.shape == (3, 8, 2, 2) and moments.dtype == torch.float32
    with torch.no_grad():
        dist = ref.encode(px.float() / 127.5 - 1).latent_dist
    torch.testing.assert_close(moments, torch.cat([dist.mean, dist.std], 1), rtol=1e-5, atol=1e-5)

    # Pixels go VAE -> posterior sample -> normalisation.
    z = enc.encode(px, generator=torch.Generator().manual_seed(3))
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(z, (dist.mean + eps * dist.std - RAW_MEAN) / RAW_STD, rtol=1e-5, atol=1e-5)

    # decode inverts the normalisation before the VAE, then truncates to uint8.
    z_raw = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(4))
    out = enc.decode((z_raw - RAW_MEAN) / RAW_STD)
    with torch.no_grad():
        y = ref.decode(z_raw).sample
    expected = ((y * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
    assert out.dtype == torch.uint8 and out.shape == (3, 3, 16, 16)
    # The shape protocol states what encode and decode just did (the VAE's ×8).
    assert enc.latent_shape(px.shape[1:]) == tuple(z.shape[1:]) and enc.decoded_resolution(2) == out.shape[-1]
    assert (out.int() - expected.int()).abs().max() <= 1  # fp32 round-off at truncation edges
    assert (out == expected).float().mean() > 0.99
    # 3-channel input is returned as is; 8-channel moments are sampled and decoded raw.
    assert torch.equal(enc.decode(px), px)
    zero = torch.cat([z_raw, torch.zeros_like(z_raw)], 1)
    assert (enc.decode(zero).int() - expected.int()).abs().max() <= 1


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks`:UserWarning")
def test_offline_missing_vae_error_names_model_and_cache(tmp_path: Path) -> None:
    enc = StabilityVAEEncoder("stabilityai/sd-vae-ft-ema", cache_dir=str(tmp_path / "hf"), local_files_only=True)
    with pytest.raises(RuntimeError, match=r"stabilityai/sd-vae-ft-ema.*HF_HOME") as info:
        enc.decode(torch.zeros(1, 4, 2, 2))
    assert str(tmp_path / "hf") in str(info.value)


def test_build_encoder_and_bad_inputs() -> None:
    assert isinstance(build_encoder({"name": "pixel"}), PixelEncoder)
    enc = build_encoder({"class_name": "training.encoders.StabilityVAEEncoder", "vae_name": "x", "raw_std": 2.0})
    assert isinstance(enc, StabilityVAEEncoder) and torch.equal(enc.scale, torch.full((4,), 0.5))
    with pytest.raises(ValueError, match="unknown encoder"):
        build_encoder({"name": "globals"})
    with pytest.raises(ValueError, match="raw_std must be positive"):
        StabilityVAEEncoder(raw_std=0.0)
    with pytest.raises(ValueError, match=r"\[2, 5, 4, 4\]"):
        StabilityVAEEncoder("unused").encode(torch.zeros(2, 5, 4, 4))
