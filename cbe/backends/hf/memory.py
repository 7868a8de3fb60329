"""Peak GPU memory of an HF training run, estimated from the config before any model loads.

It decides `backend.trainer.gradient_checkpointing=auto` (off where the run fits without it: faster steps) and
refuses, in one line, a run whose weights and optimizer state alone exceed the card. The model: bf16 weights
(2 bytes a parameter); a full fine-tune adds bf16 gradients and AdamW's two bf16 moments (6 more), LoRA
adds fp32 adapter weights, gradients and moments (16 a LoRA parameter); activations take
2 * (8 * hidden + 3 * intermediate) bytes a token a layer, or with checkpointing a bf16 hidden state a token
a layer plus one layer's activations; plus a fixed allowance for the CUDA context and the allocator.
The activation term is calibrated on one measurement: Gemma 3 4B, full fine-tune, 8 rows of 1024 tokens,
no checkpointing, about 59 GB (with TRL's loss head, 2026-11-28). Everything else is an estimate, and says so where
it is printed. The fused loss head (cbe.backends.hf.loss_head) of a full fine-tune computes the head weight's gradient
in its forward pass and holds it through the backward: the embedding's gradient, counted in the static part.

Under FSDP (`backend.trainer.parallel=fsdp`, N processes) each device holds 1/N of the weights, gradients and
optimizer state, plus the weights it all-gathers: two decoder layers' (the one computing and the next, prefetched)
and the root unit's embedding (the LM head is tied to it) for the whole step. Evaluation all-gathers the whole
model on every device (cbe.backends.hf.trainer.evaluating), beside its shard of the weights and AdamW moments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

GB = 1e9
OVERHEAD_BYTES = 1.5 * GB  # CUDA context, cuBLAS workspaces, allocator fragmentation
HEADROOM = 0.9  # plan to use at most this fraction of the card


def parameter_count(arch: Mapping[str, Any]) -> int:
    """Parameters of a Gemma 3 text model: embedding, attention and MLP projections (norms are negligible)."""
    hidden, inter = arch["hidden_size"], arch["intermediate_size"]
    q, kv = arch["num_attention_heads"] * arch["head_dim"], arch["num_key_value_heads"] * arch["head_dim"]
    per_layer = 2 * hidden * q + 2 * hidden * kv + 3 * hidden * inter  # q and o, k and v, gate, up and down
    return arch["vocab_size"] * hidden + arch["num_hidden_layers"] * per_layer


def layer_parameter_count(arch: Mapping[str, Any]) -> int:
    """Parameters of one decoder layer: FSDP's unit, all-gathered whole for its forward and backward."""
    return (parameter_count(arch) - arch["vocab_size"] * arch["hidden_size"]) // arch["num_hidden_layers"]


def lora_parameter_count(arch: Mapping[str, Any], rank: int) -> int:
    """LoRA parameters with rank `rank` on every linear projection: rank * (fan_in + fan_out) each."""
    hidden, inter = arch["hidden_size"], arch["intermediate_size"]
    q, kv = arch["num_attention_heads"] * arch["head_dim"], arch["num_key_value_heads"] * arch["head_dim"]
    per_layer = 2 * (hidden + q) + 2 * (hidden + kv) + 2 * (hidden + inter) + (inter + hidden)
    return rank * per_layer * arch["num_hidden_layers"]


