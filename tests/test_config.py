"""The configs: the authors' values (docs/method.md §8.5, §12 items 25, 27), composition, and the schema."""

from __future__ import annotations

import dataclasses
import importlib
import io
import pickle
import re
import typing

import pytest
import torch
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from tvm import config as schema
from tvm.config import CONFIG_DIR, Choice, compose_config, from_container, to_container, validate_config

AUTHORS = {  # name, project, time_specinit (inert), do_scale_param, cfg, max_grad_norm, ref stats, raw_std[0]
    "im256_w2": ("img256_w2", "tvm_imagenet256", True, True, 2.0, None, "img256.pkl", 4.85503674),
    "im256_w1p75": ("img256_w1p75", "tvm_imagenet256", False, True, 1.75, None, "img256.pkl", 4.85503674),
    "im512_w2p5": ("img512_w2p5", "tvm_imagenet512", False, False, 2.5, 1.0, "img512.pkl", 5.27),
    "im512_w2p25": ("img512_w2p25", "tvm_imagenet512", True, True, 2.25, 1.0, "img512.pkl", 5.27),
}


@pytest.mark.parametrize("config_name", sorted(AUTHORS))
def test_authors_configs(config_name):
    name, project, specinit, scale, w, clip, ref, raw_std0 = AUTHORS[config_name]
    cfg = compose_config(config_name)
    assert (cfg.name, cfg.logger.project, cfg.network.model_kwargs.time_specinit) == (name, project, specinit)
    assert cfg.network.do_scale_param is scale and cfg.loss.cfg == w and cfg.training.max_grad_norm == clip
    assert cfg.eval.ref_stats.endswith(ref) and cfg.encoder.raw_std[0] == raw_std0
    assert {k: (v.num_steps, v.cfg_scale) for k, v in cfg.sampling.items()} == {
        "1_step": (1, w),
        "2_step": (2, w),
        "4_step": (4, w),
    }
    # Shared values (docs/method.md §2, §5.1, §8.3, paper Table 6).
    assert cfg.network.model_type == "DiT_XL_2_18h" and cfg.network.data_type == "bf16"
    assert (cfg.loss.s_P_mean, cfg.loss.s_P_std, cfg.loss.gap_P_mean, cfg.loss.gap_P_std) == (-0.4, 1.0, -0.8, 1.0)
    assert cfg.loss.label_dropout == 0.1
    assert (cfg.optimizer.lr, list(cfg.optimizer.betas), cfg.optimizer.eps, cfg.optimizer.weight_decay) == (
        1e-4,
        [0.9, 0.95],
        1e-8,
        0.0,
    )
    assert (cfg.training.ema_beta, cfg.training.ema_target_beta, cfg.training.batch_size) == (0.9999, 0.99, 2048)
    # One tick = 100 iterations at batch 2048; 3,000 ticks = the paper's 300K iterations (§11 item 9).
    assert cfg.training.kimg_per_tick * 1000 / cfg.training.batch_size == 100
    assert cfg.training.total_ticks == 3000
    assert (cfg.training.snapshot_ticks, cfg.training.ckpt_ticks, cfg.training.eval_ticks) == (500, 50, 250)
    assert cfg.dataset.cache is False  # no per-rank copy of the dataset by default (§11 item 17)
    assert "api_key" not in cfg.logger


def test_unknown_keys_are_errors_that_name_the_key():
    with pytest.raises(ConfigCompositionException, match="training.bogus"):
        compose_config("im256_w2", ["training.bogus=1"])
    with pytest.raises(ConfigCompositionException):
        compose_config("im256_w2", ["logger.api_key=secret"])
    with pytest.raises(ConfigKeyError, match="nonsense"):
        from_container({"training": {"nonsense": 3}})


@pytest.mark.parametrize(
    "override, message",
    [
        ("+training.totl_ticks=3", "unknown config key training.totl_ticks (did you mean training.total_ticks?)"),
        (
            "+network.model_kwargs.dropot=0.1",
            "unknown config key network.model_kwargs.dropot (did you mean network.model_kwargs.dropout?)",
        ),
        ("+colour=red", "unknown config key colour: not in the schema"),
        ("training.total_ticks=-3", "training.total_ticks=-3 is not allowed: it must be >= 0"),
        ("training.batch_size=-64", "training.batch_size=-64 is not allowed: it must be > 0"),
        ("training.batch_gpu=-8", "training.batch_gpu=-8 is not allowed: it must be > 0"),
        ("training.kimg_per_tick=0", "training.kimg_per_tick=0.0 is not allowed: it must be > 0"),
        ("eval.batch_size=0", "eval.batch_size=0 is not allowed: it must be > 0"),
        ("dataloader.num_workers=-1", "dataloader.num_workers=-1 is not allowed: it must be >= 0"),
        ("network.compile_memory_budget=1.5", "network.compile_memory_budget=1.5 is not allowed: it must be in [0, 1]"),
        (
            "network.compile_memory_budget_fm=-0.1",
            "network.compile_memory_budget_fm=-0.1 is not allowed: it must be in [0, 1]",
        ),
    ],
)
def test_validate_config_names_the_key(override, message):
    """What Hydra lets through (``+key`` adds any key; values are only type-checked) is refused by the
    trainer's validation, naming the key."""
    cfg = compose_config("tiny", [override])
    with pytest.raises(ValueError) as info:
        validate_config(cfg)
    assert message in str(info.value)


