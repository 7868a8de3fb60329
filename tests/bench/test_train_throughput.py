"""The training-throughput bench runs its modes through the real HF training path and ends with its ratio: the
upstream style, ours packed, ours in the benchmark's layout (data.packing=false), and ours with TRL's loss head
(bench.head=trl: the fused head's baseline)."""

import re
import subprocess
import sys

from tests.conftest import ROOT

MODE_LINE = re.compile(r"(upstream-style|ours|documents|trl-head): [\d,]+ useful tok/s, padding \d+\.\d%, batch \d+")


def test_train_throughput_prints_both_modes_and_a_positive_ratio():
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "train_throughput.py"),
            "--batch-size",
            "4",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--seq",
            "512",
            "--variant",
            "ours=",
            "--variant",
            "documents=data.packing=false",
            "--variant",
            "trl-head=bench.head=trl",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    modes = [m for line in lines if (m := MODE_LINE.fullmatch(line))]
    assert [m[1] for m in modes] == ["upstream-style", "ours", "documents", "trl-head"]
    padding = {m[1]: float(re.search(r"padding (\S+)%", m[0])[1]) for m in modes}
    assert padding["ours"] < padding["upstream-style"]  # packing fills the rows that truncate-and-pad leaves empty
    assert padding["documents"] == 0  # one article per row, laid end to end: no padding computed
    ratio = re.fullmatch(r"ratio_vs_upstream: (\d+\.\d\d)", lines[-1])
    assert ratio and float(ratio[1]) > 0
