"""The Kauldron backend end to end, and its parity with the HF backend: same weights, same data, same metrics."""

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
import torch
import yaml
from flax import traverse_util
from gemma import gm
from peft.tuners.lora import LoraLayer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoConfig

from cbe.backends.hf.models import load_base_model
from cbe.backends.kd.convert import gemma_to_hf, text_weights
from cbe.backends.kd.models import GemmaFactory, load_hf_weights
from cbe.config import settings_of
from cbe.plot import read_tensorboard_scalars
from cbe.run import RunDir
from tests.conftest import loop_in_process
from tests.logging.test_loggers import GLUED, train_lines
from tests.results import assert_same_metrics, eval_results
from tests.test_config import compose_config

pytestmark = pytest.mark.slow

# TensorFlow's start-up banners (kauldron imports TF), known harmless and kept out of a run's output.
TF_BANNERS = ("oneDNN custom operations are on", "All log messages before absl::InitializeLog", "cpu_feature_guard")

# Two micro-batches of 4 rows per optimizer step, so gradient accumulation is part of the comparison.
TINY_STEPS = [
    "training.num_train_steps=4",
    "training.eval_every=2",
    "training.save_every=2",
    "training.per_device_batch_size=4",
    "logging.log_every_n_steps=1",
    "training.max_checkpoints=2",
]

# Step-for-step parity: 4 of the 29 rows that the sample track packs into at length 64 make a step (so the order
# the rows are read in shows in every loss), in 2 accumulated micro-batches of 2; weights decay (norm scales
# must not); 7 steps saved every 2 and evaluated every 4, so the last save and evaluation fall off the cadence
# and the saves at 2 and 4 are pruned to max_checkpoints.
PARITY = [
    "data.sequence_length=64",
    "training.effective_batch_size=4",
    "training.per_device_batch_size=2",
    "training.num_train_steps=7",
    "training.eval_every=4",
    "training.save_every=2",
    "training.max_checkpoints=2",
    "logging.log_every_n_steps=1",
    "optimizer.weight_decay=0.1",
    "optimizer.max_grad_norm=null",  # no clipping: the recipes' default is tested by the clipping test
]
PARITY_ROWS = 29

LORA = [
    "adapter=lora128",
    "training.num_train_steps=5",
    "training.eval_every=5",
    "training.save_every=5",
    "logging.log_every_n_steps=1",
    "optimizer.lr=1e-3",
    "optimizer.weight_decay=0.1",
]


def run_both(tmp_path, cache_dir, *overrides: str) -> dict[str, Path]:
    """The same run with backend=hf and backend=kd, each in this process (a new one would import both frameworks
    again) and wired as main.py wires it, everything it prints copied to its logs/train.log from before the backend
    is built; the run dir of each."""
    runs = {}
    for backend in ("hf", "kd"):
        runs[backend] = run = tmp_path / backend
        (run / "logs").mkdir(parents=True)
        stdout, stderr = sys.stdout, sys.stderr
        RunDir(run).capture_output()
        try:
            loop = loop_in_process(run, f"backend={backend}", *overrides, f"data.cache_dir={cache_dir}")
            try:
                loop.train()
            finally:
                loop.loggers.close()
        finally:
            sys.stdout.log.close()
            sys.stdout, sys.stderr = stdout, stderr
    return runs


def train_losses(run: Path) -> list[float]:
    events = EventAccumulator(str(run / "logs" / "tensorboard"))
    events.Reload()
    return [e.value for e in events.Scalars("train/loss")]


def predictions(run: Path, qa_set: str, step: int) -> list[str]:
    lines = (run / "eval_details" / f"{qa_set}_step_{step:06d}.jsonl").read_text().splitlines()
    return [json.loads(line)["raw_prediction"] for line in lines]


def same_fraction(a: list[str], b: list[str]) -> float:
    assert len(a) == len(b) > 0
    return sum(x == y for x, y in zip(a, b)) / len(a)


def kd_params(checkpoint: Path) -> dict[tuple[str, ...], np.ndarray]:
    """The params of a KD checkpoint (ckpt_<step>), by flat key."""
    return traverse_util.flatten_dict(ocp.StandardCheckpointer().restore(checkpoint / "default")["params"])


