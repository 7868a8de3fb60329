"""Does FP8 training (backend.trainer.fp8=true, torchao float8) keep the numbers? Two real runs side by side.

Runs main.py twice on the same config, seed and data, without FP8 (bf16 on a GPU) then with it, each training --steps
optimizer steps and evaluating at the end, and compares what the benchmark reports: eval_loss (FP8 must stay within 1%
of bf16's) and each QA set's exact match (FP8's must fall within bf16's 95% bootstrap CI). Prints one line per run, then
one `fp8-check:` line with both comparisons and PASS or FAIL. Where both runs answer nothing right, it says the QA
comparison shows nothing rather than passing it.

    .venv/bin/python bench/fp8_check.py [--model gemma3_4b] [--task sample] [--steps 300] [OVERRIDES ...]

Defaults: Gemma 3 4B from random init (model.source=init: a machine without the hub has no weights) with the
offline tokenizer, on the bundled sample track (its QA asks for memorized facts, so a run that learned the corpus
scores above 0), at lr 1e-4. With the real weights and the news track: --task news model.source=hub and the
recipe's lr (any further main.py overrides are passed on). FP8 needs an FP8 GPU; the CPU emulates it (SMOKE:
--model tiny --steps 20).
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cbe.run import RunDir, read_jsonl  # noqa: E402

LOSS_LIMIT = 0.01  # FP8's eval_loss within 1% of bf16's


def run(args, fp8: bool, out: Path) -> dict:
    """One main.py run; returns its last evaluation's metrics (printing how long it took)."""
    overrides = [
        f"task={args.task}",
        f"model={args.model}",
        "backend=hf",
        "logging=none",
        f"training.num_train_steps={args.steps}",
        f"training.eval_every={args.steps}",
        f"training.save_every={args.steps}",
        f"backend.trainer.fp8={str(fp8).lower()}",
        f"hydra.run.dir={out}",
    ]
    if args.model != "tiny":
        overrides += ["model.source=init", "model.tokenizer=cbe/assets/tiny_tokenizer", f"optimizer.lr={args.lr}"]
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "main.py"), *overrides, *args.overrides], check=True, cwd=ROOT)
    metrics = read_jsonl(out / RunDir.EVAL_RESULTS)[-1]
    print(
        f"fp8={str(fp8).lower()}: {args.steps} steps in {time.perf_counter() - start:.0f} s (the whole job), "
        f"eval_loss {metrics['eval_loss']:.4f}",
        flush=True,
    )
    return metrics


def compare(base: dict, fp8: dict) -> tuple[bool, str]:
    """Whether FP8 kept the numbers of the run without it (base: bf16 on a GPU), and the comparison in words."""
    loss = abs(fp8["eval_loss"] - base["eval_loss"]) / base["eval_loss"]
    passed = loss <= LOSS_LIMIT
    parts = [f"eval_loss without FP8 {base['eval_loss']:.4f}, with {fp8['eval_loss']:.4f}"]
    parts[0] += f" (relative {loss:.2%}, limit 1%)"
    for qa in ("valqa", "testqa"):
        key = f"{qa}_exact_match"
        if key not in base:
            continue
        low, high = base[f"{key}_ci95"]
        if base[key] == fp8[key] == 0:
            parts.append(f"{qa} exact match 0 in both: shows nothing")
            continue
        inside = low <= fp8[key] <= high
        passed &= inside
        parts.append(f"{qa} exact match without FP8 {base[key]:.3f} [{low:.3f}, {high:.3f}], with {fp8[key]:.3f}")
    return passed, "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3_4b", help="a conf/model option (default: %(default)s)")
    parser.add_argument("--task", default="sample", help="a conf/task option (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate of a non-tiny model")
    parser.add_argument("overrides", nargs="*", help="more main.py overrides, for both runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = run(args, False, Path(tmp) / "base")
        fp8 = run(args, True, Path(tmp) / "fp8")
    passed, described = compare(base, fp8)
    print(f"fp8-check: {args.model}, {args.task}, {args.steps} steps: {described}: {'PASS' if passed else 'FAIL'}")


if __name__ == "__main__":
    main()
