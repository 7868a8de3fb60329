"""main.py under torchrun: two processes (gloo, this CPU) train as one process does with the same effective batch,
under DDP (backend.trainer.parallel=ddp, the default) and FSDP2 (=fsdp). Under FSDP a run killed mid-way resumes
with each evaluation written once, and its checkpoints are the ordinary HF layout, read by `from_pretrained` (PEFT
for LoRA), and mode=eval of one reproduces the run's numbers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from cbe.run import read_jsonl
from cbe.weights.init import init_config
from tests.conftest import ROOT, loop_in_process
from tests.results import assert_same_metrics, eval_results, raw_predictions

# 6 steps of 8 rows (the sample track at 64 tokens a row is 29 rows), 2 rows a micro-batch: each of the two ranks
# accumulates 2 micro-batches a step, the one process 4.
RUN = [
    "data.sequence_length=64",
    "training.num_train_steps=6",
    "training.eval_every=3",
    "training.save_every=3",
    "training.effective_batch_size=8",
    "training.per_device_batch_size=2",
    "optimizer.weight_decay=0.1",
    "optimizer.max_grad_norm=0.5",  # clipped: the gradient norm is taken over the shards
    "eval.max_questions=8",
    "eval.loss_batch_size=1",  # 4 validation rows, 2 for each rank
    "logging=none",
]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """RUN, full fine-tune, as one process (in this one): what both torchrun runs of it must reproduce."""
    run_dir = tmp_path_factory.mktemp("one_process")
    loop_in_process(run_dir, *RUN).train()
    return run_dir


# main.py under torchrun, with each rank's share of the work counted, one line per call in counts.rank<N>: the
# prompts the HF backend's decoder gets, the validation rows its eval-loss forward passes get (inputs built without
# gradient), and the W&B runs it starts.
COUNTING_MAIN = """
import os, runpy, sys

import torch
import wandb

import cbe.backends.hf.trainer as hf_trainer

counts = open(os.path.join(os.path.dirname(__file__), "counts.rank" + os.environ["RANK"]), "a", buffering=1)
answers, tensors, wandb_init = hf_trainer.decode_answers, hf_trainer.HFTrainer.tensors, wandb.init


def counted_answers(model, tokenizer, prompts, **kwargs):
    counts.write(f"prompts {len(prompts)}\\n")
    return answers(model, tokenizer, prompts, **kwargs)


def counted_tensors(self, rows, index):
    if not torch.is_grad_enabled():
        counts.write(f"val_rows {len(index)}\\n")
    return tensors(self, rows, index)


def counted_wandb_init(*args, **kwargs):
    counts.write("wandb_runs 1\\n")
    return wandb_init(*args, **kwargs)


