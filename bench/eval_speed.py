"""QA evaluation speed: the harness's batched generate against one-question-at-a-time HF generate.

Both run in this process on the same questions and model, each question behind the task's few-shot prefix
(news's by default, as evaluation runs it); the parsed predictions must be identical.

    .venv/bin/python bench/eval_speed.py [--model tiny] [--checkpoint DIR] [--questions 144] [--batch-size 64]
                                         [--prefix conf/prompts/news_3shot.txt | --prefix none]

The last line is `speedup: <naive seconds / harness seconds>`.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="a conf/model option")
    parser.add_argument("--checkpoint", help="evaluate this checkpoint dir instead of the base model")
    parser.add_argument("--questions", type=int, default=144)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prefix", default="conf/prompts/news_3shot.txt", help="few-shot prefix file, or none")
    args = parser.parse_args()

    import torch
    from hydra import compose, initialize_config_dir

    from cbe.config import register_configs
    from cbe.eval.parse import parse_answer
    from cbe.loop import build
    from cbe.run import RunDir

    register_configs()
    overrides = [
        f"model={args.model}",
        f"eval.prompt_prefix_file={ROOT / args.prefix if args.prefix != 'none' else 'null'}",
    ]
    overrides += ["mode=eval", f"checkpoint={args.checkpoint or 'base'}"]
    overrides += ["eval.prompt_template='Q: {question}\\nA:'"]  # the real tracks' template (the sample's is bare)
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=overrides)
    backend, evaluator = build(cfg, RunDir(tempfile.mkdtemp()))
    backend.load(cfg.checkpoint)
    questions = [q for records in evaluator.qa_sets.values() for q in records][: args.questions]
    prompts = [evaluator.prompt(q) for q in questions]
    model, tok = backend.model.eval(), backend.tokenizer

    start = time.perf_counter()
    raws = backend.generate(prompts, args.max_new_tokens, args.batch_size, evaluator.stop_strings)
    ours = [parse_answer(raw) for raw in raws]
    ours_s = time.perf_counter() - start

    start = time.perf_counter()
    naive = []
    with torch.no_grad():
        for prompt in prompts:  # the plain way: one question, all max_new_tokens, no stop condition
            inputs = tok(prompt, return_tensors="pt").to(backend.device)
            out = model.generate(
                **inputs, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
            naive.append(parse_answer(tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)))
    naive_s = time.perf_counter() - start

    differ = [i for i, (a, b) in enumerate(zip(ours, naive)) if a != b]
    assert not differ, (
        f"predictions differ on {len(differ)} questions, e.g. {ours[differ[0]]!r} vs {naive[differ[0]]!r}"
    )
    device = "GPU" if torch.cuda.is_available() else "CPU"
    prefix_tokens = len(tok(evaluator.prefix, add_special_tokens=False)["input_ids"])
    print(
        f"{len(prompts)} questions, model {args.model}, {device}, {args.max_new_tokens} new tokens at most, "
        f"{prefix_tokens} prefix tokens per question"
    )
    print(
        f"harness (batch {args.batch_size}, stop at newline): {ours_s:.2f} s, {len(prompts) / ours_s:.1f} questions/s"
    )
    print(f"naive (one at a time, no stop):      {naive_s:.2f} s, {len(prompts) / naive_s:.1f} questions/s")
    print(f"speedup: {naive_s / ours_s:.2f}")


if __name__ == "__main__":
    main()
