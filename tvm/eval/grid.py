"""Sample grids and the real-data reference grid as PNG files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, TypedDict

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


def grid_classes(n: int, num_classes: int) -> list[int] | None:
    """Classes of the ``n`` images of a class-conditional grid: ``i % num_classes`` (one class per
    column with :func:`grid_layout`); None for unconditional models (``num_classes == 0``)."""
    return [i % num_classes for i in range(n)] if num_classes else None


class GridLayout(TypedDict):
    """Keyword arguments of :func:`save_image_grid` (all but the images and the path)."""

    cols: int | None
    upscale: int


def grid_layout(n: int, num_classes: int, side: int) -> GridLayout:
    """``save_image_grid`` arguments for ``n`` images of ``side`` pixels: a column per class
    (square grid when unconditional), small images enlarged to at least 64 pixels."""
    return {"cols": min(n, num_classes) if num_classes else None, "upscale": max(1, 64 // side)}


def reference_indices(dataset: Any, n: int, num_classes: int, seed: int = 0, max_scan: int = 200_000) -> list[int]:
    """Indices of ``n`` real items for a reference grid laid out like the sample grids.

    Items are visited in a seeded random order; slot ``i`` takes the first unused item of class
    ``i % num_classes`` (any item when ``num_classes`` is 0). Slots whose class was not met within
    ``max_scan`` items take other visited items, so the grid is always full (if the dataset has
    ``n`` items).
    """
    order = np.random.default_rng(seed).permutation(len(dataset))[:max_scan]
    wanted = grid_classes(n, num_classes)
    if wanted is None:
        return [int(i) for i in order[:n]]
    slots: list[int | None] = [None] * n
    open_slots: dict[int, list[int]] = {}
    for slot, cls in enumerate(wanted):
        open_slots.setdefault(cls, []).append(slot)
    unused: list[int] = []
    for index in order:
        cls = int(np.argmax(dataset.get_label(int(index))))
        if open_slots.get(cls):
            slots[open_slots[cls].pop(0)] = int(index)
            if not any(open_slots.values()):
                break
        elif len(unused) < n:
            unused.append(int(index))
    filled = [s if s is not None else (unused.pop(0) if unused else None) for s in slots]
    return [s for s in filled if s is not None]


@torch.no_grad()
def save_reference_grid(
    dataset: Any,
    encoder: Any,
    folder: str | Path,
    n: int,
    num_classes: int,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> Path:
    """Write ``<folder>/reference.png``, a grid of real training items beside the sample grids.

    The items (:func:`reference_indices`) go through the same path as the training data and the
    samples: ``encoder.encode`` (a posterior sample for latent datasets, drawn from a generator
    seeded with ``seed``, so the global random state is untouched) then ``encoder.decode``, the
    decoder of the sample grids; the layout is :func:`grid_layout`'s. An existing file is kept
    (a resumed run does not redo it). Returns the path.
    """
    path = Path(folder) / "reference.png"
    if path.exists():
        return path
    indices = reference_indices(dataset, n, num_classes, seed)
    items = torch.stack([torch.as_tensor(np.asarray(dataset[i][0])) for i in indices]).to(device)
    generator = torch.Generator(device=torch.device(device)).manual_seed(seed)
    images = encoder.decode(encoder.encode(items, generator=generator)).cpu()
    return save_image_grid(images, path, **grid_layout(len(indices), num_classes, images.shape[-1]))
