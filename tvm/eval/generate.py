"""Image generation from a trained network, reproducible per image index.

Image ``i`` of a run with seed ``seed`` always gets the same noise (a generator seeded with
``(seed, i)``) and the same class (drawn the same way), so a sample set does not depend on the
number of GPUs or the batch size: rank ``r`` of ``W`` simply generates the indices ``i ≡ r (mod W)``
(this fixes upstream's world-size-dependent FID, TVM.md §11 item 15).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tvm.method.sampler import sample
from tvm.method.wrapper import TVMWrapper

LABEL_MODES = ("uniform", "empirical")


def image_seed(seed: int, index: int) -> int:
    """A 63-bit seed for image ``index`` of a run seeded ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def image_noise(indices: Sequence[int], shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu"
                ) -> torch.Tensor:
    """Standard normal noise ``[len(indices), *shape]`` fp32, one generator per image index."""
    out = torch.empty((len(indices), *shape), dtype=torch.float32)
    for row, index in enumerate(indices):
        gen = torch.Generator().manual_seed(image_seed(seed, index))
        out[row] = torch.randn(shape, generator=gen)
    return out.to(device)


def image_classes(indices: Sequence[int], num_classes: int, seed: int, mode: str = "uniform",
                  class_probs: np.ndarray | None = None) -> np.ndarray:
    """Class index per image: uniform (default) or the training set's label frequencies."""
    if mode not in LABEL_MODES:
        raise ValueError(f"unknown label mode {mode!r}; allowed: {', '.join(LABEL_MODES)}")
    if num_classes == 0:
        return np.zeros(len(indices), dtype=np.int64)
    if mode == "empirical" and class_probs is None:
        raise ValueError("label mode 'empirical' needs the training set's class frequencies")
    out = np.empty(len(indices), dtype=np.int64)
    for row, index in enumerate(indices):
        rng = np.random.default_rng([seed, index, 1])
        out[row] = rng.integers(num_classes) if mode == "uniform" else rng.choice(num_classes, p=class_probs)
    return out


def one_hot(classes: Sequence[int] | np.ndarray, num_classes: int, device: torch.device | str = "cpu"
            ) -> torch.Tensor | None:
    """Float one-hot ``[N, num_classes]``; None for an unconditional model."""
    if num_classes == 0:
        return None
    return torch.nn.functional.one_hot(torch.as_tensor(np.asarray(classes)), num_classes).float().to(device)


@torch.no_grad()
def generate_images(net: TVMWrapper, encoder, indices: Sequence[int], *, steps: int, cfg: float, seed: int,
                    classes: Sequence[int] | np.ndarray | None = None, batch_size: int = 64,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 images for the given indices (noise from :func:`image_noise`, classes given or uniform).

    Returns ``[N, C_img, H, W]`` uint8 on the CPU.
    """
    model = net.model
    shape = (model.in_channels, model.input_size, model.input_size)
    if classes is None:
        classes = image_classes(indices, model.num_classes, seed)
    classes = np.asarray(classes)
    out = []
    for start in range(0, len(indices), batch_size):
        chunk = list(indices[start:start + batch_size])
        z = image_noise(chunk, shape, seed, device)
        labels = one_hot(classes[start:start + batch_size], model.num_classes, device)
        latents = sample(net, z, labels, steps=steps, cfg=cfg)
        out.append(encoder.decode(latents.to(torch.float32)).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.uint8)
