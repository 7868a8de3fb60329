"""Training throughput: the harness's training path against the upstream-style setup, side by side in one run.

Both modes run real optimizer steps through the backend (its public train_steps; HF upstream style: its model and
optimizer on padded rows with their attention mask) on the same synthetic news-like articles (lognormal lengths,
median 500 tokens, random token ids; throughput does not depend on the weights or the text):
- upstream style: one article per row, truncated and padded to the sequence length, gradient checkpointing,
  no compilation (HF: sdpa with a padding mask; KD has no checkpointing switch, so its rows are only padded);
- ours: the run's config (packed rows, documents kept apart by position ids, training.* as configured); a variant
  with data.packing=false measures the benchmark's layout as cbe trains it (one article per row, truncated, each
  micro-batch's articles laid end to end without padding).
Useful tokens are the non-padding ones; MFU counts 6 x base-model parameters per useful token plus attention
(each token's attended span, causal and windowed as the layer is) against 989 TFLOP/s (H100/H200 bf16 dense).

    .venv/bin/python bench/train_throughput.py [--model tiny] [--adapter full] [--backend hf] [--batch-size 16]
        [--upstream-batch-size 16] [--steps 8] [--warmup 3] [--seq 1024] [--task TASK]
        [--variant NAME=KEY=VALUE,KEY=VALUE ...]

On a GPU, real architectures are built from conf/model/<model>.yaml's `architecture` with random weights.
Each --variant is one more measured setup of ours (config overrides; the default is the plain config). One
override is the bench's own: `bench.head=trl` trains with TRL's fused LM head (which recomputes its logits in
backward: the loss head before cbe's fused one, and the baseline of its lever; trl comes with the dev extra).
--task TASK measures that task's recipe as it runs (its sequence length and per-device batch, rows of one optimizer
step = one micro-batch), and on a GPU prints the HF memory plan's estimate beside the measured peak.
One line per mode, then last `ratio_vs_upstream: <useful tok/s of the first variant / upstream style>` (none with
--no-upstream, which measures only the variants). A mode's line ends with the torch.compile graphs compiled in
its warmup and in its timed steps, where it compiled any (fixed shapes: none in the timed steps).

--check-varlen measures nothing: it runs one training forward and backward of the same packed rows and weights
through sdpa and through varlen attention (cbe/backends/hf/attention.py) and prints both losses, how far the
attention weights' gradients differ, and PASS or FAIL against bf16 tolerance.

Ours goes through the public wiring only (cbe.loop.build, the Backend protocol's start, tokenizer and train_steps).
Upstream-style baselines (run_hf's padded path, check_varlen) use the HF backend's internals (its model, optimizer,
tensors and autocast) because they reproduce a bare transformers training loop, which the protocol does not expose;
the parameter count and peak memory read each backend's model or state, which no protocol method reports.
"""

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cbe.data.packing import IGNORE, PackedRows, document_rows, pack_documents, training_order  # noqa: E402

PEAK_FLOPS = 989e12  # H100/H200 SXM, dense bf16


