"""The structured configuration schema (docs/method.md §8.3) and its composition.

Every knob lives here with its unit and default. The key names are the authors' (so their
command lines work: ``network.do_scale_param=false``), except what was unsafe or broken
upstream: there is no ``logger.api_key`` (the wandb key comes only from ``WANDB_API_KEY``),
class paths point to this package, ``training.total_ticks`` is the paper's 300K iterations
(3,000 ticks of 100 iterations) rather than 10M, and the dataset is not cached per rank by
default. ``configs/base.yaml`` starts from this schema; every experiment file overrides it.

The schema is registered with Hydra's ConfigStore, so an unknown or mistyped key (in a file or
on the command line) is an error that names the key. Hydra adds a key given as ``+key=value``
whatever the schema says; :func:`validate_config` (run by the trainer before anything else) refuses
such keys and out-of-range values, naming the key.

Fields with a fixed set of values are :class:`Choice` enums, so a bad value fails at composition
with an error naming the key and the allowed values. A choice compares equal to, hashes and
formats as its plain string (``cfg.network.jvp_mode == "explicit"``); :func:`to_container` (what
checkpoints, ``config.yaml`` and wandb receive) holds plain strings.
"""

from __future__ import annotations

import difflib
import math
import sys
import typing
from dataclasses import dataclass, field, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


if sys.version_info >= (3, 11):
    from enum import StrEnum as Choice
else:

    class Choice(str, Enum):
        """Python 3.10's stand-in for :class:`enum.StrEnum`, which the functional API below gives on 3.11+."""

        def __str__(self) -> str:
            return self.value

        def __format__(self, spec: str) -> str:
            return format(self.value, spec)

        @staticmethod
        def _generate_next_value_(name: str, start: int, count: int, last_values: list) -> str:
            return name


# The choice fields. Each is a str enum whose member names are its values (OmegaConf looks a string up
# by name; StrEnum's functional API makes each value its name in lower case, so names are lower case),
# made with the functional API because some values are not identifiers ("reduce-overhead", "raise").
WandbMode = Choice("WandbMode", ["online", "offline", "disabled"])
DigitsSplit = Choice("DigitsSplit", ["train", "test", "all"])
InitType = Choice("InitType", ["spectral", "xunif"])
DataType = Choice("DataType", ["bf16", "fp16", "fp32"])
CompileScope = Choice("CompileScope", ["blocks", "full"])
CompileMode = Choice("CompileMode", ["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"])
Sharding = Choice("Sharding", ["ddp", "fsdp2"])
Recompute = Choice("Recompute", ["none", "fm", "all"])
AttnBackend = Choice("AttnBackend", ["sdpa", "math", "triton"])
JVPAttnBackend = Choice("JVPAttnBackend", ["auto", "math", "triton"])
JVPMode = Choice("JVPMode", ["explicit", "autograd"])
TimeScheme = Choice("TimeScheme", ["gap", "trunc", "clamp"])
FMTime = Choice("FMTime", ["separate", "shared"])
CFGRangeMode = Choice("CFGRangeMode", ["w", "beta"])
NonfinitePolicy = Choice("NonfinitePolicy", ["skip", "raise"])
LabelMode = Choice("LabelMode", ["uniform", "empirical"])


@dataclass
class LoggerConfig:
    project: str = "tvm"  # wandb project; also a run-dir component when run_dir is unset
    entity: Optional[str] = None  # wandb entity
    mode: WandbMode = WandbMode.disabled  # wandb mode (the key only from WANDB_API_KEY)


@dataclass
class DatasetConfig:
    class_name: str = "tvm.data.datasets.ImageFolderDataset"  # or tvm.data.digits.DigitsDataset
    path: Optional[str] = None  # zip or folder (EDM format); unused for the digits
    use_labels: bool = True  # class-conditional training (false: unconditional)
    xflip: bool = False  # doubles the dataset with mirrored copies
    cache: bool = False  # keep decoded items in each worker's memory (costs RAM per rank)
    max_size: Optional[int] = None  # random subset (seed 0) of this many items
    resolution: Optional[int] = None  # expected resolution; checked against the data when set
    split: DigitsSplit = DigitsSplit.train  # digits only


@dataclass
class DataLoaderConfig:
    pin_memory: bool = True
    num_workers: int = 1  # data-loading processes per GPU (0: in the training process)
    prefetch_factor: int = 2


@dataclass
class EncoderConfig:
    class_name: str = "tvm.data.encoders.StabilityVAEEncoder"  # or tvm.data.encoders.PixelEncoder
    vae_name: str = "stabilityai/sd-vae-ft-ema"  # hub name or a local weights directory
    raw_mean: list[float] = field(default_factory=lambda: [0.86488, -0.27787343, 0.21616915, 0.3738409])
    raw_std: list[float] = field(default_factory=lambda: [4.85503674, 5.31922414, 3.93725398, 3.9870003])
    final_mean: float = 0.0
    final_std: float = 1.0
    use_fp16: bool = True
    batch_size: int = 8  # VAE decode batch


