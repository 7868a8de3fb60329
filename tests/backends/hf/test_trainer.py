"""The HF backend end to end on the tiny model: the run layout and its cadence, the learning rates it logs, the rows
each step trains on, resume after a kill, LoRA, the CPU speed settings, the demo itself (torchrun: test_torchrun.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cbe.data.packing import corpus_rows, training_order
from cbe.plan import lr_multiplier
from cbe.plot import read_tensorboard_scalars
from tests.conftest import ROOT, loop_in_process
from tests.results import assert_same_metrics, eval_results

# 5 steps, evaluated and saved every 2: the last step is off the cadence and still gets its evaluation and
# checkpoint, and its 3 saves under max_checkpoints=2 prune the oldest. The schedule: 2 steps of warmup (40%), then
# linear down to 0.1 of the peak, each step's learning rate logged.
SHORT = [
    "training.num_train_steps=5",
    "training.eval_every=2",
    "training.save_every=2",
    "training.max_checkpoints=2",
    "optimizer.warmup_fraction=0.4",
    "optimizer.schedule=linear",
    "optimizer.end_lr_fraction=0.1",
    "logging.log_every_n_steps=1",
]


def only_dir(folder: Path) -> Path:
    [inside] = folder.iterdir()
    return inside


def train_observed(run_dir: Path, cache_dir: Path, *overrides: str):
    """Train in this process; returns the backend and what the model's training forward passes were given, by
    input (input_ids, position_ids, labels), micro-batches concatenated, and under "loss" each step's training
    loss as train_steps returned it."""
    seen, losses = [], []

    def record(model, args, kwargs):
        if model.training:  # evaluation's loss and generation run in eval mode
            seen.append({key: kwargs[key].numpy().copy() for key in ("input_ids", "position_ids", "labels")})

    def observe(backend):
        backend.model.register_forward_pre_hook(record, with_kwargs=True)
        train_steps = backend.train_steps
        backend.train_steps = lambda *args: [losses.append(m["loss"]) or m for m in train_steps(*args)]

    loop = loop_in_process(run_dir, f"data.cache_dir={cache_dir}", "logging=none", *overrides, on_start=observe)
    loop.train()
    return loop.backend, {key: np.concatenate([batch[key] for batch in seen]) for key in seen[0]} | {
        "loss": np.array(losses)
    }


def test_tiny_run_writes_the_output_layout(run_main, tmp_path):
    before = sorted(os.listdir(ROOT))
    proc = run_main(
        *SHORT, "logging.project_name=proj", "logging.run_name=layout", 'eval.prompt_template="Recall: {question}"'
    )
    run = tmp_path / "outputs" / "proj" / "layout"
    assert sorted(os.listdir(ROOT)) == before  # nothing lands in the current directory
    assert f"run dir: {run}" in proc.stdout

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["training"]["num_train_steps"] == 5 and "${" not in (run / "config.yaml").read_text()
    assert (run / ".hydra" / "overrides.yaml").exists()

    log = (run / "logs" / "train.log").read_text()
    assert "train: " in log and "padding" in log and "eval | step 5" in log
    assert "eval | step 5" in proc.stdout
    # How often the run repeats its corpus, said once at the start: the sample track packs into 8 rows, 8 a step.
    repetition = (
        "repetition: the training corpus is 8 packed rows; one optimizer step (8 packed rows) is 1 epoch, the whole "
        "run (5 steps) 5 epochs\nwarning: one optimizer step holds the whole training corpus"
    )
    assert log.count(repetition) == 1 and proc.stdout.count(repetition) == 1
    # The learning rate each step trained at, logged after it, as transformers' schedule gives it: 2 warmup steps
    # (ceil(0.4 x 5)) at 3e-3 x 0/2 and 1/2, the peak at step 3, then 0.7 and 0.4 (0.1 + 0.9 x 2/3, 1/3).
    scalars = read_tensorboard_scalars(run / "logs" / "tensorboard")
    learning_rates = scalars["train/learning_rate"]
    assert learning_rates == pytest.approx({1: 0.0, 2: 1.5e-3, 3: 3e-3, 4: 2.1e-3, 5: 1.2e-3}, rel=1e-6, abs=1e-12)
    schedule = {s: 3e-3 * lr_multiplier(s - 1, 5, 0.4, "linear", 0.1) for s in range(1, 6)}
    assert learning_rates == pytest.approx(schedule, rel=1e-6)
    # The share of trained tokens the model ranks first, logged for training and evaluation; memorizing raises it.
    accuracy = scalars["eval/eval_mean_token_accuracy"]
    assert set(scalars["train/mean_token_accuracy"]) == {1, 2, 3, 4, 5}
    assert 0 <= accuracy[0] < accuracy[5] <= 1

    # Saved at 2, 4 and at the end (5, off the cadence); the oldest pruned to keep max_checkpoints=2.
    checkpoints = sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-4", "checkpoint-5"]
    assert os.readlink(run / "checkpoints" / "latest") == "checkpoint-5"
    assert (run / "checkpoints" / "checkpoint-5" / "optimizer.pt").exists()

    results = eval_results(run)
    assert [m["step"] for m in results] == [0, 2, 4, 5]  # step 0, every eval_every, and the end
    for m in results:
        for key in (
            "timestamp",
            "eval_loss",
            "valqa_exact_match",
            "valqa_fuzzy_match",
            "valqa_token_f1",
            "valqa_n",
            "testqa_exact_match",
            "testqa_n",
            "valqa_exact_match_supports_ge_2",
            "valqa_n_supports_ge_2",
        ):
            assert key in m, key
    assert results[-1]["eval_loss"] < results[0]["eval_loss"]

    details = [json.loads(line) for line in (run / "eval_details" / "valqa_step_000002.jsonl").read_text().splitlines()]
    assert len(details) == results[1]["valqa_n"] == 72
    assert {
        "prompt",
        "question",
        "raw_prediction",
        "parsed_prediction",
        "ground_truth",
        "exact_match",
        "fuzzy_match",
        "supports",
    } <= set(details[0])
    assert sorted(p.name for p in (run / "eval_details").iterdir()) == [
        f"{s}_step_{n:06d}.jsonl" for s in ("testqa", "valqa") for n in (0, 2, 4, 5)
    ]

    # mode=eval of the final checkpoint, with no other setting, composes as the run did (its template here), gives
    # exactly training's evaluation at that step, and lands inside the run, named by what it evaluated...
    latest = run / "checkpoints" / "latest"
    proc = run_main("mode=eval", f"checkpoint={latest}")
    evaluated = only_dir(run / "eval" / "checkpoint-5")
    assert evaluated.name.startswith("valqa+testqa-") and f"wrote {evaluated}" in proc.stdout
    assert_same_metrics(eval_results(evaluated)[0], results[-1])
    assert "prompt of the first valqa question: 'Recall: The Zorblat was first seen in'" in proc.stdout
    assert "[exact]" in proc.stdout or "[fuzzy]" in proc.stdout or "[wrong]" in proc.stdout
    assert "valqa" in proc.stdout and "95% CI" in proc.stdout and " on data/sample/val.jsonl" in proc.stdout

    # ...another QA file, with a template typed with a backslash-n, keeps its own result beside the first...
    run_main(
        "mode=eval",
        f"checkpoint={latest}",
        "eval.qa_data=data/sample/testqa.jsonl",
        'eval.prompt_template="Q: {question}\\nA:"',
    )
    assert len(list((run / "eval" / "checkpoint-5").iterdir())) == 2 and eval_results(evaluated)
    other = next(p for p in (run / "eval" / "checkpoint-5").iterdir() if p != evaluated)
    prompt = json.loads((other / "eval_details" / "testqa_step_000005.jsonl").read_text().splitlines()[0])["prompt"]
    assert prompt == "Q: The Zorblat is colored\nA:"  # a real newline

    # ...and checkpoint=base the untrained baseline at step 0, here on one QA file with its details saved.
    saved = tmp_path / "base_details.jsonl"
    run_main(
        "mode=eval",
        "checkpoint=base",
        "eval.qa_data=data/sample/valqa.jsonl",
        f"eval.save_details={saved}",
        'eval.prompt_template="Recall: {question}"',
    )
    base = eval_results(only_dir(tmp_path / "outputs" / "cbe" / "sample" / "tiny-full-hf" / "eval" / "base"))[0]
    assert_same_metrics(base, {k: v for k, v in results[0].items() if not k.startswith("testqa")})

    # cbe rescore recomputes the same metrics from the saved raw predictions.
    rescored = json.loads(
        subprocess.run(
            [sys.executable, "-m", "cbe.cli", "rescore", str(saved), "--support-thresholds", "2"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert {
        k: rescored[k] for k in ("n", "exact_match", "fuzzy_match", "token_f1", "exact_match_ci95", "n_supports_ge_2")
    } == {
        k: base[f"valqa_{k}"]
        for k in ("n", "exact_match", "fuzzy_match", "token_f1", "exact_match_ci95", "n_supports_ge_2")
    }


# The sample track's 8 rows, 2 a step in micro-batches of 1: 6 steps read one epoch and half of the next.
SMALL_STEPS = [
    "training.effective_batch_size=2",
    "training.per_device_batch_size=1",
    "training.num_train_steps=6",
    "training.eval_every=3",
    "training.save_every=6",
    "eval.max_questions=2",
]


@pytest.fixture(scope="module")
def small_steps_run(tmp_path_factory, cache_dir):
    """(backend, what its training forward passes got, eval results) of a run of SMALL_STEPS, trained in process."""
    run = tmp_path_factory.mktemp("small_steps")
    backend, seen = train_observed(run, cache_dir, *SMALL_STEPS)
    return backend, seen, eval_results(run)


def test_each_step_trains_on_the_rows_of_the_training_order(small_steps_run, cache_dir):
    backend, seen, _ = small_steps_run
    s, t = backend.settings, backend.settings.training
    rows = corpus_rows(
        str(ROOT / "data/sample/train.jsonl"), backend.tokenizer, s.sequence_length, cache_dir, packing=True
    )
    order = training_order(len(rows), s.total_steps * t.effective_batch_size, t.seed)
    assert len(rows) == 8 and sorted(order[:8]) == list(range(8)) and list(order[:8]) != list(range(8))
    for key in seen.keys() - {"loss"}:
        assert np.array_equal(seen[key], getattr(rows, key)[order]), key


@pytest.mark.parametrize("scope", ["model", "layers"])
def test_gradient_checkpointing_and_compilation_train_alike_on_the_cpu(small_steps_run, tmp_path, cache_dir, scope):
    """backend.trainer.gradient_checkpointing=true and .torch_compile=model (the whole decoder stack) or layers (each
    decoder layer) on the tiny model on the CPU: the same rows, the same training losses and eval_loss as eager
    without checkpointing (to float noise)."""
    _, plain_seen, plain = small_steps_run
    backend, seen = train_observed(
        tmp_path,
        cache_dir,
        *SMALL_STEPS,
        "backend.trainer.gradient_checkpointing=true",
        f"backend.trainer.torch_compile={scope}",
    )
    assert backend.model.is_activation_checkpointing
    stack = backend.model.base_model
    layers = [m for m in stack.modules() if type(m).__name__.endswith("DecoderLayer")]
    compiled = [stack] if scope == "model" else layers  # nn.Module.compile
    assert len(layers) == 4 and all(m._compiled_call_impl is not None for m in stack.modules() if m in compiled)
    assert not any(m._compiled_call_impl is not None for m in stack.modules() if m not in compiled)
    assert all(np.array_equal(seen[key], plain_seen[key]) for key in seen.keys() - {"loss"})
    np.testing.assert_allclose(seen["loss"], plain_seen["loss"], rtol=1e-5)
    results = eval_results(tmp_path)
    assert [m["step"] for m in results] == [m["step"] for m in plain] == [0, 3, 6]
    assert plain[-1]["eval_loss"] < plain[0]["eval_loss"] - 0.1  # it trained
    for a, b in zip(results, plain):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-5), a["step"]


def test_fp8_trains_the_projections_in_float8_near_the_plain_losses_and_checkpoints_alike(
    small_steps_run, tmp_path, cache_dir
):
    """backend.trainer.fp8=true (torchao float8) on the CPU: every decoder projection, and nothing else, computes in
    FP8; the losses move (FP8 arithmetic ran) but stay near the plain run's; the checkpoint is the same format."""
    from safetensors.torch import load_file
    from torchao.float8.float8_linear import Float8Linear

    plain_backend, plain_seen, plain = small_steps_run
    backend, seen = train_observed(tmp_path, cache_dir, *SMALL_STEPS, "backend.trainer.fp8=true")
    converted = [name for name, m in backend.model.named_modules() if isinstance(m, Float8Linear)]
    projections = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert sorted(name.split(".")[-1] for name in converted) == sorted(list(projections) * 4)
    assert all(".layers." in name for name in converted)
    assert not np.array_equal(seen["loss"], plain_seen["loss"])
    np.testing.assert_allclose(seen["loss"], plain_seen["loss"], rtol=2e-2)
    for a, b in zip(eval_results(tmp_path), plain):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=2e-2), a["step"]
    saved, plain_saved = (
        load_file(b.run.checkpoint_dir(6, "hf") / "model.safetensors") for b in (backend, plain_backend)
    )
    assert {k: (v.dtype, v.shape) for k, v in saved.items()} == {k: (v.dtype, v.shape) for k, v in plain_saved.items()}


