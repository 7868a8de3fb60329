"""The Kauldron backend: a JAX model (cbe.backends.kd.models: Gemma 3 and 2) stepped by a `kd.train.Trainer`.

The Trainer is built in Python for its train step (jit, donated state, FSDP sharding over every device, of every
process where the run has several: cbe.backends.kd.processes) and its checkpointer (orbax, `checkpoints/ckpt_<step>`);
cbe.loop hands this backend each optimizer step's rows and learning rate, the same on every process, and each process
puts its own devices' rows of them. One optimizer step is `accumulation` micro-batches (`optax.MultiSteps`); the
learning rate is a hyperparameter in the optimizer state (`optax.inject_hyperparams`), set before each step.

Packed rows go to the devices as they are; one document per row (the benchmark's layout), each device's documents
of a micro-batch go end to end in one row (cbe.data.packing.back_to_back), its length rounded up to a multiple of
LENGTH_BUCKET tokens, so that a run compiles a handful of programs and computes little padding.

Each example carries next-token targets and a loss weight per token. The weights make a step's loss the mean over
every trained token of the optimizer step, as the HF backend computes it (not the mean of the micro-batch means):
with Kauldron's loss normalized by the number of values, a token weighs accumulation x micro-batch values / trained
tokens in the whole step.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from kauldron import kd

from cbe.backends.base import NewlineStop, answer_ended
from cbe.backends.kd.compat import InitTransform, batch_sharding
from cbe.backends.kd.convert import fold_lora, gemma_to_hf, lora_to_peft
from cbe.backends.kd.generate import decode_ids
from cbe.backends.kd.models import build_model, load_gemma_params, load_hf_weights
from cbe.backends.kd.processes import global_array, local_rows, to_host
from cbe.backends.sampling import GREEDY, Sampling
from cbe.config import Settings
from cbe.data.packing import IGNORE, PackedRows, back_to_back
from cbe.errors import UserError
from cbe.run import RunDir, step_of
from cbe.specs import SPECS
from cbe.weights.reader import hub_id
from cbe.weights.writer import write_model, write_peft_adapter

LENGTH_BUCKET = 256  # one document per row: laid-out rows are a multiple of this many tokens


def next_token_example(rows: PackedRows, i: int) -> dict[str, np.ndarray]:
    labels = np.append(rows.labels[i, 1:], IGNORE)
    trained = (labels != IGNORE)[:, None]
    return {
        "input_ids": rows.input_ids[i],
        "position_ids": rows.position_ids[i],
        "target": np.maximum(labels, 0)[:, None],
        "loss_mask": trained.astype(np.float32),  # scaled per step by train_steps
        "token_mask": trained,  # mean_token_accuracy's
    }


def next_token_batch(rows: PackedRows, index: np.ndarray, parts: int) -> dict[str, np.ndarray]:
    """The examples of rows[index] as `parts` rows: packed rows as they are, one document per row laid end to end
    (`parts` rows of their documents, padded to a multiple of LENGTH_BUCKET)."""
    if rows.one_document_per_row:
        rows, index = back_to_back(rows, index, parts, LENGTH_BUCKET), np.arange(parts)
    examples = [next_token_example(rows, int(i)) for i in index]
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


class _Weights(InitTransform):
    """Puts the converted weights into the freshly initialized state. LoRA keeps gemma's initialization, which is
    the benchmark's: B = 0 and A uniform in +-sqrt(6 / fan_in) (the HF backend draws the same, init_lora_a)."""

    def __init__(self, params: dict[str, Any]):
        self.params = traverse_util.flatten_dict(params)

    def transform(self, state):
        flat = traverse_util.flatten_dict(state.params)
        for key, value in self.params.items():
            old = flat[key]
            flat[key] = global_array(np.ascontiguousarray(value, old.dtype), old.sharding)
        return state.replace(params=traverse_util.unflatten_dict(flat))