@dataclass(frozen=True)
class MemoryEstimate:
    static_bytes: float  # training's weights, gradients and optimizer state (FSDP: a shard, plus what it gathers)
    activation_bytes: float
    evaluation_bytes: float = 0.0  # FSDP: evaluation's whole gathered model beside the shards (0: within static)

    @property
    def total_bytes(self) -> float:
        return max(self.static_bytes + self.activation_bytes, self.evaluation_bytes) + OVERHEAD_BYTES

    def static_exceeds(self, card_bytes: float) -> bool:
        """Weights and optimizer state alone take more than the card: no batch size makes the run fit."""
        return max(self.static_bytes, self.evaluation_bytes) + OVERHEAD_BYTES > card_bytes

    def describe(self) -> str:
        evaluation = f", {self.evaluation_bytes / GB:.1f} GB in evaluation" if self.evaluation_bytes else ""
        return (
            f"about {self.total_bytes / GB:.1f} GB per device (estimated: {self.static_bytes / GB:.1f} GB weights "
            f"and optimizer state, {self.activation_bytes / GB:.1f} GB activations{evaluation})"
        )


def estimate(
    arch: Mapping[str, Any],
    lora_rank: int,
    rows: int,
    sequence_length: int,
    gradient_checkpointing: bool,
    shards: int = 1,
) -> MemoryEstimate:
    """The estimated peak of one training step with `rows` rows of `sequence_length` tokens per device, its model
    sharded over `shards` devices (FSDP; 1: each device holds all of it)."""
    params = parameter_count(arch)
    weights = 2 * params
    lora = lora_parameter_count(arch, lora_rank)
    trained, gradients = (16 * lora, 4 * lora) if lora_rank else (6 * params, 2 * params)
    tokens, layers = rows * sequence_length, arch["num_hidden_layers"]
    per_layer = 2 * (8 * arch["hidden_size"] + 3 * arch["intermediate_size"])  # bytes a token
    per_token = layers * 2 * arch["hidden_size"] + per_layer if gradient_checkpointing else layers * per_layer
    activations = tokens * per_token
    if shards == 1:
        return MemoryEstimate(static_bytes=weights + trained, activation_bytes=activations)
    gathered = 2 * (2 * layer_parameter_count(arch) + arch["vocab_size"] * arch["hidden_size"])
    shard = (weights + trained) / shards
    return MemoryEstimate(
        static_bytes=shard + gathered,
        activation_bytes=activations,
        evaluation_bytes=shard - gradients / shards + weights,  # gradients are freed after each step
    )


@dataclass(frozen=True)
class MemoryPlan:
    gradient_checkpointing: bool
    estimate: MemoryEstimate | None  # None where the architecture is not in the config
    fits: bool  # the estimate is within the card (always True without an estimate)


def plan(
    arch: Mapping[str, Any],
    lora_rank: int,
    rows: int,
    sequence_length: int,
    setting: str,
    card_bytes: float | None,
    shards: int = 1,
) -> MemoryPlan:
    """Whether to checkpoint (setting auto | True | False) on a card of `card_bytes` (None: no GPU), and what it
    will take. auto turns checkpointing on only where the run would not fit without it; with no GPU it is off,
    and with no architecture to estimate from it is on, as in the benchmark's recipes."""
    if setting != "auto":
        checkpointing = setting == "True"
    elif card_bytes is None:
        checkpointing = False
    elif not arch:
        checkpointing = True
    else:
        without = estimate(arch, lora_rank, rows, sequence_length, False, shards)
        checkpointing = without.total_bytes > HEADROOM * card_bytes
    if not arch:
        return MemoryPlan(checkpointing, None, True)
    peak = estimate(arch, lora_rank, rows, sequence_length, checkpointing, shards)
    return MemoryPlan(checkpointing, peak, card_bytes is None or peak.total_bytes <= HEADROOM * card_bytes)


def plan_run(
    settings: Any, card_bytes: float | None, gradient_checkpointing: str = "auto", shards: int = 1
) -> MemoryPlan:
    """`plan` for a run's settings (cbe.config.Settings: its model's shape, adapter rank, per-device batch and
    sequence length), the HF backend's `backend.trainer.gradient_checkpointing` setting and its FSDP shards."""
    arch, rows = settings.model.architecture, settings.training.per_device_batch_size
    return plan(arch, settings.adapter.rank, rows, settings.sequence_length, gradient_checkpointing, card_bytes, shards)