@dataclass
class ModelKwargs:
    """The authors' intended DiT options; upstream swallows them (docs/method.md §3.8)."""

    do_mod_norm: bool = True
    learn_guidance: bool = True
    dropout: float = 0.0
    init_type: InitType = InitType.spectral
    time_specinit: bool = False
    qk_norm: bool = True


@dataclass
class NetworkConfig:
    class_name: str = "tvm.method.wrapper.TVMWrapper"
    model_type: str = "DiT_XL_2_18h"  # a name of tvm.models.dit.VARIANTS or an authors' class name
    model_kwargs: ModelKwargs = field(default_factory=ModelKwargs)
    honor_model_kwargs: bool = False  # apply model_kwargs (paper-faithful); false = upstream behaviour
    patch_spectral: bool = False  # paper's intended spectral patch-embed init (docs/method.md §11 item 2)
    hidden_size: Optional[int] = None  # overrides of the variant (small models)
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    data_type: DataType = DataType.bf16  # CUDA autocast dtype (CPU always fp32)
    detach_jvp: bool = False
    do_scale_param: bool = True
    compile: bool = False  # torch.compile training forward, see compile_scope (configs/base.yaml: true)
    # blocks: each DiT block, regional (fast to compile) | full: the whole loss forward
    compile_scope: CompileScope = CompileScope.blocks
    compile_memory_budget: float = 1.0  # share of activations kept for the backward (1: default; less recomputes)
    # the same for the flow-matching term's graphs (null: compile_memory_budget); only with training.split_backward,
    # without which that term has no graphs of its own
    compile_memory_budget_fm: Optional[float] = None
    # torch.compile mode; reduce-overhead = CUDA graphs (no per-kernel launch cost); max-autotune = autotuned
    # GEMM templates with fused epilogues (minutes of compilation) + CUDA graphs; …-no-cudagraphs without graphs
    compile_mode: CompileMode = CompileMode.default
    compile_cache: bool = True  # keep compiled artifacts in <run dir>/compile-cache.bin; a restart loads them
    # ddp: every rank holds the whole state | fsdp2: sharded per DiT block (tvm/train/sharding.py)
    sharding: Sharding = Sharding.ddp
    # activation checkpointing: none | fm (FM-branch forward; does not lower the peak) | all (+ JVP blocks)
    recompute: Recompute = Recompute.none
    attn_backend: AttnBackend = AttnBackend.sdpa  # plain forwards
    jvp_attn_backend: JVPAttnBackend = JVPAttnBackend.auto  # inside the JVP; auto: triton on CUDA, math on CPU
    jvp_mode: JVPMode = JVPMode.explicit  # ∂F/∂s: explicit tangents through the layers | autograd (torch.func.jvp)
    # train with the blocks' qkv/proj/fc1/fc2 as FP8 (e4m3) GEMMs, forward and backward (tvm/models/fp8.py): opt-in,
    # changes the numerics (not upstream's); GPUs of compute capability >= 8.9, explicit jvp_mode, ddp sharding
    fp8: bool = False


@dataclass
class LossConfig:
    # Selects nothing (there is one objective); the names accepted are tvm/runtime/build.py LOSSES.
    class_name: str = "tvm.method.loss.TVMLoss"
    scheme: TimeScheme = TimeScheme.gap  # docs/method.md §2, §10.3
    fm_time: FMTime = FMTime.separate  # separate s' (gap*) | shared (s' = s)
    s_P_mean: float = -0.4
    s_P_std: float = 1.0
    gap_P_mean: float = -0.8
    gap_P_std: float = 1.0
    t_P_mean: float = 1.0  # trunc/clamp only
    t_P_std: float = 1.0
    frac_t_eq_s: float = 0.0
    cfg: Optional[float] = 2.0  # fixed CFG scale w; null → range or β ~ U[0, 1)
    min_cfg: Optional[float] = None
    max_cfg: Optional[float] = None
    cfg_range_mode: CFGRangeMode = CFGRangeMode.w  # w ~ U[min, max] (upstream) | beta ~ U[1/max, 1/min] (paper)
    label_dropout: float = 0.1


