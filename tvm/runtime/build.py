"""Build the run's objects from the config: dataset, encoder, network, optimizer, the training batches.

Class paths in the configs (``dataset.class_name`` …) keep the authors' key names but resolve
through the explicit registries below, never through arbitrary imports.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from omegaconf import DictConfig

from tvm.config import to_container
from tvm.data.datasets import ImageFolderDataset, InfiniteSampler
from tvm.data.digits import DigitsDataset, Split
from tvm.data.encoders import build_encoder
from tvm.method.times import Guidance, TimeSampling
from tvm.method.wrapper import TVMWrapper
from tvm.models.dit import DiT
from tvm.runtime.distributed import DistContext

DATASETS = {"tvm.data.datasets.ImageFolderDataset": ImageFolderDataset, "tvm.data.digits.DigitsDataset": DigitsDataset}
ImageDataset = ImageFolderDataset | DigitsDataset  # the dataset classes (build_dataset returns one)
NETWORKS = {"tvm.method.wrapper.TVMWrapper": TVMWrapper}
# ``loss.class_name`` selects nothing: there is one TVM objective (tvm/method; no class of this name). The
# key is the authors'; these are the names it may carry, each standing for that objective:
# the authors' class (``training.loss.TVMLoss``, upstream's module layout) and the name our configs and
# stored checkpoints have carried (``tvm.method.loss.TVMLoss``, kept so those load).
LOSSES = {
    "training.loss.TVMLoss": "the TVM objective (the authors' class name)",
    "tvm.method.loss.TVMLoss": "the TVM objective (this package's configs and checkpoints)",
}
OPTIMIZERS = {"torch.optim.AdamW": torch.optim.AdamW}


def _lookup(registry: dict[str, Any], key: str, what: str) -> Any:
    if key not in registry:
        raise ValueError(f"unknown {what} {key!r}; allowed: {', '.join(registry)}")
    return registry[key]


def build_dataset(cfg: DictConfig) -> ImageDataset:
    """The training dataset; errors name a missing path, absent labels or a resolution mismatch."""
    cls = _lookup(DATASETS, cfg.class_name, "dataset.class_name")
    dataset: ImageDataset
    if cls is DigitsDataset:
        if cfg.path:
            raise ValueError(
                f"dataset.path={cfg.path} is set but dataset.class_name={cfg.class_name} reads no files "
                "(the digits ship with scikit-learn): drop dataset.path, or set "
                "dataset.class_name=tvm.data.datasets.ImageFolderDataset to train on that path"
            )
        dataset = DigitsDataset(split=cast(Split, str(cfg.split)), use_labels=cfg.use_labels)  # schema-checked
    else:
        if not cfg.path:
            raise ValueError(
                "dataset.path is not set: point it at an EDM-format zip or folder "
                "(scripts/dataset_tool.py makes one)"
            )
        dataset = ImageFolderDataset(
            cfg.path,
            use_labels=cfg.use_labels,
            xflip=cfg.xflip,
            max_size=cfg.max_size,
            cache=cfg.cache,
            resolution=cfg.resolution,
        )
    if cfg.use_labels and not dataset.has_labels:
        raise ValueError(
            f"dataset.use_labels is true but the dataset at {cfg.path or cfg.class_name} has no labels "
            "(dataset.json 'labels' is null or missing); set dataset.use_labels=false for "
            "unconditional training"
        )
    if cfg.resolution is not None and dataset.resolution != cfg.resolution:
        raise ValueError(f"dataset resolution {dataset.resolution} does not match dataset.resolution={cfg.resolution}")
    return dataset


def encoder_from_config(cfg: DictConfig) -> Any:
    """The encoder of ``cfg.encoder`` (pixels or SD-VAE latents, docs/method.md §6.3)."""
    if cfg.class_name.endswith("PixelEncoder"):
        return build_encoder({"class_name": cfg.class_name})
    return build_encoder(
        {
            str(key): (list(value) if not isinstance(value, (str, int, float, bool)) else value)
            for key, value in cfg.items()
        }
    )


def resolve_jvp_backend(name: str, device: torch.device) -> str:
    """``auto`` → the Triton kernel on CUDA, the math reference elsewhere."""
    if name == "auto":
        return "triton" if device.type == "cuda" else "math"
    return name


def build_network(
    cfg: DictConfig,
    resolution: int,
    channels: int,
    label_dim: int,
    device: torch.device | str = "cpu",
    init: bool = True,
) -> TVMWrapper:
    """The :class:`TVMWrapper` around a DiT for data of this shape (docs/method.md §3, §3.8).

    ``init=False`` is for weights that are loaded right after (a checkpoint, upstream weights): the
    modules are built on the meta device and their parameters allocated on ``device`` without any
    values — neither the initialisation (docs/method.md §3.8, an SVD per linear layer) nor the
    modules' default inits run, no random numbers are drawn and nothing is copied from the CPU.
    Every parameter then holds arbitrary memory until a strict ``load_state_dict`` fills it (the
    DiT has no buffers).

    Upstream ignores ``network.model_kwargs`` (the DiT always uses its defaults); set
    ``network.honor_model_kwargs=true`` to apply them.
    """
    _lookup(NETWORKS, cfg.class_name, "network.class_name")
    kwargs = to_container(cfg.model_kwargs) if cfg.honor_model_kwargs else {}  # init_type a plain string
    arch = dict(mod_norm=kwargs.pop("do_mod_norm", True), **kwargs)
    with contextlib.nullcontext() if init else torch.device("meta"):
        model = DiT(
            cfg.model_type,
            input_size=resolution,
            in_channels=channels,
            num_classes=label_dim,
            hidden_size=cfg.hidden_size,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            patch_spectral=cfg.patch_spectral,
            init=init,
            **arch,
        )
    device = torch.device(device)
    wrapper = TVMWrapper(
        model,
        data_type=str(cfg.data_type),
        do_scale_param=cfg.do_scale_param,
        detach_jvp=cfg.detach_jvp,
        attn_backend=str(cfg.attn_backend),
        jvp_mode=str(cfg.jvp_mode),
        recompute=str(cfg.recompute),
        jvp_attn_backend=resolve_jvp_backend(str(cfg.jvp_attn_backend), device),
    )
    return wrapper.to(device) if init else wrapper.to_empty(device=device)


def train_in_fp8(net: TVMWrapper, cfg: DictConfig) -> None:
    """``network.fp8=true``: the blocks' token-wise linear layers of the network that trains as FP8 GEMMs,
    forward and backward (``DiT.quantize_fp8(static_weight=False)``; build its EMAs after, so they copy it).
    ValueError naming the setting it cannot run with; the device check is the layers'."""
    if not cfg.fp8:
        return
    if cfg.jvp_mode != "explicit":
        raise ValueError(
            "network.fp8=true needs network.jvp_mode=explicit (torch.func.jvp has no forward-mode rule for the "
            "FP8 GEMMs; the explicit tangents run through them)"
        )
    if cfg.sharding != "ddp":
        raise ValueError(f"network.fp8=true runs with network.sharding=ddp only (got {cfg.sharding})")
    net.model.quantize_fp8(static_weight=False)


