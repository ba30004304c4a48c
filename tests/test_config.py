"""The configs: the authors' values (docs/method.md §8.5, §12 items 25, 27), composition, and the schema."""
from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from tvm.config import compose_config, from_container, to_container, validate_config

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
        "1_step": (1, w), "2_step": (2, w), "4_step": (4, w)}
    # Shared values (docs/method.md §2, §5.1, §8.3, paper Table 6).
    assert cfg.network.model_type == "DiT_XL_2_18h" and cfg.network.data_type == "bf16"
    assert (cfg.loss.s_P_mean, cfg.loss.s_P_std, cfg.loss.gap_P_mean, cfg.loss.gap_P_std) == (-0.4, 1.0, -0.8, 1.0)
    assert cfg.loss.label_dropout == 0.1
    assert (cfg.optimizer.lr, list(cfg.optimizer.betas), cfg.optimizer.eps, cfg.optimizer.weight_decay) == (
        1e-4, [0.9, 0.95], 1e-8, 0.0)
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


@pytest.mark.parametrize("override, message", [
    ("+training.totl_ticks=3", "unknown config key training.totl_ticks (did you mean training.total_ticks?)"),
    ("+network.model_kwargs.dropot=0.1", "unknown config key network.model_kwargs.dropot (did you mean "
                                         "network.model_kwargs.dropout?)"),
    ("+colour=red", "unknown config key colour: not in the schema"),
    ("training.total_ticks=-3", "training.total_ticks=-3 is not allowed: it must be >= 0"),
    ("training.batch_size=-64", "training.batch_size=-64 is not allowed: it must be > 0"),
    ("training.batch_gpu=-8", "training.batch_gpu=-8 is not allowed: it must be > 0"),
    ("training.kimg_per_tick=0", "training.kimg_per_tick=0.0 is not allowed: it must be > 0"),
    ("eval.batch_size=0", "eval.batch_size=0 is not allowed: it must be > 0"),
    ("dataloader.num_workers=-1", "dataloader.num_workers=-1 is not allowed: it must be >= 0"),
])
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
