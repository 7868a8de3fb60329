"""The KD<->HF parity check of bench/gpu_check.sh runs on the CPU: on the tiny model in fp32 both backends give the
same eval loss and every answer alike, and it reports both backends' answering speed."""

import os
import re
import subprocess
import sys

from tests.conftest import ROOT


def test_kd_parity_passes_on_the_tiny_model_and_reports_both_speeds():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kd_parity.py"), "--questions", "12", "--max-new-tokens", "8"]
        + ["--batch-size", "6"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"^hf-ours: \d+\.\d q/s", out, re.M) and re.search(r"^kd-generate: \d+\.\d q/s", out, re.M)
    parity = re.search(r"^kd-parity: eval_loss hf (\S+) kd (\S+) rel (\S+) \| answers identical (\d+)/(\d+)", out, re.M)
    assert parity, out[-2000:]
    hf, kd, rel, same, total = parity.groups()
    assert float(hf) > 1 and float(rel) <= 1e-4 and same == total == "12"  # the untrained model: loss ~ ln(vocab)
    assert "| PASS (" in out
