"""Dataset preparation: RGB conversion with centre crops, SD-VAE encoding, latent statistics (docs/method.md §6.2).

Sub-commands (``scripts/dataset_tool.py`` is the command line)::

    convert  --source DIR|ZIP --dest OUT.zip|DIR --resolution 256 [--transform ...] [--max-images N]
    encode   --source RGB.zip --dest LATENTS.zip|DIR [--vae NAME|DIR] [--batch N] [--max-images N]
    getstats --source LATENTS.zip|DIR [--seed S] [--out STATS.json]

Layout written by ``convert``: uncompressed PNGs (``compress_level=0``) named
``NNNNN/imgNNNNNNNN.png`` (the folder is the first 5 of the 8 index digits) plus
``dataset.json``. ``encode`` writes float32 ``[8, H/8, W/8]`` arrays (posterior mean ‖ std of the
fp32 VAE) as ``NNNNN/img-mean-std-NNNNNNNN.npy`` with the labels carried over.

Labels of a source folder or zip: its ``dataset.json`` if present; otherwise, when every image
lies in a top-level sub-folder (ImageNet layout), the index of that sub-folder among the sorted
sub-folder names; otherwise none (``{"labels": null}``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from tvm.data.datasets import ImageFolderDataset, image_extensions
from tvm.progress import progress_bar

__all__ = [
    "SourceImage",
    "TRANSFORMS",
    "center_crop_dhariwal",
    "center_crop",
    "open_source",
    "convert_dataset",
    "encode_dataset",
    "latent_stats",
    "stats_path_for",
    "main",
]

_LABELS_FILE = "dataset.json"


def _archive_name(index: int, stem: str, ext: str) -> str:
    """``NNNNN/<stem>NNNNNNNN<ext>`` with the folder = first 5 of the 8 index digits."""
    digits = f"{index:08d}"
    return f"{digits[:5]}/{stem}{digits}{ext}"


# ---------------------------------------------------------------------------------- transforms
def center_crop_dhariwal(img: PIL.Image.Image, resolution: int) -> PIL.Image.Image:
    """ADM centre crop (docs/method.md §6.2): BOX-halve while the short side ≥ 2·res, BICUBIC-resize the
    short side to ``res`` (rounded), then crop the centre ``res × res``."""
    while min(img.size) >= 2 * resolution:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=PIL.Image.Resampling.BOX)
    scale = resolution / min(img.size)
    img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), resample=PIL.Image.Resampling.BICUBIC)
    left = (img.size[0] - resolution) // 2
    top = (img.size[1] - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def center_crop(img: PIL.Image.Image, resolution: int) -> PIL.Image.Image:
    """Square centre crop of side ``min(w, h)``, then LANCZOS resize to ``res × res``."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return img.resize((resolution, resolution), resample=PIL.Image.Resampling.LANCZOS)


def resize_only(img: PIL.Image.Image, resolution: int) -> PIL.Image.Image:
    """LANCZOS resize to ``res × res`` (no crop) when the size differs."""
    if img.size == (resolution, resolution):
        return img
    return img.resize((resolution, resolution), resample=PIL.Image.Resampling.LANCZOS)


TRANSFORMS: dict[str, Callable[[PIL.Image.Image, int], PIL.Image.Image]] = {
    "center-crop-dhariwal": center_crop_dhariwal,
    "center-crop": center_crop,
    "none": resize_only,
}


# ---------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class SourceImage:
    """One source image: its relative name, a loader, and its label (``None`` if unlabelled)."""

    name: str
    load: Callable[[], PIL.Image.Image]
    label: int | None


