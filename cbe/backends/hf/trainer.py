"""The HuggingFace backend: a transformers model (PEFT LoRA where adapted), stepped by our own optimizer loop.

cbe.loop hands it each optimizer step's rows and learning rate: packed rows, or one document per row (the benchmark's
layout), whose micro-batches are laid end to end with no padding (cbe.data.packing.back_to_back), so a step costs what
its real tokens cost. Rows carry position ids that restart per document and no attention mask: with use_cache=False
transformers then builds a block-diagonal causal mask, so documents never see each other (under varlen attention no mask
at all: the documents' boundaries, cbe.backends.hf.attention). The loss is the fused LM head's
(cbe.backends.hf.loss_head: never the whole vocabulary's logits at once), summed over the step's trained tokens and
divided by their count on every rank, so a step's gradient is the same however its rows are split into micro-batches and
processes (DDP and FSDP average over processes).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from cbe.backends.base import NewlineStop
from cbe.backends.hf import memory
from cbe.backends.hf.attention import VARLEN, documents_per_row, varlen_inputs
from cbe.backends.hf.generate import decode_answers
from cbe.backends.hf.loss_head import add_loss_head
from cbe.backends.hf.models import (
    compute_dtype,
    export_model,
    load_checkpoint,
    load_model_and_tokenizer,
    unwrapped,
)
from cbe.backends.sampling import GREEDY, Sampling
from cbe.config import Settings
from cbe.data.packing import IGNORE, PackedRows, back_to_back
from cbe.errors import UserError
from cbe.ranks import is_main_process, world_size
from cbe.run import RunDir, atomic_dir
from cbe.specs import SPECS
from cbe.weights.reader import hub_id

# PEFT still reads transformers' deprecated alias on every LoRA model; the warning is its to act on, not the user's.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def plan_memory(settings: Settings, card: float | None, setting: str, shards: int = 1) -> bool:
    """Whether to checkpoint activations on a GPU of `card` bytes (None: the CPU), the model sharded over `shards`
    GPUs (FSDP; else 1), decided and said before the model loads (cbe.backends.hf.memory); refuses a run whose
    weights and optimizer state alone exceed the GPU."""
    plan = memory.plan_run(settings, card, setting, shards)
    where = f"on this {card / memory.GB:.0f} GB GPU" if card else "on the CPU"
    line = f"memory: gradient checkpointing {'on' if plan.gradient_checkpointing else 'off'} {where}"
    if plan.estimate is None:
        print(f"{line} (no model.architecture to estimate from)", flush=True)
        return plan.gradient_checkpointing
    if card and plan.estimate.static_exceeds(card):
        raise UserError(
            f"{settings.model.name} {settings.adapter.name}: its weights and optimizer state alone take "
            f"{plan.estimate.static_bytes / memory.GB:.0f} GB (estimated), more than this "
            f"{card / memory.GB:.0f} GB GPU{f' with FSDP over {shards}' if shards > 1 else ''}; use adapter=lora128, "
            "or backend.trainer.parallel=fsdp over more GPUs (torchrun or SLURM tasks), or a larger GPU"
        )
    print(f"{line}; {plan.estimate.describe()}", flush=True)
    if not plan.fits:
        print(
            f"memory: this may not fit {where}: lower training.per_device_batch_size (gradient accumulation keeps "
            "training.effective_batch_size) or set backend.trainer.gradient_checkpointing=true",
            flush=True,
        )
    return plan.gradient_checkpointing


def setup_processes() -> None:
    """This process's GPU (LOCAL_RANK) and, under torchrun or a SLURM job of several tasks, the process group that
    training and evaluation shard over (main.py calls this through the backend's spec before building it)."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if world_size() > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def compile_scope(setting: str, sharded: bool) -> str:
    """What backend.trainer.torch_compile compiles: `model` (the whole decoder stack, one program), `layers` (each
    decoder layer: regional compilation) or `False` (nothing). `auto` is `model` on a GPU and nothing on a CPU (where
    compiling the tiny model costs more than it saves). A model sharded with FSDP compiles its layers: FSDP2's
    per-layer all-gathers and frees run as hooks between them, which one whole-stack program cannot hold."""
    scope = ("model" if torch.cuda.is_available() else "False") if setting == "auto" else setting
    return "layers" if scope == "model" and sharded else scope


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def compile_model(model: torch.nn.Module, scope: str) -> None:
    """Compile in place (nn.Module.compile: parameter names, hence checkpoints, are unchanged): the decoder stack
    (embedding, every layer, final norm: the backbone under the LM head) as one program, or each decoder layer
    (the layers share one program per attention type: seconds to compile rather than minutes). The loss head stays
    outside (cbe.backends.hf.loss_head: its chunks compile on their own)."""
    if scope == "model":
        unwrapped(model).base_model.compile()
    elif scope == "layers":
        for layer in decoder_layers(model):
            layer.compile()


def convert_to_fp8(model: torch.nn.Module) -> None:
    """torchao's float8 training (tensorwise scales): the decoder layers' projections multiply in FP8, their weights
    staying as they are (checkpoints are unchanged); the embedding, LM head, vision tower and LoRA's adapters (small
    matmuls, where FP8's casts cost more than they save) keep their dtype. A GPU must have FP8 tensor cores (compute
    capability 8.9+); the CPU runs the same arithmetic through torch._scaled_mm, slowly: for tests. Compiling fuses its
    casts."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
        raise UserError(
            f"backend.trainer.fp8=true needs a GPU with FP8 (compute capability 8.9+: L4, H100, H200, B200); this is "
            f"a {torch.cuda.get_device_name()}: set backend.trainer.fp8=false"
        )
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    def projection(module: torch.nn.Linear, name: str) -> bool:  # FP8 matmuls need sizes divisible by 16
        in_layers = ".layers." in name and "vision" not in name and "lora_" not in name
        return in_layers and module.in_features % 16 == 0 and module.out_features % 16 == 0

    convert_to_float8_training(
        model, config=Float8LinearConfig.from_recipe_name("tensorwise"), module_filter_fn=projection
    )


def shard(model: torch.nn.Module) -> None:
    """FSDP2 (torch's fully_shard) over every process of the job: each decoder layer is a unit, all-gathered for its
    forward and backward and freed after; the root unit (embedding, the LM head tied to it, final norm) stays
    gathered through a step. A module on the CPU moves to this process's GPU shard by shard."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """The model in eval mode with its compiled layers run eagerly (evaluation's shapes vary: compiling them would
    cost more than it saves), then back in the mode it was in. A sharded model is all-gathered whole for the while
    and kept so through every forward: each rank answers its own share of the questions, a different number of
    forward passes, so evaluation can hold no collective."""
    from torch.distributed.fsdp import FSDPModule

    was_training = model.training
    model.eval()
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        with torch.compiler.set_stance("force_eager"):
            yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not model, recurse=False)  # fully_shard's defaults
        model.train(was_training)


def no_decay(name: str) -> bool:
    """Norm scales and biases are not decayed (as in HF's Trainer, and gemma's `scale` in the KD backend)."""
    return "norm" in name or name.endswith(".bias")


def load_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Put a checkpoint's saved weights (a full model's or a LoRA adapter's) into the model built for training."""
    if (checkpoint / "adapter_config.json").exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"))
        return
    saved = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        saved |= load_file(shard)
    missing = set(model.load_state_dict(saved, strict=False).missing_keys)
    tied = {"lm_head.weight"} if model.config.get_text_config().tie_word_embeddings else set()
    if missing - tied:
        raise UserError(f"{checkpoint} lacks {sorted(missing - tied)[:3]}: it is not a checkpoint of this model")


class HFTrainer:
    """One run's model with transformers/PEFT: training steps, checkpoints, generation and loss (cbe.backends.base).
    Options (backend.trainer): attn_implementation (cbe.backends.hf.attention), torch_compile
    (auto|model|layers|false: `compile_scope`), gradient_checkpointing (auto|true|false: `plan_memory`), parallel
    (ddp|fsdp: how several processes share the work: each holds the whole model (DDP), or 1/N of it (FSDP2,
    `shard`)), loss_head (fused|plain: cbe.backends.hf.loss_head) and fp8 (false|true: `convert_to_fp8`)."""

    spec = SPECS["hf"]  # its options, checkpoint names and rules (cbe.specs)

    def __init__(
        self,
        settings: Settings,
        run: RunDir,
        attn_implementation: str = "sdpa",
        torch_compile: str = "auto",
        gradient_checkpointing: str = "auto",
        parallel: str = "ddp",
        loss_head: str = "fused",
        fp8: bool = False,
    ):
        self.settings, self.run = settings, run
        self.attn_implementation, self.torch_compile = attn_implementation, torch_compile
        self.gradient_checkpointing, self.loss_head, self.fp8 = gradient_checkpointing, loss_head, fp8
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.sharded = parallel == "fsdp" and self.world > 1

    # -- state -------------------------------------------------------------------------------------
    def start(self, checkpoint: Path | None) -> None:
        card = torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else None
        checkpointing = plan_memory(self.settings, card, self.gradient_checkpointing, self.world if self.sharded else 1)
        self.model, self.tokenizer = load_model_and_tokenizer(self.settings, self.attn_implementation)
        add_loss_head(self.model, self.loss_head)
        if not self.sharded:  # a sharded model reaches the GPU shard by shard
            self.model.to(self.device)
        if checkpoint is not None:
            load_weights(self.model, checkpoint)
        if self.fp8:
            convert_to_fp8(self.model)
        if checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        compile_model(self.model, compile_scope(self.torch_compile, self.sharded))
        if self.sharded:
            shard(self.model)
        self.reset_optimizer()
        if checkpoint is not None:
            # Every rank maps the one file (mmap: the node's page cache holds it once) and keeps its own shard.
            saved = torch.load(checkpoint / "optimizer.pt", map_location="cpu", mmap=True, weights_only=True)
            set_optimizer_state_dict(self.model, self.optimizer, saved, options=StateDictOptions(full_state_dict=True))
        ddp = self.world > 1 and not self.sharded
        self.stepped = torch.nn.parallel.DistributedDataParallel(self.model) if ddp else self.model

    def reset_optimizer(self) -> None:
        """A fresh AdamW over the trained parameters (no decay on norms), fused on a GPU."""
        trained = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        o = self.settings.optimizer
        groups = [
            {"params": [p for n, p in trained if not no_decay(n)], "weight_decay": o.weight_decay},
            {"params": [p for n, p in trained if no_decay(n)], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(
            groups, lr=o.lr, betas=(o.b1, o.b2), eps=1e-8, fused=self.device.type == "cuda"
        )

    def load(self, checkpoint: str) -> None:
        self.model, self.tokenizer = load_checkpoint(self.settings, checkpoint, self.attn_implementation)
        add_loss_head(self.model, self.loss_head)
        self.model.to(self.device)

    def save(self, step: int) -> Path:
        """checkpoints/checkpoint-<step>: the model (or adapter) as `from_pretrained` reads it, its tokenizer and
        the optimizer state keyed by parameter name, written whole or not at all. A sharded model and its optimizer
        state are gathered whole onto rank 0's CPU first (every rank takes part), so the checkpoint is the same
        under DDP and FSDP, and any number of processes resumes it."""
        path = self.run.checkpoint_dir(step, self.spec.name)
        whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(self.model, options=whole) if self.sharded else None  # None: its own
        optimizer_state = get_optimizer_state_dict(self.model, self.optimizer, options=whole)
        if is_main_process():
            with atomic_dir(path) as tmp:
                self.model.save_pretrained(tmp, state_dict=model_state)
                self.tokenizer.save_pretrained(tmp)
                torch.save(optimizer_state, tmp / "optimizer.pt")
        if self.world > 1:
            dist.barrier()
        return path

    def export(self, out: Path, merge_lora: bool, dtype: str) -> None:
        """The model as an HF dir (cbe.backends.hf.models.export_model), from one process holding it whole."""
        if self.sharded:
            raise UserError("exporting a model sharded over processes is not supported; export its checkpoint")
        export_model(self.model, self.tokenizer, out, merge_lora, dtype, hub_id(self.settings.model.name))

    # -- training ------------------------------------------------------------------------------------
    def train_steps(self, rows: PackedRows, batches: np.ndarray, learning_rates: np.ndarray) -> list[dict[str, float]]:
        """One optimizer step per row of `batches`; this rank takes its share of each step's rows, in micro-batches
        of training.per_device_batch_size."""
        t, o = self.settings.training, self.settings.optimizer
        self.model.train()
        losses = torch.zeros(len(batches), dtype=torch.float64, device=self.device)
        top1 = torch.zeros(len(batches), dtype=torch.float64, device=self.device)
        for i, (batch, lr) in enumerate(zip(batches, learning_rates)):
            trained_tokens = int((rows.labels[batch, 1:] != IGNORE).sum())  # of the whole step, all ranks
            share = len(batch) // self.world
            mine = batch[self.rank * share : (self.rank + 1) * share]
            micro = [mine[m : m + t.per_device_batch_size] for m in range(0, len(mine), t.per_device_batch_size)]
            for m, index in enumerate(micro):
                with self.gradient_sync(m == len(micro) - 1), self.autocast():
                    inputs = self.tensors(rows, index)
                    out = self.stepped(**inputs, use_cache=False, scored=True, num_items_in_batch=trained_tokens)
                    (out.loss * self.world).backward()  # DDP and FSDP average over ranks; the loss is a share of all
                losses[i] += out.loss.detach()
                top1[i] += out.is_top1.sum() / trained_tokens
            if o.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.max_grad_norm)
            for group in self.optimizer.param_groups:
                group["lr"] = float(lr)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.world > 1:
            dist.all_reduce(losses)
            dist.all_reduce(top1)
        return [{"loss": loss, "mean_token_accuracy": acc} for loss, acc in zip(losses.tolist(), top1.tolist())]

    @contextlib.contextmanager
    def gradient_sync(self, last_micro_batch: bool):
        """Gradients are reduced over ranks once a step, after its last micro-batch (the others accumulate)."""
        if last_micro_batch or self.world == 1:
            yield
        elif self.sharded:
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)
        else:
            with self.stepped.no_sync():
                yield

    def tensors(self, rows: PackedRows, index: np.ndarray) -> dict[str, torch.Tensor]:
        """The model inputs of some rows, on this rank's device; under varlen attention also their documents'
        boundaries (cbe.backends.hf.attention), sized for as many documents as the fullest row of `rows` holds.
        One document per row, the documents go end to end in one row: no padding is computed."""
        if rows.one_document_per_row:
            rows, index = back_to_back(rows, index), np.zeros(1, dtype=np.int64)
        arrays = {"input_ids": rows.input_ids, "position_ids": rows.position_ids, "labels": rows.labels}
        inputs = {k: torch.from_numpy(v[index].astype(np.int64)).to(self.device) for k, v in arrays.items()}
        text = self.model.config.get_text_config()
        if text._attn_implementation != VARLEN:
            return inputs
        if getattr(self, "_documents_per_row", (None,))[0] is not rows:  # counted once per corpus, not per batch
            self._documents_per_row = (rows, documents_per_row(rows.position_ids))
        capacity = len(index) * self._documents_per_row[1]
        return inputs | varlen_inputs(rows.position_ids[index], capacity, text.layer_types, self.device)

    def autocast(self):
        """bf16 matmuls on a GPU where the weights are bf16 (fp32 adapters then compute in bf16 too); nothing on the
        CPU, where bf16 weights compute in bf16 as they are."""
        on = self.device.type == "cuda" and compute_dtype(self.settings.training.precision) == torch.bfloat16
        return torch.autocast("cuda", dtype=torch.bfloat16) if on else contextlib.nullcontext()

    # -- evaluation ----------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        batch_size: int,
        stop_strings: Sequence[str],
        sampling: Sampling = GREEDY,
        cuda_graph: bool | None = None,
    ) -> list[str]:
        """Answers to every prompt, greedy or sampled, over a static cache with the shared prefix computed once
        (cbe.backends.hf.generate), each stopped where cbe.backends.base.answer_ended says. Under torchrun each rank
        answers every world-th one (drawing with that question's uniforms, as one process would) and all ranks get
        all answers (rank-0-only generation would leave the others waiting at their next collective).
        `cuda_graph` (default: on a GPU) replays the decode step as a CUDA graph; bench/eval_speed.py turns it off."""
        with evaluating(self.model):  # training's compiled layers run eagerly; on a GPU the decode step is a CUDA graph
            mine = decode_answers(
                self.model,
                self.tokenizer,
                prompts[self.rank :: self.world],
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                stop_strings=stop_strings,
                newline_stop=self.newline_stop,
                sampling=sampling,
                question_ids=range(len(prompts))[self.rank :: self.world],
                # FSDP's forward hooks stay on the gathered model: a CUDA graph would capture their stream syncs.
                cuda_graph=False if self.sharded else cuda_graph,
            )
        if self.world == 1:
            return mine
        parts: list[list[str]] = [[] for _ in range(self.world)]
        dist.all_gather_object(parts, mine)
        answers = [""] * len(prompts)
        for r, part in enumerate(parts):
            answers[r :: self.world] = part
        return answers

    @functools.cached_property
    def newline_stop(self) -> NewlineStop:
        return NewlineStop.of(self.tokenizer, self.model.config.get_text_config().vocab_size)

    @torch.no_grad()
    def loss_sums(self, rows: PackedRows, batches: list[np.ndarray]) -> np.ndarray:
        """Per batch: summed next-token loss, trained tokens, top-1 tokens (each rank takes every world-th batch)."""
        sums = torch.zeros((len(batches), 3), dtype=torch.float64, device=self.device)
        with evaluating(self.model):
            for i in range(self.rank, len(batches), self.world):
                with self.autocast():
                    out = self.model(**self.tensors(rows, batches[i]), use_cache=False, scored=True)
                sums[i, 0], sums[i, 1], sums[i, 2] = -out.log_probs.sum(), len(out.log_probs), out.is_top1.sum()
        if self.world > 1:
            dist.all_reduce(sums)
        return sums.cpu().numpy()
