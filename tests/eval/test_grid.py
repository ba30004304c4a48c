"""Sample-grid layout and the real-data reference grid (tvm/eval/grid.py), also through a tiny run."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from helpers import QUICK_TINY
from tvm.config import compose_config
from tvm.data.digits import DigitsDataset
from tvm.data.encoders import PixelEncoder
from tvm.eval.grid import grid_classes, grid_layout, image_grid, reference_indices, save_reference_grid
from tvm.train.loop import run


class _TwoClasses(torch.utils.data.Dataset):
    """20 items of classes 0 and 1 only (label_dim 3), item i filled with the value i."""

    def __len__(self) -> int:
        return 20

    def __getitem__(self, i: int):
        return np.full((1, 4, 4), i, dtype=np.uint8), self.get_label(i)

    def get_label(self, i: int) -> np.ndarray:
        return np.eye(3, dtype=np.float32)[i % 2]


class _LatentLike:
    """Stands in for the SD-VAE: 8-channel moments -> 4 noisy channels -> 3-channel pixels, twice the size."""

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(x[:, :4].shape, generator=generator)
        return x[:, :4].float() + 0.01 * noise

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        pixels = (z[:, :3] * 10).clamp(0, 255).to(torch.uint8)
        return pixels.repeat_interleave(2, -1).repeat_interleave(2, -2)


def test_layout_one_class_per_column() -> None:
    assert grid_classes(12, 5) == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1] and grid_classes(4, 0) is None
    assert grid_layout(40, 10, 8) == {"cols": 10, "upscale": 8}
    assert grid_layout(16, 1000, 256) == {"cols": 16, "upscale": 1}
    assert grid_layout(16, 0, 32) == {"cols": None, "upscale": 2}


def test_reference_items_follow_the_sample_grid_classes() -> None:
    digits = DigitsDataset("train")
    picks = reference_indices(digits, 40, 10, seed=0)
    assert len(set(picks)) == 40
    assert [int(digits.get_label(i).argmax()) for i in picks] == [i % 10 for i in range(40)]
    assert picks == reference_indices(digits, 40, 10, seed=0) != reference_indices(digits, 40, 10, seed=1)
    unconditional = reference_indices(digits, 16, 0)
    assert len(set(unconditional)) == 16
    # class 2 never occurs: its slots take other items, so the grid is still full
    picks = reference_indices(_TwoClasses(), 6, 3)
    assert len(set(picks)) == 6 and [p % 2 for p in picks[:2]] == [0, 1] and [p % 2 for p in picks[3:5]] == [0, 1]


def test_reference_grid_of_pixel_data_is_the_real_images(tmp_path) -> None:
    digits = DigitsDataset("train")
    state = torch.get_rng_state()
    path = save_reference_grid(digits, PixelEncoder(), tmp_path / "samples", 40, 10)
    assert path == tmp_path / "samples" / "reference.png" and torch.equal(torch.get_rng_state(), state)
    real = torch.stack([torch.from_numpy(digits[i][0]) for i in reference_indices(digits, 40, 10)])
    expected = image_grid(real, cols=10, upscale=8)[..., 0]  # decode(encode(x)) == x for pixel data
    assert np.array_equal(np.asarray(Image.open(path)), expected)
    path.write_bytes(b"kept")  # an existing grid (a resumed run) is not redone
    assert save_reference_grid(digits, PixelEncoder(), tmp_path / "samples", 40, 10).read_bytes() == b"kept"


def test_reference_grid_of_latents_goes_through_the_decoder(tmp_path) -> None:
    class Latents(_TwoClasses):
        def __getitem__(self, i: int):
            return np.full((8, 4, 4), i, dtype=np.float32), self.get_label(i)

    state = torch.get_rng_state()
    path = save_reference_grid(Latents(), _LatentLike(), tmp_path, 4, 2, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the posterior noise comes from its own generator
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 8 * 8, 2 * 8 * 8, 3)  # 4 decoded 8x8 RGB images, 2 columns, enlarged 8x
    picks = reference_indices(Latents(), 4, 2, seed=3)
    assert abs(int(grid[0, 0, 0]) - 10 * picks[0]) <= 1  # item value x10 by the decoder


def test_tiny_run_writes_the_reference_grid_and_the_curves(tmp_path) -> None:
    cfg = compose_config(
        "tiny",
        QUICK_TINY
        + [f"run_dir={tmp_path}", "training.do_log_image=true", "training.total_ticks=2", "training.num_samples=20"],
    )
    run(cfg)
    reference = Image.open(tmp_path / "samples" / "reference.png")
    sample = Image.open(tmp_path / "samples" / "1_step-tick000002.png")
    assert reference.size == sample.size == (10 * 64, 2 * 64)  # 20 digits, a class per column, 8x enlarged
    curves = Image.open(tmp_path / "training_curves.png")
    assert curves.size == (3 * 420, 2 * 270)
