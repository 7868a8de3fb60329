"""QA evaluation speed: the harness's generation (static KV cache, the shared few-shot prefix computed once, on a GPU
a CUDA-graph decode step; cbe.backends.hf.generate) against HF `model.generate` (dynamic cache, eager, the same
stops: EOS, the template's stop string, the newline rule), in one process, on the same questions and model.

Each question sits behind the news few-shot prefix with the real tracks' template ("Q: {question}\\nA:"); the
sample track's questions, repeated up to --questions. Non-tiny models are the real architecture with random
weights and the offline tokenizer (as bench/train_throughput.py); their answers run to the token limit.

    .venv/bin/python bench/eval_speed.py [--model tiny] [--checkpoint DIR] [--questions 144]
        [--batch-size 256 ...] [--hf-batch-size 32] [--hf-questions N] [--max-new-tokens 32]
        [--prefix conf/prompts/news_3shot.txt | --prefix none]

One line per way (questions/s), ours also saying how many answers equal HF's on the questions both answered
(all, on the CPU; bf16 on a GPU may differ in near ties); then ours without the CUDA graph at the last batch size
(on a GPU its answers must equal the graph's, every one); last `speedup: <ours at the last --batch-size / HF>`.
A way that fails prints `<name>: failed: <error>` and the run exits 1 after measuring the others.

HF only: bench/kd_parity.py times the KD backend's generate beside ours, on the same prompts and weights.
Ours goes through the public wiring (cbe.loop.build, the backend's load and generate), plus the HF
backend's own generate option cuda_graph for the eager line. hf_generate is an upstream-style baseline: uses the HF
backend's internals (its model, device, newline-stop table, sdpa switch and HF-generate stopping criterion) because
it runs plain HF `model.generate` on the same weights with the same stops.
"""

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEMPLATE = "Q: {question}\\nA:"  # as typed on a command line; the evaluator turns \n into a newline


def compose_config(args):
    from hydra import compose, initialize_config_dir

    from cbe.config import register_configs

    register_configs()
    prefix = ROOT / args.prefix if args.prefix != "none" else "null"
    overrides = [f"model={args.model}", "mode=eval", f"checkpoint={args.checkpoint or 'base'}", "logging=none"]
    overrides += [f"eval.prompt_prefix_file={prefix}", f"eval.prompt_template='{TEMPLATE}'"]
    if args.model != "tiny":  # random init of the real architecture, with the offline tokenizer
        overrides += ["model.source=init", "model.tokenizer=cbe/assets/tiny_tokenizer"]
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        return compose("config", overrides=overrides)


def hf_generate(backend, prompts, max_new_tokens: int, batch_size: int, stop_strings) -> list[str]:
    """HF's way: `model.generate` on left-padded batches of similar length, dynamic cache, eager, our stops.
    Upstream-style baseline: uses the HF backend's internals because HF generate needs its model, and our newline
    stop as an HF stopping criterion."""
    import torch
    from transformers import GenerationConfig, StoppingCriteriaList

    from cbe.backends.hf.generate import NewlineStopCriteria, sdpa_attention

    tok = backend.tokenizer
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        stop_strings=list(stop_strings) or None,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(prompts)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"), sdpa_attention(backend.model):
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            inputs = tok([prompts[i] for i in batch], return_tensors="pt", padding=True, padding_side="left")
            inputs = inputs.to(backend.device)
            width = inputs["input_ids"].shape[1]
            newline = StoppingCriteriaList([NewlineStopCriteria(backend.newline_stop, width, backend.device)])
            out = backend.model.generate(**inputs, generation_config=config, tokenizer=tok, stopping_criteria=newline)
            for i, text in zip(batch, tok.batch_decode(out[:, width:], skip_special_tokens=True)):
                answers[i] = text
    return answers