def _source_labels(names: list[str], read_json: Callable[[], bytes | None], where: str) -> dict[str, int] | None:
    raw = read_json()
    if raw is not None:
        try:
            labels = json.loads(raw)["labels"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{where}: invalid {_LABELS_FILE}: {e}") from e
        if labels is None:
            return None
        table = {str(n).replace("\\", "/"): v for n, v in labels}
        missing = [n for n in names if n not in table]
        if missing:
            raise ValueError(f"{where}: {_LABELS_FILE} has no label for {missing[0]!r}")
        bad = [n for n in names if not isinstance(table[n], int) or isinstance(table[n], bool) or table[n] < 0]
        if bad:
            raise ValueError(
                f"{where}: {_LABELS_FILE} label of {bad[0]!r} is not a non-negative int: {table[bad[0]]!r}"
            )
        return {n: int(table[n]) for n in names}
    if names and all("/" in n for n in names):
        classes = sorted({n.split("/", 1)[0] for n in names})
        index = {c: i for i, c in enumerate(classes)}
        return {n: index[n.split("/", 1)[0]] for n in names}
    return None


def _open_pil(data: bytes, where: str) -> PIL.Image.Image:
    try:
        img = PIL.Image.open(io.BytesIO(data))
        img.load()
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: cannot decode image: {e}") from e
    return img


class _ZipMembers:
    """Reads the members of one zip through a single handle, opened on first use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None

    def read(self, name: str) -> bytes:
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.path)
        return self._zip.read(name)


def open_source(source: str | os.PathLike[str], max_images: int | None = None) -> list[SourceImage]:
    """List the images of a folder (recursive) or zip, sorted by relative name, with labels."""
    source = Path(source)
    exts = image_extensions()
    if source.is_dir():
        names = sorted(
            p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file() and p.suffix.lower() in exts
        )

        def read_json() -> bytes | None:
            path = source / _LABELS_FILE
            return path.read_bytes() if path.is_file() else None

        def loader(name: str) -> Callable[[], PIL.Image.Image]:
            return lambda: _open_pil((source / name).read_bytes(), str(source / name))

    elif source.is_file():
        try:
            with zipfile.ZipFile(source) as z:
                members = z.namelist()
        except zipfile.BadZipFile as e:
            raise ValueError(f"{source}: not a valid zip archive (corrupt or truncated): {e}") from e
        names = sorted(n for n in members if not n.endswith("/") and os.path.splitext(n)[1].lower() in exts)

        archive = _ZipMembers(source)

        def read_json() -> bytes | None:
            return archive.read(_LABELS_FILE) if _LABELS_FILE in members else None

        def loader(name: str) -> Callable[[], PIL.Image.Image]:
            return lambda: _open_pil(archive.read(name), f"{source}:{name}")

    else:
        raise FileNotFoundError(f"{source}: source does not exist")
    if not names:
        raise ValueError(f"{source}: no images found")
    labels = _source_labels(names, read_json, str(source))
    if max_images is not None:
        names = names[:max_images]
    return [SourceImage(n, loader(n), None if labels is None else labels[n]) for n in names]


# ---------------------------------------------------------------------------------- writers
class _Writer:
    """Writes files into a directory or an uncompressed zip, atomically at close."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.is_zip = dest.suffix.lower() == ".zip"
        if self.is_zip:
            dest.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = dest.with_name(dest.name + ".tmp")
            self._zip: zipfile.ZipFile | None = zipfile.ZipFile(self._tmp, "w", compression=zipfile.ZIP_STORED)
        else:
            dest.mkdir(parents=True, exist_ok=True)
            self._zip = None

    def write(self, name: str, data: bytes) -> None:
        if self._zip is not None:
            self._zip.writestr(name, data)
            return
        path = self.dest / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            os.replace(self._tmp, self.dest)


def _labels_json(entries: list[tuple[str, int | None]]) -> bytes:
    labels = None if any(lab is None for _, lab in entries) else [[n, lab] for n, lab in entries]
    return json.dumps({"labels": labels}).encode()


def _parse_resolution(text: str) -> int:
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts) or len(set(parts)) != 1:
        raise argparse.ArgumentTypeError(f"resolution must be N or NxN (square), got {text!r}")
    return int(parts[0])


def convert_dataset(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    resolution: int | None,
    transform: str = "center-crop-dhariwal",
    max_images: int | None = None,
    progress: bool = True,
) -> int:
    """Convert images to an EDM RGB dataset (docs/method.md §6.2); returns the number of images written.

    Every image is converted to RGB and transformed; ``resolution`` must be a power of two (it
    may be ``None`` only with ``transform="none"``, when all images must share one square size).
    """
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; choose one of {sorted(TRANSFORMS)}")
    if resolution is None and transform != "none":
        raise ValueError(f"transform {transform!r} needs a resolution")
    if resolution is not None and (resolution < 1 or resolution & (resolution - 1)):
        raise ValueError(f"resolution must be a power of two, got {resolution}")
    items = open_source(source, max_images)
    writer = _Writer(Path(dest))
    entries: list[tuple[str, int | None]] = []
    size: tuple[int, int] | None = None
    for index, item in enumerate(progress_bar(items, desc="convert", unit="img", disable=not progress)):
        img = item.load().convert("RGB")
        if resolution is not None:
            img = TRANSFORMS[transform](img, resolution)
        size = size or img.size
        if img.size != size or size[0] != size[1]:
            raise ValueError(
                f"{source}:{item.name}: size {img.size} differs from {size} or is not square; pass --resolution"
            )
        name = _archive_name(index, "img", ".png")
        buf = io.BytesIO()
        img.save(buf, format="png", compress_level=0)
        writer.write(name, buf.getvalue())
        entries.append((name, item.label))
    writer.write(_LABELS_FILE, _labels_json(entries))
    writer.close()
    return len(entries)


