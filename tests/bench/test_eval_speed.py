"""The eval-speed benchmark runs on the CPU, ours answers every question as HF's generate does, and it ends with its
ratio."""

import os
import re
import subprocess
import sys

from tests.conftest import ROOT


def test_eval_speed_prints_both_rates_and_its_ratio():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "eval_speed.py"), "--questions", "12", "--max-new-tokens", "8"]
        + ["--batch-size", "4", "8", "--hf-batch-size", "4"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # the tiny model's matmuls gain nothing from threads
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"hf-generate: \d+\.\d q/s, \d+\.\d\d s \(batch 4, dynamic cache, eager\)", lines[-5])
    ours = r"\d+\.\d q/s, \d+\.\d\d s \(static cache, shared prefix, eager\), answers identical to"
    for line, batch in zip(lines[-4:-2], (4, 8)):  # on the CPU (fp32) the answers are the same, every one
        assert re.fullmatch(rf"ours-b{batch}: {ours} hf-generate's: 12/12", line)
    assert re.fullmatch(rf"ours-eager-b8: {ours} ours-b8's: 12/12", lines[-2])
    assert re.fullmatch(r"speedup: \d+\.\d\d", lines[-1])
