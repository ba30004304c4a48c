"""Train a TVM model: ``python train.py --config-name=tiny [key=value ...]`` (one process), or
``bash train.sh NUM_GPUS CONFIG [overrides ...]`` (torchrun, one process per GPU).
``python train.py --help`` lists the main knobs with their units."""
import sys

import hydra
from omegaconf import DictConfig

import tvm.config  # noqa: F401  (registers the config schema with Hydra)
from tvm.cli_help import print_help_if_asked
from tvm.train.loop import run


@hydra.main(config_path="configs", config_name="tiny", version_base=None)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    if not print_help_if_asked(sys.argv[1:]):  # our --help (units); Hydra's is --hydra-help
        main()