def test_a_cosine_run_logs_the_learning_rate_of_each_step(tiny_wandb_run):
    """The shared tiny W&B run: 4 steps, cosine, 5% warmup, which rounds up to one step (transformers' ceil): lr 0
    at step 1, then 3e-3 x (1 + cos(pi x 0, 1/3, 2/3)) / 2 = 3e-3 x (1, 0.75, 0.25)."""
    learning_rates = read_tensorboard_scalars(tiny_wandb_run / "logs" / "tensorboard")["train/learning_rate"]
    expected = [0.0, 1.0, 0.75, 0.25]
    assert learning_rates == pytest.approx({s: 3e-3 * m for s, m in enumerate(expected, 1)}, rel=1e-6, abs=1e-12)


def test_lora_trains_only_the_adapter(run_main, tmp_path, cache_dir):
    run = tmp_path / "outputs" / "cbe" / "sample" / "tiny-lora128-hf"
    steps = ["training.num_train_steps=2", "training.eval_every=2", "training.save_every=2", "eval.max_questions=8"]
    before = {}
    loop = loop_in_process(
        run,
        f"data.cache_dir={cache_dir}",
        "logging=none",
        "adapter=lora128",
        *steps,
        on_start=lambda b: before.update({name: p.detach().clone() for name, p in b.model.named_parameters()}),
    )
    loop.train()
    backend = loop.backend
    b_names = [name for name in before if "lora_B" in name]
    assert b_names and not any(before[name].any() for name in b_names)  # B starts at zero

    # Every B moved off zero; every tensor of the base model is bit for bit what it was.
    after = {name: p.detach() for name, p in backend.model.named_parameters()}
    assert after.keys() == before.keys()
    assert all(after[name].any() for name in b_names)
    base = [name for name in before if "lora_" not in name]
    assert len(base) > 30 and [name for name in base if not torch.equal(after[name], before[name])] == []
    results = eval_results(run)
    assert [m["step"] for m in results] == [0, 2] and results[1]["eval_loss"] < results[0]["eval_loss"] - 0.01

    checkpoint = run / "checkpoints" / "checkpoint-2"
    adapter = json.loads((checkpoint / "adapter_config.json").read_text())
    assert adapter["r"] == 128 and adapter["lora_alpha"] == 128
    assert all(name in adapter["target_modules"] for name in ("q_proj", "down_proj"))
    from safetensors.numpy import load_file

    weights = load_file(checkpoint / "adapter_model.safetensors")
    assert weights and all("lora_" in name for name in weights)
    assert all(value.any() for name, value in weights.items() if "lora_B" in name)

    # The adapter dir evaluates on its own (base model + adapter) to training's numbers at that step.
    proc = run_main("adapter=lora128", "mode=eval", f"checkpoint={checkpoint}", "eval.max_questions=8", "logging=none")
    assert "FutureWarning" not in proc.stderr  # transformers' is_gradient_checkpointing notice, read by PEFT
    assert_same_metrics(eval_results(only_dir(run / "eval" / "checkpoint-2"))[0], results[-1])