def news_like_documents(count: int, vocab: int, specials: set[int], bos: int, eos: int, seed: int = 0) -> list:
    """[BOS] tokens [EOS] with news-like lengths: lognormal, median 500 tokens, 15% longer than 1024."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(500), 0.7, count), 62, 8190).astype(int)
    allowed = np.setdiff1d(np.arange(vocab), list(specials))
    return [np.concatenate([[bos], rng.choice(allowed, n), [eos]]).astype(np.int32) for n in lengths]


def padded_rows(docs: list, length: int, pad_id: int) -> tuple[PackedRows, np.ndarray]:
    """Upstream style: one document per row, truncated to `length` and padded; also its attention mask."""
    n = len(docs)
    input_ids = np.full((n, length), pad_id, dtype=np.int32)
    labels = np.full((n, length), IGNORE, dtype=np.int32)
    mask = np.zeros((n, length), dtype=np.int32)
    for row, doc in enumerate(docs):
        doc = doc[:length]
        input_ids[row, : len(doc)], labels[row, 1 : len(doc)], mask[row, : len(doc)] = doc, doc[1:], 1
    position_ids = np.tile(np.arange(length, dtype=np.int32), (n, 1))
    return PackedRows(input_ids, position_ids, labels, mask.sum(1)), mask


def useful_mask(rows: PackedRows) -> np.ndarray:
    """Non-padding positions: every segment (positions restarting at 0) with a trained label is a document."""
    segment = np.cumsum(rows.position_ids == 0, axis=1)
    useful = np.zeros(rows.input_ids.shape, dtype=bool)
    for r in range(len(rows)):
        trained = np.unique(segment[r][rows.labels[r] != IGNORE])
        useful[r] = np.isin(segment[r], trained)
    return useful


def attention_flops(positions: np.ndarray, useful: np.ndarray, hf_config) -> float:
    """Training FLOPs of the attention scores and values: 3 x (2 matmuls x 2 x heads x head_dim x span) per token
    and layer, where the span is what the token attends to in its document (capped by a sliding window)."""
    span = (positions + 1)[useful].astype(np.float64)
    per_span = 12.0 * hf_config.num_attention_heads * hf_config.head_dim
    total = 0.0
    for kind in hf_config.layer_types:
        total += per_span * (np.minimum(span, hf_config.sliding_window) if kind == "sliding_attention" else span).sum()
    return total


def compose_config(args, overrides: list[str], batch_size: int, out: str):
    from hydra import compose, initialize_config_dir

    from cbe.config import register_configs, validate

    register_configs()
    base = []
    if args.task:  # its recipe's shape; the files only need to exist (the bench trains on its own documents)
        sample = {"train_path": "train", "val_path": "val", "valqa_path": "valqa", "testqa_path": "testqa"}
        base += [f"task={args.task}"] + [f"data.{key}=data/sample/{name}.jsonl" for key, name in sample.items()]
    base += [
        f"model={args.model}",
        f"adapter={args.adapter}",
        f"backend={args.backend}",
        "logging=none",
        f"data.sequence_length={args.seq}",
        f"training.per_device_batch_size={batch_size}",
        f"training.effective_batch_size={batch_size}",
        f"training.num_train_steps={args.warmup + args.steps}",
        "training.save_every=1000000",
        "training.eval_every=1000000",
        "logging.log_every_n_steps=1000000",
        f"output_root={out}",
    ]
    if args.model != "tiny":  # random init of the real architecture, with the offline tokenizer
        base += ["model.source=init", "model.tokenizer=cbe/assets/tiny_tokenizer"]
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        return validate(compose("config", overrides=base + args.recipe_overrides + overrides))


class Measurement:
    """Wall time of the timed optimizer steps and what they trained on."""

    def __init__(self, args, rows: PackedRows, useful: np.ndarray, order: np.ndarray, batch_size: int):
        timed = order[args.warmup * batch_size : (args.warmup + args.steps) * batch_size]
        self.useful_tokens = int(useful[timed].sum())
        computed = self.useful_tokens if rows.one_document_per_row else useful[timed].size  # laid end to end
        self.padding = 1 - self.useful_tokens / computed
        self.positions, self.useful = rows.position_ids[timed], useful[timed]
        self.seconds = 0.0
        self.graphs = (0, 0)  # torch.compile graphs compiled in the warmup steps, and in the timed steps (HF)


def run_hf(args, cfg, backend, rows: PackedRows, mask: np.ndarray | None, measurement: Measurement, order):
    """Steps the started HF backend, ours through its train_steps; returns the base model's parameter count and the
    peak GPU memory in GB. With a `mask`, the upstream-style baseline: uses the HF backend's internals (its model and
    optimizer) because it trains padded rows with their attention mask, as upstream does and train_steps does not."""
    import torch

    base_params = sum(p.numel() for n, p in backend.model.named_parameters() if "lora_" not in n)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    batches = order.reshape(-1, cfg.training.effective_batch_size)

    def steps(first: int, last: int) -> None:
        if mask is None:
            backend.train_steps(rows, batches[first:last], np.full(last - first, cfg.optimizer.lr))
            return
        for batch in batches[first:last]:
            inputs = {k: v for k, v in backend.tensors(rows, batch).items() if k != "position_ids"}
            inputs["attention_mask"] = torch.from_numpy(mask[batch]).to(backend.device)
            with backend.autocast():
                backend.model(**inputs, use_cache=False).loss.backward()
            backend.optimizer.step()
            backend.optimizer.zero_grad(set_to_none=True)

    measurement.seconds, measurement.graphs = timed(
        steps, args, torch.cuda.synchronize if torch.cuda.is_available() else None, compiled_graphs
    )
    peak = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    return base_params, peak


def run_kd(args, cfg, backend, rows: PackedRows, measurement: Measurement, order) -> tuple[int, float | None]:
    """Steps the started KD backend's train_steps (Kauldron's train step: jit, donated state, FSDP); returns as
    run_hf."""
    import jax

    batches = order.reshape(-1, cfg.training.effective_batch_size)

    def steps(first: int, last: int) -> None:
        backend.train_steps(rows, batches[first:last], np.full(last - first, cfg.optimizer.lr))

    measurement.seconds, _ = timed(steps, args, lambda: jax.block_until_ready(backend.state))
    base_params = sum(
        x.size
        for path, x in jax.tree_util.tree_leaves_with_path(backend.params)
        if "lora" not in jax.tree_util.keystr(path)
    )
    stats = jax.devices()[0].memory_stats() if jax.default_backend() == "gpu" else None
    return base_params, stats["peak_bytes_in_use"] / 1e9 if stats else None


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (each recompile is one more)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def timed(steps, args, synchronize, graphs=lambda: 0) -> tuple[float, tuple[int, int]]:
    """Seconds of the timed steps, after the warmup steps (compilation), synchronized only at the two clock readings:
    a sync every step would stall the device queue in a way training does not; and the graphs `graphs` counts
    compiled in the warmup and in the timed steps (fixed shapes: none in the timed steps)."""
    before = graphs()
    steps(0, args.warmup)
    if synchronize:
        synchronize()
    warm = graphs()
    start = time.perf_counter()
    steps(args.warmup, args.warmup + args.steps)
    if synchronize:
        synchronize()
    return time.perf_counter() - start, (warm - before, graphs() - warm)


def measure(args, name: str, overrides: list[str], batch_size: int, upstream: bool) -> float:
    """Train warmup + steps optimizer steps in one mode and print its line; returns useful tokens/s."""
    from cbe.loop import build
    from cbe.run import RunDir

    head = "bench.head=trl" in overrides  # the bench's own override (see the module's docstring)
    cfg = compose_config(args, [o for o in overrides if o != "bench.head=trl"], batch_size, tempfile.mkdtemp())
    batch_size = cfg.training.effective_batch_size  # a variant may set its own (per-device = effective)
    backend, _ = build(cfg, RunDir(tempfile.mkdtemp()))
    backend.start(None)
    if head:
        use_trl_head(backend.model)
    tok = backend.tokenizer
    vocab = cfg.model.architecture.vocab_size
    specials = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}
    needed = (args.warmup + args.steps) * batch_size
    docs = news_like_documents(3 * needed, vocab, specials, tok.bos_token_id, tok.eos_token_id)
    if upstream:
        rows, mask = padded_rows(docs[:needed], args.seq, tok.pad_token_id)
        useful = mask.astype(bool)
    elif cfg.data.packing:
        rows, mask = pack_documents(docs, args.seq, tok.pad_token_id), None
        useful = useful_mask(rows)
    else:  # the benchmark's layout as cbe trains it
        rows, mask = document_rows(docs[:needed], args.seq, tok.pad_token_id), None
        useful = np.arange(args.seq) < rows.lengths[:, None]
    order = training_order(len(rows), needed, cfg.training.seed)
    m = Measurement(args, rows, useful, order, batch_size)
    if args.backend == "hf":
        params, peak = run_hf(args, cfg, backend, rows, mask, m, order)
    else:
        params, peak = run_kd(args, cfg, backend, rows, m, order)
    rate = m.useful_tokens / m.seconds
    line = f"{name}: {rate:,.0f} useful tok/s, padding {m.padding:.1%}, batch {batch_size}"
    if peak is not None:  # on a GPU
        from omegaconf import OmegaConf
        from transformers import Gemma3TextConfig

        config = Gemma3TextConfig(**OmegaConf.to_container(cfg.model.architecture))
        flops = 6.0 * params * m.useful_tokens + attention_flops(m.positions, m.useful, config)
        line += f", MFU {flops / m.seconds / PEAK_FLOPS:.1%}, peak memory {peak:.1f} GB"
        if args.task:
            line += f" (the memory plan's estimate: {planned_peak(cfg):.1f} GB)"
    if any(m.graphs):
        line += f", compiled graphs: {m.graphs[0]} in warmup, {m.graphs[1]} in timed steps"
    print(line, flush=True)
    return rate


def use_trl_head(model) -> None:
    """Replace the model's loss head with TRL's fused LM head, answering `scored=True` calls as cbe's does (bench
    baseline: the head cbe trained with before its own, whose backward recomputes every tile of logits)."""
    import types

    from trl.trainer.utils import add_fused_lm_head

    from cbe.backends.hf.loss_head import Scores
    from cbe.backends.hf.models import unwrapped

    base = unwrapped(model)
    base.forward = types.MethodType(type(base).forward, base)  # the class's own forward, then TRL's patch on it
    add_fused_lm_head(base, outputs=("log_probs", "is_top1"))
    trl_forward = base.forward

    def forward(self, *args, scored=False, **kwargs):
        if not scored:
            return trl_forward(*args, **kwargs)
        out = trl_forward(*args, fused_lm_head=True, **kwargs)
        return Scores(out.loss, out.log_probs[out.label_mask].detach(), out.is_top1[out.label_mask])

    base.forward = types.MethodType(forward, base)


def planned_peak(cfg) -> float:
    """The HF memory plan's estimated peak in GB for this config on this GPU (what a run prints at its start)."""
    import torch

    from cbe.backends.hf import memory
    from cbe.config import backend_options, settings_of

    card = torch.cuda.get_device_properties(0).total_memory
    setting = backend_options(cfg)["gradient_checkpointing"]
    return memory.plan_run(settings_of(cfg), card, setting).estimate.total_bytes / memory.GB


