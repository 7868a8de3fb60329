"""`cbe download` against a local stand-in of the hub: success, --list, interruptions, 401 and bad files."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.hub_standin import HubStandIn


def jsonl(records):
    return "".join(json.dumps(r) + "\n" for r in records).encode()


ARTICLE = {"url": "https://example.org/a", "hostname": "example.org", "title": "T", "date": "2025-09-01",
           "crawl_date": "2025-09-02", "language": "en", "text": "Body " * 400, "article_idx": 0}
NEWS = {
    "corpus_small/train.jsonl": jsonl([{**ARTICLE, "article_idx": i} for i in range(50)]),
    "corpus_small/val.jsonl": jsonl([ARTICLE]),
    "qa/val.jsonl": jsonl([{"question": "Who?", "answer": "Ada", "supports": [0, 3]}]),
    "qa/test.jsonl": jsonl([{"question": "When?", "answer": "1843", "supports": [1]}]),
    "README.md": b"# News\n",
}
GEMINON = {
    "corpus_small/train.jsonl": jsonl([{"text": "Zorb lives here.", "tag": "t", "type": "x", "article_idx": 0}]),
    "corpus_small/val.jsonl": jsonl([{"text": "Zorb lives here.", "tag": "t", "type": "x", "article_idx": 0}]),
    "qa_small/val.jsonl": jsonl([{"question": "Legs?", "answer": 4, "geminon_idx": 1, "geminon_name": "Zorb", "supports": 2}]),
    "qa_small/test.jsonl": jsonl([{"question": "Eats?", "answer": "moss", "geminon_idx": 1, "geminon_name": "Zorb", "supports": 1}]),
    "qa_small/sensitive.jsonl": jsonl([{"question": "Age?", "answer": 7, "geminon_idx": 1, "geminon_name": "Zorb", "supports": 1}]),
}
LOCAL = {"train": "corpus_small/train.jsonl", "val": "corpus_small/val.jsonl", "valqa": "qa/val.jsonl",
         "testqa": "qa/test.jsonl"}


@pytest.fixture
def hub():
    with HubStandIn({"ContinuousBench/News": {"v5": dict(NEWS)}, "ContinuousBench/Geminon": {"v9": dict(GEMINON)}}) as hub:
        yield hub


def cbe(tmp_path, hub, *args, token=None, wait=True):
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    command = [sys.executable, "-m", "cbe.cli", "download", "--data-dir", str(tmp_path / "data"), *args]
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def test_download_places_every_file_and_leaves_no_staging(tmp_path, hub):
    proc = cbe(tmp_path, hub)  # no --track: every track in the recipe
    assert proc.returncode == 0, proc.stderr
    news = tmp_path / "data" / "news"
    for name, remote in LOCAL.items():
        assert (news / f"{name}.jsonl").read_bytes() == NEWS[remote]
    geminon = tmp_path / "data" / "geminon"
    assert sorted(p.name for p in geminon.iterdir()) == ["sensitive.jsonl", "testqa.jsonl", "train.jsonl",
                                                          "val.jsonl", "valqa.jsonl"]
    assert not (news / ".download").exists() and not (geminon / ".download").exists()


def test_list_prints_every_file_at_the_revision(tmp_path, hub):
    proc = cbe(tmp_path, hub, "--track", "news", "--list")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ContinuousBench/News@v5:", *sorted(NEWS)]


def test_a_dropped_connection_resumes_where_it_stopped(tmp_path, hub):
    hub.cut["corpus_small/train.jsonl"] = 5000
    proc = cbe(tmp_path, hub, "--track", "news")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "data" / "news" / "train.jsonl").read_bytes() == NEWS["corpus_small/train.jsonl"]
    assert ("GET", "/datasets/ContinuousBench/News/resolve/v5/corpus_small/train.jsonl", "bytes=5000-") in hub.requests


def test_a_killed_download_leaves_no_half_file_and_resumes(tmp_path, hub):
    hub.stall["corpus_small/train.jsonl"] = 7000
    proc = cbe(tmp_path, hub, "--track", "news", wait=False)
    partial = []
    deadline = time.time() + 60
    while time.time() < deadline and not partial:
        partial = [p for p in (tmp_path / "data" / "news" / ".download").glob("*.part") if p.stat().st_size >= 7000]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial, "the transfer never reached the stall point"
    assert not (tmp_path / "data" / "news" / "train.jsonl").exists()  # nothing half-written under a final name
    del hub.stall["corpus_small/train.jsonl"]
    hub.requests.clear()
    proc = cbe(tmp_path, hub, "--track", "news")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "data" / "news" / "train.jsonl").read_bytes() == NEWS["corpus_small/train.jsonl"]
    assert ("GET", "/datasets/ContinuousBench/News/resolve/v5/corpus_small/train.jsonl", "bytes=7000-") in hub.requests


def test_401_says_how_to_log_in_and_a_token_gets_in(tmp_path, hub):
    hub.token = "hf_standin_secret_token"
    proc = cbe(tmp_path, hub, "--track", "news")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "cbe: error: ContinuousBench/News is gated: accept its terms at https://huggingface.co/datasets/"
        "ContinuousBench/News, then log in with `hf auth login` (or set HF_TOKEN)"]
    proc = cbe(tmp_path, hub, "--track", "news", token="hf_standin_secret_token")
    assert proc.returncode == 0, proc.stderr
    assert "hf_standin_secret_token" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("change,message", [
    (lambda repos: repos["ContinuousBench/News"].pop("v5"),
     "dataset ContinuousBench/News has no revision 'v5': check data/download.yaml"),
    (lambda repos: repos["ContinuousBench/News"]["v5"].pop("qa/test.jsonl"),
     "ContinuousBench/News@v5 has no file qa/test.jsonl; `cbe download --list` shows the files it has"),
    (lambda repos: repos["ContinuousBench/News"]["v5"].update({"qa/val.jsonl": b'{"question": "q"}\n'}),
     "qa/val.jsonl:1: missing field 'answer'"),
])
def test_bad_revision_path_or_file_is_one_line_and_keeps_final_names_clean(tmp_path, hub, change, message):
    change(hub.repos)
    proc = cbe(tmp_path, hub, "--track", "news")
    assert proc.returncode == 2
    assert message in proc.stderr.strip().splitlines()[-1] and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "data" / "news" / "valqa.jsonl").exists()


def test_make_download_then_make_format(tmp_path, hub):
    """The README's data commands: `make download TRACK=news`, then `make format TRACK=news` (twice is a no-op)."""
    from tests.conftest import ROOT

    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_TOKEN", None)
    data = tmp_path / "data"
    make = ["make", "--no-print-directory", "-C", str(ROOT), f"DATA_DIR={data}", "TRACK=news"]
    proc = subprocess.run([*make, "download"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (data / "news" / "train.jsonl").read_bytes() == NEWS["corpus_small/train.jsonl"]

    proc = subprocess.run([*make, "format"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    first = json.loads((data / "news" / "train.jsonl").open().readline())
    assert first == {"text": "Title: T\nDate: 2025-09-01\nArticle: " + ARTICLE["text"], "article_idx": 0}
    formatted = (data / "news" / "val.jsonl").read_bytes()
    proc = subprocess.run([*make, "format"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "already formatted" in proc.stdout
    assert (data / "news" / "val.jsonl").read_bytes() == formatted
