"""Download a track from the HuggingFace hub into data/<track>/, as data/download.yaml describes.

huggingface_hub resolves each file at the pinned revision (or one the user names with --revision) with the user's
token (HF_TOKEN or `hf auth login`) and reports the hub's refusals as typed errors. The transfer itself is ours because
hf_hub_download does not resume across processes (it downloads into a fresh per-process temp file): bytes go to
data/<track>/.download/<file>.<etag>.part and a later run continues from where a killed one stopped. The token goes
only to the hub's own host, never to the CDN that the hub redirects large files to. A track's files are checked with
the shared loader and only then renamed to their final names together, so an interrupted or bad download never leaves
a half file, or a mix of old and new files, behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import yaml

from cbe.data.jsonl import CORPUS_FIELDS, QA_FIELDS, iter_jsonl
from cbe.errors import LOG_IN, UserError

RECIPE = Path(__file__).resolve().parents[2] / "data" / "download.yaml"
CORPUS_NAMES = ("train", "val")  # every other local name is a QA set


def load_recipe(path: str | Path = RECIPE) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text())


def files_to_fetch(recipe: dict[str, Any], track: str, corpus: str, qa: str) -> dict[str, str]:
    """Local name -> remote path for one track at the chosen sizes."""
    if track not in recipe:
        raise UserError(f"unknown track {track!r}; data/download.yaml has {', '.join(recipe)}")
    spec = recipe[track]
    for kind, size in (("corpus", corpus), ("qa", qa)):
        if size not in spec[kind]:
            raise UserError(
                f"track {track} has no --{kind} {size} on the hub; choose --{kind} {' or '.join(spec[kind])}"
            )
    return {**spec["corpus"][corpus], **spec["qa"][qa]}


def source(recipe: dict[str, Any], track: str, revision: str | None = None) -> tuple[str, str]:
    """The track's repo and the revision to read: `revision` if given, else the recipe's pin."""
    return recipe[track]["repo"], revision or recipe[track]["revision"]


@contextlib.contextmanager
def hub_errors(repo: str, revision: str, what: str) -> Iterator[None]:
    """Turn the hub's failures into one line that says what to do."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import constants, errors

    try:
        yield
    except errors.GatedRepoError:
        raise UserError(f"{repo} is gated: accept its terms at https://huggingface.co/datasets/{repo}, then {LOG_IN}")
    except errors.RepositoryNotFoundError:
        raise UserError(
            f"dataset {repo} was not found or your token may not read it (401/404): check "
            f"data/download.yaml, or {LOG_IN}"
        )
    except errors.RevisionNotFoundError:  # a pin the hub dropped; the benchmark's own harness reads main
        raise UserError(
            f"dataset {repo} has no revision {revision!r}: try `--revision main` (make download "
            "REVISION=main) for its latest files, or fix the pin in data/download.yaml"
        )
    except errors.RemoteEntryNotFoundError:
        raise UserError(f"{repo}@{revision} has no file {what}; `cbe download --list` shows the files it has")
    except errors.HfHubHTTPError as e:
        raise UserError(f"the hub refused {repo}@{revision} {what}: {str(e).splitlines()[0]}")
    except (OSError, httpx2.TransportError) as e:  # no connection (hf_hub_download says LocalEntryNotFoundError)
        raise UserError(
            f"cannot reach the hub at {constants.ENDPOINT} ({type(e).__name__}); check your network "
            "or HF_ENDPOINT, and rerun: finished files are kept and a partial one resumes"
        )


def list_files(recipe: dict[str, Any], track: str, revision: str | None = None) -> list[str]:
    """Every file in the track's repo at `revision` (default: the recipe's pin)."""
    from huggingface_hub import HfApi

    repo, revision = source(recipe, track, revision)
    with hub_errors(repo, revision, "(listing)"):
        return sorted(HfApi().list_repo_files(repo, repo_type="dataset", revision=revision))


def origin(url: str) -> tuple[str, str, int]:
    """A URL's scheme, host and port (the scheme's default port where it names none)."""
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(parts.scheme, 0)


def fetch(repo: str, remote: str, revision: str, staging: Path, attempts: int = 5) -> Path:
    """One file into `staging`, resuming a partial file from an earlier attempt or run; returns its path."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status
    from tqdm.auto import tqdm

    url = hf_hub_url(repo, remote, repo_type="dataset", revision=revision)  # on the hub's endpoint
    meta = get_hf_file_metadata(url)  # with the user's token; follows redirects only while they stay on the hub
    # The hub sends a large file from a CDN host (a 302 to a signed URL): the user's token must not go there.
    headers = build_hf_headers(token=None if origin(meta.location) == origin(url) else False)
    # Keyed by the file's etag, so a file that changed on the hub is never resumed from stale bytes.
    part = staging / f"{remote.replace('/', '__')}.{meta.etag[:16]}.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    already = part.stat().st_size if part.exists() else 0
    with tqdm(total=meta.size, initial=already, unit="B", unit_scale=True, desc=remote) as bar:
        for attempt in range(attempts):
            done = part.stat().st_size if part.exists() else 0
            if done >= meta.size:
                break
            try:
                with get_session().stream(
                    "GET", meta.location, headers={**headers, "Range": f"bytes={done}-"}
                ) as response:
                    hf_raise_for_status(response)
                    resumed = response.status_code == 206  # a server may ignore the Range and send it all
                    if done and not resumed:
                        bar.reset(total=meta.size)
                    with open(part, "ab" if resumed else "wb") as f:
                        for chunk in response.iter_bytes():
                            f.write(chunk)
                            f.flush()  # what arrived is on disk, for a run that resumes after a kill
                            bar.update(len(chunk))
            except httpx2.TransportError:
                if attempt == attempts - 1:
                    raise
    if part.stat().st_size != meta.size:
        raise UserError(f"{remote}: got {part.stat().st_size} of {meta.size} bytes; rerun to resume")
    return part


def download_track(
    recipe: dict[str, Any], track: str, corpus: str, qa: str, data_dir: str | Path, revision: str | None = None
) -> list[Path]:
    """Fetch, check and place every file of a track at `revision` (default: the pin); return the final paths."""
    repo, revision = source(recipe, track, revision)
    target = Path(data_dir) / track
    staging = target / ".download"
    fetched = {}
    for name, remote in files_to_fetch(recipe, track, corpus, qa).items():
        print(f"{track}: {repo}@{revision} {remote} -> {target / (name + '.jsonl')}", flush=True)
        with hub_errors(repo, revision, remote):
            fetched[name] = fetch(repo, remote, revision, staging)
        fields = CORPUS_FIELDS if name in CORPUS_NAMES else QA_FIELDS
        for _ in iter_jsonl(fetched[name], fields, name=f"{repo}@{revision} {remote}"):
            pass  # a malformed file stops here with its file:line, before it replaces anything
    # Only a complete, checked track replaces what was there: no mix of old and new files.
    for name, part in fetched.items():
        os.replace(part, target / f"{name}.jsonl")
    shutil.rmtree(staging, ignore_errors=True)
    return [target / f"{name}.jsonl" for name in fetched]
