"""The memory plan: parameter counts of the real shapes, the one measured peak, and what fits a 40 GB card."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cbe.backends.hf import memory
from cbe.config import register_configs, settings_of
from tests.conftest import ROOT

CARD_40GB = 40e9


def architecture(model):
    return OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{model}.yaml").model.architecture)


@pytest.mark.parametrize(
    "model,billions", [("gemma3_270m", 0.268), ("gemma3_1b", 1.0), ("gemma3_4b", 3.88), ("gemma3_12b", 11.77)]
)
def test_parameter_counts_of_the_text_models(model, billions):
    # Published sizes: 268M (170M embedding + 100M transformer), 1.0B; the 4B and 12B checkpoints' text models
    # (their vision towers, about 0.4B, are not counted).
    assert memory.parameter_count(architecture(model)) / 1e9 == pytest.approx(billions, rel=0.01)


def test_the_estimate_matches_the_measured_4b_peak():
    # Measured: Gemma 3 4B full fine-tune, 8 rows of 1024 tokens a device, no checkpointing: about 59 GB.
    peak = memory.estimate(architecture("gemma3_4b"), 0, rows=8, sequence_length=1024, gradient_checkpointing=False)
    assert peak.total_bytes / 1e9 == pytest.approx(59, rel=0.1)
    checkpointed = memory.estimate(architecture("gemma3_4b"), 0, 8, 1024, gradient_checkpointing=True)
    assert checkpointed.static_bytes == peak.static_bytes and checkpointed.activation_bytes < peak.activation_bytes / 5


def test_auto_checkpoints_only_where_the_run_would_not_fit():
    arch = architecture("gemma3_4b")
    assert memory.plan(arch, 0, 4, 1024, "auto", CARD_40GB).gradient_checkpointing  # 4B full needs it on 40 GB
    assert not memory.plan(arch, 0, 4, 1024, "auto", 141e9).gradient_checkpointing  # an H200 has room
    assert not memory.plan(arch, 0, 4, 1024, "auto", None).gradient_checkpointing  # the CPU
    assert memory.plan(arch, 0, 4, 1024, "True", 141e9).gradient_checkpointing  # an explicit setting wins
    assert memory.plan({}, 0, 4, 1024, "auto", CARD_40GB) == memory.MemoryPlan(True, None, True)  # no shape known


def compose_recipe(*overrides):
    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("task", ["news", "geminon"])
@pytest.mark.parametrize("model", ["gemma3_270m", "gemma3_1b", "gemma3_4b", "gemma3_12b"])
@pytest.mark.parametrize("adapter", ["full", "lora128"])
def test_every_default_recipe_fits_a_40gb_card_or_is_refused(task, model, adapter):
    cfg = compose_recipe(f"task={task}", f"model={model}", f"adapter={adapter}")
    plan = memory.plan_run(settings_of(cfg), CARD_40GB)
    if (model, adapter) == ("gemma3_12b", "full"):  # 12B weights, gradients and AdamW state: no single card holds them
        assert plan.estimate.static_bytes > CARD_40GB
    else:
        assert plan.fits, plan.estimate.describe()


@pytest.mark.parametrize("gpus,card_gb", [(8, 40), (4, 80)])
@pytest.mark.parametrize("task", ["news", "geminon"])
def test_12b_full_fits_a_set_of_gpus_under_fsdp_and_is_refused_on_one(task, gpus, card_gb):
    from cbe.backends.hf.trainer import plan_memory
    from cbe.errors import UserError

    settings, card = settings_of(compose_recipe(f"task={task}", "model=gemma3_12b", "adapter=full")), card_gb * 1e9
    with pytest.raises(UserError, match="parallel=fsdp"):
        plan_memory(settings, card, "auto", shards=1)
    plan_memory(settings, card, "auto", shards=gpus)  # accepted
    peak = memory.plan_run(settings, card, shards=gpus).estimate
    # Each GPU holds 1/N of the 94 GB of bf16 weights, gradients and AdamW moments, plus what FSDP gathers: two
    # decoder layers (0.22B parameters each) and the embedding (262144 x 3840), all bf16: about 3 GB.
    assert peak.static_bytes / 1e9 == pytest.approx(94.2 / gpus + 2.9, rel=0.03)
    # Evaluation gathers the whole model (23.5 GB) beside the shards of the weights and moments (gradients freed).
    assert peak.evaluation_bytes / 1e9 == pytest.approx(23.5 + 70.6 / gpus, rel=0.03)
    assert peak.total_bytes <= memory.HEADROOM * card
    with pytest.raises(UserError, match="with FSDP over 2"):  # two 40 GB cards cannot hold it either
        plan_memory(settings, 40e9, "auto", shards=2)