# ---------------------------------------------------------------------------------- encoding
def stats_path_for(dest: str | os.PathLike[str]) -> Path:
    """``LATENTS.zip`` or ``LATENTS/`` → ``LATENTS.stats.json`` beside it."""
    dest = Path(dest)
    stem = dest.stem if dest.suffix.lower() == ".zip" else dest.name
    return dest.with_name(stem + ".stats.json")


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _wait_for(paths: Sequence[Path], timeout: float, poll: float = 5.0) -> None:
    """Block until every path exists (scanning on from the first missing one)."""
    deadline = time.monotonic() + timeout
    first_missing = 0
    while True:
        while first_missing < len(paths) and paths[first_missing].exists():
            first_missing += 1
        if first_missing == len(paths):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for the other ranks to write {paths[first_missing]}")
        time.sleep(poll)


def _source_has_labels(source: str | os.PathLike[str]) -> bool:
    """Whether an EDM dataset's ``dataset.json`` exists and its labels are not null."""
    source = Path(source)
    try:
        if source.is_dir():
            path = source / _LABELS_FILE
            raw = path.read_bytes() if path.is_file() else None
        else:
            with zipfile.ZipFile(source) as z:
                raw = z.read(_LABELS_FILE) if _LABELS_FILE in z.namelist() else None
    except zipfile.BadZipFile as e:
        raise ValueError(f"{source}: not a valid zip archive (corrupt or truncated): {e}") from e
    if raw is None:
        return False
    try:
        return json.loads(raw).get("labels") is not None
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{source}: invalid {_LABELS_FILE}: {e}") from e


def encode_dataset(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    vae: str = "stabilityai/sd-vae-ft-ema",
    batch_size: int = 8,
    max_images: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    seed: int = 0,
    merge_timeout: float = 24 * 3600.0,
    progress: bool = True,
) -> dict[str, object] | None:
    """Encode an RGB dataset into VAE posterior moments (docs/method.md §6.2), sharded and resumable.

    Rank ``r`` of ``W`` encodes the items ``i ≡ r (mod W)`` with the fp32 VAE, writing each as
    ``float32 [8, H/8, W/8]`` (mean ‖ std) into the parts folder (``dest`` itself for a folder
    destination, ``DEST.parts/`` for a zip); items already written are skipped, so re-running
    resumes. Rank 0 then waits until every item file exists (written by all ranks), writes
    ``dataset.json`` (integer labels carried over) and, for a zip destination, the uncompressed
    zip, then computes :func:`latent_stats` and saves it to :func:`stats_path_for` ``(dest)``.

    Returns the statistics on rank 0, ``None`` on other ranks. A zip destination that already
    exists is an error (``FileExistsError``); remove it to encode again.
    """
    from tvm.data.encoders import StabilityVAEEncoder

    dest = Path(dest)
    is_zip = dest.suffix.lower() == ".zip"
    if is_zip and dest.exists():
        raise FileExistsError(f"{dest}: destination exists; remove it to re-encode")
    data = ImageFolderDataset(source, use_labels=_source_has_labels(source), channels=3)
    n = len(data) if max_images is None else min(max_images, len(data))
    labels = [int(np.argmax(data.get_label(i))) if data.has_labels else None for i in range(n)]
    parts = dest.with_name(dest.name + ".parts") if is_zip else dest
    parts.mkdir(parents=True, exist_ok=True)
    names = [_archive_name(i, "img-mean-std-", ".npy") for i in range(n)]
    todo = [i for i in range(rank, n, world_size) if not (parts / names[i]).exists()]
    encoder = StabilityVAEEncoder(vae, use_fp16=False, batch_size=batch_size)
    writer = _Writer(parts)
    with progress_bar(total=len(todo), desc=f"encode rank {rank}", unit="img", disable=not progress) as bar:
        for k in range(0, len(todo), batch_size):
            idx = todo[k : k + batch_size]
            pixels = torch.as_tensor(np.stack([data[i][0] for i in idx])).to(device)
            moments = encoder.encode_moments(pixels).cpu().numpy().astype(np.float32)
            for i, m in zip(idx, moments):
                writer.write(names[i], _npy_bytes(m))
            bar.update(len(idx))
    if rank != 0:
        return None
    _wait_for([parts / name for name in names], merge_timeout)
    writer.write(_LABELS_FILE, _labels_json(list(zip(names, labels))))
    if is_zip:
        out = _Writer(dest)
        for name in [*names, _LABELS_FILE]:
            out.write(name, (parts / name).read_bytes())
        out.close()
        shutil.rmtree(parts)
    stats = latent_stats(dest, seed=seed, progress=progress)
    stats_file = stats_path_for(dest)
    stats_file.write_text(json.dumps(stats, indent=2))
    print(f"raw_mean: {stats['raw_mean']}\nraw_std:  {stats['raw_std']}\nsaved to {stats_file}")
    return stats


