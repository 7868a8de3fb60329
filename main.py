"""Compose a run from the config groups, validate it, instantiate its parts and run it.

python main.py task=news model=gemma3_1b adapter=lora128 backend=hf
python main.py -m optimizer.lr=1e-4,3e-4 training.effective_batch_size=32,64
python main.py -m experiment=lr_bs_sweep hydra/launcher=submitit_slurm hydra.launcher.partition=gpu
torchrun --nproc_per_node=4 main.py task=news model=gemma3_1b
python main.py mode=eval checkpoint=outputs/.../checkpoints/latest   (with the run's own settings)
"""

import os
import sys

import hydra
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig

from cbe.checkpoints import inherit_run_overrides
from cbe.config import eval_dir_override, register_configs, validate
from cbe.errors import exit_on_user_error, run_and_report_user_errors
from cbe.logging import Loggers
from cbe.loop import Loop, build
from cbe.plan import stages_of
from cbe.ranks import adopt_slurm_ranks, is_main_process, world_size
from cbe.run import RunDir
from cbe.specs import SPECS

register_configs()


@hydra.main(version_base=None, config_path="conf", config_name="config")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    adopt_slurm_ranks()
    cfg = validate(cfg, world_size())
    run = RunDir(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    if cfg.mode == "train":
        run.refuse_a_different_run(cfg)
        steps = run.completed_steps(stages_of(cfg)[-1].last_step)
        if steps is not None:  # a re-submitted sweep or job: leave the finished run as it is
            print(
                f"{run.root} is complete: {steps} steps trained and evaluated; raise training.num_train_steps to "
                "extend it",
                flush=True,
            )
            return
    run.create(cfg).capture_output()
    if is_main_process():
        print(f"run dir: {run.root}", flush=True)
    setup = SPECS[cfg.backend.name].process_setup
    if setup:  # the backend's share of the job: its device, its process group
        get_method(setup)()
    loggers = Loggers(
        run, [instantiate(spec, run=run) for spec in cfg.logging.loggers.values()] if is_main_process() else []
    )
    loop = Loop(cfg, run, *build(cfg, run), loggers)
    try:
        loop.train() if cfg.mode == "train" else loop.evaluate_checkpoint()
    finally:
        loggers.close()


def evaluate_or_train() -> None:
    argv = inherit_run_overrides(sys.argv[1:])  # mode=eval of a run's checkpoint composes as the run did
    sys.argv[1:] = argv + eval_dir_override(argv)
    main()


if __name__ == "__main__":
    # Hydra's errors propagate to us, so a user mistake becomes one line, not Hydra's multi-line report.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    run_and_report_user_errors(evaluate_or_train)
