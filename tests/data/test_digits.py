"""The embedded digits dataset (tvm.data.digits)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from tvm.data.digits import DigitsDataset, digits_split_indices


def test_item_contract_and_pixel_mapping() -> None:
    ds = DigitsDataset("all")
    raw = load_digits()
    assert len(ds) == 1797 and ds.resolution == 8 and ds.num_channels == 1 and ds.label_dim == 10
    x, label = ds[5]
    assert x.dtype == np.uint8 and x.shape == (1, 8, 8)
    assert label.dtype == np.float32 and label.shape == (10,)
    assert label.argmax() == raw.target[5] and label.sum() == 1
    np.testing.assert_array_equal(x[0], np.rint(raw.images[5] * 255 / 16).astype(np.uint8))
    # Value table: v -> rint(v * 255 / 16); 8 -> 127.5 -> 128 (half to even), 16 -> 255.
    values = np.unique(ds.images)
    assert values[0] == 0 and values[-1] == 255 and 128 in values and 127 not in values


def test_split_is_fixed_stratified_and_disjoint() -> None:
    train, test = DigitsDataset("train"), DigitsDataset("test")
    assert (len(train), len(test)) == (1438, 359)
    assert not set(train.source_indices) & set(test.source_indices)
    assert len(set(train.source_indices) | set(test.source_indices)) == 1797
    counts = np.bincount(test.targets, minlength=10)
    totals = np.bincount(load_digits().target, minlength=10)
    np.testing.assert_array_equal(counts, np.round(0.2 * totals).astype(int))
    # The documented rule, recomputed independently for class 3.
    target = load_digits().target
    members = np.flatnonzero(target == 3)
    expected = np.sort(np.random.default_rng([0, 3]).permutation(members)[: round(0.2 * len(members))])
    np.testing.assert_array_equal(np.intersect1d(test.source_indices, members), expected)
    # Stable across constructions; another seed gives another split.
    np.testing.assert_array_equal(DigitsDataset("test").source_indices, test.source_indices)
    assert not np.array_equal(digits_split_indices(target, seed=1)[1], test.source_indices)


def test_bad_split_and_unlabelled() -> None:
    with pytest.raises(ValueError, match="split"):
        DigitsDataset("valid")  # type: ignore[arg-type]
    ds = DigitsDataset("test", use_labels=False)
    assert ds[0][1].shape == (0,) and ds.label_dim == 0
