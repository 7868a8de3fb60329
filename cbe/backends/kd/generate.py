"""Batched decoding for gemma models, greedy or sampled (cbe.backends.sampling), using gemma's KV cache.

Why it is built this way:

* Prompts are left-padded. Every row's last prompt token then sits in the same cache slot, so all rows write the
  same slot at every decode step, which is what gemma's cache requires (one shared `end_index` for the whole batch).
  Positions count from each row's first real token and pad slots are masked out of every attention, so padding
  never changes a row's result.
* The prefill covers all prompt tokens but the last; the decode loop starts by feeding that last token. Every model
  call in the loop then has the same shape, and the prefill's logits go unused, so XLA drops the big unembedding
  ([batch, length, vocab]), no need for gemma's `return_last_only` (which finds the last token by looking for id 0).
* Prefill and the decode loop are one jitted function with a `lax.while_loop` that stops once every row has ended
  (EOS, or a newline after its first non-blank text: cbe.backends.base.NewlineStop). Batches are filled with dummy
  rows to a fixed size and prompt lengths rounded up to a few buckets: a whole eval compiles a couple of programs.
* Sampled decoding draws each token inside the loop (`draw`) with the uniform of its question and answer position,
  from a [batch, max_new_tokens] table passed in with the batch: the same draws as the HF backend's.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from cbe.backends.base import NewlineStop
from cbe.backends.kd.processes import to_host
from cbe.backends.sampling import GREEDY, UNITS, Sampling


def decode_ids(
    model,
    params,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop: NewlineStop,
    eos_id: int,
    pad_id: int,
    batch_size: int,
    sampling: Sampling = GREEDY,
) -> list[list[int]]:
    """Continuation token ids of every prompt (prompt excluded), greedy or sampled, each cut where its answer
    ended; prompt i draws with the uniforms of question i."""
    tables = (stop.newline, stop.ends_alone, stop.blank)  # numpy, as the batches: jit replicates them on every device
    draws = dataclasses.replace(sampling, seed=0)  # what the compiled loop needs: the seed is in the uniforms
    generate = functools.partial(
        _generate_batch, model, params, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id, sampling=draws
    )
    uniforms = np.zeros((len(prompts), max_new_tokens), np.float32)
    if not sampling.greedy:
        uniforms = sampling.uniforms(range(len(prompts)), max_new_tokens)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths together: little padding
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        length = _bucket(max(len(prompts[i]) for i in rows))
        tokens = np.full((batch_size, length), pad_id, np.int32)
        lengths = np.zeros((batch_size,), np.int32)  # dummy rows keep length 0
        batch_uniforms = np.zeros((batch_size, max_new_tokens), np.float32)
        for r, i in enumerate(rows):
            if prompts[i]:
                tokens[r, length - len(prompts[i]) :] = prompts[i]
            lengths[r] = len(prompts[i])
            batch_uniforms[r] = uniforms[i]
        out = to_host(generate(tokens, lengths, tables, batch_uniforms))
        for r, i in enumerate(rows):
            ids = out[r].tolist()
            results[i] = ids[: stop.end(ids, eos_id)]
    return results


def _bucket(length: int) -> int:
    """Next power of two, at least 32: few distinct shapes, at most 2x padding."""
    return max(32, 1 << (length - 1).bit_length())


def draw(logits: jax.Array, u: jax.Array, sampling: Sampling) -> jax.Array:
    """cbe.backends.sampling's draw in JAX: the token ids [rows] that `logits` [rows, vocab] and one uniform each
    (`u`, [rows]) give."""
    x = logits.astype(jnp.float32) / sampling.temperature
    order = jnp.argsort(-x, axis=-1, stable=True)  # highest first, equal values by lower id
    x = jnp.take_along_axis(x, order, axis=-1)
    if sampling.top_k > 0:
        x = x.at[:, sampling.top_k :].set(-jnp.inf)
    e = jnp.exp(x - x[:, :1])  # the softmax as the reference writes it
    units = jnp.floor(e / jnp.sum(e, axis=-1, keepdims=True) * UNITS).astype(jnp.int32)
    if sampling.top_p < 1:  # keep a token while the tokens before it hold less than top_p
        before = jnp.cumsum(units, axis=-1) - units
        total = jnp.sum(units, axis=-1, keepdims=True).astype(jnp.float32)
        units = jnp.where(before.astype(jnp.float32) < sampling.top_p * total, units, 0)
    cdf = jnp.cumsum(units, axis=-1)
    threshold = u[:, None] * cdf[:, -1:].astype(jnp.float32)
    pick = jnp.minimum(jnp.sum(cdf.astype(jnp.float32) <= threshold, axis=-1), jnp.sum(units > 0, axis=-1) - 1)
    return jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_id", "pad_id", "sampling"))
def _generate_batch(model, params, tokens, lengths, tables, uniforms, *, max_new_tokens, eos_id, pad_id, sampling):
    """Token ids [B, max_new_tokens] for left-padded `tokens` [B, L], greedy or drawn with `uniforms`
    [B, max_new_tokens]; rows of length 0 are dummies. `tables` are NewlineStop's (newline, ends_alone, blank) per
    token id."""
    newline, ends_alone, blank = tables
    batch, length = tokens.shape
    prefill = length - 1  # the last prompt token is fed by the first loop step
    cache_length = length + max_new_tokens  # room for every step: the cache never wraps around
    slots = jnp.arange(cache_length)

    # Slot j of row b holds a real token iff j >= first[b]; its position is j - first[b].
    first = length - lengths
    real = slots[None, :] >= first[:, None]  # [B, C]: pad slots are never attended
    positions = jnp.maximum(slots[None, :] - first[:, None], 0)  # pads get 0, masked anyway

    # k/v take the activation dtype, which follows the embedding table (gemma's own sampler makes the same choice);
    # the cache must match it exactly.
    dtype = params["embedder"]["input_embedding"].dtype
    cache = model.init_cache(batch_size=batch, dtype=dtype, cache_length=cache_length)

    # Prefill: each prompt slot sees real slots up to itself. Mask is [B, L-1, C].
    causal = slots[:prefill, None] >= slots[None, :]
    out = model.apply(
        {"params": params},
        tokens[:, :prefill],
        positions=positions[:, :prefill],
        cache=cache,
        attention_mask=real[:, None, :] & causal[None],
    )

    def step(state):
        t, token, cache, ids, done, text_before = state
        slot = prefill + t
        mask = (real & (slots[None, :] <= slot))[:, None, :]  # [B, 1, C]: real slots written so far, this one too
        out = model.apply(
            {"params": params}, token[:, None], positions=(slot - first)[:, None], cache=cache, attention_mask=mask
        )
        logits = out.logits[:, 0]
        nxt = jnp.argmax(logits, axis=-1) if sampling.greedy else draw(logits, uniforms[:, t], sampling)
        nxt = jnp.where(done, pad_id, nxt.astype(jnp.int32))  # finished rows just idle
        ids = ids.at[:, t].set(nxt)
        ended = (nxt == eos_id) | ends_alone[nxt] | (newline[nxt] & text_before)
        return t + 1, nxt, out.cache, ids, done | ended, text_before | ~blank[nxt]

    def keep_going(state):
        t, _, _, _, done, _ = state
        return (t < max_new_tokens) & ~jnp.all(done)

    ids = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    state = (jnp.int32(0), tokens[:, -1], out.cache, ids, lengths == 0, jnp.zeros((batch,), bool))
    return jax.lax.while_loop(keep_going, step, state)[3]
