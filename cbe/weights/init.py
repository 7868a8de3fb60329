"""The tiny model's weights (model.source=init): HF's seeded random init of a Gemma 3 architecture, drawn by
torch. The HF backend builds it in memory; the KD backend reads it from a checkpoint saved once."""

import hashlib
import importlib.util
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cbe.errors import UserError
from cbe.weights.reader import build_once, load_tokenizer


def init_device() -> str:
    """Where the init is drawn: where it will train (initializing billions of parameters on a CPU takes minutes);
    the draws differ by device, so a KD run reads the init of the device an HF run would draw it on."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def init_model(architecture: dict, tokenizer, seed: int, attn_implementation: str = "sdpa"):
    """A Gemma3ForCausalLM of `architecture` (Gemma3TextConfig's fields) in fp32, drawn from `seed` (init_device)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, set_seed

    set_seed(seed)
    config = Gemma3TextConfig(
        **_plain(architecture),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation=attn_implementation,
    )
    with torch.device(init_device()):
        return Gemma3ForCausalLM(config)


def init_checkpoint(architecture: dict, tokenizer_name: str, seed: int, cache_dir: str | Path) -> Path:
    """init_model's weights as an HF checkpoint dir (with the tokenizer) in cache_dir/models, built once."""
    if importlib.util.find_spec("torch") is None:
        raise UserError(
            "model.source=init draws the HF backend's seeded init, which needs torch; install it or point "
            "model.name at a saved checkpoint"
        )
    key = json.dumps([_plain(architecture), seed, str(tokenizer_name), init_device()], sort_keys=True).encode()

    def build(out: Path) -> None:
        tokenizer = load_tokenizer(tokenizer_name)
        init_model(architecture, tokenizer, seed).save_pretrained(out)
        tokenizer.save_pretrained(out)

    final = Path(cache_dir).expanduser() / "models" / f"init-{hashlib.sha256(key).hexdigest()[:12]}"
    return build_once(final, ("config.json", "model.safetensors"), build)


def _plain(architecture) -> dict:  # model.architecture of a DictConfig or of the typed config
    return OmegaConf.to_container(architecture) if isinstance(architecture, DictConfig) else dict(architecture)
