"""Push an exported model folder to the HuggingFace hub as one commit (`cbe export ... --push-to-hub REPO`).

huggingface_hub does the talking, with the endpoint (HF_ENDPOINT) and the token (HF_TOKEN or `hf auth login`) as it
reads them: it creates the model repo if missing, asks the hub which files go inline in the commit and which to
large-file storage, uploads those and commits. The token goes only to the hub's own host: huggingface_hub sends it
with the hub's API calls, never with the bytes it puts on a storage host (LFS: a pre-signed URL that wants no token;
Xet, its choice whenever hf_xet is installed: a short-lived storage token the hub hands out). tests/test_publish.py
checks this against a stand-in of the hub and its storage. The hub's refusals become one line that says what to do.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from cbe.errors import LOG_IN, UserError, one_line


def reason(error) -> str:
    """What the server said about an HfHubHTTPError, in one line."""
    return one_line(error.server_message or str(error).splitlines()[0])


@contextlib.contextmanager
def upload_errors(repo: str) -> Iterator[None]:
    """Turn what the hub (or its storage) refuses into one line that says what to do."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import constants, errors

    try:
        yield
    except errors.HFValidationError as e:  # raised before any request
        raise UserError(f"{repo!r} is not a repo id the hub takes ({one_line(e)}); name it as NAMESPACE/NAME")
    except errors.HfHubHTTPError as e:
        status, said = e.response.status_code, reason(e)
        if status == 401:
            raise UserError(f"the hub did not take your token (401: {said}): {LOG_IN}, with a token that may write")
        if status == 403:
            raise UserError(f"your token may not write to {repo} (403: {said}): {LOG_IN}, with a write token")
        if isinstance(e, errors.RepositoryNotFoundError):
            raise UserError(f"model repo {repo} was not found, or your token may not see it: {LOG_IN}")
        raise UserError(f"the hub refused the upload to {repo} ({status}: {said})")
    except RuntimeError as e:  # huggingface_hub wraps a failed LFS upload: "Error while uploading 'x' to the Hub."
        cause = e.__cause__
        if isinstance(cause, errors.HfHubHTTPError):  # not the whole error: it names the upload's signed URL
            raise UserError(f"{one_line(e)} It was refused ({cause.response.status_code}: {reason(cause)}); rerun")
        if isinstance(cause, httpx2.TransportError):
            raise UserError(f"{one_line(e)} The connection failed ({type(cause).__name__}); rerun")
        raise
    except httpx2.TransportError as e:  # no connection to the hub (huggingface_hub retried where it could)
        raise UserError(
            f"cannot reach the hub at {constants.ENDPOINT} ({type(e).__name__}); check your network or "
            "HF_ENDPOINT, and rerun"
        )
    except OSError as e:  # hf_xet's failures with the hub's Xet storage (ConnectionError, ...) and the like
        raise UserError(f"the upload to {repo} failed ({type(e).__name__}: {one_line(e)}); rerun")


def push_folder(folder: str | Path, repo: str, private: bool = False) -> str:
    """Upload every file under `folder` to the model repo `repo` in one commit, creating the repo if it is missing
    (private if asked); return the repo's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    folder = Path(folder)
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    if not files:
        raise UserError(f"nothing to push: {folder} is not a folder with files in it")
    if get_token() is None:  # the hub would refuse anonymous writes, but only after a round trip
        raise UserError(f"pushing to {repo} needs a token that may write to it: {LOG_IN}")
    api = HfApi()  # here, not at import: the endpoint is huggingface_hub's, as it stands now
    with upload_errors(repo):
        # Not asked for private: leave a new repo to the hub's default (public, unless the organization makes its
        # repos private), rather than force it public.
        url = api.create_repo(repo, repo_type="model", private=True if private else None, exist_ok=True)
        # A repo that exists keeps its visibility: refuse to put a private model into a public repo.
        if private and not api.model_info(repo).private:
            raise UserError(f"{url} exists and is public: make it private on the hub first, or push without --private")
        operations = [
            CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=path) for path in files
        ]
        # create_commit, not upload_folder: with hf_xet, upload_folder may split a folder into several commits.
        api.create_commit(repo, operations, commit_message=f"Upload {folder.name} with cbe export")
    return str(url)
