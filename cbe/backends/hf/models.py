"""Load the model and tokenizer a config names, and wrap it with LoRA when the adapter asks for it."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from cbe.backends.hf.attention import attention_implementation
from cbe.config import Settings
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


def unwrapped(model):
    """The transformers model itself: under a PEFT wrapper, the base model it adapts (its LoRA layers in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """A PEFT model's weights under its base model's names, each LoRA's change folded in (in fp32); the model itself
    stays as it is (a run may go on training it)."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    changes = {
        f"{name}.weight": module.get_delta_weight(module.active_adapters[0])
        for name, module in base.named_modules()
        if isinstance(module, LoraLayer)
    }
    state = {}
    for key, tensor in base.state_dict().items():
        if ".lora_" not in key:
            key = key.replace(".base_layer.", ".")
            state[key] = (tensor.float() + changes[key].float()).to(tensor.dtype) if key in changes else tensor
    return state


def export_model(model, tokenizer, out: Path, merge_lora: bool, dtype: str, base_model: str) -> None:
    """The model as an HF dir (`save_pretrained`) in `dtype` (bf16|fp32): the whole model, the LoRA folded into its
    weights when `merge_lora`, or the LoRA as a PEFT adapter for the base model named `base_model`."""
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    adapted = hasattr(model, "peft_config")
    if adapted and not merge_lora:
        model.peft_config["default"].base_model_name_or_path = base_model
        state = {k: v.to(torch_dtype) if ".lora_" in k else v for k, v in model.state_dict().items()}
        model.save_pretrained(out, state_dict=state)
    else:
        base = unwrapped(model)
        state = merged_state_dict(model) if adapted else base.state_dict()
        if base.config.get_text_config().tie_word_embeddings:
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # the embedding is the LM head
        base.save_pretrained(out, state_dict={k: v.to(torch_dtype).contiguous() for k, v in state.items()})
        config = copy.deepcopy(base.config)
        config.dtype = torch_dtype
        config.save_pretrained(out)
    tokenizer.save_pretrained(out)
