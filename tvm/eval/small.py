"""Download-free metrics for the embedded 8×8 digits (:mod:`tvm.data.digits`).

* Fréchet distance in pixel space: each uint8 ``[1, 8, 8]`` image is a 64-dim float64 vector
  ``x / 255`` in [0, 1]; ``frechet(samples)`` is :func:`tvm.eval.fid.frechet_distance` between
  the samples' moments and those of the real training digits (unbiased covariances on both
  sides). Some border pixels are 0 in every real digit, so the covariances are singular; scipy's
  ``sqrtm`` then warns (silenced here) but its trace agrees with the symmetric eigen-form
  ``tr((Σ_r^{1/2} Σ_g Σ_r^{1/2})^{1/2})`` to ~1e-9 relative.
* Class accuracy: an RBF support-vector classifier (scikit-learn ``SVC``, ``C = 10``, deterministic,
  inputs ``x / 255``) trained on the real training digits; ``accuracy(samples, labels)`` is the
  fraction of samples it assigns to the class they were generated for.
* ``real_floor()``: the same two numbers for the held-out real test digits — what a perfect
  generator would score with a sample of that size (the Fréchet estimate is biased upwards for
  small samples, so compare generated sets of similar size with the floor).
"""

from __future__ import annotations

from dataclasses import dataclass

import warnings

import numpy as np
import scipy.linalg
import torch
from sklearn.svm import SVC

from tvm.data.digits import DigitsDataset
from tvm.eval.fid import FeatureStats, frechet_distance

__all__ = ["DigitsMetrics", "RealFloor"]


@dataclass(frozen=True)
class RealFloor:
    """Scores of held-out real digits: Fréchet distance, classifier accuracy, sample count."""

    frechet: float
    accuracy: float
    num_images: int


def _flatten(samples: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 ``[N, 1, 8, 8]`` → float64 ``[N, 64]`` = ``x / 255``."""
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().cpu().numpy()
    x = np.asarray(samples)
    if x.dtype != np.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
        raise ValueError(f"expected uint8 digits [N, 1, 8, 8], got {x.dtype} {list(x.shape)}")
    return x.reshape(len(x), 64).astype(np.float64) / 255.0


class DigitsMetrics:
    """Fréchet distance and classifier accuracy against the real digits (fit once).

    Args:
        seed: the digits split seed (``DigitsDataset``'s).
    """

    def __init__(self, seed: int = 0) -> None:
        train = DigitsDataset("train", seed=seed)
        self._test = DigitsDataset("test", seed=seed)
        x = _flatten(train.images)
        stats = FeatureStats(64)
        stats.update(x)
        self.mu, self.sigma = stats.mean_cov(unbiased=True)
        self.classifier = SVC(kernel="rbf", C=10.0, gamma="scale").fit(x, train.targets)

    def frechet(self, samples: np.ndarray | torch.Tensor) -> float:
        """Pixel-space Fréchet distance of uint8 ``[N, 1, 8, 8]`` samples (N ≥ 2) to the training digits."""
        stats = FeatureStats(64)
        stats.update(_flatten(samples))
        mu, sigma = stats.mean_cov(unbiased=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            return frechet_distance(mu, sigma, self.mu, self.sigma)

    def predict(self, samples: np.ndarray | torch.Tensor) -> np.ndarray:
        """Classifier's class ``int64 [N]`` for uint8 ``[N, 1, 8, 8]`` samples."""
        return self.classifier.predict(_flatten(samples)).astype(np.int64)

    def accuracy(self, samples: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
        """Fraction of samples classified as their intended class ``labels`` (int ``[N]``)."""
        if isinstance(labels, torch.Tensor):
            labels = labels.detach().cpu().numpy()
        labels = np.asarray(labels).reshape(-1)
        pred = self.predict(samples)
        if labels.shape != pred.shape:
            raise ValueError(f"{len(pred)} samples but {labels.shape[0]} labels")
        return float(np.mean(pred == labels))

    def real_floor(self) -> RealFloor:
        """Fréchet distance and accuracy of the held-out real test digits."""
        images = self._test.images
        return RealFloor(self.frechet(images), self.accuracy(images, self._test.targets), len(images))
