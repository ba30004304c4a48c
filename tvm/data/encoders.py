"""Data encoders: identity for pixel models and the SD-VAE with latent normalisation (docs/method.md §6.3).

An encoder maps dataset items to the network's space and back:

* ``encode(x, generator=None) -> float32 [B, C', H', W']`` — called on every training batch;
* ``decode(z) -> uint8 [B, 3|1, H, W]`` — called on generated samples (sample grids, FID);
* ``latent_shape(item_shape) -> (C', H', W')`` — what ``encode`` makes of a dataset item, i.e. the
  network's input shape;
* ``decoded_resolution(latent_resolution) -> int`` — the side of ``decode``'s images.

:class:`Encoder` states this protocol; the shape rules live only here (the SD-VAE's ×8 included).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

__all__ = [
    "Encoder",
    "PixelEncoder",
    "StabilityVAEEncoder",
    "build_encoder",
    "ENCODERS",
    "RAW_MEAN_256",
    "RAW_STD_256",
    "RAW_MEAN_512",
    "RAW_STD_512",
]

# Raw SD-VAE (ft-ema) latent statistics of ImageNet used by the TVM configs (docs/method.md §6.3).
RAW_MEAN_256 = (0.86488, -0.27787343, 0.21616915, 0.3738409)
RAW_STD_256 = (4.85503674, 5.31922414, 3.93725398, 3.9870003)
RAW_MEAN_512 = (1.56, -0.695, 0.483, 0.729)
RAW_STD_512 = (5.27, 5.91, 4.21, 4.31)


class Encoder(Protocol):
    """What the training loop, the sampler and the metrics use of an encoder (module docstring)."""

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def decode(self, z: torch.Tensor) -> torch.Tensor: ...

    def latent_shape(self, item_shape: Sequence[int]) -> tuple[int, int, int]: ...

    def decoded_resolution(self, latent_resolution: int) -> int: ...


class PixelEncoder:
    """Identity encoder for pixel-space models (e.g. the embedded digits).

    ``encode``: ``uint8 [B, C, H, W] -> float32 x / 127.5 − 1`` in ``[-1, 1]``.
    ``decode``: ``float [B, C, H, W] -> uint8 floor((z + 1)·127.5 + 0.5)`` clamped to
    ``[0, 255]``, i.e. round half up; ``decode(encode(x)) == x`` exactly for uint8 ``x``.
    """

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``generator`` is accepted for interface parity and unused (no randomness)."""
        return x.to(torch.float32) / 127.5 - 1

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        y = (z.to(torch.float32) + 1) * 127.5
        return torch.floor(y + 0.5).clamp(0, 255).to(torch.uint8)

    def latent_shape(self, item_shape: Sequence[int]) -> tuple[int, int, int]:
        """``encode``'s output shape ``(C, H, W)`` for items of shape ``(C, H, W)``: the same."""
        channels, height, width = item_shape
        return int(channels), int(height), int(width)

    def decoded_resolution(self, latent_resolution: int) -> int:
        """Side of the decoded images: the network's own resolution."""
        return int(latent_resolution)


def _channel_vector(value: float | Sequence[float], name: str) -> torch.Tensor:
    vec = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
    if vec.numel() not in (1, 4):
        raise ValueError(f"{name} must be a scalar or 4 per-channel values, got {vec.numel()}")
    return vec.expand(4).clone()