def assert_same_weights(kd_checkpoint: Path, hf_checkpoint: Path, config, rel: float) -> None:
    """Every tensor of a KD and an HF checkpoint, in HF names, agrees: mean |difference| <= rel x mean |value|.

    (A mean, not a max: Adam's first updates are about lr x the sign of the gradient, so an element whose gradient
    is float noise may differ by about lr.)"""
    kd = gemma_to_hf(traverse_util.unflatten_dict(kd_params(kd_checkpoint)), config)
    hf = text_weights(safetensors.numpy.load_file(hf_checkpoint / "model.safetensors"))
    assert kd.keys() == hf.keys()
    for name, value in hf.items():
        assert np.abs(kd[name] - value).mean() <= rel * np.abs(value).mean(), name


@pytest.fixture(scope="module")
def tiny_with_norms(tmp_path_factory) -> Path:
    """The tiny model as the harness initializes it, with its RMSNorm weights drawn in +-0.5 instead of 0, as a
    local HF checkpoint: a pretrained model's norm weights are not 0, and only then would decaying them (which
    neither backend may do) change training."""
    model, _ = load_base_model(settings_of(compose_config()))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "norm" in name:
                weight.copy_(torch.empty(weight.shape).uniform_(-0.5, 0.5, generator=generator))
    path = tmp_path_factory.mktemp("tiny_with_norms")
    model.save_pretrained(path)
    return path


# Where gemma keeps the LoRA A of each PEFT projection. gemma computes k and v in one einsum (kv_einsum), and gate
# and up in another, each with one LoRA A for the pair; PEFT has an A per projection.
GEMMA_LORA_A = {
    "self_attn.q_proj": ("attn", "q_einsum", "_LoRAEinsum_0"),
    "self_attn.k_proj": ("attn", "kv_einsum", "_LoRAEinsum_0"),
    "self_attn.o_proj": ("attn", "attn_vec_einsum", "_LoRAEinsum_0"),
    "mlp.gate_proj": ("mlp", "_LoRAEinsum_gating_einsum"),
    "mlp.down_proj": ("mlp", "_LoRAEinsum_linear"),
}
FUSED_WITH = {"self_attn.v_proj": "self_attn.k_proj", "mlp.up_proj": "mlp.gate_proj"}


def lora_layers(peft_model) -> dict[tuple[int, str], LoraLayer]:
    """The PEFT model's LoRA layers by (layer index, projection), e.g. (0, "self_attn.q_proj")."""
    layers = {}
    for name, module in peft_model.named_modules():
        match = re.fullmatch(r".*\.layers\.(\d+)\.((?:self_attn|mlp)\.\w+)", name)
        if match and isinstance(module, LoraLayer):
            layers[int(match[1]), match[2]] = module
    return layers


def tie_and_take_lora_a(peft_model, num_heads: int, head_dim: int) -> dict[tuple[str, ...], np.ndarray]:
    """Gives v the A of k and up the A of gate, as gemma's fused einsums have it, and returns every A as gemma
    keeps it, by flat param key."""
    layers = lora_layers(peft_model)
    gemma_a = {}
    for (i, projection), layer in layers.items():
        a = layer.lora_A["default"].weight  # [rank, in]
        if projection in FUSED_WITH:
            with torch.no_grad():
                a.copy_(layers[i, FUSED_WITH[projection]].lora_A["default"].weight)
            continue
        value = a.detach().numpy().T.copy()  # [in, rank], a copy: training moves A in place
        if projection == "self_attn.o_proj":  # its input is the heads' outputs side by side
            value = value.reshape(num_heads, head_dim, -1)
        gemma_a[(f"layer_{i}", *GEMMA_LORA_A[projection], "lora", "a")] = value
    return gemma_a


def test_clipping_is_the_same_in_both_backends(tmp_path, cache_dir):
    """optimizer.max_grad_norm clips both backends' gradients alike (null clips nothing: the test below). In-process
    runs: what is compared is the training, not a process's start."""

    def train_losses_of(name: str, *overrides: str) -> list[float]:
        # No warmup: every step updates (a warmup's first step trains at lr 0).
        args = [*TINY_STEPS, "optimizer.warmup_fraction=0", f"data.cache_dir={cache_dir}", *overrides]
        loop = loop_in_process(tmp_path / name, *args)
        loop.train()
        loop.loggers.close()
        return train_losses(tmp_path / name)

    clipped = {b: train_losses_of(b, f"backend={b}", "optimizer.max_grad_norm=0.05") for b in ("hf", "kd")}
    assert clipped["kd"] == pytest.approx(clipped["hf"], rel=1e-3)
    unclipped = train_losses_of("unclipped", "backend=hf", "optimizer.max_grad_norm=null")
    assert clipped["hf"][0] == pytest.approx(unclipped[0])  # the same start: clipping acts from the first update
    # Clipping changed training by several times the tolerance the backends agree to (AdamW undoes most of a
    # gradient's scale, so the change is small, about 0.4% here).
    assert max(abs(c - u) / u for c, u in zip(clipped["hf"], unclipped)) > 3e-3


