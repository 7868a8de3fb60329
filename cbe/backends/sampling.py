"""Sampled decoding (eval.temperature, top_k, top_p, seed): the one definition of how an answer token is drawn,
which the HF decoder (torch, cbe.backends.hf.generate), the KD decoder (JAX, cbe.backends.kd.generate) and this
module's numpy reference (`draw`) all follow, so that the same logits and the same seed give the same token on
either backend, in any batch and on any rank.

A draw takes a row's next-token logits and one uniform number u in [0, 1):

1. the logits / temperature (float32), sorted by value, highest first (equal values: the lower token id first);
2. top_k > 0: only the first top_k are kept;
3. top_p < 1: of the kept tokens, by their probability (softmax over the kept ones), the smallest leading set whose
   cumulative probability reaches top_p (transformers' TopPLogitsWarper; the first token is always kept);
4. the token is the first whose cumulative probability, renormalized over the kept tokens, exceeds u.

The probabilities are counted in whole units of 2**-30 (floor), so that every cumulative sum is an exact integer:
a float32 running sum over a vocabulary drifts (by about 1e-5 over 1,024 tokens, far more over 262,144), differently
on each framework and device, which would make the backends draw different tokens for many u; what is left to differ
is the last bit of exp and of the softmax's sum, which flips a draw rarely (never in the tests' 1,024-token draws;
about 1 in 1,000 draws from a flat distribution over 32,768 tokens). Step 4 compares cdf > u x total in float32
(past the last kept token by rounding: the last one with a unit above 0); a token below 2**-30 is never drawn.

Question i's t-th answer token takes `Sampling.uniforms(...)[i, t]`, from np.random.default_rng([seed, i]), i being
the question's index in the list given to `generate` (its global index under torchrun): batching, sorting by length
and sharding do not change a question's draws. temperature 0 is greedy decoding (argmax), and draws nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Sampling:
    """How answer tokens are chosen: greedy (temperature 0) or drawn as this module says."""

    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: every token
    top_p: float = 1.0  # 1: every token
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def uniforms(self, questions: Sequence[int], tokens: int) -> np.ndarray:
        """[len(questions), tokens] float32 in [0, 1): the u of each answer token of these questions (by index)."""
        rows = [np.random.default_rng([self.seed, int(i)]).random(tokens, dtype=np.float32) for i in questions]
        return np.array(rows, np.float32).reshape(len(rows), tokens)


GREEDY = Sampling()
UNITS = 2**30  # probability units per 1 (the cumulative sums stay below 2**31)


def draw(logits: np.ndarray, u: np.ndarray, sampling: Sampling) -> np.ndarray:
    """The reference draw in numpy: the token ids [rows] that `logits` [rows, vocab] and one uniform each (`u`,
    [rows]) give. The torch and JAX decoders do these same steps on the device."""
    x = np.asarray(logits, np.float32) / np.float32(sampling.temperature)
    order = np.argsort(-x, axis=-1, kind="stable")  # highest first, equal values by lower id
    x = np.take_along_axis(x, order, -1)
    if sampling.top_k > 0:
        x[:, sampling.top_k :] = -np.inf
    e = np.exp(x - x[:, :1])  # x[:, 0] is the maximum
    units = np.floor(e / e.sum(-1, keepdims=True) * np.float32(UNITS)).astype(np.int64)
    if sampling.top_p < 1:  # keep a token while the tokens before it hold less than top_p
        before = np.cumsum(units, -1) - units
        total = units.sum(-1, keepdims=True).astype(np.float32)
        units = np.where(before.astype(np.float32) < np.float32(sampling.top_p) * total, units, 0)
    cdf = np.cumsum(units, -1)
    threshold = np.asarray(u, np.float32)[:, None] * cdf[:, -1:].astype(np.float32)
    pick = np.minimum((cdf.astype(np.float32) <= threshold).sum(-1), (units > 0).sum(-1) - 1)
    return np.take_along_axis(order, pick[:, None], -1)[:, 0]
