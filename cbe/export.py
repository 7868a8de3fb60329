"""`cbe export`: any checkpoint as a standard HF model dir (config, safetensors, tokenizer) that transformers, PEFT,
vLLM and lm-evaluation-harness read, and its upload to the hub.

A checkpoint is loaded as `mode=eval` loads it (its run's own settings, then the command line's overrides; `base` and
a dir outside a run from the overrides alone), by the backend that wrote it, and that backend writes the model out
(Backend.export): HF checkpoints through save_pretrained, KD ones through the inverse of the HF -> KD conversion
(cbe.backends.kd.convert). A LoRA checkpoint becomes a PEFT adapter dir for the base model's name, or with
`merge_lora` a whole model with the adapter folded into its weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from cbe.checkpoints import inherit_run_overrides
from cbe.config import backend_options, compose_config, quoted, settings_of, validate
from cbe.errors import UserError, describe_config_error
from cbe.run import atomic_dir

DTYPES = ("bf16", "fp32")


def check_dtype(dtype: str) -> None:
    """--dtype names one of DTYPES (cbe export's and cbe lm-eval's), or the command stops in one line."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")


def checkpoint_config(checkpoint: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The validated config `mode=eval checkpoint=<checkpoint>` composes with these overrides."""
    argv = inherit_run_overrides(["mode=eval", f"checkpoint={quoted(str(checkpoint))}", *overrides])
    try:
        cfg = compose_config(argv)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(f"config error: {describe_config_error(e)}") from e
    return validate(cfg)


def load_backend(cfg: DictConfig):
    """The backend that wrote cfg.checkpoint, holding its model (as mode=eval loads it)."""
    backend = instantiate(
        backend_options(cfg), _recursive_=False, _convert_="object", settings=settings_of(cfg), run=None
    )
    backend.load(cfg.checkpoint)
    return backend


def export_checkpoint(
    checkpoint: str,
    out: str | Path,
    *,
    merge_lora: bool = False,
    dtype: str = "fp32",
    overrides: Sequence[str] = (),
    overwrite: bool = False,
) -> Path:
    """Write `checkpoint` (a checkpoint dir, `.../checkpoints/latest` or `base`) as an HF dir at `out`, whole or not
    at all; an existing `out` is replaced only with `overwrite`."""
    out = Path(out)
    check_dtype(dtype)
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} exists; pass --overwrite to replace it, or choose another dir")
    backend = load_backend(checkpoint_config(checkpoint, overrides))
    with atomic_dir(out) as tmp:
        backend.export(tmp, merge_lora=merge_lora, dtype=dtype)
    return out