class StabilityVAEEncoder:
    """SD-VAE (diffusers ``AutoencoderKL``) encoder with TVM's latent normalisation (docs/method.md §6.3).

    Normalisation, per latent channel ``k`` (float32)::

        scale_k = final_std_k / raw_std_k,   bias_k = final_mean_k − raw_mean_k · scale_k
        z = z_raw · scale + bias             (= (z_raw − raw_mean) / raw_std for 0/1 finals)

    The SD scaling factor 0.18215 is not used.

    Args:
        vae_name: Hugging Face model id (``stabilityai/sd-vae-ft-ema`` for the TVM configs) or a
            local directory written by ``AutoencoderKL.save_pretrained``.
        raw_mean, raw_std: raw latent statistics (default: the 256-px values of §6.3).
        final_mean, final_std: target statistics (0 and 1 in every TVM config).
        use_fp16: run the VAE in fp16 on CUDA (always fp32 on CPU).
        batch_size: VAE batch size for encoding pixels and decoding.
        cache_dir: Hugging Face cache directory (default: ``HF_HOME``/``HF_HUB_CACHE``).
        local_files_only: never contact the Hub (default: the ``HF_HUB_OFFLINE`` setting).

    The VAE is loaded lazily on first use, onto the device of the first tensor it sees.
    """

    def __init__(
        self,
        vae_name: str = "stabilityai/sd-vae-ft-ema",
        raw_mean: float | Sequence[float] = RAW_MEAN_256,
        raw_std: float | Sequence[float] = RAW_STD_256,
        final_mean: float | Sequence[float] = 0.0,
        final_std: float | Sequence[float] = 1.0,
        use_fp16: bool = True,
        batch_size: int = 8,
        cache_dir: str | None = None,
        local_files_only: bool | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        raw_std_vec = _channel_vector(raw_std, "raw_std")
        if not bool((raw_std_vec > 0).all()):
            raise ValueError(f"raw_std must be positive, got {raw_std_vec.tolist()}")
        self.vae_name = os.fspath(vae_name)
        self.use_fp16 = use_fp16
        self.batch_size = int(batch_size)
        self.cache_dir = cache_dir
        self.local_files_only = local_files_only
        self.scale = _channel_vector(final_std, "final_std") / raw_std_vec
        self.bias = _channel_vector(final_mean, "final_mean") - _channel_vector(raw_mean, "raw_mean") * self.scale
        self._vae: Any = None
        self._vae_placement: tuple[torch.device, torch.dtype] | None = None

    # ------------------------------------------------------------------ VAE handling
    def _load_vae(self, dtype: torch.dtype) -> Any:
        from diffusers import AutoencoderKL

        if os.path.isdir(self.vae_name):
            return AutoencoderKL.from_pretrained(self.vae_name, torch_dtype=dtype)
        offline = self.local_files_only
        if offline is None:
            offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        try:
            return AutoencoderKL.from_pretrained(
                self.vae_name, cache_dir=self.cache_dir, local_files_only=offline, torch_dtype=dtype
            )
        except (OSError, ValueError) as e:
            cache = (
                self.cache_dir
                or os.environ.get("HF_HUB_CACHE")
                or os.path.join(
                    os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub"
                )
            )
            raise RuntimeError(
                f"could not load the VAE {self.vae_name!r}: not found locally and not downloadable ({e}). "
                f"Either download it where the Hub is reachable into the Hugging Face cache ({cache}; set "
                f"HF_HOME or HF_HUB_CACHE to choose it), e.g. `huggingface-cli download {self.vae_name}`, "
                f"or pass vae_name=<local directory written by AutoencoderKL.save_pretrained>."
            ) from e

    def _vae_dtype(self, device: torch.device) -> torch.dtype:
        return torch.float16 if self.use_fp16 and device.type == "cuda" else torch.float32

    def vae(self, device: torch.device | str = "cpu") -> Any:
        """The ``AutoencoderKL`` in eval mode on ``device`` (loaded on first call, in fp16 on CUDA
        when ``use_fp16``, else fp32; moved when a later call names another device).

        Loading runs under a forked CPU RNG: without ``accelerate`` diffusers randomly
        initialises the module before loading weights (docs/method.md §3.8), which would otherwise
        shift the caller's global random stream.
        """
        device = torch.device(device)
        dtype = self._vae_dtype(device)
        if self._vae is None:
            with torch.random.fork_rng(devices=[]):
                self._vae = self._load_vae(dtype).eval().requires_grad_(False)
            self._vae_placement = (torch.device("cpu"), dtype)
        assert self._vae_placement is not None  # set with the VAE
        if self._vae_placement != (device, dtype):
            if self._vae_placement[1] == dtype:
                self._vae.to(device=device)
            else:
                self._vae.to(device=device, dtype=dtype)
            self._vae_placement = (device, dtype)
        return self._vae

    # ------------------------------------------------------------------ normalisation
    def _affine(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1)
        return self.scale.to(z.device).reshape(shape), self.bias.to(z.device).reshape(shape)

    def normalize(self, z_raw: torch.Tensor) -> torch.Tensor:
        """``z = z_raw · scale + bias`` in float32; ``[B, 4, h, w]``."""
        scale, bias = self._affine(z_raw)
        return z_raw.to(torch.float32) * scale + bias

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """``z_raw = (z − bias) / scale`` in float32; ``[B, 4, h, w]``."""
        scale, bias = self._affine(z)
        return (z.to(torch.float32) - bias) / scale

    @staticmethod
    def sample_posterior(moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean + N(0, 1)·std`` from ``[B, 8, h, w]`` moments (mean ‖ std); float32 ``[B, 4, h, w]``."""
        mean, std = moments.to(torch.float32).chunk(2, dim=1)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        return mean + noise * std

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def encode_moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """Posterior moments of uint8 pixels ``[B, 3, H, W]`` → float32 ``[B, 8, H/8, W/8]`` (mean ‖ std).

        Pixels are mapped to ``x/127.5 − 1`` and run through the VAE encoder in batches.
        """
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected RGB pixels [B, 3, H, W], got {list(pixels.shape)}")
        vae = self.vae(pixels.device)
        dtype = self._vae_dtype(pixels.device)
        out = []
        for chunk in pixels.split(self.batch_size):
            x = (chunk.to(torch.float32) / 127.5 - 1).to(dtype)
            dist = vae.encode(x).latent_dist
            out.append(torch.cat([dist.mean, dist.std], dim=1).to(torch.float32))
        return torch.cat(out)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training-batch encoding (docs/method.md §6.3), float32 ``[B, 4, h, w]``.

        * 8 channels (latent dataset item, mean ‖ std): ``z = normalize(mean + ε·std)``;
        * 3 channels (uint8 pixels): posterior moments from the VAE, then the same.

        ``ε ~ N(0, 1)`` is drawn from ``generator`` (on ``x``'s device) when given.
        """
        if x.ndim != 4 or x.shape[1] not in (3, 8):
            raise ValueError(f"expected [B, 8, h, w] latent moments or [B, 3, H, W] pixels, got {list(x.shape)}")
        moments = self.encode_moments(x) if x.shape[1] == 3 else x
        return self.normalize(self.sample_posterior(moments, generator))

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents → uint8 RGB ``[B, 3, 8h, 8w]`` (docs/method.md §6.3).

        * 4 channels (normalised latents): ``z_raw = denormalize(z)`` in float32;
        * 8 channels (raw mean ‖ std of a latent dataset item): a posterior sample is decoded;
        * 3 channels: returned unchanged (already pixels).

        The VAE decodes in batches (fp16 on CUDA when ``use_fp16``); the output
        ``(y·0.5 + 0.5).clamp(0, 1)·255`` is cast to uint8 by truncation, as upstream does.
        """
        if z.ndim != 4 or z.shape[1] not in (3, 4, 8):
            raise ValueError(f"expected [B, 4|8, h, w] latents or [B, 3, H, W] pixels, got {list(z.shape)}")
        if z.shape[1] == 3:
            return z
        z_raw = self.denormalize(z) if z.shape[1] == 4 else self.sample_posterior(z)
        vae = self.vae(z.device)
        dtype = self._vae_dtype(z.device)
        out = []
        for chunk in z_raw.split(self.batch_size):
            y = vae.decode(chunk.to(dtype)).sample.to(torch.float32)
            out.append(((y * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8))
        return torch.cat(out)

    DOWNSAMPLE = 8  # the SD-VAE's spatial factor: a latent pixel covers 8×8 image pixels (docs/method.md §6.3)

    def latent_shape(self, item_shape: Sequence[int]) -> tuple[int, int, int]:
        """``encode``'s output shape ``(4, h, w)`` for an item of shape ``(C, H, W)``: RGB pixels
        (C = 3) give ``h, w = H/8, W/8``; latent moments (C = 8, mean ‖ std) keep their size."""
        channels, height, width = (int(n) for n in item_shape)
        if channels == 3:
            return 4, height // self.DOWNSAMPLE, width // self.DOWNSAMPLE
        if channels == 8:
            return 4, height, width
        raise ValueError(f"StabilityVAEEncoder takes 3-channel pixels or 8-channel moments, not {channels}")

    def decoded_resolution(self, latent_resolution: int) -> int:
        """Side of the decoded RGB images: 8× the latent side."""
        return int(latent_resolution) * self.DOWNSAMPLE


ENCODERS: Mapping[str, type] = {"pixel": PixelEncoder, "sd_vae": StabilityVAEEncoder}
# Upstream class names (the last component of a dotted ``class_name``) and their encoder.
_UPSTREAM_NAMES: Mapping[str, str] = {
    "StabilityVAEEncoder": "sd_vae",
    "StandardRGBEncoder": "pixel",
    "PixelEncoder": "pixel",
}


def build_encoder(cfg: Mapping[str, Any]) -> PixelEncoder | StabilityVAEEncoder:
    """Construct an encoder from a config mapping.

    The kind is ``cfg["name"]`` (``"pixel"`` or ``"sd_vae"``) or, for configs that keep
    upstream's key, ``cfg["class_name"]`` ending in ``StabilityVAEEncoder`` or
    ``StandardRGBEncoder``; every other key is a constructor argument.
    """
    kwargs = dict(cfg)
    name = kwargs.pop("name", None)
    class_name = kwargs.pop("class_name", None)
    if name is None and class_name is not None:
        name = _UPSTREAM_NAMES.get(str(class_name).rsplit(".", 1)[-1])
        if name is None:
            raise ValueError(f"unknown encoder class_name {class_name!r}; known: {sorted(_UPSTREAM_NAMES)}")
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {sorted(ENCODERS)}")
    return ENCODERS[name](**kwargs)
