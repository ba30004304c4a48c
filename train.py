"""Train a TVM model: ``python train.py --config-name=tiny [key=value ...]`` (one process), or
``bash train.sh NUM_GPUS CONFIG [overrides ...]`` (torchrun, one process per GPU)."""
import hydra
from omegaconf import DictConfig

import tvm.config  # noqa: F401  (registers the config schema with Hydra)
from tvm.train.loop import run


@hydra.main(config_path="configs", config_name="tiny", version_base=None)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