def test_multirun_gives_each_job_its_own_run_dir_and_a_sweep_summary(run_main, tmp_path):
    proc = run_main(
        "-m",
        "optimizer.lr=1e-3,3e-3",
        "training.num_train_steps=2",
        "training.eval_every=2",
        "training.save_every=2",
        "logging=none",
    )
    sweep = tmp_path / "outputs" / "cbe" / "sample" / "tiny-full-hf"
    jobs = sorted(p.name for p in sweep.iterdir() if (p / "metrics").exists())
    # Named from the job's overrides; logging and output_root are left out (they change no result).
    assert jobs == [
        f"optimizer.lr={lr},training.eval_every=2,training.num_train_steps=2,training.save_every=2"
        for lr in ("0.001", "0.003")
    ]
    for job in jobs:
        assert [m["step"] for m in eval_results(sweep / job)] == [0, 2]
        assert not list((sweep / job / "logs" / "tensorboard").glob("*"))  # logging=none
        assert (sweep / job / "logs" / "train.log").read_text().count("eval | step 2") == 1
    summary = [json.loads(line) for line in (sweep / "sweep_summary.jsonl").read_text().splitlines()]
    assert [s["job"] for s in summary] == jobs
    for s, job in zip(summary, jobs):
        results = eval_results(sweep / job)
        assert s["last_step"] == 2 and s["final_eval_loss"] == results[-1]["eval_loss"]
        assert s["best_eval_loss"] == min(m["eval_loss"] for m in results)
        assert s["best_valqa_fuzzy_match"] == max(m["valqa_fuzzy_match"] for m in results)
    table = proc.stdout[proc.stdout.index("eval_loss final/best") - 200 :]
    assert "optimizer.lr=0.001" in table and "optimizer.lr=0.003" in table and "sweep_summary.jsonl" in table


def test_zero_steps_evaluates_the_start_only(run_main, tmp_path):
    run_main("training.num_train_steps=0", "logging.run_name=zero")
    run = tmp_path / "outputs" / "cbe" / "zero"
    assert [m["step"] for m in eval_results(run)] == [0]
    assert not (run / "checkpoints").exists()


@pytest.mark.slow
def test_the_demo_memorizes_the_sample_track(tmp_path, cache_dir):
    """`make demo` is the default config: eval loss falls and valqa exact match climbs from ~0 to >= 0.8 (run in this
    process, wired as main.py wires it)."""
    loop_in_process(tmp_path / "demo", f"data.cache_dir={cache_dir}").train()
    results = eval_results(tmp_path / "demo")
    losses = [m["eval_loss"] for m in results]
    # The cosine ends at lr 0: the last evaluations are level, so the last is the lowest up to float noise.
    assert losses[-1] < losses[0] / 4 and losses[-1] == pytest.approx(min(losses), rel=1e-4)
    assert results[0]["valqa_exact_match"] <= 0.05 and results[-1]["valqa_exact_match"] >= 0.8
