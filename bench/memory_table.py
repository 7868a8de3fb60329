"""Estimated peak GPU memory of every (task, model, adapter) recipe, as the HF backend plans it.

HF-only by nature: it prints the README's memory table from the HF backend's own memory plan
(cbe.backends.hf.memory), which the KD backend does not have, so it imports that module directly.

    .venv/bin/python bench/memory_table.py [--card-gb 40]

Prints a markdown table: the recipe's per-device batch, what `backend.trainer.gradient_checkpointing=auto` picks on
that card, and the estimated peak per GPU (or why the run is refused); then the 12B full recipes sharded with
`backend.trainer.parallel=fsdp` over 8 x 40 GB and 4 x 80 GB. Estimates, not measurements: a GPU
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
    from cbe.config import register_configs, settings_of

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
                    print(row(memory, [task, model, adapter], settings_of(cfg), card, 1))
        print()
        print("| task | model | adapter | GPUs (FSDP) | per-device batch | checkpointing (auto) | estimated peak |")
        print("|---|---|---|---|---|---|---|")
        for task in ("news", "geminon"):
            cfg = compose("config", overrides=[f"task={task}", "model=gemma3_12b", "adapter=full"])
            for gpus, card_gb in ((8, 40), (4, 80)):
                print(row(memory, [task, "gemma3_12b", "full"], settings_of(cfg), card_gb * memory.GB, gpus))


def row(memory, recipe: list[str], settings, card: float, shards: int) -> str:
    """One recipe's line: per-device batch, auto's checkpointing, the estimated peak per GPU or the refusal."""
    plan = memory.plan_run(settings, card, shards=shards)
    peak = plan.estimate
    cell = (
        f"refused: {peak.static_bytes / memory.GB:.0f} GB of weights and optimizer state"
        if peak.static_exceeds(card)
        else f"{peak.total_bytes / memory.GB:.1f} GB"
    )
    gpus = [f"{shards} x {card / memory.GB:.0f} GB"] if shards > 1 else []
    cells = [*recipe, *gpus]
    cells += [settings.training.per_device_batch_size, "on" if plan.gradient_checkpointing else "off", cell]
    return "| " + " | ".join(map(str, cells)) + " |"


if __name__ == "__main__":
    main()
