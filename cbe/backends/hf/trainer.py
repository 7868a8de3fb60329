"""The HuggingFace backend: transformers + TRL's SFTTrainer + PEFT over the shared packed rows.

Packing happens once in cbe.data (shared with the JAX backend), so TRL gets ready rows and skips its own
dataset preparation. Rows carry position ids that restart per document and no attention mask: with
use_cache=False transformers then builds a block-diagonal causal mask, so documents never see each other.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from datasets import Dataset
from omegaconf import DictConfig
from torch.optim.lr_scheduler import LambdaLR
from transformers import (
    GenerationConfig,
    PrinterCallback,
    ProgressCallback,
    StoppingCriteria,
    StoppingCriteriaList,
    TrainerCallback,
)
from trl import SFTConfig, SFTTrainer

from cbe import memory
from cbe.backends.base import Backend, NewlineStop, lr_multiplier
from cbe.backends.hf.models import load_model_and_tokenizer
from cbe.data.packing import IGNORE, PackedRows, epochs_seen, training_order
from cbe.errors import UserError
from cbe.eval.evaluator import QAEvaluator
from cbe.logging import Loggers
from cbe.run import RunDir, is_main_process, world_size

# PEFT and TRL still read transformers' deprecated alias on every LoRA run; the warning is theirs to act on, not
# the user's. Only this message is silenced.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def as_dataset(rows: PackedRows) -> Dataset:
    """Packed rows as the dataset TRL batches (numpy-formatted, so batching does not go through lists)."""
    columns = {"input_ids": rows.input_ids, "position_ids": rows.position_ids, "labels": rows.labels}
    return Dataset.from_dict(columns).with_format("numpy")


class NewlineStopCriteria(StoppingCriteria):
    """Ends a row at a newline after its first non-blank generated text, checked on the device from NewlineStop."""

    def __init__(self, stop: NewlineStop, prompt_length: int, device: torch.device):
        self.prompt_length = prompt_length
        self.newline, self.ends_alone, self.blank = (
            torch.from_numpy(a).to(device) for a in (stop.newline, stop.ends_alone, stop.blank)
        )

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        generated = input_ids[:, self.prompt_length :]
        text = (~self.blank[generated]).int()
        text_before = (text.cumsum(1) - text) > 0  # some earlier generated token was not blank
        return (self.ends_alone[generated] | (self.newline[generated] & text_before)).any(1)


def plan_memory(cfg: DictConfig, card: float | None) -> bool:
    """Whether to checkpoint activations on a GPU of `card` bytes (None: the CPU), decided and said before the
    model loads (cbe.memory); refuses a run whose weights and optimizer state alone exceed the GPU."""
    plan = memory.plan_run(cfg, card)
    where = f"on this {card / memory.GB:.0f} GB GPU" if card else "on the CPU"
    line = f"memory: gradient checkpointing {'on' if plan.gradient_checkpointing else 'off'} {where}"
    if plan.estimate is None:
        print(f"{line} (no model.architecture to estimate from)", flush=True)
        return plan.gradient_checkpointing
    if card and plan.estimate.static_exceeds(card):
        raise UserError(
            f"{cfg.model.name} {cfg.adapter.name}: its weights and optimizer state alone take "
            f"{plan.estimate.static_bytes / memory.GB:.0f} GB (estimated), more than this "
            f"{card / memory.GB:.0f} GB GPU; use adapter=lora128, or backend=kd over several GPUs (FSDP "
            "shards them), or a larger GPU"
        )
    print(f"{line}; {plan.estimate.describe()}", flush=True)
    if not plan.fits:
        print(
            f"memory: this may not fit {where}: lower training.per_device_batch_size (gradient accumulation keeps "
            "training.effective_batch_size) or set training.gradient_checkpointing=true",
            flush=True,
        )
    return plan.gradient_checkpointing


def compile_enabled(setting: str) -> bool:
    """training.torch_compile: `auto` compiles on a GPU only (on a CPU, compiling the tiny model costs more than
    it saves)."""
    return torch.cuda.is_available() if setting == "auto" else setting == "True"


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """Compile every decoder layer in place and return how many. Layer by layer rather than the whole model:
    the layers share one compiled program per attention type, so compiling takes seconds rather than minutes;
    TRL's fused loss head (Triton) stays outside; parameter names, hence checkpoints, are unchanged."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for layer in layers:
        layer.compile()
    return len(layers)


def eager():
    """Evaluation runs the compiled layers eagerly: its shapes vary, and compiling them would cost more than it
    saves."""
    return torch.compiler.set_stance("force_eager")


def collate(examples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.stack([e[key] for e in examples]).astype(np.int64)) for key in examples[0]}


