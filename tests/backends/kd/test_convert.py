"""HF <-> gemma weight conversion: exact both ways, and the same logits from both libraries on packed rows, for
each family the KD backend's model factory serves (Gemma 3, and Gemma 2)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from cbe.backends.kd.convert import gemma_to_hf, hf_to_gemma, text_weights
from cbe.backends.kd.models import FACTORIES, build_model

ARCH = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window=8,
    layer_types=["sliding_attention"] * 3 + ["full_attention"],
    max_position_embeddings=256,
)


def random_hf_model(model_type: str = "gemma3_text"):
    """Every weight random, norms included, so a misplaced or transposed tensor shows in the logits."""
    torch.manual_seed(0)
    # Gemma 2 soft-caps attention and output logits (at 50 and 30): caps this small make capping show.
    caps = dict(attn_logit_softcapping=1.0, final_logit_softcapping=2.0) if model_type == "gemma2" else {}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **ARCH, **caps)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if "norm" in name else 0.05)
    return model


def numpy_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def gemma_config(hf):
    return FACTORIES[hf.config.model_type].config(hf.config)


@pytest.mark.parametrize("model_type", FACTORIES)
def test_hf_to_gemma_and_back_is_exact(model_type):
    hf = random_hf_model(model_type)
    sd = text_weights(numpy_state(hf))
    back = gemma_to_hf(hf_to_gemma(sd, gemma_config(hf)), gemma_config(hf))
    assert back.keys() == sd.keys()
    for name in sd:
        np.testing.assert_array_equal(back[name], sd[name], err_msg=name)


def test_multimodal_names_map_to_the_text_model():
    w = np.zeros(2)
    names = text_weights(
        {
            "model.language_model.layers.0.mlp.up_proj.weight": w,
            "model.vision_tower.encoder.x.weight": w,
            "lm_head.weight": w,
            "model.language_model.embed_tokens.weight": w,
        }
    )
    assert set(names) == {"model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"}


@pytest.mark.parametrize("model_type", FACTORIES)
def test_both_libraries_give_the_same_logits_on_a_packed_row(model_type):
    hf = random_hf_model(model_type)
    config = gemma_config(hf)
    model = build_model(FACTORIES[model_type], config, "fp32")
    # Two documents and padding, longer than the sliding window, with token id 0 inside a document.
    tokens = np.random.default_rng(0).integers(1, ARCH["vocab_size"], size=(1, 40))
    tokens[0, 5] = 0
    positions = np.concatenate([np.arange(22), np.arange(12), np.arange(6)])[None]
    with torch.no_grad():
        expected = hf(torch.tensor(tokens), position_ids=torch.tensor(positions), use_cache=False).logits.numpy()
    params = {"params": hf_to_gemma(numpy_state(hf), config)}
    got = np.asarray(model.apply(params, jnp.asarray(tokens), positions=jnp.asarray(positions)).logits)
    assert np.abs(expected).max() > 0.4  # not a trivially small output
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_an_official_gemma_checkpoint_loads_by_config(tmp_path):
    """backend.trainer.gemma_params reads an orbax checkpoint as gemma writes it (gm.ckpts.save_params)."""
    from gemma import gm

    from cbe.backends.kd.models import load_gemma_params

    hf = random_hf_model()
    params = hf_to_gemma(numpy_state(hf), gemma_config(hf))
    gm.ckpts.save_params(params, tmp_path / "ckpt", wait_until_finished=True)
    loaded = load_gemma_params(str(tmp_path / "ckpt"))
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