def recipe_shape(args) -> tuple[int, int, list[str]]:
    """The sequence length and per-device batch that --task's recipe (with --model and --adapter) trains with, and
    with --card-gb the gradient checkpointing that `auto` picks for it on a card of that size (an override)."""
    from hydra import compose, initialize_config_dir

    from cbe.backends.hf import memory
    from cbe.config import register_configs, settings_of

    register_configs()
    overrides = [f"task={args.task}", f"model={args.model}", f"adapter={args.adapter}"]
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=overrides)
    checkpointing = []
    if args.card_gb:
        plan = memory.plan_run(settings_of(cfg), args.card_gb * memory.GB)
        checkpointing = [f"backend.trainer.gradient_checkpointing={str(plan.gradient_checkpointing).lower()}"]
    return cfg.data.sequence_length, cfg.training.per_device_batch_size, checkpointing


LOSS_RTOL = 1.6e-2  # torch.testing's relative tolerance for bf16
GRADIENT_RTOL = 5e-2  # of the gradients' norm: a wrong mask or window moves them by their whole size


def check_varlen(args) -> bool:
    """The varlen path against sdpa on one micro-batch of packed news-like rows, same weights: the training loss
    (the configured loss head, as train_steps computes it) and the attention weights' gradients, by layer kind. The
    loss alone would not do: a random-init model predicts near-uniformly, so a wrong mask barely moves it.
    Upstream-style baseline: uses the HF backend's internals (its model, tensors and autocast) because it compares
    the varlen path with transformers' own sdpa on the same weights, gradients included."""
    import torch

    from cbe.loop import build
    from cbe.run import RunDir

    # The backend loads the model with varlen (registering it with transformers); set_attn_implementation switches.
    # Eager layers: compiling them twice (once per attention) would cost this check most of its time limit.
    overrides = ["backend.trainer.attn_implementation=varlen", "backend.trainer.torch_compile=false"]
    cfg = compose_config(args, overrides, args.batch_size, tempfile.mkdtemp())
    backend, _ = build(cfg, RunDir(tempfile.mkdtemp()))
    backend.start(None)
    tok, model = backend.tokenizer, backend.model
    specials = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}
    docs = news_like_documents(
        4 * args.batch_size, cfg.model.architecture.vocab_size, specials, tok.bos_token_id, tok.eos_token_id
    )
    rows = pack_documents(docs, args.seq, tok.pad_token_id)
    index = np.arange(args.batch_size)
    trained = int((rows.labels[index, 1:] != IGNORE).sum())
    kinds = model.config.get_text_config().layer_types
    losses, gradients = {}, {}
    for name in ("sdpa", "varlen"):
        model.set_attn_implementation(name)
        model.zero_grad(set_to_none=True)
        with backend.autocast():
            inputs = backend.tensors(rows, index)
            out = model(**inputs, use_cache=False, scored=True, num_items_in_batch=trained)
        out.loss.backward()
        losses[name] = float(out.loss.detach())
        gradients[name] = {kind: [] for kind in set(kinds)}
        for param_name, p in model.named_parameters():
            if ".self_attn." in param_name and p.grad is not None:
                layer = int(param_name.split(".layers.")[1].split(".")[0])
                gradients[name][kinds[layer]].append(p.grad.float().flatten())
    loss_error = abs(losses["varlen"] - losses["sdpa"]) / abs(losses["sdpa"])
    errors = {}
    for kind in sorted(gradients["sdpa"]):
        reference, varlen = (torch.cat(gradients[name][kind]) for name in ("sdpa", "varlen"))
        errors[kind] = float((varlen - reference).norm() / reference.norm())
    passed = loss_error <= LOSS_RTOL and max(errors.values()) <= GRADIENT_RTOL
    described = ", ".join(f"{kind} {error:.1e}" for kind, error in errors.items())
    print(
        f"varlen-check: loss sdpa {losses['sdpa']:.5f}, varlen {losses['varlen']:.5f} (relative {loss_error:.1e}, "
        f"tolerance {LOSS_RTOL}); attention gradients' relative difference: {described} (tolerance "
        f"{GRADIENT_RTOL}); {args.batch_size} rows of {args.seq}: {'PASS' if passed else 'FAIL'}",
        flush=True,
    )
    return passed


