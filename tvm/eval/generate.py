"""Image generation from a trained network, reproducible per image index.

Image ``i`` of a run with seed ``seed`` always gets the same noise (a generator seeded with
``(seed, i)``) and the same class (drawn the same way), so a sample set does not depend on the
number of GPUs or the batch size: rank ``r`` of ``W`` simply generates the indices ``i ≡ r (mod W)``
(this fixes upstream's world-size-dependent FID, docs/method.md §11 item 15).

:func:`generate_to` is the library behind ``scripts/generate.py`` (a working replacement for
upstream's broken ``generate_images.py``, docs/method.md §11 item 12): it shards a list of image indices
over ranks in global batches and writes a PNG folder (every rank its own files) or one ``.npz``
streamed by rank 0, so the output does not depend on the number of processes either.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from tvm.data.encoders import Encoder
from tvm.method.sampler import sample
from tvm.method.wrapper import TVMWrapper
from tvm.progress import progress_bar
from tvm.runtime import distributed

LABEL_MODES = ("uniform", "empirical")


def image_seed(seed: int, index: int) -> int:
    """A 63-bit seed for image ``index`` of a run seeded ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def image_noise(
    indices: Sequence[int], shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Standard normal noise ``[len(indices), *shape]`` fp32, one generator per image index."""
    out = torch.empty((len(indices), *shape), dtype=torch.float32)
    for row, index in enumerate(indices):
        gen = torch.Generator().manual_seed(image_seed(seed, index))
        out[row] = torch.randn(shape, generator=gen)
    return out.to(device)


def image_classes(
    indices: Sequence[int], num_classes: int, seed: int, mode: str = "uniform", class_probs: np.ndarray | None = None
) -> np.ndarray:
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


def one_hot(
    classes: Sequence[int] | np.ndarray, num_classes: int, device: torch.device | str = "cpu"
) -> torch.Tensor | None:
    """Float one-hot ``[N, num_classes]``; None for an unconditional model."""
    if num_classes == 0:
        return None
    return torch.nn.functional.one_hot(torch.as_tensor(np.asarray(classes)), num_classes).float().to(device)


@torch.no_grad()
def generate_images(
    net: TVMWrapper,
    encoder,
    indices: Sequence[int],
    *,
    steps: int,
    guidance: float,
    seed: int,
    classes: Sequence[int] | np.ndarray | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
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
        chunk = list(indices[start : start + batch_size])
        z = image_noise(chunk, shape, seed, device)
        labels = one_hot(classes[start : start + batch_size], model.num_classes, device)
        latents = sample(net, z, labels, steps=steps, guidance=guidance)
        out.append(encoder.decode(latents.to(torch.float32)).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.uint8)


# ------------------------------------------------------------------------------ command-line helpers


def parse_index_ranges(text: str) -> list[int]:
    """``"0-3,10,20-21"`` → ``[0, 1, 2, 3, 10, 20, 21]`` (inclusive ranges, order kept).

    ValueError for a malformed item (negative numbers included), a descending range or a
    repeated index (two images would share one output file).
    """
    out: list[int] = []
    for item in text.split(","):
        item = item.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if match is None:
            raise ValueError(f"bad index range {item!r} in {text!r}; use e.g. 0-49999 or 0-9,20,30-39")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise ValueError(f"descending range {item!r} in {text!r}")
        out.extend(range(low, high + 1))
    if len(set(out)) != len(out):
        raise ValueError(f"index list {text!r} repeats an index")
    return out


def parse_classes(text: str, num_classes: int) -> list[int]:
    """``"1,2,3"`` → ``[1, 2, 3]``, each checked against the model's ``num_classes``."""
    if num_classes == 0:
        raise ValueError("the network is unconditional (label_dim 0): it takes no classes")
    try:
        classes = [int(item) for item in text.split(",")]
    except ValueError:
        raise ValueError(f"bad class list {text!r}; use comma-separated integers, e.g. 1,2,3") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"classes {bad} are outside [0, {num_classes})")
    return classes


def default_cfg_scale(sampling: Mapping[str, Any], steps: int) -> float:
    """Guidance scale of the config's sampler with ``steps`` steps, else of its first sampler, else 1.

    ``sampling`` is a config's ``sampling`` section (``{name: {num_steps, cfg_scale}}``, docs/method.md §4).
    """
    entries = list(sampling.values())
    for entry in entries:
        if entry["num_steps"] == steps:
            return float(entry["cfg_scale"])
    return float(entries[0]["cfg_scale"]) if entries else 1.0


def decoded_resolution(net: TVMWrapper, encoder: Encoder) -> int:
    """Side of the images ``encoder`` decodes from ``net``'s samples (:meth:`Encoder.decoded_resolution`)."""
    return encoder.decoded_resolution(net.model.input_size)


# ------------------------------------------------------------------------------ writers

IMAGE_NAME = re.compile(r"\d{6,}\.png")  # what PngFolderWriter writes