@dataclass
class OptimizerConfig:
    class_name: str = "torch.optim.AdamW"
    lr: float = 1e-4  # learning rate (constant)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class TrainingConfig:
    total_ticks: int = 3000  # length in ticks (paper: 300K iterations = 3,000 ticks of 100 iterations)
    kimg_per_tick: float = 204.8  # thousands of images per tick (100 iterations at batch 2048)
    ema_beta: float = 0.9999  # eval EMA decay per step (samples, FID, snapshots)
    ema_target_beta: Optional[float] = 0.99  # teacher EMA; null = the online network is its own teacher
    batch_size: int = 2048  # global batch (images per optimizer step)
    batch_gpu: Optional[int] = None  # per-GPU micro-batch (images); below batch/world → gradient accumulation
    # backward of each loss term on its own (terminal, then flow matching): same gradient, lower peak memory
    split_backward: bool = False
    # the whole step (forwards, backwards, AdamW, EMAs) as one CUDA graph after 3 eager steps, bit-identical;
    # one process only; −3.5% step time on an H100 (docs/benchmarks.md, Round 7)
    cuda_graph: bool = False
    cudnn_benchmark: bool = True
    enable_tf32: bool = False
    snapshot_ticks: int = 500  # permanent checkpoints every this many ticks
    state_dump_ticks: int = 500  # the authors' key, accepted and ignored: every checkpoint holds full state
    ckpt_ticks: int = 50  # rolling checkpoint every this many ticks
    keep_last: int = 3  # rolling checkpoints kept
    sample_ticks: int = 50  # sample grids every this many ticks
    eval_ticks: int = 250  # metrics every this many ticks (after no_eval_before_tick)
    no_eval_before_tick: int = 300  # no metrics before this tick
    metrics: list[str] = field(default_factory=lambda: ["fid50k_full"])  # during training: fid50k_full, digits, ...
    seed: Optional[int] = 0  # null: rank 0 draws one and broadcasts it
    transfer: Optional[str] = None  # checkpoint path: load weights only (fine-tuning)
    resume: Optional[str] = None  # checkpoint path to continue from (default: latest in run dir)
    max_grad_norm: Optional[float] = None  # L2 clipping after the all-reduce; null = none
    num_samples: int = 16  # images per sample grid
    do_log_image: bool = True
    nonfinite_policy: NonfinitePolicy = NonfinitePolicy.skip  # skip: count, raise after max_nonfinite_in_row
    max_nonfinite_in_row: int = 10
    preempt_check_steps: int = 10  # agree across ranks on a preemption signal every this many steps
    max_steps: Optional[int] = None  # stop after this many optimizer steps (tests, smoke runs)


@dataclass
class SamplerConfig:
    num_steps: int = 1
    cfg_scale: float = 2.0


@dataclass
class EvalConfig:
    seed: int = 0
    cudnn_benchmark: bool = True
    batch_size: int = 128  # images per generation batch (global; split over ranks)
    batch_gpu: Optional[int] = None  # the authors' key, accepted and ignored (unused upstream too): see batch_size
    metrics: list[str] = field(default_factory=lambda: ["fid50k_full"])
    resume: Optional[str] = None  # a checkpoint or a run directory (newest first)
    detector_url: str = (
        "https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/"
        "metrics/inception-2015-12-05.pkl"
    )  # FID/IS Inception: URL (cached) or local file
    ref_stats: Optional[str] = None  # reference statistics (authors' img256.pkl / img512.pkl or .npz)
    # Optional metrics (tvm/eval/extra_metrics.py): is50k uses detector_url; pr50k3_full needs ref_features
    # (.npz 'features', scripts/ref_features.py) from pr_detector_url; fd_dinov2 needs DINOv2 locally.
    pr_detector_url: str = (
        "https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/vgg16.pkl"
    )
    ref_features: Optional[str] = None
    dinov2: Optional[str] = "facebookresearch/dinov2"  # TorchScript file, local hub checkout, or hub repo (its cache)
    dinov2_weights: Optional[str] = None  # checkout state dict (default <dir or hub>/dinov2_vitl14_pretrain.pth)
    dinov2_ref_stats: Optional[str] = None  # .npz (mu, sigma); default: ref_stats when it is an EDM2 pickle
    dinov2_allow_download: bool = False
    num_images: int = 50000  # generated images per metric (fid50k_full: 50,000)
    label_mode: LabelMode = LabelMode.uniform  # empirical: training-set label frequencies (upstream)
    enable_tf32: bool = False
    fp8: bool = False  # sample with FP8 GEMMs in the blocks (DiT.quantize_fp8; GPUs of compute capability >= 8.9)


