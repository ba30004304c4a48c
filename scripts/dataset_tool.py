#!/usr/bin/env python
"""Prepare EDM-format datasets: ``convert``, ``encode``, ``getstats`` (docs/method.md §6.2).

Examples::

    python scripts/dataset_tool.py convert --source=imagenet/train --dest=img256.zip \\
        --resolution=256 --transform=center-crop-dhariwal
    torchrun --nproc-per-node=8 scripts/dataset_tool.py encode --source=img256.zip \\
        --dest=img256-sd.zip --vae=stabilityai/sd-vae-ft-ema
    python scripts/dataset_tool.py getstats --source=img256-sd.zip

The logic lives in :mod:`tvm.data.dataset_tool`.
"""

import sys

from tvm.data.dataset_tool import main

if __name__ == "__main__":
    sys.exit(main())
