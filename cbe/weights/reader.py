"""Find, read and name HF checkpoints with neither torch nor jax: numpy weights that either backend converts."""

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
from huggingface_hub import errors, snapshot_download
from transformers import AutoTokenizer

from cbe.errors import UserError

# gemma3-1b-pt -> google/gemma-3-1b-pt: the short names researchers use in recipes.
_SHORT_NAME = re.compile(r"gemma3-(\d+[mb])(?:-(pt|it))?")
_MISSING = (errors.LocalEntryNotFoundError, errors.HfHubHTTPError, errors.HFValidationError)  # repo not found: HTTP
# As safetensors stores them, little-endian; BF16 (the hub's Gemma dtype, which numpy lacks) is widened in _read.
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}


def hub_id(name: str) -> str:
    """The hub repo (or local dir) a `model.name` refers to."""
    match = _SHORT_NAME.fullmatch(name)
    return f"google/gemma-3-{match[1]}-{match[2] or 'pt'}" if match else name


def _access_error(name: str, e: Exception) -> Exception:
    """One line for the user where `e` is a hub access or network failure; `e` itself otherwise."""
    cause = e if isinstance(e, _MISSING) else e.__cause__ or e
    if isinstance(cause, errors.GatedRepoError):
        return UserError(
            f"{name} is gated: accept its license at https://huggingface.co/{name}, then run "
            "`hf auth login` (or set HF_TOKEN)"
        )
    if isinstance(cause, _MISSING):
        return UserError(
            f"cannot load model {name!r}: {str(e).splitlines()[0]} Check model.name (a short name "
            "like gemma3-1b-pt, a hub id or a local dir) and your network"
        )
    return e


def from_pretrained(loader, name: str, **kwargs):
    """loader.from_pretrained that turns access and network failures into one line for the user."""
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, errors.HFValidationError) as e:
        raise _access_error(name, e)


def load_tokenizer(name_or_dir: str | Path):
    """The tokenizer of a hub repo or dir, padding with EOS where it has no pad token."""
    tokenizer = from_pretrained(AutoTokenizer, str(name_or_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def checkpoint_dir(name: str) -> Path:
    """A local checkpoint dir as it is; a hub repo's config, tokenizer and weights, downloaded once into its cache."""
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"]))
    except (OSError, errors.HFValidationError) as e:
        raise _access_error(name, e)


def read_checkpoint(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json, every tensor of every *.safetensors as float32 numpy) of an HF checkpoint dir."""
    tensors = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        tensors |= _read(file)
    return json.loads((Path(path) / "config.json").read_text()), tensors


def _read(file: Path) -> dict[str, np.ndarray]:
    """safetensors, parsed here because safetensors.numpy cannot give bf16: an 8-byte little-endian header size,
    a JSON header (dtype, shape, data_offsets), the tensors' bytes."""
    with open(file, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        offset = f.tell()
    header.pop("__metadata__", None)
    data = np.memmap(file, np.uint8, "r", offset=offset) if header else None
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise UserError(f"{file}: {name} is {info['dtype']}; cbe reads {', '.join(_DTYPES)} weights")
        start, end = info["data_offsets"]
        array = data[start:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":  # bf16 is the top half of a float32's bits
            array = (array.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = array.astype(np.float32)  # a copy: the file's map closes
    return tensors


def build_once(final: Path, files: tuple[str, ...], build: Callable[[Path], None]) -> Path:
    """`final` once it holds `files`; else `build(dir)` fills a private scratch dir beside it, then renamed to it
    (atomic: concurrent jobs never share half-built files, and `final` only ever appears complete)."""

    def complete() -> bool:
        return all((final / name).is_file() for name in files)

    if complete():
        return final
    if final.exists():  # it only appears by rename, so a partial one was edited by hand: don't guess, don't delete
        raise UserError(f"{final} is incomplete (it lacks one of {', '.join(files)}); delete it and rerun")
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(scratch / final.name)
        try:
            os.replace(scratch / final.name, final)
        except OSError:
            if not complete():  # anything but "another job published first" is a real failure
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final
