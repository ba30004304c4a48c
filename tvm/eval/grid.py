"""Sample grids as PNG files."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def image_grid(images: torch.Tensor, cols: int | None = None, upscale: int = 1) -> np.ndarray:
    """uint8 ``[N, C, H, W]`` (C = 1 or 3) → one uint8 image ``[rows·H, cols·W, C]``."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images [N, 1|3, H, W], got {images.dtype} {list(images.shape)}")
    n, c, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = torch.zeros(rows * cols, c, h, w, dtype=torch.uint8)
    canvas[:n] = images
    grid = canvas.reshape(rows, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c)
    if upscale > 1:
        grid = grid.repeat_interleave(upscale, 0).repeat_interleave(upscale, 1)
    return grid.numpy()


def save_image_grid(images: torch.Tensor, path: str | Path, cols: int | None = None, upscale: int = 1) -> Path:
    """Write :func:`image_grid` as a PNG (grayscale for one channel)."""
    grid = image_grid(images, cols, upscale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path
