"""Train a TVM model: ``python train.py --config-name=tiny [key=value ...]`` (one process), or
``bash train.sh NUM_GPUS CONFIG [overrides ...]`` (torchrun, one process per GPU).

``python train.py --help`` lists the main knobs with their units (Hydra's own help: ``--hydra-help``).
Whatever stops the run, the last line says why (``train.py: error: …``; tvm/train/entry.py).
Ctrl-C stops at the next step boundary with a checkpoint; a second Ctrl-C aborts at once.
"""

import sys

import hydra
from omegaconf import DictConfig

import tvm.config  # noqa: F401  (registers the config schema with Hydra)
from tvm.cli_help import print_help_if_asked
from tvm.runtime import distributed
from tvm.train.entry import outcome_line, run_entry_point
from tvm.train.loop import run


@hydra.main(config_path="configs", config_name="tiny", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        result = run(cfg)
        line = outcome_line("train.py", result) if distributed.is_main() else None
    finally:
        distributed.cleanup()
    if line:
        print(line, flush=True)


if __name__ == "__main__":
    if print_help_if_asked(sys.argv[1:]):
        sys.exit(0)
    distributed.exit_process(run_entry_point(main, "train.py"))  # not sys.exit: see its docstring
