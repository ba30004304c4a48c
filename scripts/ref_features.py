#!/usr/bin/env python
"""Reference files of the optional metrics (tvm/eval/extra_metrics.py) for an RGB dataset.

Examples::

    # precision/recall (pr50k3_full): all reference feature vectors, StyleGAN's VGG-16 by default
    python scripts/ref_features.py --data=img256.zip --dest=refs/img256-vgg16.npz
    # FD-DINOv2 (fd_dinov2): DINOv2 ViT-L/14 mean and covariance (unbiased)
    python scripts/ref_features.py --dinov2=/path/to/dinov2-checkout --data=img256.zip --dest=refs/img256-dinov2.npz

The first writes ``features`` (float32 [N, D]), ``num_images``, ``resolution`` and ``detector``
(:func:`tvm.eval.extra_metrics.save_ref_features`; set ``eval.ref_features`` to it and
``eval.pr_detector_url`` to the same ``--detector``). The second writes our statistics format
(``mu``, ``sigma``, ``num_images``, ``resolution``; set ``eval.dinov2_ref_stats`` to it). DINOv2
is loaded from local files only unless ``--allow-download``
(:func:`tvm.eval.extra_metrics.load_dinov2`).
"""

import argparse
import sys
from collections.abc import Sequence

import torch

from tvm.data.datasets import ImageFolderDataset
from tvm.eval import extra_metrics as em
from tvm.eval.fid import compute_reference_stats, load_inception_detector, save_ref_stats


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="RGB dataset (zip or folder)")
    parser.add_argument("--dest", required=True, help="output .npz")
    parser.add_argument("--detector", default=em.VGG16_URL, help="feature network for precision/recall (URL or file)")
    parser.add_argument(
        "--dinov2",
        default=None,
        help="DINOv2 source: TorchScript file, local checkout or hub repo; "
        "writes FD-DINOv2 statistics instead of features",
    )
    parser.add_argument("--dinov2-weights", default=None, help="state dict for a DINOv2 checkout")
    parser.add_argument("--allow-download", action="store_true", help="let torch.hub fetch DINOv2")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    dataset = ImageFolderDataset(args.data, use_labels=False, channels=3)
    if args.dinov2:
        model = em.load_dinov2(
            args.dinov2, device=args.device, weights=args.dinov2_weights, allow_download=args.allow_download
        )
        ref = compute_reference_stats(
            dataset,
            model,
            batch_size=args.batch,
            max_images=args.max_images,
            device=args.device,
            num_workers=args.workers,
        )
        save_ref_stats(args.dest, ref)
        print(f"DINOv2 statistics of {ref.num_images} images at {ref.resolution}px -> {args.dest}")
        return 0
    detector = load_inception_detector(args.detector, device=args.device)
    feats = em.compute_reference_features(
        dataset,
        detector,
        batch_size=args.batch,
        max_images=args.max_images,
        device=args.device,
        num_workers=args.workers,
        detector_name=args.detector,
    )
    em.save_ref_features(args.dest, feats)
    print(f"{feats.features.shape[0]} features ({feats.features.shape[1]}-d) at {feats.resolution}px -> {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
