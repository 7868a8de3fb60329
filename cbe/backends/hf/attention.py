"""Packed-row attention through torch's variable-length flash kernel, registered with transformers as `varlen`.

A packed row holds several documents. With sdpa, transformers keeps them apart with a block-diagonal [T, T] mask,
which costs sdpa its flash kernel: every masked tile is computed, the sliding-window layers' included. Here the
documents' boundaries travel instead as cumulative lengths over the micro-batch's rows laid end to end
(`cu_seq_lens_q`, computed on the host by `varlen_inputs`), and each layer calls
`torch.nn.attention.varlen.varlen_attn`, which attends within each document only: causally, and within the layer's
sliding window where it has one. No mask is built at all.

Without boundaries (generation: left padding and a KV cache) the same name runs transformers' sdpa with its usual
mask, so a model loaded with `varlen` generates exactly as with sdpa. On a CPU, which has no flash kernel,
`reference_varlen_attn` (sdpa one document at a time) computes the same thing: the tests' reference. On a GPU the
kernel is called directly: if it breaks, the run fails rather than quietly taking another path.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from cbe.errors import UserError

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.10: only the CPU reference below
    varlen_attn = None

VARLEN = "varlen"


def attention_implementation(setting: str) -> str:
    """The transformers attention implementation for backend.trainer.attn_implementation: `auto` is varlen on a GPU
    whose torch has the kernel, sdpa elsewhere; `varlen` is registered with transformers before it is named."""
    if setting == "auto":
        setting = VARLEN if flash_varlen_available() else "sdpa"
    if setting == VARLEN:
        if torch.cuda.is_available() and not flash_varlen_available():
            raise UserError(
                f"backend.trainer.attn_implementation=varlen needs torch >= 2.11 (varlen_attn with window_size) and "
                f"an sm80+ GPU; this is torch {torch.__version__}: use sdpa"
            )
        AttentionInterface.register(VARLEN, varlen_attention)
        AttentionMaskInterface.register(VARLEN, sdpa_mask)  # generation's padding masks, as sdpa builds them
    return setting


def flash_varlen_available() -> bool:
    """Whether this machine has a GPU that runs flash attention and a torch whose varlen_attn takes a window."""
    if varlen_attn is None or not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        return False
    return "window_size" in inspect.signature(varlen_attn).parameters


def documents_per_row(position_ids: np.ndarray) -> int:
    """The most documents any row holds (a document starts where its position id is 0; a row's end padding counts
    as one)."""
    return int((position_ids == 0).sum(1).max())


def varlen_inputs(position_ids: np.ndarray, capacity: int, layer_types, device: torch.device) -> dict:
    """The model inputs that make `varlen` attend within documents: the cumulative lengths of the documents of
    `position_ids`' rows laid end to end, padded with empty documents to `capacity` documents, so that compiled
    layers see one shape (no recompiling per batch) and read no value on the host (no sync); the row length as
    the longest document; and a ready (empty) mask for every layer type, so that transformers builds none."""
    if (position_ids[:, 0] != 0).any():
        raise ValueError("every packed row must start a document (position id 0)")
    flat = position_ids.reshape(-1)
    starts = np.flatnonzero(flat == 0)
    if len(starts) > capacity:
        raise ValueError(f"{len(starts)} documents in rows sized for {capacity}")
    cumulative = np.full(capacity + 1, flat.size, dtype=np.int32)
    cumulative[: len(starts)] = starts
    boundaries = torch.from_numpy(cumulative).to(device)
    length = position_ids.shape[1]
    return {
        "cu_seq_lens_q": boundaries,
        "cu_seq_lens_k": boundaries,
        "max_length_q": length,
        "max_length_k": length,
        "attention_mask": {kind: None for kind in set(layer_types)},
    }


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query [batch, heads, T, D], key and value [batch, kv heads, T, D];
    returns [batch, T, heads, D]. `scaling` is the model's (Gemma 3: query_pre_attn_scalar^-0.5)."""
    boundaries = kwargs.get("cu_seq_lens_q")
    if boundaries is None:  # generation, or rows without boundaries: sdpa with the mask transformers built
        kwargs |= {"dropout": dropout, "scaling": scaling, "sliding_window": sliding_window}
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None or dropout or not getattr(module, "is_causal", True):
        raise ValueError("varlen attention is causal within the documents of cu_seq_lens_q: no mask, no dropout")
    batch, heads, length, _ = query.shape
    groups = heads // key.shape[1]  # torch 2.11's kernel has no grouped K/V heads: each serves `groups` query heads
    # [batch, heads, T, D] -> [batch x T, heads, D]
    q, k, v = (x.transpose(1, 2).reshape(batch * length, x.shape[1], x.shape[3]) for x in (query, key, value))
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    # transformers' sliding window lets a query see itself and the W - 1 tokens before it: left = W - 1. A tuple:
    # varlen_attn tests `window_size == (-1, 0)` for plain causal attention.
    window = (-1, 0) if sliding_window is None else (sliding_window - 1, 0)
    attend = varlen_attn if q.is_cuda else reference_varlen_attn
    longest_q, longest_k = kwargs["max_length_q"], kwargs["max_length_k"]
    out = attend(q, k, v, boundaries, boundaries, longest_q, longest_k, scale=scaling, window_size=window)
    return out.view(batch, length, heads, out.shape[-1]), None


def reference_varlen_attn(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    max_q: int,
    max_k: int,
    *,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
) -> torch.Tensor:
    """varlen_attn's semantics with sdpa, one document at a time: query i of a document sees key j of it where
    -right <= i - j <= left (a negative bound is none). Slow, and on any device: the CPU's stand-in."""
    left, right = window_size
    bounds = cu_seq_q.tolist()
    if bounds != cu_seq_k.tolist() or bounds[-1] != query.shape[0]:
        raise ValueError("reference_varlen_attn takes the same documents for queries and keys, covering every token")
    pieces = []
    for start, end in zip(bounds, bounds[1:]):
        if end == start:  # the empty documents that pad the boundaries to a fixed length
            continue
        position = torch.arange(end - start, device=query.device)
        distance = position[:, None] - position[None, :]
        allowed = distance >= -right if right >= 0 else torch.ones_like(distance, dtype=torch.bool)
        if left >= 0:
            allowed &= distance <= left
        q, k, v = (x[start:end].transpose(0, 1) for x in (query, key, value))  # [heads, length, D]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
        pieces.append(out.transpose(0, 1))
    return torch.cat(pieces)
