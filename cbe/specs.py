"""What the rest of cbe knows of each backend, without importing it (no framework here): the types and allowed
values of its options (backend.trainer), its process setup, the name of its checkpoint dirs and how to tell the
adapter of one, and the rules it adds to validation. Config, the run dir, checkpoints and plot ask this registry."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import MISSING


@dataclass
class HFOptions:
    """The types of backend.trainer of backend=hf (its values and their meaning: conf/backend/hf.yaml)."""

    _target_: str = MISSING
    attn_implementation: str = MISSING
    torch_compile: str = MISSING
    gradient_checkpointing: str = MISSING
    parallel: str = MISSING
    loss_head: str = MISSING
    fp8: bool = MISSING


@dataclass
class KDOptions:
    """The types of backend.trainer of backend=kd (its values and their meaning: conf/backend/kd.yaml)."""

    _target_: str = MISSING
    gemma_params: Optional[str] = MISSING
    fsdp_min_size_mb: float = MISSING


def hf_problems(config: Any, world_size: int) -> list[str]:
    if config.model.architecture.get("model_type") == "gemma2":
        # Gemma 2 soft-caps its attention logits, which sdpa (the HF backend's attention in decoding) cannot.
        return ["model.architecture.model_type=gemma2 runs on backend=kd only: sdpa, the HF backend's attention, "
                "has no soft-capping"]  # fmt: skip
    return []


def kd_problems(config: Any, world_size: int) -> list[str]:
    arch = config.model.architecture
    if arch and arch.get("num_key_value_heads") == arch.get("num_attention_heads"):
        # gemma would fuse q, k and v into one qkv_einsum, a layout the real models do not have.
        return ["model.architecture: num_key_value_heads must be fewer than num_attention_heads for backend=kd"]
    return []


@dataclass(frozen=True)
class BackendSpec:
    """One backend as the rest of cbe knows it."""

    name: str
    options: type  # backend.trainer's schema
    checkpoint_name: str  # its checkpoint dirs, formatted with the step
    problems: Callable[[Any, int], list[str]] = lambda config, world_size: []  # what it refuses, one line each
    adapter_of: Callable[[Path], str | None] = lambda checkpoint: None  # the adapter a checkpoint dir says, if any
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)  # option -> allowed values
    process_setup: str | None = None  # (dotted path) this process's device and process group, before it is built

    def wrote(self, checkpoint: Path) -> bool:
        """Whether a dir (`latest` resolved) has the name of this backend's checkpoints."""
        return bool(re.fullmatch(self.checkpoint_name.format(step=r"\d+"), checkpoint.resolve().name))


SPECS = {
    "hf": BackendSpec(
        "hf",
        HFOptions,
        "checkpoint-{step}",  # HF Trainer's layout
        problems=hf_problems,
        # A PEFT adapter dir is LoRA's, a model dir a full fine-tune's.
        adapter_of=lambda checkpoint: "lora128" if (checkpoint / "adapter_config.json").is_file() else "full",
        # str options: `true` on the command line becomes "True"
        choices={
            "attn_implementation": ("auto", "varlen", "sdpa", "eager", "flex_attention"),
            "torch_compile": ("auto", "model", "layers", "False"),
            "gradient_checkpointing": ("auto", "True", "False"),
            "parallel": ("ddp", "fsdp"),
            "loss_head": ("fused", "plain"),
        },
        process_setup="cbe.backends.hf.trainer.setup_processes",
    ),
    "kd": BackendSpec(
        "kd",
        KDOptions,
        "ckpt_{step}",  # orbax's layout under Kauldron
        problems=kd_problems,
        process_setup="cbe.backends.kd.processes.setup_processes",  # jax.distributed, where the run has several
    ),
}


def backend_of_checkpoint(checkpoint: Path) -> str | None:
    """The backend whose checkpoint names a dir has, or None for another dir."""
    return next((name for name, spec in SPECS.items() if spec.wrote(checkpoint)), None)
