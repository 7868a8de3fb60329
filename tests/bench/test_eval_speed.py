"""The eval-speed benchmark runs, its two ways agree on every prediction, and it ends with its ratio."""

import re
import subprocess
import sys

from tests.conftest import ROOT


def test_eval_speed_prints_its_ratio():
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "eval_speed.py"),
            "--questions",
            "12",
            "--batch-size",
            "4",
            "--max-new-tokens",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]  # it asserts identical predictions itself
    assert re.fullmatch(r"speedup: \d+\.\d\d", proc.stdout.strip().splitlines()[-1])
