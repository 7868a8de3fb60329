"""The reference draw of sampled decoding (cbe.backends.sampling): which tokens temperature, top_k and top_p keep,
with which probabilities (those of transformers' warpers), in which order, and whose uniforms a question takes."""

import numpy as np
import pytest

from cbe.backends.sampling import GREEDY, Sampling, draw


def grid(n: int) -> np.ndarray:
    """n uniforms evenly spread over [0, 1): the share of them that draw a token is its probability, to 1/n."""
    return ((np.arange(n) + 0.5) / n).astype(np.float32)


def frequencies(logits: np.ndarray, sampling: Sampling, n: int = 20_000) -> np.ndarray:
    tokens = draw(np.tile(logits, (n, 1)), grid(n), sampling)
    return np.bincount(tokens, minlength=len(logits)) / n


def transformers_distribution(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
    """The probabilities transformers samples from after its temperature, top-k and top-p warpers (in the order
    `generate` applies them)."""
    import torch
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = torch.from_numpy(logits[None].astype(np.float32))
    warpers = [TemperatureLogitsWarper(sampling.temperature)]
    warpers += [TopKLogitsWarper(sampling.top_k)] if sampling.top_k else []
    warpers += [TopPLogitsWarper(sampling.top_p)] if sampling.top_p < 1 else []
    for warp in warpers:
        scores = warp(None, scores)
    return torch.softmax(scores, -1)[0].numpy()


@pytest.mark.parametrize(
    "sampling",
    [
        Sampling(1.0),
        Sampling(0.5),  # sharper
        Sampling(2.5),  # flatter
        Sampling(1.0, top_k=5),
        Sampling(1.0, top_p=0.6),
        Sampling(0.8, top_k=10, top_p=0.9),  # top-p over the top-k tokens, renormalized
        Sampling(2.0, top_k=3, top_p=0.999),
    ],
    ids=str,
)
def test_draws_follow_the_distribution_transformers_samples_from(sampling):
    logits = np.random.default_rng(0).normal(0, 1.5, 32).astype(np.float32)
    expected = transformers_distribution(logits, sampling)
    seen = frequencies(logits, sampling)
    assert np.abs(seen - expected).max() < 2e-4  # each token 1/20000 of the grid at most off
    assert not seen[expected == 0].any() and seen[expected > 2e-4].all()  # the tokens transformers keeps, only
    kept = (expected > 0).sum()
    filtered = sampling.top_k or sampling.top_p < 1
    assert 1 < kept and (kept < 32) == bool(filtered)  # a case where the filters matter, or every token kept


def test_temperature_moves_probability_towards_or_away_from_the_top_token():
    logits = np.random.default_rng(1).normal(0, 1.0, 32).astype(np.float32)
    top = [frequencies(logits, Sampling(t))[logits.argmax()] for t in (0.3, 1.0, 3.0)]
    assert top[0] > 2 * top[1] > 4 * top[2]


def test_top_k_1_and_a_tiny_top_p_are_greedy_whatever_the_uniform():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 2, (500, 64)).astype(np.float32)
    u = rng.random(500, dtype=np.float32)
    for sampling in (Sampling(1.0, top_k=1), Sampling(3.0, top_p=1e-6), Sampling(0.7, top_k=8, top_p=0.01)):
        assert np.array_equal(draw(logits, u, sampling), logits.argmax(-1)), sampling
    assert not np.array_equal(draw(logits, u, Sampling(1.0, top_k=2)), logits.argmax(-1))


def test_the_uniform_walks_the_tokens_from_the_most_likely_ties_by_lower_id():
    """Inverse CDF over the tokens sorted by probability: tokens 1 and 3 (equal, the most likely) take u in
    [0, 0.366) and [0.366, 0.731), then tokens 0 and 2 share the rest; u near 1 still draws a kept token."""
    logits = np.array([[0.0, 1.0, 0.0, 1.0]], np.float32)
    drawn = [int(draw(logits, np.array([u], np.float32), Sampling(1.0))[0]) for u in (0.0, 0.3, 0.4, 0.8, 0.9)]
    assert drawn == [1, 1, 3, 0, 2]
    last = np.array([np.nextafter(np.float32(1), np.float32(0))])
    assert draw(logits, last, Sampling(1.0))[0] == 2
    assert draw(logits, last, Sampling(1.0, top_k=3))[0] == 0  # the last kept token, never a removed one
    assert draw(np.zeros((1, 6), np.float32), np.array([0.55], np.float32), Sampling(1.0))[0] == 3


def test_a_questions_uniforms_depend_on_the_seed_and_its_index_only():
    s = Sampling(1.0, seed=7)
    table = s.uniforms(range(6), 10)
    assert table.shape == (6, 10) and table.dtype == np.float32 and (0 <= table).all() and (table < 1).all()
    assert np.array_equal(s.uniforms([4, 1], 10), table[[4, 1]])  # a shard's questions: the same rows
    assert np.array_equal(table[3], np.random.default_rng([7, 3]).random(10, dtype=np.float32))
    assert not np.array_equal(Sampling(1.0, seed=8).uniforms(range(6), 10), table)
    assert len({tuple(row) for row in table}) == 6
    assert s.uniforms([], 10).shape == (0, 10)


def test_temperature_zero_is_greedy():
    assert GREEDY.greedy and Sampling(0.0, top_k=5, seed=3).greedy and not Sampling(0.1).greedy