hf_trainer.decode_answers = counted_answers
hf_trainer.HFTrainer.tensors = counted_tensors
wandb.init = counted_wandb_init
sys.argv[0] = os.path.join(os.getcwd(), "main.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def rank_counts(folder: Path, rank: int) -> dict[str, int]:
    totals = {"prompts": 0, "val_rows": 0, "wandb_runs": 0}
    for line in (folder / f"counts.rank{rank}").read_text().splitlines():
        what, n = line.split()
        totals[what] += int(n)
    return totals


def test_ddp_trains_like_one_process_with_the_same_effective_batch(one_process, tmp_path, cache_dir):
    """Two ranks (gloo) accumulating 2 micro-batches of 2 rows a step against one process accumulating 4: the same
    metrics and the same step-0 answers; the ranks share one run dir, only rank 0 writes (and logs to W&B), and
    each rank answers half of the questions and measures half of the validation rows."""
    counting_main = tmp_path / "counting_main.py"
    counting_main.write_text(COUNTING_MAIN)
    env = {
        **os.environ,
        "CBE_CACHE_DIR": str(cache_dir),
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(counting_main),
            f"output_root={tmp_path / 'outputs'}",
            *RUN,
            "logging=tensorboard_wandb",
            "logging.project_name=ddp",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["ddp"]  # one run dir for both ranks
    ddp = tmp_path / "outputs" / "ddp" / "sample" / "tiny-full-hf"
    assert [m["step"] for m in eval_results(ddp)] == [0, 3, 6]  # rank 0 alone appends
    for a, b in zip(eval_results(ddp), eval_results(one_process), strict=True):
        assert_same_metrics(a, b)
    for qa_set in ("valqa", "testqa"):  # the gathered answers, in question order: distinct noise at step 0
        answers = raw_predictions(ddp, qa_set, 0)
        assert answers == raw_predictions(one_process, qa_set, 0) and len(answers) == 8 and len(set(answers)) > 4
    # 3 evaluations of 8 + 8 questions and 4 validation rows: each rank did half; rank 0 alone logged to W&B.
    assert rank_counts(tmp_path, 0) == {"prompts": 24, "val_rows": 6, "wandb_runs": 1}
    assert rank_counts(tmp_path, 1) == {"prompts": 24, "val_rows": 6, "wandb_runs": 0}
    assert (ddp / "logs" / "train.log").read_text().count("eval | step 6") == 1
    assert sorted(p.name for p in (ddp / "checkpoints").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert len(list((ddp / "logs" / "wandb").glob("offline-run-*"))) == 1


def start_fsdp(output_root: Path, cache_dir: Path, *overrides: str) -> subprocess.Popen:
    """main.py as two torchrun processes with parallel=fsdp; their output goes to output_root/torchrun.out."""
    env = {**os.environ, "CBE_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(ROOT / "main.py"), f"output_root={output_root}", *overrides, "backend.trainer.parallel=fsdp"]
    output_root.mkdir(parents=True, exist_ok=True)
    with open(output_root / "torchrun.out", "w") as out:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def kill_once(proc: subprocess.Popen, ready, timeout: float = 900) -> bool:
    """SIGKILL the launcher and both ranks once `ready()` (a machine going down); False if the run ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            launcher = psutil.Process(proc.pid)
            for process in [*launcher.children(recursive=True), launcher]:  # torchrun starts each rank in a session
                process.kill()
            proc.wait()
            return True
        time.sleep(0.02)
    proc.wait()
    return False


def load_hf(checkpoint: Path) -> torch.nn.Module:
    """A checkpoint as transformers and PEFT read it, on their own: a whole model, or an adapter over the tiny base."""
    if not (checkpoint / "adapter_config.json").exists():
        return AutoModelForCausalLM.from_pretrained(checkpoint)
    from peft import PeftModel

    architecture = OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml").model.architecture
    config = init_config(architecture, AutoTokenizer.from_pretrained(ROOT / "cbe" / "assets" / "tiny_tokenizer"))
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_config(config), checkpoint)


def steps_written(run: Path) -> list[int]:
    path = run / "metrics" / "eval_results.jsonl"
    return [m["step"] for m in read_jsonl(path)] if path.exists() else []


@pytest.mark.parametrize("adapter,killed", [("full", True), ("lora128", False)])
def test_fsdp_trains_as_one_process_resumes_after_a_kill_and_saves_hf_checkpoints(
    adapter, killed, one_process, tmp_path, cache_dir
):
    run_args, single, last = [*RUN, f"adapter={adapter}"], one_process, 6
    if adapter == "lora128":  # its own one-process run, of 3 steps (LoRA under FSDP: frozen shards, PEFT's files)
        run_args, single, last = [*run_args, "optimizer.lr=1e-3", "training.num_train_steps=3"], tmp_path / "single", 3
        loop_in_process(single, *run_args).train()

    output = tmp_path / "outputs"
    run = output / "cbe" / "sample" / f"tiny-{adapter}-hf"
    if killed:  # after the step-3 checkpoint and before the run's end: the re-run resumes from step 3
        proc = start_fsdp(output, cache_dir, *run_args)
        assert kill_once(proc, lambda: (run / "checkpoints" / "latest").exists() and last not in steps_written(run))
        assert steps_written(run) == [0, 3]
    proc = start_fsdp(output, cache_dir, *run_args)
    assert proc.wait(timeout=900) == 0, (output / "torchrun.out").read_text()[-4000:]
    resumed = f"resuming from {run / 'checkpoints' / 'checkpoint-3'}" in (output / "torchrun.out").read_text()
    assert resumed == killed

    assert steps_written(run) == sorted({0, 3, last})  # each once, by rank 0
    for a, b in zip(eval_results(run), eval_results(single), strict=True):
        assert_same_metrics(a, b)
    assert raw_predictions(run, "valqa", last) == raw_predictions(single, "valqa", last)

    # The checkpoint is the ordinary HF layout, whole: from_pretrained reads it (PEFT over the base for LoRA), to the
    # weights the one process trained.
    checkpoint = run / "checkpoints" / f"checkpoint-{last}"
    fsdp_model, single_model = (load_hf(c) for c in (checkpoint, single / "checkpoints" / checkpoint.name))
    trained = {n: p for n, p in fsdp_model.named_parameters() if adapter == "full" or "lora_" in n}
    assert len(trained) == (4 * 13 + 2 if adapter == "full" else 4 * 7 * 2)  # LoRA: A and B of 7 projections, 4 layers
    for name, weight in single_model.named_parameters():
        if name in trained:
            torch.testing.assert_close(trained.pop(name), weight, rtol=1e-4, atol=1e-6, msg=name)
    assert not trained

    # mode=eval of it, as one process, reproduces the run's last numbers.
    evaluated = tmp_path / "evaluated"
    loop_in_process(evaluated, *run_args, "mode=eval", f"checkpoint={checkpoint}").evaluate_checkpoint()
    assert_same_metrics(eval_results(evaluated)[0], eval_results(run)[-1])
    assert raw_predictions(evaluated, "valqa", last) == raw_predictions(run, "valqa", last)
