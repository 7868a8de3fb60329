"""The KD decode loop ends each row where the answer ends: EOS, or a newline after its first non-blank token."""

from dataclasses import dataclass
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from cbe.backends.base import NewlineStop
from cbe.backends.kd.generate import decode_ids

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
