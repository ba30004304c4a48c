#!/usr/bin/env python
"""Compute FID reference statistics of an RGB dataset (docs/method.md §7.1).

Example::

    python scripts/ref_stats.py --data=img256.zip --dest=refs/img256.npz

Writes our ``.npz`` format (``mu``, ``sigma`` with the unbiased covariance, ``num_images``,
``resolution``), readable by :func:`tvm.eval.fid.load_ref_stats`. The detector is loaded only from
``--detector`` (a URL, cached under ``$TVM_CACHE_DIR/detectors``, or a local file).
"""

import argparse
import sys
from collections.abc import Sequence

import torch

from tvm.data.datasets import ImageFolderDataset
from tvm.eval.fid import INCEPTION_URL, compute_reference_stats, load_inception_detector, save_ref_stats


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="RGB dataset (zip or folder)")
    parser.add_argument("--dest", required=True, help="output .npz")
    parser.add_argument("--detector", default=INCEPTION_URL, help="detector URL or local .pt/.pkl file")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    dataset = ImageFolderDataset(args.data, use_labels=False, channels=3)
    detector = load_inception_detector(args.detector, device=args.device)
    ref = compute_reference_stats(
        dataset,
        detector,
        batch_size=args.batch,
        max_images=args.max_images,
        device=args.device,
        num_workers=args.workers,
    )
    save_ref_stats(args.dest, ref)
    print(f"{ref.num_images} images at {ref.resolution}px -> {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
