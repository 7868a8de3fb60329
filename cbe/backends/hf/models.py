"""Load the model and tokenizer a config names, and wrap it with LoRA when the adapter asks for it."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from cbe.backends.base import Settings
from cbe.backends.hf.attention import attention_implementation
from cbe.weights.gguf import materialize_gemma3_270m
from cbe.weights.init import init_config, init_state
from cbe.weights.reader import from_pretrained, hub_id, load_tokenizer


def compute_dtype(precision: str) -> torch.dtype:
    """The weights' dtype for training.precision: `auto` is bf16 where a GPU runs it, else fp32; the others hold."""
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def load_model_and_tokenizer(settings: Settings, attn_implementation: str = "sdpa"):
    """What a run trains: the base model with the adapter, and its tokenizer. `attn_implementation` is
    backend.trainer's (auto and varlen: cbe.backends.hf.attention)."""
    model, tokenizer = load_base_model(settings, attention_implementation(attn_implementation))
    return apply_adapter(model, settings), tokenizer


def load_checkpoint(settings: Settings, checkpoint: str, attn_implementation: str = "sdpa"):
    """What mode=eval evaluates, and its tokenizer: `base`, or a checkpoint dir (a LoRA adapter or a whole model)."""
    attn_implementation = attention_implementation(attn_implementation)
    if checkpoint == "base":
        return load_base_model(settings, attn_implementation)
    path = Path(checkpoint)
    if (path / "adapter_config.json").exists():
        from peft import PeftModel

        model, tokenizer = load_base_model(settings, attn_implementation)
        return PeftModel.from_pretrained(
            model, path, autocast_adapter_dtype=settings.adapter.dtype == "fp32"
        ), tokenizer
    dtype = compute_dtype(settings.training.precision)
    model = from_pretrained(AutoModelForCausalLM, str(path), dtype=dtype, attn_implementation=attn_implementation)
    return model, load_tokenizer(settings.model.tokenizer or path)


def load_base_model(settings: Settings, attn: str = "sdpa"):
    """The base model (not yet adapted) and its tokenizer (model.tokenizer, or the model's own), by model.source."""
    dtype = compute_dtype(settings.training.precision)
    path = hub_id(settings.model.name)
    if settings.model.source == "init":
        tokenizer = load_tokenizer(settings.model.tokenizer or path)
        model = init_model(init_config(settings.model.architecture, tokenizer), settings.training.seed, attn)
        return model.to(dtype), tokenizer
    if settings.model.source == "gguf":
        path = str(materialize_gemma3_270m(Path(settings.cache_dir).expanduser() / "models"))
    model = from_pretrained(AutoModelForCausalLM, path, dtype=dtype, attn_implementation=attn)
    return model, load_tokenizer(settings.model.tokenizer or path)


def init_model(config, seed: int, attn: str = "sdpa"):
    """config's model in fp32 with cbe.weights.init's draw (the KD backend draws the same). It is built where it
    will train: HF's own init, overwritten here, takes minutes for billions of parameters on a CPU."""
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    state = {name: torch.from_numpy(tensor) for name, tensor in init_state(config, seed).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # the LM head is tied to the embedding
        raise RuntimeError(f"init_state does not fit {type(model).__name__}: {missing=} {unexpected=}")
    return model


def apply_adapter(model, settings: Settings):
    """Full fine-tune leaves the model as is; LoRA wraps every listed projection of the language model."""
    if settings.adapter.rank == 0:
        return model
    from peft import LoraConfig, get_peft_model

    # A regex, so the vision tower of the multimodal 4B/12B checkpoints stays untouched.
    targets = rf"^(?!.*(vision_tower|multi_modal_projector)).*\.({'|'.join(settings.adapter.target_modules)})$"
    lora = LoraConfig(
        r=settings.adapter.rank,
        lora_alpha=settings.adapter.alpha,
        lora_dropout=settings.adapter.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    # PEFT upcasts a bf16 model's adapters to fp32 unless told not to; the benchmark keeps them bf16 (adapter.dtype).
    model = get_peft_model(model, lora, autocast_adapter_dtype=settings.adapter.dtype == "fp32")
    init_lora_a(model, settings.training.seed)
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