def test_tiny_kd_run_matches_hf_step_for_step(tmp_path, cache_dir, tiny_with_norms):
    """From one local HF checkpoint: the same losses at every step, the same answers, and at the end the same
    weights, every tensor (the norm scales undecayed in both)."""
    runs = run_both(tmp_path, cache_dir, *PARITY, "model.source=hub", f"model.name={tiny_with_norms}")
    kd, hf = eval_results(runs["kd"]), eval_results(runs["hf"])

    # The same layout and the same metric keys as HF; the last step is evaluated and saved although off the
    # cadence, and of the saves at 2, 4, 6 and 7 the last max_checkpoints=2 are kept.
    assert [m["step"] for m in kd] == [m["step"] for m in hf] == [0, 4, 7]
    assert kd[0].keys() == hf[0].keys()
    assert sorted(p.name for p in (runs["kd"] / "eval_details").iterdir()) == sorted(
        p.name for p in (runs["hf"] / "eval_details").iterdir()
    )
    assert sorted(p.name for p in (runs["kd"] / "checkpoints").glob("ckpt_*")) == ["ckpt_6", "ckpt_7"]
    assert sorted(p.name for p in (runs["hf"] / "checkpoints").glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-7"]
    assert os.readlink(runs["kd"] / "checkpoints" / "latest") == "ckpt_7"
    assert "params: " in (runs["kd"] / "logs" / "train.log").read_text()

    # The same console: the repetition report, train lines of numbers, eval lines of their own; the same train
    # scalars, among them the epoch as rows seen / packed rows.
    logs = {backend: (run / "logs" / "train.log").read_text() for backend, run in runs.items()}
    reports = {
        b: [line for line in log.splitlines() if line.startswith(("repetition:", "warning:"))]
        for b, log in logs.items()
    }
    assert reports["kd"] == reports["hf"] and len(reports["kd"]) == 1  # a step is less than the corpus: no warning
    epochs = [step * 4 / PARITY_ROWS for step in range(1, 8)]
    kd_lines = train_lines(logs["kd"])
    assert [line["epoch"] for line in kd_lines] == pytest.approx(epochs, rel=1e-3) and not GLUED.search(logs["kd"])
    assert all(isinstance(v, float) for line in kd_lines for v in line.values())
    scalars = {b: read_tensorboard_scalars(run / "logs" / "tensorboard") for b, run in runs.items()}
    assert scalars["kd"]["train/epoch"] == scalars["hf"]["train/epoch"]
    assert list(scalars["kd"]["train/epoch"].values()) == pytest.approx(epochs)
    assert {tag for tag in scalars["kd"] if tag.startswith("train/")} <= set(scalars["hf"])

    # Same weights, same rows in the same order: the same losses, in evaluation and in every optimizer step.
    for a, b in zip(kd, hf):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-4), a["step"]
    assert train_losses(runs["kd"]) == pytest.approx(train_losses(runs["hf"]), rel=1e-4)
    assert kd[-1]["eval_loss"] < kd[0]["eval_loss"] - 1  # and they did train
    # The same greedy answers. At step 0 they are noise, a different answer to almost every question, so lists
    # that agree mean the same model and the same decoding (all but one answer: float noise may flip a near tie).
    for qa_set in ("valqa", "testqa"):
        untrained = predictions(runs["kd"], qa_set, 0)
        assert len(set(untrained)) > 0.8 * len(untrained)
        assert same_fraction(untrained, predictions(runs["hf"], qa_set, 0)) >= 0.98
        assert same_fraction(predictions(runs["kd"], qa_set, 7), predictions(runs["hf"], qa_set, 7)) >= 0.95
    # The same weights: decaying the norm scales in one backend would move them by about 1e-3 of their size.
    config = GemmaFactory().config(AutoConfig.from_pretrained(tiny_with_norms))
    kd_checkpoint, hf_checkpoint = runs["kd"] / "checkpoints" / "ckpt_7", runs["hf"] / "checkpoints" / "checkpoint-7"
    assert_same_weights(kd_checkpoint, hf_checkpoint, config, 2e-4)


