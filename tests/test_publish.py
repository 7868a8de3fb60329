"""Pushing an exported model folder to the hub (cbe.publish) against a local stand-in of the hub and its storage:
the files arrive byte for byte in one commit, privately when asked, the token goes to the hub's host and nowhere
else (LFS, in one piece or in parts, and Xet), and what the hub refuses is one line that says what to do."""

import hashlib
import json
import socket
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from cbe.errors import UserError
from cbe.publish import push_folder
from tests.conftest import HUB_TOKEN as TOKEN

REPO = "standin-user/tiny-export"
LOG_IN = "log in with `hf auth login` (or set HF_TOKEN)"


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


@pytest.fixture
def export(tmp_path) -> Path:
    """An exported model in miniature: a config and a tokenizer (JSON) and 16 kB of weights."""
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "hidden_size": 64}))
    save_file({"embed": np.arange(64 * 64, dtype=np.float32).reshape(64, 64)}, str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {f"tok{i}": i for i in range(300)}}}))
    return folder


def contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def pushed_with_token(hub) -> set[str]:
    """The servers that received a request carrying the user's token."""
    return {server for server, _, _, headers in hub.received if TOKEN in headers.get("authorization", "")}


def test_the_files_arrive_byte_for_byte_in_one_commit(hub, export, tmp_path):
    from huggingface_hub import hf_hub_download

    local = contents(export)
    assert len(local["model.safetensors"]) > 16000 and 1024 < len(local["tokenizer.json"]) < 16000

    assert push_folder(export, REPO) == f"{hub.url}/{REPO}"

    assert hub.commits == [(REPO, "Upload export with cbe export", {name: sha256(c) for name, c in local.items()})]
    # The weights and the tokenizer went to LFS storage (the hub said so) and were verified; the config went inline.
    assert set(hub.stored) == hub.verified == {sha256(local["model.safetensors"]), sha256(local["tokenizer.json"])}
    hub.cdn_min_size = 4096  # and the weights come back the way the hub sends large files: from its CDN
    for name, content in local.items():
        assert Path(hf_hub_download(REPO, name, cache_dir=tmp_path / "cache")).read_bytes() == content, name


def test_private_when_asked_else_whatever_the_hub_makes_new_repos(hub, export):
    from huggingface_hub import HfApi

    push_folder(export, REPO, private=True)
    push_folder(export, "standin-user/public")
    hub.private_by_default = True  # an organization that makes its repos private: not asking keeps it so
    push_folder(export, "standin-org/by-default")
    assert hub.private == {REPO: True, "standin-user/public": False, "standin-org/by-default": True}
    assert HfApi().model_info(REPO).private is True


def test_private_refuses_a_public_repo_that_exists(hub, export):
    push_folder(export, REPO)
    with pytest.raises(UserError) as refused:
        push_folder(export, REPO, private=True)
    assert str(refused.value) == (
        f"{hub.url}/{REPO} exists and is public: make it private on the hub first, or push without --private"
    )
    assert len(hub.commits) == 1  # nothing more went up


@pytest.mark.parametrize("part_size", [None, 5000], ids=["whole", "in-parts"])
def test_with_lfs_the_token_goes_to_the_hub_and_not_to_the_storage(hub, export, part_size):
    """The hub hands out pre-signed upload URLs on another host: they get the bytes, never the token."""
    hub.lfs_part_size = part_size  # the 16 kB of weights go up in 4 parts, each to its own URL
    push_folder(export, REPO)

    assert pushed_with_token(hub) == {hub.url}
    on_storage = [(method, path, headers) for server, method, path, headers in hub.received if server == hub.cdn_url]
    local = contents(export)
    weights, tokenizer = sha256(local["model.safetensors"]), sha256(local["tokenizer.json"])
    whole = [f"/uploads/{weights}"] if part_size is None else [f"/uploads/{weights}/{n}" for n in range(1, 5)]
    assert sorted(path for _, path, _ in on_storage) == sorted([*whole, f"/uploads/{tokenizer}"])
    assert [headers.get("authorization") for _, _, headers in on_storage] == [None] * len(on_storage)
    assert TOKEN not in json.dumps(on_storage)
    assert hub.stored[weights] == local["model.safetensors"]  # its parts, joined


