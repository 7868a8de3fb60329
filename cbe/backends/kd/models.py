"""The gemma library's Gemma 3 transformer, configured from the HF config and loaded with the HF weights.

The HF checkpoint (hub, the offline 270M GGUF, or the tiny model's seeded random init) is the one source of truth
for both backends: its config becomes gemma's TransformerConfig and its weights, read without torch (cbe.weights),
are converted by cbe.backends.kd.convert. `backend.trainer.gemma_params` loads an official gemma checkpoint instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from gemma import gm
from transformers import AutoConfig  # its configs need no torch

from cbe.backends.kd.convert import hf_to_gemma
from cbe.errors import UserError
from cbe.weights import gguf, init, reader

_ATTENTION = {"sliding_attention": gm.nn.AttentionType.LOCAL_SLIDING, "full_attention": gm.nn.AttentionType.GLOBAL}
_QUERY_SCALE = gm.nn.config.QueryPreAttentionNormalisation


def param_dtype(precision: str) -> jnp.dtype:
    """The weights' dtype for training.precision, as the HF backend's: `auto` is fp32 on the CPU, bf16 elsewhere."""
    if precision == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.bfloat16 if precision == "bf16" else jnp.float32


def gemma_config(hf) -> gm.nn.config.TransformerConfig:
    """gemma's config for a Gemma3TextConfig (the text part of a multimodal config)."""
    hf = getattr(hf, "text_config", hf)
    if hf.query_pre_attn_scalar == hf.head_dim:
        query_scale = _QUERY_SCALE.BY_ONE_OVER_SQRT_HEAD_DIM
    elif hf.query_pre_attn_scalar == hf.hidden_size // hf.num_attention_heads:
        query_scale = _QUERY_SCALE.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS
    else:
        raise UserError(
            f"model: query_pre_attn_scalar={hf.query_pre_attn_scalar} has no gemma equivalent; set it "
            f"to head_dim ({hf.head_dim}) in model.architecture"
        )
    if hf.num_key_value_heads == hf.num_attention_heads:
        # gemma then fuses q, k and v into one qkv_einsum, a layout the real models do not have.
        raise UserError("model.architecture: num_key_value_heads must be fewer than num_attention_heads for backend=kd")
    rope = hf.rope_parameters
    return gm.nn.config.TransformerConfig(
        num_embed=hf.vocab_size,
        embed_dim=hf.hidden_size,
        hidden_dim=hf.intermediate_size,
        num_heads=hf.num_attention_heads,
        head_dim=hf.head_dim,
        num_kv_heads=hf.num_key_value_heads,
        final_logit_softcap=hf.final_logit_softcapping,
        attn_logits_soft_cap=hf.attn_logit_softcapping,
        use_post_attn_norm=True,
        use_post_ffw_norm=True,
        use_qk_norm=True,
        query_pre_attn_norm=query_scale,
        attention_types=tuple(_ATTENTION[t] for t in hf.layer_types),
        sliding_window_size=hf.sliding_window,
        transpose_gating_einsum=True,
        local_base_frequency=int(rope["sliding_attention"]["rope_theta"]),
        global_base_frequency=int(rope["full_attention"]["rope_theta"]),
        global_scale_factor=float(rope["full_attention"].get("factor", 1.0)),
        vision_encoder=None,
    )


def block_causal_mask(positions: jax.Array) -> jax.Array:
    """[B, L, L] bool: a token sees earlier tokens of its own document (documents start where positions reset)."""
    document = jnp.cumsum(positions == 0, axis=-1)
    same = document[:, :, None] == document[:, None, :]
    return same & jnp.tri(positions.shape[-1], dtype=bool)


class PackedGemma3(gm.nn.Transformer):
    """gemma's Transformer over packed rows: the attention mask is built on device from the position ids (without
    one gemma would treat token id 0 as padding and let documents see each other)."""

    def __call__(self, tokens, *, positions=None, attention_mask=None, **kwargs):
        if attention_mask is None and positions is not None:
            attention_mask = block_causal_mask(positions)
        return super().__call__(tokens, positions=positions, attention_mask=attention_mask, **kwargs)


def build_model(
    config: gm.nn.config.TransformerConfig, precision: str, lora_rank: int = 0, adapter_dtype: str = "bf16", **keys: str
):
    """The model Kauldron trains: keys name the batch fields it reads (tokens=..., positions=...). LoRA's weights
    are bf16 where the model's are and adapter.dtype says so, fp32 otherwise."""
    dtype = param_dtype(precision)
    model = PackedGemma3(config=config, dtype=dtype, **keys)
    if not lora_rank:
        return model
    return gm.nn.LoRA(rank=lora_rank, model=model, dtype=jnp.float32 if adapter_dtype == "fp32" else dtype)


def load_hf_weights(model, seed: int, cache_dir: str) -> tuple[Any, dict[str, Any], Any]:
    """(HF text config, gemma params as numpy, tokenizer) of the checkpoint the config's `model` section names:
    the files the HF backend loads (the tiny model: its seeded init, saved once): both start from the same weights."""
    if model.source == "init":
        path = init.init_checkpoint(model.architecture, model.tokenizer or reader.hub_id(model.name), seed, cache_dir)
    elif model.source == "gguf":
        path = gguf.materialize_gemma3_270m(Path(cache_dir).expanduser() / "models")
    else:
        path = reader.checkpoint_dir(reader.hub_id(model.name))
    hf = AutoConfig.from_pretrained(path)
    hf = getattr(hf, "text_config", hf)
    state = reader.read_checkpoint(path)[1]
    params = hf_to_gemma(state, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim)
    return hf, params, reader.load_tokenizer(model.tokenizer or path)


def load_gemma_params(path: str) -> dict[str, Any]:
    """An official gemma checkpoint (orbax), e.g. from Kaggle, instead of the converted HF weights."""
    if not Path(path).exists():
        raise UserError(f"backend.trainer.gemma_params={path}: no such checkpoint")
    return jax.tree.map(np.asarray, gm.ckpts.load_params(path))
