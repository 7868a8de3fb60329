"""The tiny model's weights (model.source=init): a Gemma architecture drawn at random from training.seed.

They are drawn as HF initializes these models (every matrix normal(0, initializer_range), the pad token's embedding
row 0, every RMSNorm weight 0, i.e. a scale of 1), but with numpy's generator, so that both backends start from the
same weights, with or without torch, on any device. `model.architecture` holds the HF config's fields; its
`model_type` (default gemma3_text) picks the family."""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig  # its configs need no torch

from cbe.errors import UserError

FAMILIES = ("gemma3_text", "gemma2")  # the HF layouts tensor_shapes knows


def init_config(architecture, tokenizer):
    """The HF config of `architecture` (Gemma3TextConfig's or Gemma2Config's fields) with the tokenizer's ids."""
    fields = OmegaConf.to_container(architecture) if isinstance(architecture, DictConfig) else dict(architecture)
    model_type = fields.pop("model_type", "gemma3_text")
    if model_type not in FAMILIES:
        raise UserError(
            f"model.architecture.model_type={model_type}: model.source=init draws only {', '.join(FAMILIES)}; "
            "point model.name at a checkpoint for other models"
        )
    ids = {f"{t}_token_id": getattr(tokenizer, f"{t}_token_id") for t in ("pad", "bos", "eos")}
    return AutoConfig.for_model(model_type, **fields, **ids)


def tensor_shapes(config) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the config's Gemma*ForCausalLM, in a fixed order; the LM head is tied."""
    D, F, H = config.hidden_size, config.intermediate_size, config.head_dim
    N, K = config.num_attention_heads, config.num_key_value_heads
    yield "model.embed_tokens.weight", (config.vocab_size, D)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        yield from [(p + "self_attn.q_proj.weight", (N * H, D)), (p + "self_attn.k_proj.weight", (K * H, D))]
        yield from [(p + "self_attn.v_proj.weight", (K * H, D)), (p + "self_attn.o_proj.weight", (D, N * H))]
        if config.model_type == "gemma3_text":  # Gemma 3 normalizes queries and keys
            yield from [(p + "self_attn.q_norm.weight", (H,)), (p + "self_attn.k_norm.weight", (H,))]
        yield from [(p + "mlp.gate_proj.weight", (F, D)), (p + "mlp.up_proj.weight", (F, D))]
        yield p + "mlp.down_proj.weight", (D, F)
        for norm in ("input", "post_attention", "pre_feedforward", "post_feedforward"):
            yield p + f"{norm}_layernorm.weight", (D,)
    yield "model.norm.weight", (D,)


def init_state(config, seed: int) -> dict[str, Any]:
    """The state dict (float32 numpy) of `config`'s model, drawn from `seed`."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in tensor_shapes(config):
        if name.endswith("norm.weight"):
            state[name] = np.zeros(shape, np.float32)
        else:
            state[name] = rng.standard_normal(shape, np.float32) * np.float32(config.initializer_range)
    if config.pad_token_id is not None:
        state["model.embed_tokens.weight"][config.pad_token_id] = 0
    return state