def timed(generate, prompts) -> tuple[list[str], float]:
    """The answers and the seconds they took (answers are strings on the host: the device has finished)."""
    start = time.perf_counter()
    answers = generate(prompts)
    return answers, time.perf_counter() - start


def measure(name: str, how: str, generate, prompts, reference: tuple[str, list[str]] | None = None):
    """Time one way and print its line (and how many answers equal the reference's); a failure prints its line
    instead, so the other ways are still measured. Returns the answers and questions/s, or (None, None)."""
    try:
        answers, seconds = timed(generate, prompts)
    except Exception as e:  # e.g. a CUDA-graph capture error: said, not hidden
        print(f"{name}: failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}", flush=True)
        return None, None
    rate = len(answers) / seconds
    line = f"{name}: {rate:.1f} q/s, {seconds:.2f} s ({how})"
    if reference and reference[1] is not None:
        same = sum(a == b for a, b in zip(answers, reference[1]))
        line += f", answers identical to {reference[0]}'s: {same}/{min(len(answers), len(reference[1]))}"
    print(line, flush=True)
    return answers, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="a conf/model option (non-tiny: random init)")
    parser.add_argument("--checkpoint", help="evaluate this checkpoint dir instead of the base model")
    parser.add_argument("--questions", type=int, default=144, help="questions ours answers (the sample's, repeated)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[256], help="ours, one line per batch size")
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--hf-questions", type=int, help="the first N questions only, for HF (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prefix", default="conf/prompts/news_3shot.txt", help="few-shot prefix file, or none")
    args = parser.parse_args()

    import torch
    import transformers

    from cbe.loop import build
    from cbe.run import RunDir

    cfg = compose_config(args)
    backend, evaluator = build(cfg, RunDir(tempfile.mkdtemp()))
    backend.load(cfg.checkpoint)
    backend.model.eval()
    records = [q for qa in evaluator.qa_sets.values() for q in qa]
    prompts = [evaluator.prompt(records[i % len(records)]) for i in range(args.questions)]
    stops, new_tokens = evaluator.stop_strings, args.max_new_tokens
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    prefix_tokens = len(backend.tokenizer(evaluator.prefix, add_special_tokens=False)["input_ids"])
    print(f"device {device}, torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
    print(
        f"model {args.model}, {len(prompts)} questions, {new_tokens} new tokens at most, "
        f"{prefix_tokens} prefix tokens per question, stop strings {stops}",
        flush=True,
    )

    def hf(batch):
        return hf_generate(backend, batch, new_tokens, args.hf_batch_size, stops)

    def ours(batch_size: int, cuda_graph: bool | None = None):  # None: the harness's own choice
        return lambda batch: backend.generate(batch, new_tokens, batch_size, stops, cuda_graph=cuda_graph)

    hf(prompts[:2])  # warm up (CUDA context, cuBLAS), untimed
    with contextlib.suppress(Exception):  # a failure shows in the timed call below
        ours(2)(prompts[:2])
    how = f"batch {args.hf_batch_size}, dynamic cache, eager"
    expected, hf_rate = measure("hf-generate", how, hf, prompts[: args.hf_questions])
    gpu = torch.cuda.is_available()
    for batch_size in args.batch_size:
        how = f"static cache, shared prefix, {'CUDA graph' if gpu else 'eager'}"
        answers, rate = measure(f"ours-b{batch_size}", how, ours(batch_size), prompts, ("hf-generate", expected))
    # On a GPU the graph replays the eager step's kernels: the same answers, bit for bit (and the graph's gain).
    how, reference = "static cache, shared prefix, eager", (f"ours-b{batch_size}", answers)
    measure(f"ours-eager-b{batch_size}", how, ours(batch_size, cuda_graph=False), prompts, reference)
    print(f"speedup: {rate / hf_rate:.2f}" if rate and hf_rate else "speedup: n/a (a way failed)")
    sys.exit(0 if rate and hf_rate else 1)


if __name__ == "__main__":
    main()