@dataclass
class Config:
    name: str = "tvm"
    outputdir: str = "./outputs"
    run_dir: Optional[str] = None  # default: <outputdir>/<name>
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    dataloader: DataLoaderConfig = field(default_factory=DataLoaderConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sampling: dict[str, SamplerConfig] = field(
        default_factory=lambda: {
            "1_step": SamplerConfig(1, 2.0),
            "2_step": SamplerConfig(2, 2.0),
            "4_step": SamplerConfig(4, 2.0),
        }
    )
    eval: EvalConfig = field(default_factory=EvalConfig)


def register_schema() -> None:
    """Register :class:`Config` as ``schema`` so that ``configs/base.yaml`` can start from it."""
    ConfigStore.instance().store(name="schema", node=Config)


register_schema()


def compose_config(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` with overrides, as ``train.py`` would (tests, scripts)."""
    from hydra import compose, initialize_config_dir

    config_name = config_name.removesuffix(".yaml")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name=config_name, overrides=list(overrides or []))


def to_container(cfg: DictConfig | dict) -> dict[str, Any]:
    """A plain, resolved dict (what checkpoints store): choices are plain strings."""
    if isinstance(cfg, dict):
        return cfg
    # A DictConfig of the schema converts to a dict with string keys.
    return typing.cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))


def from_container(data: dict[str, Any]) -> DictConfig:
    """Validate a stored plain dict against the schema (unknown keys are errors)."""
    schema = OmegaConf.structured(Config)
    merged = OmegaConf.merge(schema, data)
    assert isinstance(merged, DictConfig)  # merged into a structured (dict) config
    return merged


# Keys whose value must be > 0 (None allowed where the schema has Optional), and >= 0
# (training.total_ticks=0 sets the run up, evaluates at step 0 where configured, and stops).
POSITIVE_KEYS = (
    "training.kimg_per_tick",
    "training.batch_size",
    "training.batch_gpu",
    "training.snapshot_ticks",
    "training.state_dump_ticks",
    "training.ckpt_ticks",
    "training.keep_last",
    "training.sample_ticks",
    "training.eval_ticks",
    "training.num_samples",
    "training.max_nonfinite_in_row",
    "training.preempt_check_steps",
    "training.max_steps",
    "training.max_grad_norm",
    "dataloader.prefetch_factor",
    "encoder.batch_size",
    "eval.batch_size",
    "eval.batch_gpu",
    "eval.num_images",
)
NON_NEGATIVE_KEYS = (
    "training.total_ticks",
    "dataloader.num_workers",
    "optimizer.lr",
    "optimizer.eps",
    "optimizer.weight_decay",
)


def _unknown_keys(data: Any, schema: type, prefix: str = "") -> list[str]:
    """Dotted keys of the plain dict ``data`` that the dataclass ``schema`` does not define, each
    with a close match when there is one (``training.totl_ticks (did you mean training.total_ticks?)``)."""
    hints = typing.get_type_hints(schema)
    found = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            found.append(path + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
            continue
        hint = hints[key]
        if isinstance(hint, type) and is_dataclass(hint) and isinstance(value, dict):
            found += _unknown_keys(value, hint, f"{path}.")
        elif typing.get_origin(hint) is dict and isinstance(value, dict):
            entry = typing.get_args(hint)[1]
            if isinstance(entry, type) and is_dataclass(entry):
                for name, item in value.items():
                    if isinstance(item, dict):
                        found += _unknown_keys(item, entry, f"{path}.{name}.")
    return found


def validate_config(cfg: DictConfig) -> None:
    """Refuse what composition lets through: keys the schema does not define (Hydra adds any
    ``+key=value``), counts, sizes and intervals that are not positive, and settings training cannot
    run with (fp16 without loss scaling, resume and transfer together). ValueError naming the key."""
    unknown = _unknown_keys(OmegaConf.to_container(cfg, resolve=False), Config)
    if unknown:
        raise ValueError(f"unknown config key {', '.join(unknown)}: not in the schema (tvm/config.py)")
    for keys, ok, what in ((POSITIVE_KEYS, lambda v: v > 0, "> 0"), (NON_NEGATIVE_KEYS, lambda v: v >= 0, ">= 0")):
        for key in keys:
            value = OmegaConf.select(cfg, key)
            if value is not None and not (math.isfinite(value) and ok(value)):
                raise ValueError(f"{key}={value} is not allowed: it must be {what}")
    for name, sampler in (cfg.get("sampling") or {}).items():
        if not sampler.num_steps >= 1 or not sampler.cfg_scale >= 1:
            raise ValueError(
                f"sampling.{name}: num_steps={sampler.num_steps}, cfg_scale={sampler.cfg_scale} is not "
                "allowed: num_steps must be >= 1 and cfg_scale >= 1 (1 = unguided)"
            )
    if cfg.network.data_type == DataType.fp16:
        raise ValueError(
            "network.data_type=fp16 is not supported for training (it needs loss scaling); use bf16 on GPUs or fp32"
        )
    if cfg.training.resume and cfg.training.transfer:
        raise ValueError("training.resume and training.transfer are mutually exclusive")
    for key in ("network.compile_memory_budget", "network.compile_memory_budget_fm"):
        value = OmegaConf.select(cfg, key)
        if value is not None and not 0 <= value <= 1:
            raise ValueError(f"{key}={value} is not allowed: it must be in [0, 1]")
