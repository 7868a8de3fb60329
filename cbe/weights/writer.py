"""Write HF checkpoints with neither torch nor jax (the inverse of cbe.weights.reader): numpy weights as safetensors,
sharded as the hub shards them, and a LoRA as a PEFT adapter. What the KD backend exports (`cbe export`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np

SHARD_BYTES = 5 * 2**30  # transformers' and the hub's usual shard size
DTYPES = {"fp32": ("F32", "float32"), "bf16": ("BF16", "bfloat16")}  # --dtype -> (safetensors', the HF config's)


def _encoded(array: np.ndarray, dtype: str) -> np.ndarray:
    """The array's bytes as safetensors stores `dtype`, little-endian: bf16 is a float32's top 16 bits, rounded to the
    nearest even (numpy has no bf16)."""
    x = np.ascontiguousarray(array, np.float32)
    if dtype == "fp32":
        return x.astype("<f4")
    bits = x.view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")


def write_safetensors(file: Path, tensors: Mapping[str, np.ndarray], dtype: str) -> None:
    """One safetensors file: an 8-byte little-endian header size, a JSON header (dtype, shape, data offsets; padded
    to 8 bytes), the tensors' bytes."""
    encoded = {name: _encoded(array, dtype) for name, array in tensors.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, data in encoded.items():
        header[name] = {
            "dtype": DTYPES[dtype][0],
            "shape": list(data.shape),
            "data_offsets": [offset, offset + data.nbytes],
        }
        offset += data.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(file, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for data in encoded.values():
            f.write(data.tobytes())


def write_weights(out: Path, tensors: Mapping[str, np.ndarray], dtype: str, name: str = "model") -> None:
    """`name`.safetensors, or shards of SHARD_BYTES and their index (`name`.safetensors.index.json) where larger."""
    itemsize = 4 if dtype == "fp32" else 2
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, array in tensors.items():
        if shards[-1] and size + array.size * itemsize > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = array
        size += array.size * itemsize
    if len(shards) == 1:
        write_safetensors(out / f"{name}.safetensors", shards[0], dtype)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"{name}-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / file, shard, dtype)
        weight_map |= dict.fromkeys(shard, file)
    total = sum(array.size * itemsize for array in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / f"{name}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_model(out: Path, state_dict: Mapping[str, np.ndarray], config, dtype: str) -> None:
    """An HF model dir's weights and config.json (`config`: a transformers config, which needs no torch), in
    `dtype`; the class that reads it is the causal LM of its model_type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = config.__class__.from_dict(config.to_dict())  # a copy: the caller's stays as it is
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.dtype = DTYPES[dtype][1]
    config.save_pretrained(out)
    write_weights(out, state_dict, dtype)


def write_peft_adapter(
    out: Path, adapters: Mapping[str, tuple[np.ndarray, np.ndarray]], base_model: str, dtype: str
) -> None:
    """A PEFT LoRA adapter dir from (A [rank, in], B [out, rank]) per module (model.layers.<i>.<name>), at scale 1
    (lora_alpha = rank), for the base model named `base_model` (PeftModel.from_pretrained reads it)."""
    tensors = {}
    for module, (A, B) in adapters.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = A
        tensors[f"base_model.model.{module}.lora_B.weight"] = B
    rank = next(iter(adapters.values()))[0].shape[0]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted({module.rsplit(".", 1)[1] for module in adapters}),
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(out / "adapter_model.safetensors", tensors, dtype)