@dataclasses.dataclass(frozen=True, kw_only=True)
class _FSDP(kd.sharding.FSDPSharding):
    """Kauldron's FSDP rule (shard each array's largest divisible axis over all devices), with the size below
    which arrays stay replicated as a setting, so tests can shard the tiny model."""

    min_size_to_shard_mb: float = 4


class KDTrainer:
    """One run's model with Kauldron and gemma: training steps, checkpoints, generation and loss
    (cbe.backends.base). Options (backend.trainer): gemma_params, fsdp_min_size_mb."""

    spec = SPECS["kd"]  # its options, checkpoint names and rules (cbe.specs)

    def __init__(self, settings: Settings, run: RunDir, gemma_params: str | None = None, fsdp_min_size_mb: float = 4):
        self.settings, self.run = settings, run
        t, adapter = settings.training, settings.adapter
        self.devices = jax.device_count()
        self.rows_per_micro_step = t.per_device_batch_size * self.devices
        if t.effective_batch_size % self.rows_per_micro_step:
            raise UserError(
                f"training.effective_batch_size={t.effective_batch_size} is not divisible by "
                f"training.per_device_batch_size x devices = {t.per_device_batch_size} x {self.devices}"
            )
        self.accumulation = t.effective_batch_size // self.rows_per_micro_step
        self.base = load_hf_weights(settings.model, t.seed, settings.cache_dir)
        self.tokenizer = self.base.tokenizer
        self.weights = load_gemma_params(gemma_params) if gemma_params else self.base.params
        fields = {"tokens": "batch.input_ids", "positions": "batch.position_ids"}  # what the model reads of a batch
        self.model = build_model(
            self.base.factory, self.base.config, t.precision, adapter.rank, adapter.dtype, **fields
        )
        self.fsdp = _FSDP(min_size_to_shard_mb=fsdp_min_size_mb)
        self.params = None  # set by start() or load()
        self._loss_sums = jax.jit(self._loss_sums_of_batch)

    # -- the Kauldron trainer ------------------------------------------------------------------------
    def _optimizer(self) -> optax.GradientTransformation:
        """AdamW as the HF backend runs it: clipping at optimizer.max_grad_norm (none when null), no decay on norms,
        only LoRA when adapted; the learning rate is injected state, set per step by `_set_learning_rate`."""
        o = self.settings.optimizer

        def decays(params):
            return jax.tree_util.tree_map_with_path(lambda path, _: "scale" not in jax.tree_util.keystr(path), params)

        adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))
        optimizer = adamw(learning_rate=o.lr, b1=o.b1, b2=o.b2, eps=1e-8, weight_decay=o.weight_decay, mask=decays)
        if o.max_grad_norm is not None:
            optimizer = optax.chain(optax.clip_by_global_norm(o.max_grad_norm), optimizer)
        if self.settings.adapter.rank:
            optimizer = kd.optim.partial_updates(optimizer, mask=kd.optim.select("lora"))
        return optax.MultiSteps(optimizer, every_k_schedule=self.accumulation)

    def _set_learning_rate(self, lr: float) -> None:
        def put(path, leaf):
            if jax.tree_util.keystr(path).endswith("['learning_rate']"):
                return global_array(np.asarray(lr, leaf.dtype), leaf.sharding)
            return leaf

        self.state = self.state.replace(opt_state=jax.tree_util.tree_map_with_path(put, self.state.opt_state))

    def _kd_trainer(self, workdir: Path | None = None) -> kd.train.Trainer:
        """The Trainer whose train step and checkpointer this backend uses; `workdir` holds checkpoints/. Its data
        source is one blank row, only for the shapes the state is built from: cbe.loop brings the rows."""
        blank, rows = np.zeros((1, self.settings.sequence_length), np.int32), self.rows_per_micro_step
        example = next_token_example(PackedRows(blank, blank, blank, np.zeros(1, np.int64)), 0)
        return kd.train.Trainer(
            seed=self.settings.training.seed,
            workdir=str(workdir or self.run.root),
            train_ds=kd.data.py.DataSource(
                data_source=[example] * rows, shuffle=False, batch_size=rows, num_workers=0, num_epochs=1
            ),
            model=self.model,
            sharding=kd.sharding.ShardingStrategy(params=self.fsdp),
            num_train_steps=max(1, self.settings.total_steps) * self.accumulation,
            train_losses={
                "xent": kd.losses.SoftmaxCrossEntropyWithIntLabels(
                    logits="preds.logits", labels="batch.target", mask="batch.loss_mask", normalize_by="values"
                )
            },
            train_metrics={
                "top1": kd.metrics.Accuracy(logits="preds.logits", labels="batch.target", mask="batch.token_mask")
            },
            optimizer=self._optimizer(),
            checkpointer=kd.ckpts.Checkpointer(save_interval_steps=1, max_to_keep=None),  # cbe.loop prunes
            init_transform=_Weights(self.weights),
            writer=kd.train.metric_writer.NoopWriter(),
        )

    def _initial_state(self, trainer: kd.train.Trainer, with_weights: bool = True):
        return trainer.trainstep.init(elem_spec=trainer.train_ds.element_spec, skip_transforms=not with_weights)

    # -- state -------------------------------------------------------------------------------------
    def start(self, checkpoint: Path | None) -> None:
        self.trainer = self._kd_trainer()
        self.state = self._initial_state(self.trainer, with_weights=checkpoint is None)
        if checkpoint is not None:
            self.state = self.trainer.checkpointer.restore(self.state, step=step_of(checkpoint))
        self.params = self.state.params
        sharded = [x for x in jax.tree.leaves(self.params) if not x.sharding.is_fully_replicated]
        print(
            f"params: {len(sharded)} of {len(jax.tree.leaves(self.params))} arrays sharded over {self.devices} "
            f"device(s) (FSDP), accumulation {self.accumulation} micro-batches of {self.rows_per_micro_step} rows",
            flush=True,
        )

    def reset_optimizer(self) -> None:
        """A fresh optimizer state (moments, accumulation, step count) for the current parameters."""
        self.state = self.state.replace(opt_state=self._initial_state(self.trainer, with_weights=False).opt_state)

    def load(self, checkpoint: str) -> None:
        if checkpoint == "base":
            self.model = build_model(self.base.factory, self.base.config, self.settings.training.precision)
            # The whole model on every device, of every process: generation replicates its batches too.
            self.params = jax.tree.map(lambda w: global_array(np.asarray(w), kd.sharding.REPLICATED), self.weights)
            return
        path = Path(checkpoint).resolve()  # a ckpt_<step> dir: validate checked who wrote it
        trainer = self._kd_trainer(workdir=path.parent.parent)
        self.params = trainer.checkpointer.restore(self._initial_state(trainer, False), step=step_of(path)).params

    def save(self, step: int) -> Path:
        """checkpoints/ckpt_<step>, which orbax writes under a temporary name and renames when complete."""
        checkpointer = self.trainer.checkpointer
        checkpointer.save(self.state, step=step, force=True)
        checkpointer.wait_until_finished()
        return self.run.checkpoint_dir(step, self.spec.name)

    def export(self, out: Path, merge_lora: bool, dtype: str) -> None:
        """The model as an HF dir, through the inverse of the HF -> KD conversion: the whole model (the LoRA folded
        into its weights when `merge_lora`), or the LoRA as a PEFT adapter for the base model's hub name."""
        params = jax.tree.map(to_host, self.params)
        adapted = any("lora" in jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params))
        adapters = lora_to_peft(params, self.base.config) if adapted else {}
        if adapters and not merge_lora:
            write_peft_adapter(out, adapters, hub_id(self.settings.model.name), dtype)
        else:
            state = gemma_to_hf(params, self.base.config)
            fold_lora(state, adapters)
            write_model(out, state, self.base.hf, dtype)
        self.tokenizer.save_pretrained(out)

    # -- training ------------------------------------------------------------------------------------
    def train_steps(self, rows: PackedRows, batches: np.ndarray, learning_rates: np.ndarray) -> list[dict[str, float]]:
        """One optimizer step per row of `batches`, each `accumulation` micro-batches of the train step."""
        parts = self.devices if rows.one_document_per_row else self.rows_per_micro_step  # rows of a micro-batch
        sharding = batch_sharding(self.trainer)  # a micro-batch's rows split over the devices
        steps = []
        for batch, lr in zip(batches, learning_rates):
            self._set_learning_rate(lr)
            trained = max(1, int((rows.labels[batch, 1:] != IGNORE).sum()))
            losses, top1 = [], []
            for start in range(0, len(batch), self.rows_per_micro_step):
                micro = next_token_batch(rows, batch[start : start + self.rows_per_micro_step], parts)
                # Kauldron divides each micro-batch's loss by its values and MultiSteps averages the micro-batches:
                # this weight makes the step's loss the mean over its trained tokens.
                micro["loss_mask"] *= np.float32(self.accumulation * micro["loss_mask"].size / trained)
                micro = kd.sharding.device_put(local_rows(micro, sharding), sharding)  # from each process its rows
                self.state, aux = self.trainer.trainstep.step(
                    self.state, micro, return_losses=True, return_metrics=True
                )
                losses.append(aux.loss_states["xent"])
                top1.append(aux.metric_states["top1"])
            steps.append((losses, functools.reduce(lambda a, b: a.merge(b), top1)))
        self.params = self.state.params
        return [
            {"loss": float(np.mean([loss.compute() for loss in losses])), "mean_token_accuracy": float(top1.compute())}
            for losses, top1 in steps
        ]

    # -- evaluation ----------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        batch_size: int,
        stop_strings: Sequence[str],
        sampling: Sampling = GREEDY,
    ) -> list[str]:
        """Answers, greedy or sampled (the HF backend's draws), cut where `answer_ended` says or at EOS, as HF's are."""
        tok = self.tokenizer
        ids = [tok(p)["input_ids"] for p in prompts]
        eos, pad = tok.eos_token_id, tok.pad_token_id
        outputs = decode_ids(
            self.model, self.params, ids, max_new_tokens, self.newline_stop, eos, pad, batch_size, sampling
        )
        return [self._cut(out, stop_strings) for out in outputs]

    @functools.cached_property
    def newline_stop(self) -> NewlineStop:
        return NewlineStop.of(self.tokenizer, self.base.hf.vocab_size)

    def _cut(self, ids: list[int], stop_strings: Sequence[str]) -> str:
        """The text up to the token that ends the answer: the decode loop stops at newlines and EOS, this adds the
        stop strings."""
        for end in range(1, len(ids) + 1):
            text = self.tokenizer.decode(ids[:end], skip_special_tokens=True)
            if answer_ended(text, stop_strings):
                return text
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def loss_sums(self, rows: PackedRows, batches: list[np.ndarray]) -> np.ndarray:
        """Per batch: summed next-token loss, trained tokens, top-1 tokens. A short last batch of packed rows is
        filled with untrained copies of its first row: one batch shape, one compiled program. The batches stay numpy:
        jit replicates them on every device, of every process."""
        sums = []
        for index in batches:
            if rows.one_document_per_row:
                batch = next_token_batch(rows, index, 1)
            else:
                batch = next_token_batch(rows, np.resize(index, len(batches[0])), len(batches[0]))
                batch["loss_mask"][len(index) :] = 0
            sums.append(np.array([to_host(x) for x in self._loss_sums(self.params, batch)], dtype=np.float64))
        return np.array(sums).reshape(len(batches), 3)

    def _loss_sums_of_batch(self, params, batch):
        logits = self.model.apply({"params": params}, batch["input_ids"], positions=batch["position_ids"]).logits
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        token_loss = -jnp.take_along_axis(logp, batch["target"], axis=-1)
        mask = batch["loss_mask"]
        top1 = (jnp.argmax(logits, axis=-1)[..., None] == batch["target"]) * mask
        return jnp.sum(token_loss * mask), jnp.sum(mask), jnp.sum(top1)
