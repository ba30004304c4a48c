"""Evaluate checkpoints: ``python eval.py --config-name=CONFIG eval.resume=PATH [key=value ...]``
(one process) or ``bash eval.sh NUM_GPUS CONFIG eval.resume=PATH [overrides ...]`` (torchrun).

``eval.resume`` is a checkpoint or a run directory (newest first); results are appended to
``metrics-eval.jsonl`` next to the checkpoints (docs/method.md §7.2; :mod:`tvm.eval.evaluate`).
"""

import hydra
from omegaconf import DictConfig

import tvm.config  # noqa: F401  (registers the config schema with Hydra)
from tvm.eval.evaluate import evaluate_checkpoints
from tvm.runtime import distributed
from tvm.runtime.checkpoint import CheckpointError


@hydra.main(config_path="configs", config_name="tiny", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        evaluate_checkpoints(cfg)
    except (CheckpointError, ValueError, FileNotFoundError, ImportError) as exc:
        raise SystemExit(f"eval.py: error: {exc}") from exc
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    try:
        main()
    except SystemExit as stop:
        distributed.exit_process(stop.code)  # not sys.exit: see its docstring
    distributed.exit_process(0)
