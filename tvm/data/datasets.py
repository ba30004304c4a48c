"""EDM-format datasets and a resumable infinite sampler (docs/method.md §6.1, §5.5).

A dataset is a directory or a zip archive of image files (any format PIL reads) or ``.npy``
arrays, plus an optional ``dataset.json`` at its root::

    {"labels": [["00000/img00000000.png", 6], ["00000/img00000001.png", 3], ...]}   # or null

Files are sorted by their relative name (``/`` separated). Items are returned channel-first:

* images: ``uint8`` array ``[C, H, W]`` (a greyscale image has ``C = 1``);
* ``.npy`` arrays: ``float32`` array reshaped to ``[-1, H, W]`` (latent datasets hold the VAE
  posterior mean ‖ std, ``[8, H/8, W/8]``, docs/method.md §6.2);
* labels: integer classes become a one-hot ``float32`` vector of length ``label_dim``
  (``max + 1`` over the whole dataset unless given); float vectors are used as they are.

Everything that can be checked cheaply is checked when the dataset is opened: the archive,
``dataset.json``, and the shape of every file from its header without decoding pixels (the PNG
IHDR chunk, the ``.npy`` header, ``PIL.Image.open`` for other formats; stored zip members are
read at their offset). This costs roughly 15–35 µs per file (≈ 20–45 s for ImageNet-1k);
``check_all_headers=False`` checks the first file only. Errors name the file.

Zip archives are opened lazily, once per process: a dataset object that is forked or pickled
into DataLoader workers opens its own handle there and never copies the archive's contents,
unless ``cache=True`` keeps each decoded item in that process' memory (upstream's default, which
holds a full copy of the dataset per rank, docs/method.md §11 item 17).
"""

from __future__ import annotations

import functools
import io
import json
import os
import struct
import zipfile
from collections.abc import Iterator, Mapping
from typing import IO, Any, BinaryIO

import numpy as np
import PIL.Image
import torch

__all__ = ["ImageFolderDataset", "InfiniteSampler", "image_extensions"]

_LABELS_FILE = "dataset.json"
_NPY_EXT = ".npy"
# PIL modes that decode to 8-bit channels, with their channel counts.
_MODE_CHANNELS: Mapping[str, int] = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour type -> channels, for 8-bit images (palette images are rejected).
_PNG_COLOUR_CHANNELS: Mapping[int, int] = {0: 1, 2: 3, 4: 2, 6: 4}


def _png_shape(head: bytes) -> tuple[int, int, int] | None:
    """``(C, H, W)`` from the first 33 bytes of a PNG (signature + IHDR); ``None`` if not a PNG."""
    if len(head) < 26 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    depth, colour = head[24], head[25]
    if depth != 8 or colour not in _PNG_COLOUR_CHANNELS:
        raise ValueError(f"unsupported PNG (bit depth {depth}, colour type {colour}); need 8-bit L, LA, RGB or RGBA")
    return (_PNG_COLOUR_CHANNELS[colour], height, width)


def _npy_header_length(head: bytes) -> int:
    """Total length (magic + version + length field + header dict) of an ``.npy`` header."""
    if len(head) < 12 or head[:6] != b"\x93NUMPY":
        raise ValueError("not an .npy file (bad magic)")
    if head[6] == 1:
        return 10 + struct.unpack("<H", head[8:10])[0]
    return 12 + struct.unpack("<I", head[8:12])[0]