def latent_stats(source: str | os.PathLike[str], seed: int = 0, progress: bool = True) -> dict[str, object]:
    """Raw per-channel latent statistics of a mean ‖ std dataset (docs/method.md §6.2 ``getstats``).

    ``raw_mean_k`` = mean over (N, H, W) of the posterior means of channel ``k``;
    ``raw_std_k`` = population std over (N, H, W) of posterior samples ``mean + ε·std`` with
    ``ε`` from ``numpy.random.default_rng(seed)`` drawn item by item in dataset order.
    Accumulated in float64.
    """
    data = ImageFolderDataset(source, use_labels=False)
    if not data.is_npy or data.num_channels % 2:
        raise ValueError(
            f"{source}: expected .npy posterior moments with an even channel count, got {data.image_shape}"
        )
    c = data.num_channels // 2
    rng = np.random.default_rng(seed)
    sum_mean = np.zeros(c)
    sum_x = np.zeros(c)
    sum_x2 = np.zeros(c)
    count = 0
    for i in progress_bar(range(len(data)), desc="getstats", unit="item", disable=not progress):
        moments = data[i][0].astype(np.float64)
        mean, std = moments[:c], moments[c:]
        x = mean + rng.standard_normal(mean.shape) * std
        sum_mean += mean.sum(axis=(1, 2))
        sum_x += x.sum(axis=(1, 2))
        sum_x2 += (x * x).sum(axis=(1, 2))
        count += mean.shape[1] * mean.shape[2]
    sample_mean = sum_x / count
    raw_std = np.sqrt(np.maximum(sum_x2 / count - sample_mean**2, 0.0))
    return {
        "raw_mean": (sum_mean / count).tolist(),
        "raw_std": raw_std.tolist(),
        "num_images": len(data),
        "seed": seed,
        "source": str(source),
    }


# ---------------------------------------------------------------------------------- command line
def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dataset_tool", description="Prepare EDM-format datasets (docs/method.md §6.2)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="images (class folders, folder or zip) -> RGB PNG zip/folder")
    p.add_argument("--source", required=True)
    p.add_argument("--dest", required=True)
    p.add_argument("--resolution", type=_parse_resolution, default=None, help="N or NxN, a power of two")
    p.add_argument("--transform", choices=sorted(TRANSFORMS), default="center-crop-dhariwal")
    p.add_argument("--max-images", type=int, default=None)

    p = sub.add_parser("encode", help="RGB dataset -> SD-VAE posterior mean||std .npy dataset")
    p.add_argument("--source", required=True)
    p.add_argument("--dest", required=True)
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="HF model id or local directory")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior samples for raw_std")

    p = sub.add_parser("getstats", help="raw per-channel mean/std of a latent dataset")
    p.add_argument("--source", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file (default: print only)")
    return parser


def _device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; ranks come from the ``RANK``/``WORLD_SIZE`` torchrun variables."""
    args = _build_parser().parse_args(argv)
    if args.command == "convert":
        count = convert_dataset(args.source, args.dest, args.resolution, args.transform, args.max_images)
        print(f"wrote {count} images to {args.dest}")
    elif args.command == "encode":
        encode_dataset(
            args.source,
            args.dest,
            vae=args.vae,
            batch_size=args.batch,
            max_images=args.max_images,
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            device=_device_for_rank(),
            seed=args.seed,
        )
    else:
        stats = latent_stats(args.source, seed=args.seed)
        print(json.dumps(stats, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(stats, indent=2))
    return 0
