"""HF Gemma 3 and Gemma 2 weights <-> gemma (JAX) params, so both backends start from one checkpoint.

Both libraries compute the same functions: RMSNorm as x * (1 + w) (the same stored w), rotate-half RoPE, tanh
GELU, the embedding tied to the output layer. Only layouts differ. With N query heads, K KV heads, head size H,
width D and MLP width F:

    HF (torch Linear: [out, in])            gemma
    q_proj [N*H, D]                         attn/q_einsum/w [N, D, H]
    k_proj, v_proj [K*H, D]                 attn/kv_einsum/w [2, K, D, H]   (k, v stacked)
    o_proj [D, N*H]                         attn/attn_vec_einsum/w [N, H, D]
    gate_proj, up_proj [F, D]               mlp/gating_einsum [2, F, D]     (gate, up stacked; [2, D, F] where
                                                                             transpose_gating_einsum is off)
    down_proj [D, F]                        mlp/linear [F, D]
    q_norm, k_norm [H] (Gemma 3)            attn/_query_norm, _key_norm

Works on numpy arrays and reads only the gemma config's fields, so this module needs neither torch nor jax.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

_NORMS = {
    "input_layernorm": "pre_attention_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "pre_ffw_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def text_weights(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The language model's tensors under Gemma3ForCausalLM names (model.layers...), from a text-only or a
    multimodal (4B/12B: model.language_model...) checkpoint; the vision tower is left out."""
    out = {}
    for name, tensor in state_dict.items():
        if "vision_tower" in name or "multi_modal_projector" in name or name == "lm_head.weight":
            continue  # the LM head is tied to the embedding
        out["model." + re.sub(r"^(model\.)?(language_model\.)?(model\.)?", "", name)] = tensor
    return out


