"""The embedded dataset for CPU runs: scikit-learn's 8×8 handwritten digits.

``sklearn.datasets.load_digits`` ships 1,797 real 8×8 greyscale digits (values 0..16, 10
classes) inside scikit-learn, so tests and CPU training need no download.

Pixel mapping: ``x_uint8 = rint(v · 255 / 16)`` with NumPy's round-half-to-even; the only tie is
``v = 8 → 127.5 → 128``; ``v = 16 → 255``.

Held-out split (fixed, documented): per class ``c`` (in increasing order) the indices of that
class are permuted with ``numpy.random.default_rng([seed, c])`` and the first
``round(test_fraction · n_c)`` go to the test split; the rest are the training split. With the
defaults (``seed = 0``, ``test_fraction = 0.2``) the test split holds 359 digits (35–37 per
class) and the training split 1,438. Both splits are sorted by the original index. The test split
is the "real-data floor" of :mod:`tvm.eval.small`: generated digits are compared with held-out
real ones that no model has seen.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from sklearn.datasets import load_digits

__all__ = ["DigitsDataset", "digits_split_indices", "NUM_CLASSES", "RESOLUTION"]

NUM_CLASSES = 10
RESOLUTION = 8
_MAX_VALUE = 16

Split = Literal["train", "test", "all"]


def digits_split_indices(
    targets: np.ndarray, seed: int = 0, test_fraction: float = 0.2
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified ``(train_idx, test_idx)`` of ``targets`` (see the module docstring)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    test = []
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        perm = np.random.default_rng([seed, int(c)]).permutation(members)
        test.append(perm[: int(round(test_fraction * len(members)))])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(targets)), test_idx)
    return train_idx, test_idx


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn digits with the :class:`~tvm.data.datasets.ImageFolderDataset` item contract.

    Items: ``dataset[i] -> (x uint8 [1, 8, 8], label float32 [10] one-hot)`` (an empty label
    when ``use_labels`` is False).

    Args:
        split: ``"train"`` (1,438 digits), ``"test"`` (359 held out) or ``"all"`` (1,797 digits).
        use_labels: return one-hot labels.
        seed, test_fraction: the split (defaults are the documented fixed split).
    """

    def __init__(
        self, split: Split = "train", use_labels: bool = True, seed: int = 0, test_fraction: float = 0.2
    ) -> None:
        bunch = load_digits()
        values = np.asarray(bunch.images)  # float64 [1797, 8, 8], integers 0..16
        targets = np.asarray(bunch.target, dtype=np.int64)
        if split == "all":
            idx = np.arange(len(targets))
        elif split in ("train", "test"):
            train_idx, test_idx = digits_split_indices(targets, seed=seed, test_fraction=test_fraction)
            idx = train_idx if split == "train" else test_idx
        else:
            raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
        self.split = split
        self._use_labels = use_labels
        self._images = np.rint(values[idx] * (255.0 / _MAX_VALUE)).astype(np.uint8)[:, None]
        self._targets = targets[idx]
        self._indices = idx

    def __len__(self) -> int:
        return len(self._targets)

    def __getitem__(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        return self._images[idx].copy(), self.get_label(idx)

    def get_label(self, idx: int) -> np.ndarray:
        """``float32 [10]`` one-hot label of item ``idx`` (empty when labels are off)."""
        if not self._use_labels:
            return np.zeros(0, dtype=np.float32)
        onehot = np.zeros(NUM_CLASSES, dtype=np.float32)
        onehot[self._targets[idx]] = 1
        return onehot

    @property
    def images(self) -> np.ndarray:
        """All images of the split, ``uint8 [N, 1, 8, 8]`` (a read-only view)."""
        view = self._images.view()
        view.flags.writeable = False
        return view

    @property
    def targets(self) -> np.ndarray:
        """Integer classes ``int64 [N]``."""
        return self._targets.copy()

    @property
    def source_indices(self) -> np.ndarray:
        """Indices of the split's digits in ``load_digits()`` order."""
        return self._indices.copy()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, RESOLUTION, RESOLUTION)

    @property
    def resolution(self) -> int:
        return RESOLUTION

    @property
    def num_channels(self) -> int:
        return 1

    @property
    def label_dim(self) -> int:
        return NUM_CLASSES if self._use_labels else 0

    @property
    def has_labels(self) -> bool:
        return self._use_labels

    @property
    def is_npy(self) -> bool:
        return False
