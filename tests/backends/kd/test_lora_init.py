"""gemma's LoRA as the KD backend builds and loads it starts as the benchmark's does: B = 0, A uniform in
+-sqrt(6 / fan_in), so A's standard deviation is sqrt(6 / fan_in) / sqrt(3)."""

import math
from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from hydra import compose, initialize_config_dir

from cbe.backends.kd.models import build_model, load_hf_weights
from cbe.backends.kd.trainer import _Weights
from cbe.config import register_configs
from tests.conftest import ROOT

pytestmark = pytest.mark.kd


@dataclass(frozen=True)
class State:
    params: Any

    replace = replace


def test_lora_a_is_drawn_as_the_benchmark_draws_it_and_b_is_zero(cache_dir):
    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=["backend=kd", "adapter=lora128"])
    base = load_hf_weights(cfg.model, cfg.training.seed, str(cache_dir))
    converted = base.params
    model = build_model(base.factory, base.config, cfg.training.precision, cfg.adapter.rank, tokens="batch.input_ids")
    initialized = model.init(jax.random.key(cfg.training.seed), jnp.zeros((1, 8), jnp.int32))["params"]
    loaded = _Weights(converted).transform(State(params=initialized)).params  # the base weights go in; LoRA stays
    by_fan_in: dict[int, list[np.ndarray]] = {}
    for key, value in traverse_util.flatten_dict(loaded).items():
        if "lora" in key and key[-1] == "b":
            assert not np.asarray(value).any()
        if "lora" in key and key[-1] == "a":  # [..., fan_in axes..., rank]; attn_vec's input is heads x head_dim
            fan_in = math.prod(value.shape[:-1])
            by_fan_in.setdefault(fan_in, []).append(np.asarray(value).ravel())
    assert sorted(by_fan_in) == [128, 512]  # the tiny model's hidden (= heads x head_dim) and intermediate sizes
    for fan_in, values in by_fan_in.items():
        assert np.concatenate(values).std() == pytest.approx(math.sqrt(6 / fan_in) / math.sqrt(3), rel=0.02)