@pytest.mark.parametrize("config_name", ["tiny", "base", "cifar10", *sorted(AUTHORS)])
def test_every_shipped_config_validates(config_name):
    validate_config(compose_config(config_name))
    validate_config(compose_config(config_name, ["training.batch_gpu=null", "training.max_steps=5"]))


def test_stored_config_round_trips():
    cfg = compose_config("tiny")
    assert to_container(from_container(to_container(cfg))) == to_container(cfg)


def _choice_fields(cls: type = schema.Config, prefix: str = "") -> list[tuple[str, type]]:
    """Every ``(dotted key, Choice enum)`` of the schema."""
    found = []
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            found += _choice_fields(hint, f"{prefix}{name}.")
        elif isinstance(hint, type) and issubclass(hint, Choice):
            found.append((f"{prefix}{name}", hint))
    return found


CHOICES = _choice_fields()


def test_the_schema_has_the_choice_fields():
    assert {key for key, _ in CHOICES} == {
        "logger.mode",
        "dataset.split",
        "network.model_kwargs.init_type",
        "network.data_type",
        "network.compile_scope",
        "network.compile_mode",
        "network.sharding",
        "network.recompute",
        "network.attn_backend",
        "network.jvp_attn_backend",
        "network.jvp_mode",
        "loss.scheme",
        "loss.fm_time",
        "loss.cfg_range_mode",
        "training.nonfinite_policy",
        "eval.label_mode",
    }


@pytest.mark.parametrize("key, choice", CHOICES, ids=[key for key, _ in CHOICES])
def test_a_bad_choice_fails_at_composition_naming_the_key_and_the_values(key, choice):
    allowed = f"expected one of [{', '.join(member.value for member in choice)}]"
    with pytest.raises(ConfigCompositionException) as info:
        compose_config("tiny", [f"{key}=bogus"])
    message = str(info.value.__cause__)
    assert f"full_key: {key}" in message and "Invalid value 'bogus'" in message and allowed in message
    # A stored config (a checkpoint's plain dict) is checked the same way.
    stored = OmegaConf.create(to_container(compose_config("tiny")))
    OmegaConf.update(stored, key, "bogus")
    with pytest.raises(ValidationError, match=rf"(?s)Invalid value 'bogus', {re.escape(allowed)}.*full_key: {key}"):
        from_container(OmegaConf.to_container(stored))
    # Every allowed value composes, and reads back equal to its plain string.
    for member in choice:
        value = OmegaConf.select(compose_config("tiny", [f"{key}={member.value}"]), key)
        assert value == member.value and f"{value}" == str(value) == member.value


