"""Load the model and tokenizer a config names, and wrap it with LoRA when the adapter asks for it."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig, set_seed

from cbe.backends.hf.attention import attention_implementation
from cbe.errors import UserError

# gemma3-1b-pt -> google/gemma-3-1b-pt: the short names researchers use in recipes.
_SHORT_NAME = re.compile(r"gemma3-(\d+[mb])(?:-(pt|it))?")


def hub_id(name: str) -> str:
    """The hub repo (or local dir) a `model.name` refers to."""
    match = _SHORT_NAME.fullmatch(name)
    return f"google/gemma-3-{match[1]}-{match[2] or 'pt'}" if match else name


def compute_dtype(precision: str) -> torch.dtype:
    """The weights' dtype for training.precision: `auto` is bf16 where a GPU runs it and fp32 on the CPU; `bf16` is
    pure bf16 anywhere (the benchmark's), `fp32` fp32 anywhere."""
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def _from_pretrained(loader, name: str, **kwargs):
    """from_pretrained that turns access and network failures into one line for the user."""
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, HFValidationError) as e:
        cause = e.__cause__ or e
        if isinstance(cause, GatedRepoError):
            raise UserError(
                f"{name} is gated: accept its license at https://huggingface.co/{name}, then run "
                "`hf auth login` (or set HF_TOKEN)"
            )
        if isinstance(cause, (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, HFValidationError)):
            raise UserError(
                f"cannot load model {name!r}: {str(e).splitlines()[0]} Check model.name (a short name "
                "like gemma3-1b-pt, a hub id or a local dir) and your network"
            )
        raise


def load_tokenizer(cfg: DictConfig, checkpoint_dir: Path | None = None):
    """The tokenizer named by model.tokenizer, or the model's own."""
    name = cfg.model.tokenizer or str(checkpoint_dir or hub_id(cfg.model.name))
    tokenizer = _from_pretrained(AutoTokenizer, name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(cfg: DictConfig, attn_implementation: str = "sdpa"):
    """What a run trains: the base model with the adapter, and its tokenizer. `attn_implementation` is
    backend.trainer's (auto and varlen: cbe.backends.hf.attention)."""
    model, tokenizer = load_base_model(cfg, attention_implementation(attn_implementation))
    return apply_adapter(model, cfg), tokenizer


def load_checkpoint(cfg: DictConfig, checkpoint: str, attn_implementation: str = "sdpa"):
    """What mode=eval evaluates, and its tokenizer: `base`, or a checkpoint dir (a LoRA adapter or a whole model)."""
    attn_implementation = attention_implementation(attn_implementation)
    if checkpoint == "base":
        return load_base_model(cfg, attn_implementation)
    path = Path(checkpoint)
    if (path / "adapter_config.json").exists():
        from peft import PeftModel

        model, tokenizer = load_base_model(cfg, attn_implementation)
        return PeftModel.from_pretrained(model, path, autocast_adapter_dtype=cfg.adapter.dtype == "fp32"), tokenizer
    dtype = compute_dtype(cfg.training.precision)
    model = _from_pretrained(AutoModelForCausalLM, str(path), dtype=dtype, attn_implementation=attn_implementation)
    return model, load_tokenizer(cfg, path)


def load_base_model(cfg: DictConfig, attn: str = "sdpa"):
    """The base model (not yet adapted) and its tokenizer, by model.source."""
    dtype = compute_dtype(cfg.training.precision)
    if cfg.model.source == "init":
        set_seed(cfg.training.seed)
        tokenizer = load_tokenizer(cfg)
        config = Gemma3TextConfig(
            **OmegaConf.to_container(cfg.model.architecture),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            attn_implementation=attn,
        )
        # Built where it will train: initializing billions of parameters on the CPU takes minutes.
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            return Gemma3ForCausalLM(config).to(dtype), tokenizer
    if cfg.model.source == "gguf":
        from cbe.backends.hf.gemma_gguf import materialize_gemma3_270m

        path = str(materialize_gemma3_270m(Path(cfg.data.cache_dir).expanduser() / "models"))
    else:
        path = hub_id(cfg.model.name)
    model = _from_pretrained(AutoModelForCausalLM, path, dtype=dtype, attn_implementation=attn)
    return model, load_tokenizer(cfg, Path(path) if cfg.model.source == "gguf" else None)


def apply_adapter(model, cfg: DictConfig):
    """Full fine-tune leaves the model as is; LoRA wraps every listed projection of the language model."""
    if cfg.adapter.rank == 0:
        return model
    from peft import LoraConfig, get_peft_model

    # A regex, so the vision tower of the multimodal 4B/12B checkpoints stays untouched.
    targets = rf"^(?!.*(vision_tower|multi_modal_projector)).*\.({'|'.join(cfg.adapter.target_modules)})$"
    lora = LoraConfig(
        r=cfg.adapter.rank,
        lora_alpha=cfg.adapter.alpha,
        lora_dropout=cfg.adapter.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    # PEFT upcasts a bf16 model's adapters to fp32 unless told not to; the benchmark keeps them bf16 (adapter.dtype).
    model = get_peft_model(model, lora, autocast_adapter_dtype=cfg.adapter.dtype == "fp32")
    init_lora_a(model, cfg.training.seed)
    return model


def init_lora_a(model, seed: int) -> None:
    """Draw every LoRA A uniformly in +-sqrt(6 / fan_in), as the benchmark does on both its backends (the JAX/Flax
    default; gemma's LoRA in our KD backend draws the same), about 2.45x wider than PEFT's default. B stays 0."""
    from peft.tuners.lora import LoraLayer

    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for a in module.lora_A.values():
                bound = math.sqrt(6 / a.in_features)
                with torch.no_grad():
                    a.weight.copy_(torch.empty(a.weight.shape).uniform_(-bound, bound, generator=generator))
