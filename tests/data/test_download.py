"""`cbe download` against a local stand-in of the hub holding the benchmark's repos as published: every size
lands where the tasks read it, --revision, interruptions, 401 and bad files; then both tracks train."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.hub_standin import HubStandIn
from tests.published_hub import GEMINON, GEMINON_TAG, NEWS, NEWS_TAG, SIZES, published_repos

# Where each published file must land (from the dataset cards and the task configs, not from the recipe).
NEWS_QA_FILES = {"valqa": "qa/val.jsonl", "testqa": "qa/test.jsonl"}
GEMINON_QA_FILES = {
    "valqa": "public_val",
    "testqa": "public_test",
    "sensitive_valqa": "sensitive_val",
    "sensitive_testqa": "sensitive_test",
}


def layout(track: str, corpus: str, qa: str) -> dict[str, str]:
    """Local name -> published path for a track at the given sizes."""
    files = {"train": f"corpus_{corpus}/train.jsonl", "val": f"corpus_{corpus}/val.jsonl"}
    if track == "news":
        return {**files, **NEWS_QA_FILES}
    return {**files, **{name: f"qa_{qa}/{split}.jsonl" for name, split in GEMINON_QA_FILES.items()}}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    with HubStandIn(published_repos()) as hub:
        # huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE once, at import: point this process's
        # copy at the stand-in (subprocesses get HF_ENDPOINT in their environment instead).
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        yield hub


@pytest.fixture
def download(tmp_path, capsys):
    """Run `cbe download --data-dir <tmp>/data args...` in this process; return (exit code, stdout, stderr)."""
    from cbe.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            main(["download", "--data-dir", str(tmp_path / "data"), *args])
            code = 0
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def cbe_process(tmp_path, hub, *args, token=None, wait=True):
    """`cbe download` as a separate process, for what needs one (a kill)."""
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    command = [sys.executable, "-m", "cbe.cli", "download", "--data-dir", str(tmp_path / "data"), *args]
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def assert_track(data_dir, track, files, hub_files):
    """data/<track>/ holds exactly `files` (local name -> published path), byte for byte, and no staging."""
    folder = data_dir / track
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{name}.jsonl" for name in files)
    for name, remote in files.items():
        assert (folder / f"{name}.jsonl").read_bytes() == hub_files[remote], name


@pytest.mark.parametrize(
    "track,corpus,qa",
    [("news", c, q) for c in SIZES for q in SIZES] + [("geminon", c, q) for c in SIZES for q in ("small", "medium")],
)
def test_every_size_the_hub_has_lands_where_the_tasks_read_it(tmp_path, hub, download, track, corpus, qa):
    code, out, err = download("--track", track, "--corpus", corpus, "--qa", qa)
    assert code == 0, err
    repo, tag = (NEWS, NEWS_TAG) if track == "news" else (GEMINON, GEMINON_TAG)
    assert_track(tmp_path / "data", track, layout(track, corpus, qa), hub.repos[repo][tag])


def test_default_downloads_every_track_at_its_pin(tmp_path, hub, download):
    code, out, err = download()
    assert code == 0, err
    assert_track(tmp_path / "data", "news", layout("news", "small", "small"), hub.repos[NEWS][NEWS_TAG])
    assert_track(tmp_path / "data", "geminon", layout("geminon", "small", "small"), hub.repos[GEMINON][GEMINON_TAG])
    assert {path for method, path, _ in hub.requests if "/resolve/" in path} == {
        f"/datasets/{repo}/resolve/{tag}/{remote}"
        for repo, tag, track in ((NEWS, NEWS_TAG, "news"), (GEMINON, GEMINON_TAG, "geminon"))
        for remote in layout(track, "small", "small").values()
    }


def test_geminon_qa_large_is_refused_in_one_line_before_anything_downloads(tmp_path, hub, download):
    message = "cbe: error: track geminon has no --qa large on the hub; choose --qa small or medium"
    for args in (["--track", "geminon", "--qa", "large"], ["--qa", "large"]):  # every track is checked first
        code, out, err = download(*args)
        assert (code, err.splitlines()) == (2, [message])
        assert not (tmp_path / "data").exists() and hub.requests == []


def test_list_prints_every_published_file_at_the_revision(hub, download):
    code, out, err = download("--track", "geminon", "--list")
    assert code == 0, err
    assert out.split() == [f"{GEMINON}@{GEMINON_TAG}:", *sorted(hub.repos[GEMINON][GEMINON_TAG])]
    assert "index/sensitive.jsonl" in out and "corpus_large/test.jsonl" in out


def test_revision_main_reads_the_latest_files(tmp_path, hub, download):
    code, out, err = download("--track", "geminon", "--qa", "medium", "--revision", "main")
    assert code == 0, err
    main_files = hub.repos[GEMINON]["main"]
    assert main_files != hub.repos[GEMINON][GEMINON_TAG]  # main has moved on since the pin
    assert_track(tmp_path / "data", "geminon", layout("geminon", "small", "medium"), main_files)
    assert f"{GEMINON}@main qa_medium/sensitive_test.jsonl" in out
    code, out, err = download("--track", "news", "--list", "--revision", "main")
    assert code == 0 and out.split()[0] == f"{NEWS}@main:"


@pytest.mark.parametrize("args,revision", [([], NEWS_TAG), (["--revision", "v99"], "v99")])
def test_a_missing_revision_says_try_revision_main(tmp_path, hub, download, args, revision):
    hub.repos[NEWS].pop(NEWS_TAG)  # the pin is gone from the hub
    for command in (["--track", "news", *args], ["--track", "news", "--list", *args]):
        code, out, err = download(*command)
        assert code == 2 and len(err.splitlines()) == 1, err
        assert err.startswith(f"cbe: error: dataset {NEWS} has no revision {revision!r}: try `--revision main`")
    assert not (tmp_path / "data" / "news").exists()


def test_a_dropped_connection_resumes_where_it_stopped(tmp_path, hub, download):
    content = hub.repos[NEWS][NEWS_TAG]["corpus_small/train.jsonl"]
    hub.cut["corpus_small/train.jsonl"] = len(content) // 2
    code, out, err = download("--track", "news")
    assert code == 0, err
    assert (tmp_path / "data" / "news" / "train.jsonl").read_bytes() == content
    assert (
        "GET",
        f"/datasets/{NEWS}/resolve/{NEWS_TAG}/corpus_small/train.jsonl",
        f"bytes={len(content) // 2}-",
    ) in hub.requests


def test_a_killed_download_leaves_no_half_file_and_resumes(tmp_path, hub):
    content = hub.repos[NEWS][NEWS_TAG]["corpus_small/train.jsonl"]
    stall = len(content) // 2
    hub.stall["corpus_small/train.jsonl"] = stall
    proc = cbe_process(tmp_path, hub, "--track", "news", wait=False)
    partial = []
    deadline = time.time() + 60
    while time.time() < deadline and not partial:
        partial = [p for p in (tmp_path / "data" / "news" / ".download").glob("*.part") if p.stat().st_size >= stall]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial, "the transfer never reached the stall point"
    assert not (tmp_path / "data" / "news" / "train.jsonl").exists()  # nothing half-written under a final name
    del hub.stall["corpus_small/train.jsonl"]
    hub.requests.clear()
    proc = cbe_process(tmp_path, hub, "--track", "news")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "data" / "news" / "train.jsonl").read_bytes() == content
    assert ("GET", f"/datasets/{NEWS}/resolve/{NEWS_TAG}/corpus_small/train.jsonl", f"bytes={stall}-") in hub.requests


def test_401_says_how_to_log_in_and_a_token_gets_in(hub, download, monkeypatch):
    hub.token = "hf_standin_secret_token"
    code, out, err = download("--track", "news")
    assert code == 2
    assert err.splitlines() == [
        f"cbe: error: {NEWS} is gated: accept its terms at https://huggingface.co/datasets/{NEWS}, then log in "
        "with `hf auth login` (or set HF_TOKEN)"
    ]
    monkeypatch.setenv("HF_TOKEN", "hf_standin_secret_token")
    code, out, err = download("--track", "news")
    assert code == 0, err
    assert "hf_standin_secret_token" not in out + err


def test_the_token_goes_to_the_hub_and_never_to_the_cdn_it_redirects_to(tmp_path, hub, download, monkeypatch):
    """The hub answers a large file with a 302 to a CDN host (huggingface_hub drops the token there, and so must
    we, on a resumed Range request too); a redirect inside the hub (a renamed repo, 307) keeps it."""
    secret = "hf_standin_secret_token"
    hub.token = secret  # the hub answers nothing without it
    monkeypatch.setenv("HF_TOKEN", secret)
    hub.cdn_min_size = 4000  # the corpus files (5 kB) come from the CDN, the QA files (3 kB) from the hub itself
    renamed = f"{NEWS}-renamed"
    hub.repos[renamed] = hub.repos.pop(NEWS)
    hub.moved[NEWS] = renamed
    published = hub.repos[renamed][NEWS_TAG]
    train = published["corpus_small/train.jsonl"]
    hub.cut["corpus_small/train.jsonl"] = len(train) // 2  # the CDN drops it once; the rest comes by a Range request

    code, out, err = download("--track", "news")
    assert code == 0, err
    assert_track(tmp_path / "data", "news", layout("news", "small", "small"), published)
    assert secret not in out + err
    cdn = [(method, path, headers) for server, method, path, headers in hub.received if server == hub.cdn_url]
    # Every file request to the hub carried it (huggingface_hub's own tokenless registry lookups aside).
    on_hub = [headers for server, _, path, headers in hub.received if server == hub.url and "/resolve/" in path]
    assert [headers.get("authorization") for _, _, headers in cdn] == [None] * len(cdn)
    assert [headers.get("authorization") for headers in on_hub] == [f"Bearer {secret}"] * len(on_hub)
    train_blob = f"/blobs/{hashlib.sha256(train).hexdigest()}"
    assert [(path, headers.get("range")) for method, path, headers in cdn if path == train_blob] == [
        (train_blob, "bytes=0-"),
        (train_blob, f"bytes={len(train) // 2}-"),
    ]
    assert {path for method, path, headers in cdn} == {
        f"/blobs/{hashlib.sha256(published[f'corpus_small/{split}.jsonl']).hexdigest()}" for split in ("train", "val")
    }
    # The QA files came from the hub, at the repo's new name, which the hub pointed to from the old one.
    for remote in NEWS_QA_FILES.values():
        assert ("HEAD", f"/datasets/{NEWS}/resolve/{NEWS_TAG}/{remote}", None) in hub.requests
        assert ("GET", f"/datasets/{renamed}/resolve/{NEWS_TAG}/{remote}", "bytes=0-") in hub.requests


@pytest.mark.parametrize(
    "change,message",
    [
        (
            lambda files: files.pop("qa/test.jsonl"),
            f"{NEWS}@{NEWS_TAG} has no file qa/test.jsonl; `cbe download --list` shows the files it has",
        ),
        (
            lambda files: files.update({"qa/val.jsonl": b'{"question": "q"}\n'}),
            "qa/val.jsonl:1: missing field 'answer'",
        ),
    ],
)
def test_a_missing_or_bad_file_is_one_line_and_keeps_final_names_clean(tmp_path, hub, download, change, message):
    change(hub.repos[NEWS][NEWS_TAG])
    code, out, err = download("--track", "news")
    assert code == 2
    assert message in err.splitlines()[-1] and "Traceback" not in err, err
    assert not (tmp_path / "data" / "news" / "valqa.jsonl").exists()


@pytest.mark.parametrize("failure", ["server error", "dropped every time"])
def test_a_failed_download_leaves_the_older_copy_byte_identical(tmp_path, hub, download, failure):
    code, out, err = download("--track", "news")
    assert code == 0, err
    folder = tmp_path / "data" / "news"
    older = {p.name: p.read_bytes() for p in folder.glob("*.jsonl")}
    assert sorted(older) == ["testqa.jsonl", "train.jsonl", "val.jsonl", "valqa.jsonl"]
    # main has grown since the pin, so any file it replaced would differ. Its last file fails after the others
    # have arrived in full.
    latest = hub.repos[NEWS]["main"]
    assert latest["corpus_small/train.jsonl"] != hub.repos[NEWS][NEWS_TAG]["corpus_small/train.jsonl"]
    if failure == "server error":
        hub.fail["qa/test.jsonl"] = 500
        message = f"cbe: error: the hub refused {NEWS}@main qa/test.jsonl: Server error '500 Internal Server Error'"
    else:
        hub.broken["qa/test.jsonl"] = len(latest["qa/test.jsonl"]) // 2
        message = f"cbe: error: cannot reach the hub at {hub.url} (RemoteProtocolError)"
    code, out, err = download("--track", "news", "--revision", "main")
    assert code == 2
    assert [line for line in err.splitlines() if "error" in line.lower()] == [err.splitlines()[-1]], err
    assert err.splitlines()[-1].startswith(message), err
    assert {p.name: p.read_bytes() for p in folder.glob("*.jsonl")} == older

    hub.fail.clear()  # the hub recovers: a rerun places main's files, all of them
    hub.broken.clear()
    code, out, err = download("--track", "news", "--revision", "main")
    assert code == 0, err
    assert_track(tmp_path / "data", "news", layout("news", "small", "small"), latest)


def test_make_download_at_a_revision_then_make_format(tmp_path, hub):
    """The README's data commands: `make download TRACK=news REVISION=main`, then `make format TRACK=news`."""
    from tests.conftest import ROOT

    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_TOKEN", None)
    data = tmp_path / "data"
    make = ["make", "--no-print-directory", "-C", str(ROOT), f"DATA_DIR={data}", "TRACK=news"]
    proc = subprocess.run([*make, "REVISION=main", "download"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (data / "news" / "train.jsonl").read_bytes() == hub.repos[NEWS]["main"]["corpus_small/train.jsonl"]

    proc = subprocess.run([*make, "format"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    raw = json.loads(hub.repos[NEWS]["main"]["corpus_small/train.jsonl"].decode().splitlines()[0])
    first = json.loads((data / "news" / "train.jsonl").open().readline())
    assert first["text"].startswith(f"Title: {raw['title']}\n") and raw["text"] in first["text"]
    formatted = (data / "news" / "val.jsonl").read_bytes()
    proc = subprocess.run([*make, "format"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (data / "news" / "val.jsonl").read_bytes() == formatted  # formatting twice changes nothing


@pytest.mark.slow
def test_both_tracks_download_format_and_train(tmp_path, hub, download, run_main):
    """Done when: news and geminon come down from the hub as published, news is formatted, and `task=news` and
    `task=geminon` each train two steps on them and evaluate every QA set the task names."""
    import yaml

    from cbe.data.format_news import format_news
    from tests.conftest import ROOT

    code, out, err = download()
    assert code == 0, err
    for split in ("train", "val"):
        news = tmp_path / "data" / "news" / f"{split}.jsonl"
        format_news(news, news, overwrite=True)
    quick = [
        "model=tiny",
        "training.num_train_steps=2",
        "training.eval_every=2",
        "training.save_every=2",
        "training.effective_batch_size=8",
        "training.per_device_batch_size=8",
        "data.sequence_length=128",
        "eval.prompt_prefix_file=null",
        "eval.max_new_tokens=8",
        "logging=none",
    ]
    for track, sets in (
        ("news", ["valqa", "testqa"]),
        ("geminon", ["valqa", "testqa", "sensitive_valqa", "sensitive_testqa"]),
    ):
        # Every path the task reads (data/<track>/...), read from the tmp folder the download filled.
        data = yaml.safe_load((ROOT / "conf" / "task" / f"{track}.yaml").read_text())["data"]
        paths = {f"data.{key}": data[key] for key in ("train_path", "val_path", "valqa_path", "testqa_path")}
        paths |= {f"data.extra_qa_paths.{name}": path for name, path in data.get("extra_qa_paths", {}).items()}
        run_main(
            f"task={track}",
            *(f"{key}={tmp_path / path}" for key, path in paths.items()),
            *quick,
            f"logging.run_name={track}",
            timeout=600,
        )
        results = tmp_path / "outputs" / "cbe" / track / "metrics" / "eval_results.jsonl"
        last = json.loads(results.read_text().splitlines()[-1])
        assert last["step"] == 2
        assert sorted(k for k in last if k.endswith("_exact_match")) == sorted(f"{s}_exact_match" for s in sets)