def test_choices_read_as_plain_strings_and_are_stored_as_plain_strings(tmp_path):
    cfg = compose_config("tiny", ["network.compile_mode=reduce-overhead", "network.jvp_mode=autograd"])
    mode = cfg.network.jvp_mode
    assert mode == "autograd" and mode != "explicit" and mode in ("autograd",) and {"autograd": 1}[mode] == 1
    assert (
        f"network.jvp_mode={mode}" == "network.jvp_mode=autograd" and str(cfg.network.compile_mode) == "reduce-overhead"
    )
    stored = to_container(cfg)  # what checkpoints and wandb receive
    assert type(stored["network"]["jvp_mode"]) is str and stored["network"]["compile_mode"] == "reduce-overhead"
    assert type(stored["network"]["model_kwargs"]["init_type"]) is str
    assert "jvp_mode: autograd" in OmegaConf.to_yaml(cfg) and "JVPMode" not in OmegaConf.to_yaml(cfg)  # config.yaml
    assert yaml.safe_load(yaml.safe_dump(stored)) == stored
    buffer = io.BytesIO()
    torch.save({"config": stored}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["config"]  # a checkpoint's config loads without enum classes
    assert from_container(loaded).network.jvp_mode == "autograd" and loaded == stored
    assert pickle.loads(pickle.dumps(cfg.network.jvp_mode)) is schema.JVPMode.autograd


def test_choices_are_the_values_the_library_accepts():
    """The schema's choices and the library's own checks (functions also called with plain strings)
    name the same values."""
    from tvm.eval.generate import LABEL_MODES
    from tvm.method.times import FM_TIMES, RANGE_MODES, TIME_SCHEMES
    from tvm.method.wrapper import DATA_TYPES, JVP_MODES, RECOMPUTE
    from tvm.models.attention import BACKENDS
    from tvm.models.init import INIT_TYPES
    from tvm.runtime.run_logging import WANDB_MODES

    def values(choice: type[Choice]) -> set[str]:
        return {member.value for member in choice}

    assert values(schema.DataType) == set(DATA_TYPES) and values(schema.JVPMode) == set(JVP_MODES)
    assert values(schema.Recompute) == set(RECOMPUTE) and values(schema.AttnBackend) == set(BACKENDS)
    assert values(schema.JVPAttnBackend) == {"auto"} | set(BACKENDS) - {"sdpa"}  # no fused SDPA inside the JVP
    assert values(schema.TimeScheme) == set(TIME_SCHEMES) and values(schema.FMTime) == set(FM_TIMES)
    assert values(schema.CFGRangeMode) == set(RANGE_MODES) and values(schema.LabelMode) == set(LABEL_MODES)
    assert values(schema.InitType) == set(INIT_TYPES) and values(schema.WandbMode) == set(WANDB_MODES)


def test_time_sampling_and_guidance_are_built_from_the_loss_section():
    from tvm.method.times import Guidance, TimeSampling
    from tvm.runtime.build import guidance, time_sampling

    loss_keys = {f.name for f in dataclasses.fields(schema.LossConfig)}
    for settings in (TimeSampling, Guidance):
        assert {f.name for f in dataclasses.fields(settings)} <= loss_keys, settings
    defaults = schema.LossConfig()
    assert TimeSampling() == TimeSampling(
        **{
            f.name: str(getattr(defaults, f.name)) if f.type == "str" else getattr(defaults, f.name)
            for f in dataclasses.fields(TimeSampling)
        }
    )
    cfg = compose_config(
        "tiny",
        [
            "loss.scheme=trunc",
            "loss.fm_time=shared",
            "loss.t_P_mean=0.5",
            "loss.cfg=null",
            "loss.min_cfg=1.5",
            "loss.max_cfg=3",
            "loss.cfg_range_mode=beta",
            "loss.label_dropout=0.2",
            "loss.frac_t_eq_s=0.1",
        ],
    )
    times, guide = time_sampling(cfg.loss), guidance(cfg.loss)
    assert times == TimeSampling(scheme="trunc", fm_time="shared", t_P_mean=0.5, frac_t_eq_s=0.1)
    assert type(times.scheme) is str and type(guide.cfg_range_mode) is str
    assert guide == Guidance(cfg=None, min_cfg=1.5, max_cfg=3.0, cfg_range_mode="beta", label_dropout=0.2)
    assert guidance(compose_config("tiny").loss) == Guidance(cfg=2.5, label_dropout=0.1)


def test_registries_name_what_exists():
    from tvm.runtime import build

    for registry in (build.DATASETS, build.NETWORKS, build.OPTIMIZERS):
        for name, cls in registry.items():
            module, _, attribute = name.rpartition(".")
            assert getattr(importlib.import_module(module), attribute) is cls, name
    assert schema.LossConfig.class_name in build.LOSSES and "training.loss.TVMLoss" in build.LOSSES
    build.time_sampling(compose_config("tiny", ["loss.class_name=training.loss.TVMLoss"]).loss)
    with pytest.raises(ValueError, match="unknown loss.class_name 'tvm.method.loss.Nothing'; allowed: "):
        build.time_sampling(compose_config("tiny", ["loss.class_name=tvm.method.loss.Nothing"]).loss)


def test_base_yaml_holds_only_overrides_of_the_schema():
    base = yaml.safe_load((CONFIG_DIR / "base.yaml").read_text())
    defaults = to_container(OmegaConf.structured(schema.Config))

    def leaves(node: dict, prefix: str = ""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    overrides = dict(leaves({k: v for k, v in base.items() if k not in ("defaults", "hydra")}))
    assert overrides and all(
        OmegaConf.select(OmegaConf.create(defaults), key) != value for key, value in overrides.items()
    ), overrides


def test_a_bad_choice_in_a_config_file_is_one_line_naming_the_key(tmp_path):
    from hydra import compose, initialize_config_dir

    from tvm.train.entry import one_line

    (tmp_path / "exp.yaml").write_text("defaults:\n  - schema\n  - _self_\nnetwork:\n  jvp_mode: explict\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base=None):
        with pytest.raises(ConfigCompositionException) as info:
            compose(config_name="exp")
    assert one_line(info.value) == (
        "In 'exp': ValidationError raised while composing config: Invalid value 'explict', "
        "expected one of [explicit, autograd] (key network.jvp_mode)"
    )
    with pytest.raises(ConfigCompositionException) as info:
        compose_config("tiny", ["network.jvp_mode=explict"])
    assert one_line(info.value) == (
        "Error merging override network.jvp_mode=explict: Invalid value 'explict', "
        "expected one of [explicit, autograd]"
    )
