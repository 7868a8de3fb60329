"""The models the KD backend trains, one `JaxModelFactory` per family, chosen by the HF config's `model_type`.

The HF checkpoint (hub, the offline 270M GGUF, or the tiny model's seeded draw) is the one source of truth for both
backends: a factory turns its config into the JAX library's model config and its weights, read without torch
(cbe.weights), into the model's params. Gemma 3 is the reference implementation; Gemma 2 comes from the same gemma
library. `backend.trainer.gemma_params` loads an official gemma checkpoint instead of the converted weights.

To add a family, implement the protocol and register it in FACTORIES (README, "Adding a new model")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from gemma import gm
from transformers import AutoConfig  # its configs need no torch

from cbe.backends.kd.convert import hf_to_gemma
from cbe.errors import UserError
from cbe.weights import gguf, init, reader


class JaxModelFactory(Protocol):
    """One model family on the KD backend.

    The model `model()` builds is called as `model(tokens, positions=...)` on packed rows (documents start where the
    positions restart and must not see each other) and returns an object with `.logits`; for evaluation it follows
    gemma's decoding interface: `init_cache(batch_size, dtype, cache_length)` and `apply(..., cache=,
    attention_mask=)` (cbe.backends.kd.generate). `lora()`'s trainable params have "lora" in their path: the
    optimizer updates only those."""

    name: str  # the family, for messages

    def config(self, hf_config) -> Any:
        """The library's model config from the HF (text) config; UserError where it has no equivalent."""

    def params(self, state: dict[str, np.ndarray], config) -> dict[str, Any]:
        """The model's param tree from an HF state dict (float32 numpy, HF names)."""

    def model(self, config, dtype: jnp.dtype, **fields: str) -> nn.Module:
        """The model, computing in `dtype`; `fields` name the batch fields it reads (tokens=..., positions=...)."""

    def lora(self, model: nn.Module, rank: int, dtype: jnp.dtype) -> nn.Module:
        """`model` with LoRA of `rank`, its B 0 and its A uniform in +-sqrt(6 / fan_in) (the benchmark's draw)."""


def block_causal_mask(positions: jax.Array) -> jax.Array:
    """[B, L, L] bool: a token sees earlier tokens of its own document (documents start where positions reset)."""
    document = jnp.cumsum(positions == 0, axis=-1)
    same = document[:, :, None] == document[:, None, :]
    return same & jnp.tri(positions.shape[-1], dtype=bool)


class PackedGemma(gm.nn.Transformer):
    """gemma's Transformer over packed rows: the attention mask is built on device from the position ids (without
    one gemma would treat token id 0 as padding and let documents see each other)."""

    def __call__(self, tokens, *, positions=None, attention_mask=None, **kwargs):
        if attention_mask is None and positions is not None:
            attention_mask = block_causal_mask(positions)
        return super().__call__(tokens, positions=positions, attention_mask=attention_mask, **kwargs)


class GemmaFactory:
    """Gemma 3 from the gemma library: the reference implementation. RMSNorm, RoPE, GELU and the tied embedding
    compute the same functions in both libraries; only the layouts differ (cbe.backends.kd.convert)."""

    name = "Gemma 3"
    qk_norm, transposed_gating = True, True  # gemma's layout of Gemma 3's checkpoints

    def config(self, hf) -> gm.nn.config.TransformerConfig:
        query_scale = gm.nn.config.QueryPreAttentionNormalisation
        if hf.query_pre_attn_scalar == hf.head_dim:
            query_pre_attn_norm = query_scale.BY_ONE_OVER_SQRT_HEAD_DIM
        elif hf.query_pre_attn_scalar == hf.hidden_size // hf.num_attention_heads:
            query_pre_attn_norm = query_scale.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS
        else:
            raise UserError(
                f"model: query_pre_attn_scalar={hf.query_pre_attn_scalar} has no gemma equivalent; set it "
                f"to head_dim ({hf.head_dim}) in model.architecture"
            )
        attention = {
            "sliding_attention": gm.nn.AttentionType.LOCAL_SLIDING,
            "full_attention": gm.nn.AttentionType.GLOBAL,
        }
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
            use_qk_norm=self.qk_norm,
            query_pre_attn_norm=query_pre_attn_norm,
            attention_types=tuple(attention[t] for t in hf.layer_types),
            sliding_window_size=hf.sliding_window,
            transpose_gating_einsum=self.transposed_gating,
            vision_encoder=None,
            **self.rope(hf.rope_parameters),
        )

    def rope(self, rope: dict) -> dict[str, Any]:
        """RoPE's base frequencies: Gemma 3 has one per attention type, and scales the global one (4B and up)."""
        return {
            "local_base_frequency": int(rope["sliding_attention"]["rope_theta"]),
            "global_base_frequency": int(rope["full_attention"]["rope_theta"]),
            "global_scale_factor": float(rope["full_attention"].get("factor", 1.0)),
        }

    def params(self, state: dict[str, np.ndarray], config) -> dict[str, Any]:
        return hf_to_gemma(state, config)

    def model(self, config, dtype: jnp.dtype, **fields: str) -> nn.Module:
        return PackedGemma(config=config, dtype=dtype, **fields)

    def lora(self, model: nn.Module, rank: int, dtype: jnp.dtype) -> nn.Module:
        return gm.nn.LoRA(rank=rank, model=model, dtype=dtype)  # gemma's init is the benchmark's


class Gemma2Factory(GemmaFactory):
    """Gemma 2 from the same library: no query/key norms, one RoPE frequency, and gemma's own layout of the MLP's
    gating weights (its official checkpoints' layout, so backend.trainer.gemma_params loads them too)."""

    name = "Gemma 2"
    qk_norm, transposed_gating = False, False

    def rope(self, rope: dict) -> dict[str, Any]:
        theta = int(rope["rope_theta"])
        return {"local_base_frequency": theta, "global_base_frequency": theta}


# The HF config's model_type -> its family (a multimodal Gemma 3's text part is a gemma3_text config).
FACTORIES: dict[str, JaxModelFactory] = {"gemma3_text": GemmaFactory(), "gemma2": Gemma2Factory()}


def factory_of(hf_config) -> JaxModelFactory:
    if hf_config.model_type not in FACTORIES:
        raise UserError(
            f"model: backend=kd has no factory for model_type {hf_config.model_type} (it has {', '.join(FACTORIES)}); "
            "use backend=hf, or add one (README, 'Adding a new model')"
        )
    return FACTORIES[hf_config.model_type]


def param_dtype(precision: str) -> jnp.dtype:
    """The weights' dtype for training.precision, as the HF backend's: `auto` is fp32 on the CPU, bf16 elsewhere."""
    if precision == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.bfloat16 if precision == "bf16" else jnp.float32


def build_model(
    factory: JaxModelFactory, config, precision: str, lora_rank: int = 0, adapter_dtype: str = "bf16", **fields: str
) -> nn.Module:
    """The model Kauldron trains: `fields` name the batch fields it reads (tokens=..., positions=...). LoRA's
    weights are bf16 where the model's are and adapter.dtype says so, fp32 otherwise."""
    dtype = param_dtype(precision)
    model = factory.model(config, dtype, **fields)
    if not lora_rank:
        return model
    return factory.lora(model, lora_rank, jnp.float32 if adapter_dtype == "fp32" else dtype)


@dataclass(frozen=True)
class Loaded:
    """A checkpoint as the KD backend reads it."""

    hf: Any  # the HF (text) config
    factory: JaxModelFactory
    config: Any  # factory.config(hf)
    params: dict[str, Any]  # numpy
    tokenizer: Any


def load_hf_weights(model, seed: int, cache_dir: str) -> Loaded:
    """The checkpoint the config's `model` section names: the weights the HF backend loads (the tiny model: the
    same seeded draw), so both start alike."""
    if model.source == "init":
        tokenizer = reader.load_tokenizer(model.tokenizer or reader.hub_id(model.name))
        hf = init.init_config(model.architecture, tokenizer)
        state = init.init_state(hf, seed)
    else:
        if model.source == "gguf":
            path = gguf.materialize_gemma3_270m(Path(cache_dir).expanduser() / "models")
        else:
            path = reader.checkpoint_dir(reader.hub_id(model.name))
        hf, state = AutoConfig.from_pretrained(path), reader.read_checkpoint(path)[1]
        tokenizer = reader.load_tokenizer(model.tokenizer or path)
    hf = getattr(hf, "text_config", hf)
    factory = factory_of(hf)
    config = factory.config(hf)
    return Loaded(hf, factory, config, factory.params(state, config), tokenizer)


def load_gemma_params(path: str) -> dict[str, Any]:
    """An official gemma checkpoint (orbax), e.g. from Kaggle, instead of the converted HF weights."""
    if not Path(path).exists():
        raise UserError(f"backend.trainer.gemma_params={path}: no such checkpoint")
    return jax.tree.map(np.asarray, gm.ckpts.load_params(path))