class _SFTTrainer(SFTTrainer):
    """SFTTrainer with the harness's learning-rate schedule (shared with the JAX backend)."""

    def __init__(self, *args, optimizer_cfg: DictConfig, order: np.ndarray, **kwargs):
        self.optimizer_cfg, self.order = optimizer_cfg, order
        super().__init__(*args, **kwargs)
        # The harness prints the train line itself (cbe.logging.Loggers.train: numbers, alike for both backends).
        if self.pop_callback(ProgressCallback):
            self.add_callback(_ProgressBar)
        self.remove_callback(PrinterCallback)

    def _get_train_sampler(self, train_dataset=None):
        return self.order.tolist()  # cbe.data.packing.training_order: the same batches as the JAX backend

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            o = self.optimizer_cfg
            self.lr_scheduler = LambdaLR(
                optimizer or self.optimizer,
                lambda step: lr_multiplier(step, num_training_steps, o.warmup_fraction, o.schedule, o.end_lr_fraction),
            )
        return self.lr_scheduler


class _ProgressBar(ProgressCallback):
    """HF's training bar, without its printing of the logs (which shows floats as strings)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class _Hooks(TrainerCallback):
    """Evaluates, logs and marks checkpoints at the moments the harness defines."""

    def __init__(self, backend: "HFTrainer", train_rows: int):
        self.backend, self.train_rows = backend, train_rows

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:  # the untrained baseline; a resumed run has it already
            self.backend.evaluate(0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.backend.cfg.training.eval_every == 0 or state.global_step >= state.max_steps:
            self.backend.evaluate(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # HF's epoch counts passes over the sampler, which is the whole run's order (training_order), so it reads
        # 1 at every run's end; the harness's epoch is rows seen / packed rows, as the KD backend logs it.
        # TRL's num_tokens counts one row length a micro-batch for rows without an attention mask: dropped.
        epoch = epochs_seen(state.global_step, self.backend.cfg.training.effective_batch_size, self.train_rows)
        logs = {k: v for k, v in (logs or {}).items() if k != "num_tokens"}
        self.backend.loggers.train(state.global_step, {**logs, "epoch": epoch})

    def on_save(self, args, state, control, **kwargs):
        if is_main_process():
            self.backend.run.mark_latest(self.backend.run.checkpoint_dir(state.global_step))


class HFTrainer(Backend):
    """Trains and evaluates one run with transformers/TRL/PEFT."""

    def __init__(
        self, cfg: DictConfig, run: RunDir, evaluator: QAEvaluator, loggers: Loggers, attn_implementation: str = "sdpa"
    ):
        self.cfg, self.run, self.evaluator, self.loggers = cfg, run, evaluator, loggers
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if world_size() > 1 and not dist.is_initialized():  # torchrun: evaluation shards over the ranks
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        card = (
            torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            if torch.cuda.is_available()
            else None
        )
        self.gradient_checkpointing = plan_memory(cfg, card) if cfg.mode == "train" else False
        self.model, self.tokenizer = load_model_and_tokenizer(cfg, attn_implementation)
        self.compiled = 0  # decoder layers compiled for training (training.torch_compile)
        if torch.cuda.is_available():
            self.model.to(torch.cuda.current_device())
        self.val_rows = self.packed(cfg.data.val_path, "val")

    # -- the evaluator's view of this backend ----------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @staticmethod
    def _rank_and_world() -> tuple[int, int]:
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    def generate(self, prompts: Sequence[str], max_new_tokens: int, batch_size: int) -> list[str]:
        """Greedy answers to every prompt; under torchrun each rank answers every world-th one and all ranks
        get all answers (rank-0-only generation would leave the others waiting at their next collective)."""
        rank, world = self._rank_and_world()
        mine = self._generate(prompts[rank::world], max_new_tokens, batch_size)
        if world == 1:
            return mine
        parts: list[list[str]] = [[] for _ in range(world)]
        dist.all_gather_object(parts, mine)
        answers = [""] * len(prompts)
        for r, part in enumerate(parts):
            answers[r::world] = part
        return answers

    @torch.no_grad()
    def _generate(self, prompts: Sequence[str], max_new_tokens: int, batch_size: int) -> list[str]:
        """Greedy continuations, batched by prompt length with left padding, each stopped at EOS, Q: or a newline
        after the answer's first non-blank text (cbe.backends.base.answer_ended)."""
        was_training = self.model.training
        self.model.eval()
        tok = self.tokenizer
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            stop_strings=["Q:"],
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        answers: list[str] = [""] * len(prompts)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            inputs = tok([prompts[i] for i in batch], return_tensors="pt", padding=True, padding_side="left")
            inputs = inputs.to(self.device)
            newline = NewlineStopCriteria(self.newline_stop, inputs["input_ids"].shape[1], self.device)
            with eager():  # compiled layers would recompile for every generated length
                output = self.model.generate(
                    **inputs, generation_config=config, tokenizer=tok, stopping_criteria=StoppingCriteriaList([newline])
                )
            texts = tok.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, text in zip(batch, texts):
                answers[i] = text
        self.model.train(was_training)
        return answers

    @functools.cached_property
    def newline_stop(self) -> NewlineStop:
        return NewlineStop.of(self.tokenizer, self.model.config.get_text_config().vocab_size)

    @torch.no_grad()
    def loss(self, rows: PackedRows, batch_size: int) -> float:
        """Mean next-token loss over the trained positions of the rows (each rank takes every world-th row)."""
        was_training = self.model.training
        self.model.eval()
        rank, world = self._rank_and_world()
        total, count = 0.0, 0
        for start in range(rank * batch_size, len(rows), batch_size * world):
            end = start + batch_size
            batch = {
                "input_ids": rows.input_ids[start:end],
                "position_ids": rows.position_ids[start:end],
                "labels": rows.labels[start:end],
            }
            batch = {k: torch.from_numpy(v.astype(np.int64)).to(self.device) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != IGNORE).sum())
            with eager():
                total += float(self.model(**batch, use_cache=False).loss) * n
            count += n
        self.model.train(was_training)
        if world > 1:
            sums = torch.tensor([total, count], dtype=torch.float64, device=self.device)
            dist.all_reduce(sums)
            total, count = sums.tolist()
        return total / max(1, count)

    def evaluate_checkpoint(self) -> None:
        """mode=eval: one evaluation of cfg.checkpoint, with training's prompt, parser and metrics."""
        step = 0 if self.cfg.checkpoint == "base" else RunDir.step_of(Path(self.cfg.checkpoint).resolve())
        self.report_checkpoint(step)

    # -- training --------------------------------------------------------------------------------
    def train(self) -> None:
        t = self.cfg.training
        resume = self.run.latest_checkpoint()
        if resume is not None:
            self.run.drop_eval_results_after(RunDir.step_of(resume))
            print(f"resuming from {resume}", flush=True)
        if t.num_train_steps == 0:  # only the starting point (HF would read max_steps=0 as "use epochs")
            self.run.drop_eval_results_after(-1)
            self.evaluate(0)
            return
        train_rows = self.packed_train()
        order = training_order(len(train_rows), t.num_train_steps * t.effective_batch_size, t.seed)
        trainer = self.sft_trainer(as_dataset(train_rows), order, callbacks=[_Hooks(self, len(train_rows))])
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    def sft_trainer(self, dataset: Dataset, order: np.ndarray, callbacks: list[TrainerCallback]) -> _SFTTrainer:
        """The TRL trainer over `dataset` read in `order`, with the run's optimizer, schedule and speed settings
        (also what bench/train_throughput.py times)."""
        cfg, t = self.cfg, self.cfg.training
        on_gpu = torch.cuda.is_available()
        if compile_enabled(t.torch_compile) and not self.compiled:
            self.compiled = compile_decoder_layers(self.model)
        args = SFTConfig(
            output_dir=str(self.run.checkpoints),
            max_steps=t.num_train_steps,
            seed=t.seed,
            data_seed=t.seed,
            per_device_train_batch_size=t.per_device_batch_size,
            gradient_accumulation_steps=t.effective_batch_size // (t.per_device_batch_size * world_size()),
            learning_rate=cfg.optimizer.lr,
            weight_decay=cfg.optimizer.weight_decay,
            adam_beta1=cfg.optimizer.b1,
            adam_beta2=cfg.optimizer.b2,
            optim="adamw_torch_fused" if on_gpu else "adamw_torch",
            bf16=on_gpu and torch.cuda.is_bf16_supported(),
            max_grad_norm=cfg.optimizer.max_grad_norm or 0.0,  # 0: no clipping (null in our config)
            activation_checkpointing=self.gradient_checkpointing,
            save_strategy="steps",
            save_steps=t.save_every,
            save_total_limit=t.max_checkpoints,
            eval_strategy="no",
            logging_steps=cfg.logging.log_every_n_steps,
            report_to="none",
            dataset_kwargs={"skip_prepare_dataset": True},
            max_length=None,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            use_cpu=not on_gpu,
            disable_tqdm=not is_main_process(),
        )
        trainer = _SFTTrainer(
            model=self.model,
            args=args,
            train_dataset=dataset,
            data_collator=collate,
            processing_class=self.tokenizer,
            callbacks=callbacks,
            optimizer_cfg=cfg.optimizer,
            order=order,
        )
        self.model = trainer.model
        return trainer
