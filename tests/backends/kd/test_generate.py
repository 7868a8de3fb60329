"""The KD decode loop ends each row where the answer ends: EOS, or a newline after its first non-blank token; sampled,
it draws each row's tokens as the reference draw does (cbe.backends.sampling), with its own question's uniforms."""

from dataclasses import dataclass
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbe.backends.base import NewlineStop
from cbe.backends.kd.generate import decode_ids
from cbe.backends.kd.generate import draw as jax_draw
from cbe.backends.sampling import Sampling, draw

pytestmark = pytest.mark.kd

# Token ids of a five-word vocabulary: 0 pad, 1 EOS, 2 "\n", 3 " Paris", 4 " Rome".
STOP = NewlineStop(
    newline=np.array([False, False, True, False, False]),
    ends_alone=np.array([False, False, False, False, False]),
    blank=np.array([True, True, True, False, False]),
)
VOCAB = 5


@dataclass(frozen=True)
class ScriptedModel:
    """A stand-in for gemma's transformer that emits a fixed script per row: the loop, not the model, is tested.
    Row b's next token after position p is script[b][p - prompt_length + 1]."""

    script: tuple[tuple[int, ...], ...]
    prompt_length: int

    def init_cache(self, batch_size, dtype, cache_length):
        return {"calls": jnp.zeros((), jnp.int32)}

    def apply(self, variables, tokens, positions, cache, attention_mask):
        table = jnp.asarray(self.script)  # [B, T]
        step = jnp.clip(positions[:, -1] - self.prompt_length + 1, 0, table.shape[1] - 1)
        next_ids = table[jnp.arange(table.shape[0]), step]
        logits = jax.nn.one_hot(next_ids, VOCAB)[:, None, :].repeat(tokens.shape[1], axis=1)
        return SimpleNamespace(logits=logits, cache={"calls": cache["calls"] + 1})


def test_leading_newlines_do_not_end_the_answer():
    script = (
        (2, 2, 3, 2, 4, 4),  # "\n\n Paris\n" then more
        (3, 1, 4, 4, 4, 4),  # " Paris" EOS
        (2, 2, 2, 2, 2, 2),
    )  # only newlines: never ends early, stops at max_new_tokens
    params = {"embedder": {"input_embedding": jnp.zeros((VOCAB, 2), jnp.float32)}}
    prompts = [[3, 4, 3]] * 3
    out = decode_ids(
        ScriptedModel(script, 3), params, prompts, max_new_tokens=6, stop=STOP, eos_id=1, pad_id=0, batch_size=3
    )
    assert out == [[2, 2, 3, 2], [3, 1], [2, 2, 2, 2, 2, 2]]


FLAT_VOCAB = 64  # STOP's five tokens and plain words
FLAT_STOP = NewlineStop(
    *(np.pad(table, (0, FLAT_VOCAB - VOCAB)) for table in (STOP.newline, STOP.ends_alone, STOP.blank))
)


@dataclass(frozen=True)
class FlatModel:
    """Every token equally likely at every step: a sampled token is then the reference draw from flat logits with
    that step's uniform, so each row shows which uniforms it was given."""

    def init_cache(self, batch_size, dtype, cache_length):
        return {}

    def apply(self, variables, tokens, positions, cache, attention_mask):
        return SimpleNamespace(logits=jnp.zeros((*tokens.shape, FLAT_VOCAB)), cache=cache)


def test_each_prompt_draws_with_its_own_questions_uniforms_in_any_batch():
    prompts = [[3] * n for n in (5, 2, 9, 3, 4)]  # sorted by length into batches of 2, the last with a dummy row
    sampling = Sampling(1.0, seed=4)
    params = {"embedder": {"input_embedding": jnp.zeros((VOCAB, 2), jnp.float32)}}

    def decode(batch_size: int) -> list[list[int]]:
        return decode_ids(
            FlatModel(),
            params,
            prompts,
            max_new_tokens=6,
            stop=FLAT_STOP,
            eos_id=1,
            pad_id=0,
            batch_size=batch_size,
            sampling=sampling,
        )

    out = decode(2)
    uniforms = sampling.uniforms(range(len(prompts)), 6)
    expected = [draw(np.zeros((6, FLAT_VOCAB), np.float32), row, sampling).tolist() for row in uniforms]
    assert out == [ids[: FLAT_STOP.end(ids, 1)] for ids in expected]
    assert len({tuple(ids) for ids in out}) == len(out)
    assert decode(3) == out  # other batches, the same draws


@pytest.mark.parametrize(
    "sampling",
    [Sampling(1.0), Sampling(0.6, top_k=7), Sampling(1.7, top_p=0.8), Sampling(2.0, top_k=50, top_p=0.5)],
    ids=str,
)
def test_the_jax_draw_is_the_reference_draw(sampling):
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, (2000, 1024)).astype(np.float32)
    logits[1000:] = np.round(logits[1000:])  # many equal logits: ties go to the lower id
    u = rng.random(2000, dtype=np.float32)
    drawn = jax.jit(jax_draw, static_argnums=2)(logits, u, sampling)
    assert np.array_equal(np.asarray(drawn), draw(logits, u, sampling))
