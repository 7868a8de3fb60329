"""The Kauldron backend: gemma's Gemma 3 transformer trained by a `kd.train.Trainer` over the shared packed rows.

The Trainer is built in Python. Its train step (jit, donated state, FSDP sharding over every visible device),
its checkpointer (orbax, `checkpoints/ckpt_<step>`) and its data pipeline are used as they are; the loop around
them is ours, because the harness counts in optimizer steps: one step is `accumulation` micro-batches
(`optax.MultiSteps`), and evaluation, checkpoints and logging happen between optimizer steps, as in HF.
The rows, their order, the schedule, the evaluator and the run layout are the ones the HF backend uses.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Sequence

import grain.python as grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from kauldron import kd
from omegaconf import DictConfig
from tqdm.auto import tqdm

from cbe.backends.base import Backend, NewlineStop, answer_ended, lr_multiplier
from cbe.backends.kd.generate import greedy_generate
from cbe.backends.kd.models import build_model, gemma_config, load_gemma_params, load_hf_weights
from cbe.data.packing import IGNORE, PackedRows, epochs_seen, training_order
from cbe.errors import UserError
from cbe.eval.evaluator import QAEvaluator
from cbe.logging import Loggers
from cbe.run import RunDir


class OrderedRows(grain.RandomAccessDataSource):
    """The training rows in the harness's order (shared with HF), from a given position on.

    Each example carries next-token targets and a loss weight per token. The weights make a step's loss the
    mean over every trained token of the optimizer step, as HF computes it under gradient accumulation
    (not the mean of the micro-batch means): with Kauldron's loss normalized by the number of values,
    a token weighs accumulation x micro-batch values / trained tokens in the whole step.
    """

    def __init__(self, rows: PackedRows, order: np.ndarray, rows_per_step: int):
        self.rows, self.order = rows, order
        trained = (rows.labels[:, 1:] != IGNORE).sum(axis=1)
        step_tokens = np.add.reduceat(trained[order], np.arange(0, len(order), rows_per_step))
        values_per_step = rows_per_step * rows.input_ids.shape[1]  # micro-batches x values in each
        self.weight = values_per_step / np.maximum(step_tokens, 1)
        self.rows_per_step = rows_per_step

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        example = next_token_example(self.rows, int(self.order[index]))
        example["loss_mask"] = example["loss_mask"] * np.float32(self.weight[index // self.rows_per_step])
        return example


def next_token_example(rows: PackedRows, i: int) -> dict[str, np.ndarray]:
    labels = np.append(rows.labels[i, 1:], IGNORE)
    return {
        "input_ids": rows.input_ids[i],
        "position_ids": rows.position_ids[i],
        "target": np.maximum(labels, 0)[:, None],
        "loss_mask": (labels != IGNORE)[:, None].astype(np.float32),
    }


class _Weights(kd.ckpts.AbstractPartialLoader):
    """Puts the converted weights into the freshly initialized state. LoRA keeps gemma's initialization, which is
    the benchmark's: B = 0 and A uniform in +-sqrt(6 / fan_in) (the HF backend draws the same, init_lora_a)."""

    def __init__(self, params: dict[str, Any]):
        self.params = traverse_util.flatten_dict(params)

    def transform(self, state):
        flat = traverse_util.flatten_dict(state.params)
        for key, value in self.params.items():
            old = flat[key]
            flat[key] = jax.device_put(np.ascontiguousarray(value, old.dtype), old.sharding)
        return state.replace(params=traverse_util.unflatten_dict(flat))


@dataclasses.dataclass(frozen=True, kw_only=True)
class _FSDP(kd.sharding.FSDPSharding):
    """Kauldron's FSDP rule (shard each array's largest divisible axis over all devices), with the size below
    which arrays stay replicated as a setting, so tests can shard the tiny model."""

    min_size_to_shard_mb: float = 4


