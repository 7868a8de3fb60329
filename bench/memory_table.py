"""Estimated peak GPU memory of every (task, model, adapter) recipe, as the HF backend plans it.

HF-only by nature: it prints the README's memory table from the HF backend's own memory plan
(cbe.backends.hf.memory), which the KD backend does not have, so it imports that module directly.

    .venv/bin/python bench/memory_table.py [--card-gb 40]

Prints a markdown table: the recipe's per-device batch, what `backend.trainer.gradient_checkpointing=auto` picks on
that card, and the estimated peak per GPU (or why the run is refused). Estimates, not measurements: a GPU
run prints its own plan at the start of train.log, and its measured peak comes from bench/train_throughput.py.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--card-gb", type=float, default=40, help="the GPU's memory in GB (default: %(default)s)")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir

    from cbe.backends.hf import memory
    from cbe.config import register_configs
    from cbe.loop import settings_of

    register_configs()
    card = args.card_gb * memory.GB
    print(
        f"| task | model | adapter | per-device batch | checkpointing (auto, {args.card_gb:.0f} GB) | estimated peak |"
    )
    print("|---|---|---|---|---|---|")
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        for task in ("news", "geminon"):
            for model in ("gemma3_270m", "gemma3_1b", "gemma3_4b", "gemma3_12b"):
                for adapter in ("full", "lora128"):
                    cfg = compose("config", overrides=[f"task={task}", f"model={model}", f"adapter={adapter}"])
                    plan = memory.plan_run(settings_of(cfg), card)
                    peak = plan.estimate
                    cell = (
                        f"refused: {peak.static_bytes / memory.GB:.0f} GB of weights and optimizer state"
                        if peak.static_exceeds(card)
                        else f"{peak.total_bytes / memory.GB:.1f} GB"
                    )
                    print(
                        f"| {task} | {model} | {adapter} | {cfg.training.per_device_batch_size} | "
                        f"{'on' if plan.gradient_checkpointing else 'off'} | {cell} |"
                    )


if __name__ == "__main__":
    main()