def check_output(out: str | os.PathLike[str], force: bool) -> list[Path]:
    """Refuse an output that already exists unless ``force`` (collective: rank 0 looks, every rank
    raises its error). An existing ``.npz`` is replaced when the new one is complete; a folder that
    holds anything would mix old and new images. Returns the folder's old images (``NNNNNN.png``),
    which the caller deletes before writing when ``force`` is given; other files are left alone."""
    error: Exception | None = None
    stale: list[Path] = []
    if distributed.is_main():
        out = Path(out)
        try:
            if out.suffix == ".npz" and out.is_dir():
                raise IsADirectoryError(f"{out} is a folder, not an .npz file")
            if out.suffix != ".npz" and out.exists() and not out.is_dir():
                raise NotADirectoryError(f"{out} exists and is not a folder (name an .npz file or a folder)")
            existing = out.exists() and (out.suffix == ".npz" or any(out.iterdir()))
            if existing and not force:
                what = "exists" if out.suffix == ".npz" else "is a folder that already holds files (images would mix)"
                raise FileExistsError(f"{out} {what}; pass --force to overwrite, or choose another --out")
            if existing and out.is_dir():
                stale = sorted(path for path in out.iterdir() if IMAGE_NAME.fullmatch(path.name))
        except OSError as exc:
            error = exc
    distributed.raise_on_every_rank(error, lambda message, _errno: FileExistsError(message))
    return stale


class PngFolderWriter:
    """``<folder>/<index:06d>.png`` per image; every rank writes its own images."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.path = Path(folder)
        self.path.mkdir(parents=True, exist_ok=True)

    def write(self, indices: Sequence[int], images: torch.Tensor) -> None:
        """Write uint8 ``[N, C, H, W]`` images (C = 1 or 3) for image ``indices``."""
        for index, image in zip(indices, images.permute(0, 2, 3, 1).numpy()):
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(self.path / f"{index:06d}.png")

    def close(self) -> Path:
        return self.path


class NpzWriter:
    """One ``.npz`` with ``images`` uint8 ``[N, H, W, C]``, ``seeds`` int64 ``[N]`` (the image
    indices) and, for conditional models, ``labels`` int64 ``[N]``.

    Rank 0 streams the images into the archive in order (memory: one global batch), writing to a
    temporary file renamed at :meth:`close`, so an interrupted run leaves no partial ``.npz``.
    """

    def __init__(self, path: str | os.PathLike[str], indices: Sequence[int], labels: np.ndarray | None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.temp = self.path.with_name(f".{self.path.name}.tmp")
        self.total = len(indices)
        self.written = 0
        self._zip = zipfile.ZipFile(self.temp, "w", zipfile.ZIP_STORED, allowZip64=True)
        self._write_array("seeds", np.asarray(indices, dtype=np.int64))
        if labels is not None:
            self._write_array("labels", np.asarray(labels, dtype=np.int64))
        self._images: Any = None

    def _write_array(self, name: str, array: np.ndarray) -> None:
        with self._zip.open(f"{name}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, array, allow_pickle=False)

    def write(self, indices: Sequence[int], images: torch.Tensor) -> None:
        """Append uint8 ``[N, C, H, W]`` images (in the order of the index list)."""
        batch = np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy())
        if self._images is None:
            self._images = self._zip.open("images.npy", "w", force_zip64=True)
            header = {
                "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                "fortran_order": False,
                "shape": (self.total, *batch.shape[1:]),
            }
            np.lib.format.write_array_header_2_0(self._images, header)
        self._images.write(batch.tobytes())
        self.written += len(batch)

    def close(self) -> Path:
        if self.written != self.total:
            raise RuntimeError(f"{self.path}: wrote {self.written} of {self.total} images")
        self._images.close()
        self._zip.close()
        os.replace(self.temp, self.path)
        return self.path


def generate_to(
    net: TVMWrapper,
    encoder: Any,
    indices: Sequence[int],
    out: str | os.PathLike[str],
    *,
    steps: int,
    guidance: float,
    seed: int = 0,
    classes: Sequence[int] | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> Path:
    """Generate the images ``indices`` (seeds ``(seed, index)``) into a PNG folder or an ``.npz``.

    Sharding (docs/method.md §4 sampler, any world size): the index list is cut into global batches of
    ``batch_size × world`` positions and rank ``r`` generates positions ``r, r + W, …`` of each;
    for an ``.npz`` the batches are gathered to rank 0 and written in list order. ``classes``:
    image at list position ``p`` gets ``classes[p % len(classes)]``; None draws them uniformly per
    index (:func:`image_classes`). Every rank must call this; returns the output path.
    """
    rank, world = distributed.get_rank(), distributed.get_world_size()
    num_classes = net.model.num_classes
    if classes is not None:
        labels = np.asarray([classes[p % len(classes)] for p in range(len(indices))], dtype=np.int64)
    else:
        labels = image_classes(indices, num_classes, seed)
    out = Path(out)
    writer: NpzWriter | PngFolderWriter | None
    if out.suffix == ".npz":
        writer = NpzWriter(out, indices, labels if num_classes else None) if rank == 0 else None
    else:
        writer = PngFolderWriter(out)
    gather = out.suffix == ".npz"
    global_batch = batch_size * world
    bar = progress_bar(total=len(indices), unit="img", desc="generate", disable=not progress or rank != 0)
    for start in range(0, len(indices), global_batch):
        positions = list(range(start, min(start + global_batch, len(indices))))[rank::world]
        mine = [indices[p] for p in positions]
        images = generate_images(
            net,
            encoder,
            mine,
            steps=steps,
            guidance=guidance,
            seed=seed,
            classes=labels[positions],
            batch_size=batch_size,
            device=device,
        )
        if gather:
            count = min(global_batch, len(indices) - start)
            gathered = distributed.gather_interleaved(images, count, dst=0)
            if writer is not None:
                assert gathered is not None  # the writer's rank 0 is dst
                writer.write(indices[start : start + count], gathered)
        elif mine:
            assert writer is not None  # every rank writes its PNGs
            writer.write(mine, images)
        bar.update(min(global_batch, len(indices) - start))
    bar.close()
    distributed.barrier()
    path = writer.close() if writer is not None else out
    distributed.barrier()
    return path