def hf_to_gemma(state_dict: Mapping[str, np.ndarray], config) -> dict[str, Any]:
    """gemma's param tree for `config` (gemma's TransformerConfig) from a Gemma 3 or 2 state dict (numpy arrays)."""
    sd = text_weights(state_dict)
    N, K, H = config.num_heads, config.num_kv_heads, config.head_dim

    def heads(name: str, n: int) -> np.ndarray:  # [n*H, D] -> [n, D, H]
        w = sd[name]
        return w.reshape(n, H, w.shape[-1]).transpose(0, 2, 1)

    params: dict[str, Any] = {
        "embedder": {"input_embedding": sd["model.embed_tokens.weight"]},
        "final_norm": {"scale": sd["model.norm.weight"]},
    }
    for i in range(len(config.attention_types)):
        p = f"model.layers.{i}."
        o = sd[p + "self_attn.o_proj.weight"]
        gating = np.stack([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
        attn = {
            "q_einsum": {"w": heads(p + "self_attn.q_proj.weight", N)},
            "kv_einsum": {
                "w": np.stack([heads(p + "self_attn.k_proj.weight", K), heads(p + "self_attn.v_proj.weight", K)])
            },
            "attn_vec_einsum": {"w": o.T.reshape(N, H, o.shape[0])},
        }
        if config.use_qk_norm:
            attn |= {"_query_norm": {"scale": sd[p + "self_attn.q_norm.weight"]}}
            attn |= {"_key_norm": {"scale": sd[p + "self_attn.k_norm.weight"]}}
        layer = {
            "attn": attn,
            "mlp": {
                "gating_einsum": gating if config.transpose_gating_einsum else gating.transpose(0, 2, 1),
                "linear": sd[p + "mlp.down_proj.weight"].T,
            },
        }
        for hf_name, gemma_name in _NORMS.items():
            layer[gemma_name] = {"scale": sd[p + hf_name + ".weight"]}
        params[f"layer_{i}"] = layer
    return params


def gemma_to_hf(params: Mapping[str, Any], config) -> dict[str, np.ndarray]:
    """A Gemma*ForCausalLM state dict from gemma params of `config` (the inverse of hf_to_gemma)."""
    sd = {
        "model.embed_tokens.weight": np.asarray(params["embedder"]["input_embedding"]),
        "model.norm.weight": np.asarray(params["final_norm"]["scale"]),
    }
    for i in range(len(config.attention_types)):
        layer, p = params[f"layer_{i}"], f"model.layers.{i}."
        attn, mlp = layer["attn"], layer["mlp"]

        def rows(w) -> np.ndarray:  # [n, D, H] -> [n*H, D]
            w = np.asarray(w)
            return w.transpose(0, 2, 1).reshape(-1, w.shape[1])

        kv = np.asarray(attn["kv_einsum"]["w"])
        o = np.asarray(attn["attn_vec_einsum"]["w"])
        gating = np.asarray(mlp["gating_einsum"])
        gating = gating if config.transpose_gating_einsum else gating.transpose(0, 2, 1)
        sd |= {
            p + "self_attn.q_proj.weight": rows(attn["q_einsum"]["w"]),
            p + "self_attn.k_proj.weight": rows(kv[0]),
            p + "self_attn.v_proj.weight": rows(kv[1]),
            p + "self_attn.o_proj.weight": o.reshape(-1, o.shape[-1]).T,
            p + "mlp.gate_proj.weight": gating[0],
            p + "mlp.up_proj.weight": gating[1],
            p + "mlp.down_proj.weight": np.asarray(mlp["linear"]).T,
        }
        if config.use_qk_norm:
            sd[p + "self_attn.q_norm.weight"] = np.asarray(attn["_query_norm"]["scale"])
            sd[p + "self_attn.k_norm.weight"] = np.asarray(attn["_key_norm"]["scale"])
        for hf_name, gemma_name in _NORMS.items():
            sd[p + hf_name + ".weight"] = np.asarray(layer[gemma_name]["scale"])
    return sd


# gemma's LoRA (gm.nn.LoRA) adds x·a·b beside each einsum, unscaled: a holds the einsum's contracted input axes and
# the rank, b the rank and its output axes. k and v are one einsum in gemma, so they share one a (gate and up share
# another); in PEFT each becomes its own LoRA of the same rank, with that a. Each entry: the HF module, where its LoRA
# is in a gemma layer, and (a, b, N, K, H) -> PEFT's A [rank, in] and B [out, rank], so that B @ A is the HF weight's
# change.
def _rows(b, n: int, H: int) -> np.ndarray:  # [rank, n, H] -> [n*H, rank], the rows of an HF projection
    return b.transpose(1, 2, 0).reshape(n * H, -1)


_LORA = {
    "self_attn.q_proj": (("attn", "q_einsum"), lambda a, b, N, K, H: (a.T, _rows(b, N, H))),
    "self_attn.k_proj": (("attn", "kv_einsum"), lambda a, b, N, K, H: (a.T, _rows(b[:, 0], K, H))),
    "self_attn.v_proj": (("attn", "kv_einsum"), lambda a, b, N, K, H: (a.T, _rows(b[:, 1], K, H))),
    "self_attn.o_proj": (("attn", "attn_vec_einsum"), lambda a, b, N, K, H: (a.reshape(N * H, -1).T, b.T)),
    "mlp.gate_proj": (("mlp", "gating_einsum"), lambda a, b, N, K, H: (a.T, b[:, 0].T)),
    "mlp.up_proj": (("mlp", "gating_einsum"), lambda a, b, N, K, H: (a.T, b[:, 1].T)),
    "mlp.down_proj": (("mlp", "linear"), lambda a, b, N, K, H: (a.T, b.T)),
}
LORA_MODULES = [name.split(".")[1] for name in _LORA]  # the HF modules a KD LoRA adapts


def _lora_of(layer: Mapping[str, Any], part: str, einsum: str) -> dict[str, np.ndarray]:
    """The {a, b} of one einsum's LoRA: gemma keeps it under the einsum module for attention, beside it for the MLP."""
    lora = layer[part][einsum]["_LoRAEinsum_0"] if part == "attn" else layer[part][f"_LoRAEinsum_{einsum}"]
    return {k: np.asarray(v, np.float32) for k, v in lora["lora"].items()}


def lora_to_peft(params: Mapping[str, Any], config) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every LoRA of gemma params (gm.nn.LoRA's) as PEFT's (A, B), keyed by the HF module (model.layers.<i>.<name>);
    the adapter's scale is 1 (PEFT: lora_alpha = rank)."""
    N, K, H = config.num_heads, config.num_kv_heads, config.head_dim
    adapters = {}
    for i in range(len(config.attention_types)):
        for name, ((part, einsum), to_peft) in _LORA.items():
            lora = _lora_of(params[f"layer_{i}"], part, einsum)
            adapters[f"model.layers.{i}.{name}"] = to_peft(lora["a"], lora["b"], N, K, H)
    return adapters


def fold_lora(state_dict: dict[str, np.ndarray], adapters: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Fold each adapter's B @ A into its HF weight (fp32), in place."""
    for module, (A, B) in adapters.items():
        weight = state_dict[f"{module}.weight"]
        state_dict[f"{module}.weight"] = (weight.astype(np.float32) + B @ A).astype(weight.dtype)