def test_lora_first_steps_agree_with_hf(run_main, tmp_path, cache_dir):
    """LoRA from the same base weights and the same A (B = 0 in both): the first 5 steps' losses agree to 1e-3 while
    training moves them; KD trains only the adapter; mode=eval of its checkpoint reproduces its last evaluation.

    HF runs in this process, to give v the A of k and up the A of gate (gemma's fused einsums have one A for each
    pair); KD starts from backend.trainer.gemma_params, the converted base weights with HF's A."""
    start = {}

    def tie_lora_a(hf):
        s, arch = hf.settings, hf.settings.model.architecture
        start.update(traverse_util.flatten_dict(load_hf_weights(s.model, s.training.seed, s.cache_dir).params))
        start.update(tie_and_take_lora_a(hf.model, arch["num_attention_heads"], arch["head_dim"]))
        gm.ckpts.save_params(traverse_util.unflatten_dict(start), tmp_path / "start", wait_until_finished=True)

    hf = loop_in_process(tmp_path / "hf", "backend=hf", *LORA, f"data.cache_dir={cache_dir}", on_start=tie_lora_a)
    hf.train()
    hf.loggers.close()
    arch = hf.cfg.model.architecture
    # KD in this process too (a new one would import TensorFlow and kauldron again); its run dir where main.py's is,
    # for mode=eval below.
    run = tmp_path / "outputs" / "cbe" / "kd"
    kd_args = ["backend=kd", *LORA, f"backend.trainer.gemma_params={tmp_path / 'start'}", f"data.cache_dir={cache_dir}"]
    kd = loop_in_process(run, *kd_args)
    kd.train()
    kd.loggers.close()
    (run / ".hydra").mkdir()  # Hydra's record of the command line, as main.py's run would have it
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(kd_args))
    kd_losses, hf_losses = train_losses(run), train_losses(tmp_path / "hf")
    assert len(kd_losses) == len(hf_losses) == 5
    assert kd_losses == pytest.approx(hf_losses, rel=1e-3)
    assert hf_losses[-1] < 0.9 * hf_losses[0]

    # Only the adapter trained: every base tensor is bit for bit the start's (weight decay included), every B moved.
    trained = kd_params(run / "checkpoints" / "ckpt_5")
    for key, value in start.items():
        if "lora" not in key:
            assert np.array_equal(trained[key], value), key
    lora_b = [value for key, value in trained.items() if key[-2:] == ("lora", "b")]
    assert len(lora_b) == len(GEMMA_LORA_A) * arch.num_hidden_layers and all(b.any() for b in lora_b)

    # mode=eval of the LoRA checkpoint (composed as its run was: adapter, start) gives training's step-5 numbers.
    run_main("backend=kd", "mode=eval", f"checkpoint={run / 'checkpoints' / 'ckpt_5'}", "logging=none")
    [evaluated] = (run / "eval" / "ckpt_5").iterdir()
    assert_same_metrics(eval_results(evaluated)[0], eval_results(run)[-1])
    assert predictions(evaluated, "valqa", 5) == predictions(run, "valqa", 5)


def test_zero_steps_gives_the_same_start_in_both_backends_on_gemma3_270m(tmp_path, cache_dir):
    """The real 270M model, converted from its HF checkpoint: the same step-0 eval loss and greedy answers."""
    runs = {backend: tmp_path / backend for backend in ("hf", "kd")}
    for backend, run in runs.items():  # in this process: a new one would import both frameworks again
        loop = loop_in_process(
            run,
            f"backend={backend}",
            "model=gemma3_270m",
            "training.num_train_steps=0",
            "eval.max_questions=12",
            "eval.max_new_tokens=8",
            "eval.batch_size=24",
            "logging=none",
            f"data.cache_dir={cache_dir}",
        )
        loop.train()
    kd, hf = eval_results(runs["kd"]), eval_results(runs["hf"])
    assert kd[0]["eval_loss"] == pytest.approx(hf[0]["eval_loss"], rel=1e-3)
    for qa_set in ("valqa", "testqa"):
        assert same_fraction(predictions(runs["kd"], qa_set, 0), predictions(runs["hf"], qa_set, 0)) >= 0.98
