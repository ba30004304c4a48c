"""Download-free digits metrics (tvm.eval.small)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tvm.data.digits import DigitsDataset
from tvm.eval.fid import FeatureStats, frechet_distance
from tvm.eval.small import DigitsMetrics


@pytest.fixture(scope="module")
def metrics() -> DigitsMetrics:
    return DigitsMetrics()


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_real_floor(metrics: DigitsMetrics) -> None:
    floor = metrics.real_floor()
    assert floor.num_images == 359
    assert floor.accuracy > 0.97  # RBF-SVC on held-out digits
    assert 0.05 < floor.frechet < 0.2
    # The floor is the plain Fréchet distance of the test digits (x/255) to the training digits.
    train = DigitsDataset("train").images.reshape(-1, 64) / 255.0
    test = DigitsDataset("test").images.reshape(-1, 64) / 255.0
    expected = frechet_distance(test.mean(0), np.cov(test, rowvar=False), train.mean(0), np.cov(train, rowvar=False))
    assert floor.frechet == pytest.approx(expected, rel=1e-6)  # sqrtm of singular matrices varies by scipy build


def test_bad_samples_score_badly(metrics: DigitsMetrics) -> None:
    floor = metrics.real_floor()
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (359, 1, 8, 8), dtype=np.uint8)
    assert metrics.frechet(noise) > 50 * floor.frechet
    assert metrics.accuracy(noise, rng.integers(0, 10, 359)) < 0.3
    test = DigitsDataset("test")
    # Right images with shuffled labels: accuracy collapses to about chance.
    wrong = (test.targets + 1) % 10
    assert metrics.accuracy(test.images, wrong) < 0.05
    # One class only: distribution mismatch shows in the Fréchet distance, not in accuracy.
    zeros = test.images[test.targets == 0]
    assert metrics.frechet(zeros) > 10 * floor.frechet
    assert metrics.accuracy(torch.from_numpy(zeros), torch.zeros(len(zeros), dtype=torch.long)) > 0.95


def test_frechet_uses_unbiased_float64_stats(metrics: DigitsMetrics) -> None:
    x = DigitsDataset("train").images
    stats = FeatureStats(64)
    stats.update(x.reshape(-1, 64) / 255.0)
    mu, sigma = stats.mean_cov(unbiased=True)
    np.testing.assert_allclose(metrics.mu, mu, rtol=0, atol=0)
    assert abs(metrics.frechet(x)) < 1e-6  # the training set against itself
    with pytest.raises(ValueError, match="uint8 digits"):
        metrics.frechet(x.astype(np.float32))