class KDTrainer(Backend):
    """Trains and evaluates one run with Kauldron and gemma."""

    def __init__(
        self,
        cfg: DictConfig,
        run: RunDir,
        evaluator: QAEvaluator,
        loggers: Loggers,
        gemma_params: str | None = None,
        fsdp_min_size_mb: float = 4,
    ):
        self.cfg, self.run, self.evaluator, self.loggers = cfg, run, evaluator, loggers
        t = cfg.training
        self.devices = jax.device_count()
        self.rows_per_micro_step = t.per_device_batch_size * self.devices
        if t.effective_batch_size % self.rows_per_micro_step:
            raise UserError(
                f"training.effective_batch_size={t.effective_batch_size} is not divisible by "
                f"training.per_device_batch_size x devices = {t.per_device_batch_size} x {self.devices}"
            )
        self.accumulation = t.effective_batch_size // self.rows_per_micro_step
        o, steps = cfg.optimizer, max(1, t.num_train_steps)
        # The lr of each optimizer update: the shared schedule, once, for optax and for the log.
        self.learning_rates = np.array(
            [o.lr * lr_multiplier(s, steps, o.warmup_fraction, o.schedule, o.end_lr_fraction) for s in range(steps)]
        )
        hf_config, params, self.tokenizer = load_hf_weights(cfg)
        self.weights = load_gemma_params(gemma_params) if gemma_params else params
        self.model_config = gemma_config(hf_config)
        self.model = build_model(
            self.model_config, cfg.adapter.rank, tokens="batch.input_ids", positions="batch.position_ids"
        )
        self.val_rows = self.packed(cfg.data.val_path, "val")
        self.fsdp = _FSDP(min_size_to_shard_mb=fsdp_min_size_mb)
        self.params = None  # set by train() or evaluate_checkpoint()
        self._loss_sums = jax.jit(self._loss_sums_of_batch)

    # -- the Kauldron trainer ------------------------------------------------------------------------
    def _optimizer(self) -> optax.GradientTransformation:
        """AdamW as HF runs it: the shared schedule, clipping at optimizer.max_grad_norm (none when null), no decay
        on norms, only LoRA when adapted."""
        o, table = self.cfg.optimizer, jnp.asarray(self.learning_rates, dtype=jnp.float32)

        def learning_rate(count):  # count = optimizer updates so far
            return table[jnp.minimum(count, len(table) - 1)]

        def decays(params):
            return jax.tree_util.tree_map_with_path(lambda path, _: "scale" not in jax.tree_util.keystr(path), params)

        optimizer = optax.adamw(learning_rate, b1=o.b1, b2=o.b2, eps=1e-8, weight_decay=o.weight_decay, mask=decays)
        if o.max_grad_norm is not None:
            optimizer = optax.chain(optax.clip_by_global_norm(o.max_grad_norm), optimizer)
        if self.cfg.adapter.rank:
            optimizer = kd.optim.partial_updates(optimizer, mask=kd.optim.select("lora"))
        return optax.MultiSteps(optimizer, every_k_schedule=self.accumulation)

    def _kd_trainer(self, rows: PackedRows, start_row: int = 0, workdir: Path | None = None) -> kd.train.Trainer:
        """The Trainer over `rows` in the shared order, from `start_row` on; `workdir` holds checkpoints/."""
        t = self.cfg.training
        # At least one step's rows, for the element spec of a run that only evaluates.
        order = training_order(len(rows), max(1, t.num_train_steps) * t.effective_batch_size, t.seed)[start_row:]
        return kd.train.Trainer(
            seed=t.seed,
            workdir=str(workdir or self.run.root),
            train_ds=kd.data.py.DataSource(
                data_source=OrderedRows(rows, order, t.effective_batch_size),
                shuffle=False,
                batch_size=self.rows_per_micro_step,
                num_workers=0,
                num_epochs=1,
            ),
            model=self.model,
            sharding=kd.sharding.ShardingStrategy(params=self.fsdp),
            num_train_steps=t.num_train_steps * self.accumulation,
            train_losses={
                "xent": kd.losses.SoftmaxCrossEntropyWithIntLabels(
                    logits="preds.logits", labels="batch.target", mask="batch.loss_mask", normalize_by="values"
                )
            },
            optimizer=self._optimizer(),
            checkpointer=kd.ckpts.Checkpointer(save_interval_steps=1, max_to_keep=t.max_checkpoints),
            init_transform=_Weights(self.weights),
            writer=kd.train.metric_writer.NoopWriter(),
        )

    def _initial_state(self, trainer: kd.train.Trainer, with_weights: bool = True):
        return trainer.trainstep.init(elem_spec=trainer.train_ds.element_spec, skip_transforms=not with_weights)

    # -- the evaluator's view of this backend ----------------------------------------------------
    def generate(self, prompts: Sequence[str], max_new_tokens: int, batch_size: int) -> list[str]:
        """Greedy answers, each cut where `answer_ended` says, or at EOS (as the HF backend's are)."""
        tok = self.tokenizer
        ids = [tok(p)["input_ids"] for p in prompts]
        outputs = greedy_generate(
            self.model,
            self.params,
            ids,
            max_new_tokens,
            self.newline_stop,
            tok.eos_token_id,
            tok.pad_token_id,
            batch_size,
        )
        return [self._cut(out) for out in outputs]

    @functools.cached_property
    def newline_stop(self) -> NewlineStop:
        return NewlineStop.of(self.tokenizer, self.params["embedder"]["input_embedding"].shape[0])

    def _cut(self, ids: list[int]) -> str:
        """The text up to the token that ends the answer: the decode loop stops at newlines and EOS, this adds Q:."""
        for end in range(1, len(ids) + 1):
            text = self.tokenizer.decode(ids[:end], skip_special_tokens=True)
            if answer_ended(text):
                return text
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def loss(self, rows: PackedRows, batch_size: int) -> float:
        """Mean next-token loss over the trained positions of the rows."""
        total, count = 0.0, 0
        for start in range(0, len(rows), batch_size):
            examples = [next_token_example(rows, i) for i in range(start, min(start + batch_size, len(rows)))]
            examples += [{**examples[0], "loss_mask": np.zeros_like(examples[0]["loss_mask"])}] * (
                batch_size - len(examples)
            )  # a fixed batch shape keeps it one compiled program
            batch = {key: np.stack([e[key] for e in examples]) for key in examples[0]}
            batch_total, batch_count = self._loss_sums(self.params, batch)
            total, count = total + float(batch_total), count + float(batch_count)
        return total / max(1.0, count)

    def _loss_sums_of_batch(self, params, batch):
        logits = self.model.apply({"params": params}, batch["input_ids"], positions=batch["position_ids"]).logits
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        token_loss = -jnp.take_along_axis(logp, batch["target"], axis=-1)
        return jnp.sum(token_loss * batch["loss_mask"]), jnp.sum(batch["loss_mask"])

    # -- training --------------------------------------------------------------------------------
    def train(self) -> None:
        cfg, t = self.cfg, self.cfg.training
        resume = self.run.latest_checkpoint()
        start = RunDir.step_of(resume) if resume else 0
        train_rows = self.packed_train()
        self.trainer = self._kd_trainer(train_rows, start * t.effective_batch_size)
        trainstep, checkpointer = self.trainer.trainstep, self.trainer.checkpointer
        self.state = self._initial_state(self.trainer, with_weights=resume is None)
        if resume is not None:
            print(f"resuming from {resume}", flush=True)
            self.run.drop_eval_results_after(start)
            self.state = checkpointer.restore(self.state, step=start)
        self.params = self.state.params
        sharded = [x for x in jax.tree.leaves(self.params) if not x.sharding.is_fully_replicated]
        print(
            f"params: {len(sharded)} of {len(jax.tree.leaves(self.params))} arrays sharded over {self.devices} "
            f"device(s) (FSDP), accumulation {self.accumulation} micro-batches of {self.rows_per_micro_step} rows",
            flush=True,
        )
        if resume is None:
            self.run.drop_eval_results_after(-1)
            self.evaluate(0)
        if t.num_train_steps == 0:
            return
        batches = iter(self.trainer.train_ds)
        losses = []
        for step in tqdm(
            range(start + 1, t.num_train_steps + 1),
            initial=start,
            total=t.num_train_steps,
            desc="training",
            unit="step",
        ):
            for _ in range(self.accumulation):
                batch = kd.sharding.device_put(next(batches), self.trainer.sharding.ds)
                self.state, aux = trainstep.step(self.state, batch, return_losses=True)
                self.params = self.state.params
                losses.append(aux.loss_states["xent"])
            if step % cfg.logging.log_every_n_steps == 0 or step == t.num_train_steps:
                mean = float(np.mean([loss.compute() for loss in losses]))
                self.loggers.train(
                    step,
                    {
                        "loss": mean,
                        "learning_rate": float(self.learning_rates[step - 1]),
                        "epoch": epochs_seen(step, t.effective_batch_size, len(train_rows)),
                    },
                )
                losses = []
            if step % t.save_every == 0 or step == t.num_train_steps:
                self.save(step)
            if step % t.eval_every == 0 or step == t.num_train_steps:
                self.evaluate(step)
        checkpointer.wait_until_finished()

    def evaluate_checkpoint(self) -> None:
        """mode=eval: one evaluation of cfg.checkpoint (a checkpoints/ckpt_<step> dir, or base)."""
        if self.cfg.checkpoint == "base":
            step = 0
            self.model = build_model(self.model_config)
            self.params = jax.tree.map(jnp.asarray, self.weights)
        else:
            checkpoint = Path(self.cfg.checkpoint).resolve()  # a ckpt_<step> dir: validate checked who wrote it
            step = RunDir.step_of(checkpoint)
            trainer = self._kd_trainer(self.val_rows, workdir=checkpoint.parent.parent)
            self.params = trainer.checkpointer.restore(self._initial_state(trainer, False), step=step).params
        self.report_checkpoint(step)

    def save(self, step: int) -> None:
        """checkpoints/ckpt_<step> (orbax writes it under a temporary name), then `latest` points at it."""
        checkpointer = self.trainer.checkpointer
        checkpointer.save(self.state, step=step, force=True)
        checkpointer.wait_until_finished()
        self.run.mark_latest(self.run.checkpoints / f"ckpt_{step}")
