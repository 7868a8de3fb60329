"""KD<->HF parity at step 0, and both backends' QA answering speed, in one process on the same weights.

Both backends are built from one config through the public wiring (cbe.loop.build, then the Backend protocol's
load("base"), loss_sums through QAEvaluator.loss_metrics, and generate): the same model, which on a GPU is the real
architecture with random weights (conf/model/<model>.yaml's `architecture`, drawn from training.seed by
cbe.weights.init, as bench/train_throughput.py does; the KD backend converts that same draw to gemma's layout), and
on the CPU the tiny model. training.precision=auto: pure bf16 on a GPU, fp32 on the CPU. It measures:
- eval_loss (the benchmark's, per eval.loss_batch_size batch) on the same validation rows, the sample track's
  training corpus packed at data.sequence_length, with each backend; passes within --rtol relative (default 1e-2
  in bf16, 1e-4 in fp32);
- greedy answers (at most --max-new-tokens) to the same prompts, the sample track's 144 questions behind the news
  3-shot prefix, repeated to --questions, at --batch-size: the share of answers identical as strings passes at
  --min-identical (98%). With random weights the answers are no words and run to the token limit: every answer is
  that many argmax decisions in a row, any of which can flip in a near tie between two bf16 computations (other
  kernels, other accumulation orders), and one flip changes the rest of the answer. So on a GPU the identical share
  checks that the two decoders (prefill, KV cache, masks, positions, stops) compute the same model, not a formality;
  on the CPU, in fp32, every answer should be identical;
- questions/s of each backend's generate on those prompts, timed after one untimed call at the same batch size
  (compilation, autotuning, CUDA-graph capture): HF's is the harness's own decoder (static cache, shared prefix, on
  a GPU a CUDA-graph decode step; bench/eval_speed.py compares it with HF `generate`), KD's is gemma's model in one
  jitted prefill + while-loop decode (cbe.backends.kd.generate).

    .venv/bin/python bench/kd_parity.py [--model tiny] [--questions 144] [--batch-size 64] [--max-new-tokens 32]
        [--prefix conf/prompts/news_3shot.txt | --prefix none] [--rtol R] [--min-identical 0.98]

Prints `hf-ours: <q/s> ...`, `kd-generate: <q/s> ...`, then `kd-parity: eval_loss hf X kd Y rel Z | answers
identical N/M (P%) | PASS (...)` (or FAIL, exit 1), then up to 3 answers that differ. HF goes first and is freed
before KD is built; on a GPU, JAX allocates as it goes (no preallocation), so that the two frameworks share the card.
"""

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch holds part of the GPU in this process
import cbe.backends.kd  # noqa: E402,F401  (sets up the process for JAX before anything imports jax)

TEMPLATE = "Q: {question}\\nA:"  # as typed on a command line; the evaluator turns \n into a newline
VAL_PATH = "data/sample/train.jsonl"  # the sample track's corpus: more rows than its val.jsonl (1 packed row)


def compose_config(args, backend: str):
    from hydra import compose, initialize_config_dir

    from cbe.config import register_configs

    register_configs()
    prefix = ROOT / args.prefix if args.prefix != "none" else "null"
    overrides = [f"model={args.model}", f"backend={backend}", "mode=eval", "checkpoint=base", "logging=none"]
    overrides += [f"eval.prompt_prefix_file={prefix}", f"eval.prompt_template='{TEMPLATE}'"]
    overrides += [f"data.val_path={VAL_PATH}"]
    if args.model != "tiny":  # random init of the real architecture, with the offline tokenizer
        overrides += ["model.source=init", "model.tokenizer=cbe/assets/tiny_tokenizer"]
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        return compose("config", overrides=overrides)


def measure(name: str, args, device_sync) -> dict:
    """One backend: its eval_loss on the validation rows, its answers to the prompts and their questions/s."""
    from cbe.data.packing import corpus_rows
    from cbe.loop import build
    from cbe.run import RunDir

    cfg = compose_config(args, name)
    backend, evaluator = build(cfg, RunDir(tempfile.mkdtemp()))
    backend.load("base")
    d = cfg.data
    rows = corpus_rows(str(ROOT / d.val_path), backend.tokenizer, d.sequence_length, d.cache_dir, d.packing)
    loss = evaluator.loss_metrics(backend, rows)["eval_loss"]
    records = [q for qa in evaluator.qa_sets.values() for q in qa]
    prompts = [evaluator.prompt(records[i % len(records)]) for i in range(args.questions)]
    stops = evaluator.stop_strings

    def generate(batch):
        return backend.generate(batch, args.max_new_tokens, args.batch_size, stops)

    generate(prompts[: args.batch_size])  # compiles (KD), captures the CUDA graph (HF): untimed
    device_sync()
    start = time.perf_counter()
    answers = generate(prompts)
    seconds = time.perf_counter() - start
    rate = len(prompts) / seconds
    label = "hf-ours" if name == "hf" else "kd-generate"
    print(
        f"{label}: {rate:.1f} q/s, {seconds:.2f} s ({len(prompts)} questions, batch {args.batch_size}, at most "
        f"{args.max_new_tokens} new tokens; {len(rows)} validation rows of {d.sequence_length}, eval_loss {loss:.5f})",
        flush=True,
    )
    return {"loss": loss, "answers": answers, "backend": backend, "rows": len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="a conf/model option (non-tiny: random init)")
    parser.add_argument("--questions", type=int, default=144, help="prompts both answer (the sample's, repeated)")
    parser.add_argument("--batch-size", type=int, default=64, help="generation batch, both backends")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prefix", default="conf/prompts/news_3shot.txt", help="few-shot prefix file, or none")
    parser.add_argument("--rtol", type=float, help="eval_loss tolerance (default: 1e-2 on a GPU, bf16; 1e-4 fp32)")
    parser.add_argument("--min-identical", type=float, default=0.98, help="share of answers that must be identical")
    args = parser.parse_args()

    import jax
    import torch
    import transformers

    gpu = torch.cuda.is_available()
    rtol = args.rtol or (1e-2 if gpu else 1e-4)
    device = torch.cuda.get_device_name() if gpu else "CPU"
    print(
        f"device {device}, torch {torch.__version__}, transformers {transformers.__version__}, jax {jax.__version__} "
        f"({jax.devices()[0].platform}); model {args.model}, {'bf16' if gpu else 'fp32'}",
        flush=True,
    )

    hf = measure("hf", args, torch.cuda.synchronize if gpu else lambda: None)
    hf.pop("backend")  # freed before KD builds its copy of the weights
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    kd = measure("kd", args, lambda: None)  # KD's answers are host strings: its device has finished

    rel = abs(kd["loss"] - hf["loss"]) / abs(hf["loss"])
    same = sum(a == b for a, b in zip(hf["answers"], kd["answers"]))
    total = len(hf["answers"])
    passed = rel <= rtol and same >= args.min_identical * total
    print(
        f"kd-parity: eval_loss hf {hf['loss']:.5f} kd {kd['loss']:.5f} rel {rel:.1e} | answers identical "
        f"{same}/{total} ({same / total:.1%}) | {'PASS' if passed else 'FAIL'} (rel <= {rtol:g}, identical >= "
        f"{args.min_identical:.0%})",
        flush=True,
    )
    for a, b in [(a, b) for a, b in zip(hf["answers"], kd["answers"]) if a != b][:3]:  # what a difference looks like
        print(f"  differs: hf {a!r} kd {b!r}", flush=True)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