@functools.lru_cache(maxsize=256)
def _npy_shape(header: bytes) -> tuple[int, int, int]:
    """``(C, H, W)`` of an ``.npy`` header (parsed once per distinct header)."""
    if len(header) != _npy_header_length(header):
        raise ValueError("truncated .npy header")
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, _fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    if len(shape) < 2 or 0 in shape:
        raise ValueError(f"array of shape {shape} is not [..., H, W]")
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
        raise ValueError(f"unsupported dtype {dtype}")
    return (int(np.prod(shape[:-2], dtype=np.int64)), int(shape[-2]), int(shape[-1]))


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions (with the dot) that PIL can open."""
    PIL.Image.init()
    return frozenset(ext.lower() for ext in PIL.Image.registered_extensions())


def _file_ext(name: str) -> str:
    return os.path.splitext(name)[1].lower()


class ImageFolderDataset(torch.utils.data.Dataset):
    """An EDM-style image or array dataset read from a directory or a zip (docs/method.md §6.1).

    Args:
        path: directory or ``.zip`` file.
        use_labels: return class labels from ``dataset.json``; it is an error if the dataset
            has none. When False every item's label is an empty ``float32`` vector.
        xflip: append a horizontally mirrored copy of every item (doubles ``len``).
        max_size: keep a random subset of this many files (``RandomState(random_seed)``,
            sorted afterwards, as EDM does).
        random_seed: seed of the ``max_size`` subset.
        cache: keep each decoded item in this process' memory after its first load.
        resolution: expected side length; a mismatch raises ``ValueError`` at open.
        channels: expected channel count; a mismatch raises ``ValueError`` at open.
        label_dim: length of the one-hot labels; default ``max(label) + 1``.
        check_all_headers: read every file's header at open (default) rather than the
            first file's only; the former catches a stray file of the wrong size up front.

    Items: ``dataset[i] -> (x, label)``; ``x`` is ``uint8 [C, H, W]`` for images and
    ``float32 [C, H, W]`` for ``.npy`` files, ``label`` is ``float32 [label_dim]``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        use_labels: bool = True,
        xflip: bool = False,
        max_size: int | None = None,
        random_seed: int = 0,
        cache: bool = False,
        resolution: int | None = None,
        channels: int | None = None,
        label_dim: int | None = None,
        check_all_headers: bool = True,
    ) -> None:
        self._path = os.fspath(path)
        self._cache_enabled = cache
        self._cache: dict[int, np.ndarray] = {}
        self._zip: tuple[zipfile.ZipFile, BinaryIO] | None = None
        self._zip_pid: int | None = None

        if not os.path.exists(self._path):
            raise FileNotFoundError(f"{self._path}: dataset path does not exist")
        if os.path.isdir(self._path):
            self._kind = "dir"
            all_names = self._list_dir()
        else:
            self._kind = "zip"
            all_names = self._list_zip()

        wanted = image_extensions() | {_NPY_EXT}
        names = sorted(n for n in all_names if _file_ext(n) in wanted)
        if not names:
            raise ValueError(f"{self._path}: no image or .npy files found")
        kinds = {_file_ext(n) == _NPY_EXT for n in names}
        if len(kinds) > 1:
            raise ValueError(f"{self._path}: mixes .npy arrays and image files")
        self._is_npy = kinds.pop()
        self._names = names

        self._shape = self._check_shapes(names if check_all_headers else names[:1])
        self._check_expected(resolution, channels)
        self._labels = self._load_labels(label_dim) if use_labels else None

        raw_idx = np.arange(len(names), dtype=np.int64)
        if max_size is not None and len(raw_idx) > max_size:
            np.random.RandomState(random_seed % (1 << 31)).shuffle(raw_idx)
            raw_idx = np.sort(raw_idx[:max_size])
        flips = np.zeros(len(raw_idx), dtype=bool)
        if xflip:
            raw_idx = np.concatenate([raw_idx, raw_idx])
            flips = np.concatenate([flips, np.ones_like(flips)])
        self._raw_idx = raw_idx
        self._xflip = flips

    # ------------------------------------------------------------------ file access
    def _list_dir(self) -> list[str]:
        names = []
        for root, _dirs, files in os.walk(self._path):
            for f in files:
                rel = os.path.relpath(os.path.join(root, f), self._path)
                names.append(rel.replace(os.sep, "/"))
        return names

    def _list_zip(self) -> list[str]:
        try:
            return [i.filename for i in self._get_zip().infolist() if not i.is_dir()]
        except zipfile.BadZipFile as e:
            raise ValueError(f"{self._path}: not a valid zip archive (corrupt or truncated): {e}") from e

    def _handles(self) -> tuple[zipfile.ZipFile, BinaryIO]:
        """This process' zip handle and raw file handle, opened on first use (also after a fork
        or unpickling in a DataLoader worker, so no handle is ever shared between processes)."""
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = (zipfile.ZipFile(self._path), open(self._path, "rb"))
            self._zip_pid = os.getpid()
        return self._zip

    def _get_zip(self) -> zipfile.ZipFile:
        return self._handles()[0]

    def _open(self, name: str) -> IO[bytes]:
        if self._kind == "dir":
            return open(os.path.join(self._path, name), "rb")
        return self._get_zip().open(name, "r")

    def _head(self, name: str, size: int) -> bytes:
        """The first ``size`` bytes of a file. Stored (uncompressed) zip members are read straight
        from their offset, which is several times faster than ``ZipFile.open`` for header checks."""
        if self._kind == "dir":
            with open(os.path.join(self._path, name), "rb") as f:
                return f.read(size)
        archive, raw = self._handles()
        info = archive.getinfo(name)
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            with archive.open(info) as f:
                return f.read(size)
        raw.seek(info.header_offset)
        local = raw.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise zipfile.BadZipFile("bad local file header")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        raw.seek(info.header_offset + 30 + name_len + extra_len)
        return raw.read(min(size, info.file_size))

    def _where(self, name: str) -> str:
        return f"{self._path}:{name}" if self._kind == "zip" else os.path.join(self._path, name)

    def close(self) -> None:
        """Close this process' zip handles (they are reopened on the next access)."""
        if self._zip is not None and self._zip_pid == os.getpid():
            for handle in self._zip:
                handle.close()
        self._zip = None
        self._zip_pid = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_zip"] = None
        state["_zip_pid"] = None
        return state

    # ------------------------------------------------------------------ validation
    def _header_shape(self, name: str) -> tuple[int, int, int]:
        """``[C, H, W]`` of one file from its header only (no pixel decoding)."""
        try:
            if self._is_npy:
                head = self._head(name, 128)
                total = _npy_header_length(head)
                return _npy_shape(head[:total] if total <= len(head) else self._head(name, total))
            shape = _png_shape(self._head(name, len(_PNG_SIGNATURE) + 25))
            if shape is not None:
                return shape
            with self._open(name) as f, PIL.Image.open(f) as img:
                if img.mode not in _MODE_CHANNELS:
                    raise ValueError(f"unsupported PIL mode {img.mode!r} (need one of {sorted(_MODE_CHANNELS)})")
                w, h = img.size
                return (_MODE_CHANNELS[img.mode], h, w)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as e:
            raise ValueError(f"{self._where(name)}: unreadable or invalid file: {e}") from e

    def _check_shapes(self, names: list[str]) -> tuple[int, int, int]:
        ref = self._header_shape(names[0])
        for name in names[1:]:
            shape = self._header_shape(name)
            if shape != ref:
                raise ValueError(
                    f"{self._where(name)}: shape [C,H,W]={list(shape)} differs from "
                    f"{list(ref)} of {self._where(names[0])}"
                )
        if ref[1] != ref[2]:
            raise ValueError(f"{self._where(names[0])}: items must be square, got [C,H,W]={list(ref)}")
        return ref

    def _check_expected(self, resolution: int | None, channels: int | None) -> None:
        c, h, _w = self._shape
        if resolution is not None and h != resolution:
            raise ValueError(f"{self._path}: resolution is {h}, expected {resolution} ({self._where(self._names[0])})")
        if channels is not None and c != channels:
            raise ValueError(f"{self._path}: {c} channels, expected {channels} ({self._where(self._names[0])})")

    def _read_labels_json(self) -> Any:
        where = self._where(_LABELS_FILE)
        try:
            with self._open(_LABELS_FILE) as f:
                data = json.load(f)
        except (FileNotFoundError, KeyError):
            raise ValueError(
                f"{where}: labels requested (use_labels=True) but the dataset has no {_LABELS_FILE}"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{where}: not valid JSON: {e}") from e
        if not isinstance(data, dict) or "labels" not in data:
            raise ValueError(f"{where}: expected an object with a 'labels' key")
        if data["labels"] is None:
            raise ValueError(f"{where}: labels requested (use_labels=True) but 'labels' is null")
        return data["labels"]

    def _load_labels(self, label_dim: int | None) -> np.ndarray:
        """``float32 [N_files, label_dim]`` in file order (validated, docs/method.md §6.1)."""
        entries = self._read_labels_json()
        where = self._where(_LABELS_FILE)
        if not isinstance(entries, list):
            raise ValueError(f"{where}: 'labels' must be a list of [name, label] pairs or null")
        known = set(self._names)
        by_name: dict[str, Any] = {}
        for entry in entries:
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
                raise ValueError(f"{where}: bad entry {entry!r}; expected [relative_name, label]")
            name = entry[0].replace("\\", "/")
            if name not in known:
                raise ValueError(f"{where}: label for {name!r}, which is not a data file of the dataset")
            if name in by_name:
                raise ValueError(f"{where}: duplicate label for {name!r}")
            by_name[name] = entry[1]
        missing = [n for n in self._names if n not in by_name]
        if missing:
            raise ValueError(f"{where}: no label for {self._where(missing[0])} ({len(missing)} files unlabelled)")
        values = [by_name[n] for n in self._names]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            ints = np.asarray(values, dtype=np.int64)
            if ints.min() < 0:
                bad = self._names[int(np.argmin(ints))]
                raise ValueError(f"{where}: negative class {ints.min()} for {bad!r}")
            dim = int(ints.max()) + 1 if label_dim is None else label_dim
            if ints.max() >= dim:
                bad = self._names[int(np.argmax(ints))]
                raise ValueError(f"{where}: class {ints.max()} of {bad!r} is out of range for label_dim={dim}")
            onehot = np.zeros((len(ints), dim), dtype=np.float32)
            onehot[np.arange(len(ints)), ints] = 1
            return onehot
        for name, v in zip(self._names, values):
            if not (isinstance(v, list) and all(isinstance(u, (int, float)) and not isinstance(u, bool) for u in v)):
                raise ValueError(f"{where}: label of {name!r} must be an int class or a list of numbers, got {v!r}")
        if len({len(v) for v in values}) != 1:
            raise ValueError(f"{where}: label vectors have different lengths")
        vecs = np.asarray(values, dtype=np.float32)
        if label_dim is not None and vecs.shape[1] != label_dim:
            raise ValueError(f"{where}: label vectors have length {vecs.shape[1]}, expected {label_dim}")
        if not np.isfinite(vecs).all():
            raise ValueError(f"{where}: label vectors contain non-finite values")
        return vecs

    # ------------------------------------------------------------------ items
    def _load_raw(self, raw_index: int) -> np.ndarray:
        name = self._names[raw_index]
        try:
            with self._open(name) as f:
                if self._is_npy:
                    arr = np.load(io.BytesIO(f.read()), allow_pickle=False)
                    arr = arr.astype(np.float32).reshape(-1, *arr.shape[-2:])
                else:
                    with PIL.Image.open(f) as img:
                        arr = np.asarray(img)
                    arr = arr[:, :, None] if arr.ndim == 2 else arr
                    arr = arr.transpose(2, 0, 1)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise ValueError(f"{self._where(name)}: failed to read: {e}") from e
        if tuple(arr.shape) != self._shape:
            raise ValueError(f"{self._where(name)}: decoded shape {list(arr.shape)} != {list(self._shape)}")
        return arr

    def __len__(self) -> int:
        return len(self._raw_idx)

    def __getitem__(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        raw = int(self._raw_idx[idx])
        arr = self._cache.get(raw)
        if arr is None:
            arr = self._load_raw(raw)
            if self._cache_enabled:
                self._cache[raw] = arr
        if self._xflip[idx]:
            arr = arr[:, :, ::-1]
        # A copy, so that callers never alias (and mutate) the cached item.
        out = np.array(arr, order="C") if self._cache_enabled else np.ascontiguousarray(arr)
        return out, self.get_label(idx)

    def get_label(self, idx: int) -> np.ndarray:
        """``float32 [label_dim]`` label of item ``idx`` (empty when labels are off)."""
        if self._labels is None:
            return np.zeros(0, dtype=np.float32)
        return self._labels[int(self._raw_idx[idx])].copy()

    def file_name(self, idx: int) -> str:
        """Relative name of the file behind item ``idx``."""
        return self._names[int(self._raw_idx[idx])]

    # ------------------------------------------------------------------ properties
    @property
    def path(self) -> str:
        return self._path

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every item."""
        return self._shape

    @property
    def resolution(self) -> int:
        return self._shape[1]

    @property
    def num_channels(self) -> int:
        return self._shape[0]

    @property
    def label_dim(self) -> int:
        return 0 if self._labels is None else int(self._labels.shape[1])

    @property
    def has_labels(self) -> bool:
        return self._labels is not None

    @property
    def is_npy(self) -> bool:
        """True for ``.npy`` (e.g. latent) datasets, False for image datasets."""
        return self._is_npy


class InfiniteSampler(torch.utils.data.Sampler[int]):
    """Deterministic, resumable, rank-sharded infinite sampler (replaces docs/method.md §5.5).

    The global stream is ``p = 0, 1, 2, …``; position ``p`` lies in epoch ``e = p // N`` and
    yields ``perm_e[p mod N]`` with ``perm_e`` a permutation drawn from
    ``numpy.random.default_rng([seed, e])``. Rank ``r`` of ``W`` yields the positions
    ``start_index + r + k·W``. Hence, for a per-rank batch ``b``, global step ``k`` consumes the
    contiguous positions ``[start + k·W·b, start + (k+1)·W·b)`` whatever ``W`` is, and a run
    resumed with ``start_index = images consumed so far`` continues the stream exactly (also
    with a different world size).

    Upstream's EDM sampler (one shuffle plus a random-window swap per step) is not resumable
    (docs/method.md §11 item 10); this one deliberately changes the order for that reason.

    The sampler holds no state to save: a DataLoader prefetches, so it runs ahead of training, and
    the training loop resumes it from the images consumed, ``start_index = step × global batch``.
    """

    def __init__(
        self, dataset_len: int, rank: int = 0, world_size: int = 1, seed: int = 0, start_index: int = 0
    ) -> None:
        if dataset_len <= 0:
            raise ValueError(f"dataset_len must be positive, got {dataset_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if start_index < 0:
            raise ValueError(f"start_index must be >= 0, got {start_index}")
        self.dataset_len = int(dataset_len)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.start_index = int(start_index)

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of epoch ``epoch``: ``int64 [dataset_len]``."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.dataset_len)

    def __iter__(self) -> Iterator[int]:
        position = self.start_index + self.rank
        epoch, perm = -1, np.empty(0, dtype=np.int64)
        while True:
            e, offset = divmod(position, self.dataset_len)
            if e != epoch:
                epoch, perm = e, self.permutation(e)
            yield int(perm[offset])
            position += self.world_size