def check_fp8_training_supported(cfg: DictConfig, device: torch.device) -> None:
    """ValueError for ``network.fp8=true`` with compiled blocks on a GPU: measured on an H100 (2026-12-08,
    docs/benchmarks.md Round 17), their gradients were wrong (the compiled step's gradients 83% off
    ``torch.func.jvp``'s, against 2e-3 in bf16), and the step was slower than bf16's."""
    if cfg.fp8 and cfg.compile and device.type == "cuda":
        raise ValueError(
            "network.fp8=true with network.compile=true gave wrong gradients on the GPU (docs/benchmarks.md, "
            "Round 17); set network.compile=false to train with FP8 GEMMs eagerly, or network.fp8=false"
        )


def time_sampling(cfg: DictConfig) -> TimeSampling:
    """The loss config's time sampler (docs/method.md §2)."""
    _lookup(LOSSES, cfg.class_name, "loss.class_name")
    return TimeSampling.from_config(cfg)


def guidance(cfg: DictConfig) -> Guidance:
    """The loss config's CFG sampling and label dropout (docs/method.md §2 item 6, §1.6)."""
    return Guidance.from_config(cfg)


def build_optimizer(cfg: DictConfig, params: Any, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused where the device supports it (its ``found_inf`` input skips a step on device)."""
    cls = _lookup(OPTIMIZERS, cfg.class_name, "optimizer.class_name")
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, fused=True)


def training_batches(
    cfg: DictConfig,
    dataset: ImageDataset,
    batch_gpu: int,
    dist: DistContext,
    seed: int,
    start: int,
    worker_init_fn: Callable[[int], None] | None = None,
) -> Iterator[Any]:
    """This rank's endless stream of ``(images, labels)`` batches of ``batch_gpu``, from the global
    stream position ``start`` (images consumed so far; :class:`InfiniteSampler`), with the
    ``dataloader`` config's workers, pinning and prefetching."""
    sampler = InfiniteSampler(len(dataset), rank=dist.rank, world_size=dist.world_size, seed=seed, start_index=start)
    workers = cfg.num_workers
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_gpu,
        sampler=sampler,
        num_workers=workers,
        pin_memory=cfg.pin_memory and dist.device.type == "cuda",
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
        persistent_workers=workers > 0,
        worker_init_fn=worker_init_fn,
    )
    while True:
        yield from loader