def test_with_xet_the_token_goes_to_the_hub_and_the_storage_gets_the_hubs_short_lived_one(
    hub, export, monkeypatch, tmp_path
):
    """hf_xet is installed, so huggingface_hub uploads with Xet: the hub hands out a storage token and URL."""
    pytest.importorskip("hf_xet")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    push_folder(export, REPO)

    assert hub.xorbs and hub.shards and not hub.stored  # the bytes went by Xet, not LFS
    assert hub.commits == [(REPO, "Upload export with cbe export", {n: sha256(c) for n, c in contents(export).items()})]
    assert pushed_with_token(hub) == {hub.url}
    on_storage = [headers.get("authorization") for server, _, _, headers in hub.received if server == hub.cdn_url]
    assert on_storage and set(on_storage) == {f"Bearer {hub.xet_token}"}
    assert (tmp_path / "xet").is_dir()  # hf_xet's caches went where the test said, not to ~/.cache


@pytest.mark.parametrize("repo_exists", [False, True])
def test_a_token_the_hub_refuses_is_one_line(hub, export, monkeypatch, repo_exists):
    if repo_exists:
        push_folder(export, REPO)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token")
    with pytest.raises(UserError) as refused:
        push_folder(export, REPO)
    assert str(refused.value) == (
        f"the hub did not take your token (401: Invalid credentials in Authorization header): {LOG_IN}, "
        "with a token that may write"
    )
    hub.readers.add("hf_read_token")
    monkeypatch.setenv("HF_TOKEN", "hf_read_token")
    with pytest.raises(UserError) as refused:
        push_folder(export, REPO)
    assert str(refused.value) == (
        f"your token may not write to {REPO} (403: You don't have the rights to write to this repo: your token is "
        f"read-only): {LOG_IN}, with a write token"
    )
    assert len(hub.commits) == (1 if repo_exists else 0)  # only the first push, by the right token


def test_no_token_is_refused_before_the_hub_is_asked(hub, export, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(UserError) as refused:
        push_folder(export, REPO)
    assert str(refused.value) == f"pushing to {REPO} needs a token that may write to it: {LOG_IN}"
    assert [path for _, _, path, _ in hub.received if path != "/api/agent-harnesses"] == []


@pytest.mark.parametrize("protocol", ["lfs", "xet"])
def test_storage_that_refuses_an_upload_is_one_line_and_nothing_is_committed(hub, export, monkeypatch, protocol):
    from huggingface_hub import constants

    if protocol == "xet":
        pytest.importorskip("hf_xet")
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    hub.lfs_min_size = 10**6  # only the weights go to large-file storage, so one file fails
    hub.storage_refuses = 403  # say, a signed URL that expired
    with pytest.raises(UserError) as refused:
        push_folder(export, REPO)
    if protocol == "lfs":
        assert str(refused.value) == (
            "Error while uploading 'model.safetensors' to the Hub. It was refused (403: AccessDenied: Request has "
            "expired); rerun"
        )
    else:  # hf_xet's own line, which names the storage's URL
        assert str(refused.value).startswith(f"the upload to {REPO} failed (ConnectionError: ")
        assert "(403 Forbidden)" in str(refused.value) and str(refused.value).endswith("); rerun")
    assert "\n" not in str(refused.value) and TOKEN not in str(refused.value)
    assert hub.commits == []


def test_no_hub_there_bad_repo_id_and_empty_folder_are_one_line(hub, export, tmp_path, monkeypatch):
    from huggingface_hub import constants

    with pytest.raises(UserError) as refused:
        push_folder(export, "not a/valid id")
    assert str(refused.value).startswith("'not a/valid id' is not a repo id the hub takes (")
    assert str(refused.value).endswith("); name it as NAMESPACE/NAME")
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(UserError) as refused:
            push_folder(folder, REPO)
        assert str(refused.value) == f"nothing to push: {folder} is not a folder with files in it"
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{closed.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", nowhere)
    with pytest.raises(UserError) as refused:
        push_folder(export, REPO)
    assert (
        str(refused.value)
        == f"cannot reach the hub at {nowhere} (ConnectError); check your network or HF_ENDPOINT, and rerun"
    )