def parse_args() -> argparse.Namespace:
    """The command line (see the module's docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="a conf/model option (non-tiny: random init)")
    parser.add_argument("--adapter", default="full", help="a conf/adapter option")
    parser.add_argument("--backend", default="hf", choices=["hf", "kd"])
    parser.add_argument("--batch-size", type=int, default=16, help="rows per optimizer step (no accumulation)")
    parser.add_argument("--upstream-batch-size", type=int, help="the upstream style's batch (default: --batch-size)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first (compilation)")
    parser.add_argument("--seq", type=int, default=1024, help="sequence length")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME=KEY=VALUE,KEY=VALUE: one more setup of ours, e.g. "
        "varlen=backend.trainer.attn_implementation=varlen; a variant's own batch: "
        "training.per_device_batch_size=32,training.effective_batch_size=32",
    )
    parser.add_argument("--no-upstream", action="store_true", help="measure only the variants (no ratio)")
    parser.add_argument("--task", help="measure this task's recipe: its sequence length and per-device batch")
    parser.add_argument(
        "--card-gb", type=float, help="with --task: checkpoint as auto would on a card of this many GB (README: 40)"
    )
    parser.add_argument("--check-varlen", action="store_true", help="check varlen's loss against sdpa's, no timing")
    return parser.parse_args()


def print_setup(args) -> None:
    """The device, the framework versions and what is measured: the first lines of the output."""
    if args.backend == "hf":
        import torch
        import transformers

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        print(f"device {device}, torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
    else:
        import jax

        print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    print(
        f"model {args.model}, adapter {args.adapter}, backend {args.backend}, sequence {args.seq}, "
        f"{f'the {args.task} recipe ({args.batch_size} rows a step), ' if args.task else ''}"
        f"{args.warmup} warmup + {args.steps} timed steps",
        flush=True,
    )


def main() -> None:
    args = parse_args()
    args.recipe_overrides = []
    if args.task:
        args.seq, args.batch_size, args.recipe_overrides = recipe_shape(args)
    print_setup(args)
    if args.check_varlen:
        sys.exit(0 if check_varlen(args) else 1)
    upstream_overrides = []
    if args.backend == "hf":
        upstream_overrides += [
            "backend.trainer.gradient_checkpointing=true",
            "backend.trainer.torch_compile=false",
            "backend.trainer.attn_implementation=sdpa",
        ]
    upstream = (
        None
        if args.no_upstream
        else measure(
            args, "upstream-style", upstream_overrides, args.upstream_batch_size or args.batch_size, upstream=True
        )
    )
    variants = [spec.split("=", 1) for spec in args.variant] or [["ours", ""]]
    rates = []
    for name, overrides in variants:
        try:
            rates.append(measure(args, name, [o for o in overrides.split(",") if o], args.batch_size, upstream=False))
        except Exception as e:  # one failing variant (an OOM, an unsupported kernel) keeps the others' numbers
            print(f"{name}: failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}", flush=True)
            gc.collect()
    if upstream is not None:
        print(
            f"ratio_vs_upstream: {rates[0] / upstream:.2f}"
            if rates
            else "ratio_vs_upstream: n/a (every variant failed)"
        )


if __name__ == "__main__":
    main()
