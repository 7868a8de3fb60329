"""QA answers (greedy, or sampled as cbe.backends.sampling defines) over a static KV cache: the shared few-shot
prefix computed once, and on a GPU each decode step replayed as one CUDA graph (generation is launch-bound: a
decode step of Gemma 3 1B launches about 2,000 small kernels, each costing more to launch than to run).

Why our own loop rather than `model.generate(cache_implementation="static")` with its compiled step: generate cannot
share one prefix among the rows of a left-padded batch, checks its stopping criteria on the host after every token,
and compiling the whole model takes long and again for every new shape. Capturing the eager step as a CUDA graph
costs one step per call, needs no recompiles, and replays exactly the kernels the eager step runs, so the CPU tests
(tests/backends/hf/test_generate_fast.py) check the arithmetic the GPU replays.

Every batch of a call has the same shape, the last one padded with copies of its last question, and this cache
layout (one row per question, every layer alike):

    slot  0 ........ P-1 | P ............ P+Q-1 | P+Q ......... P+Q+N-1
          shared prefix  | question, padded on  | answer (N = max_new_tokens)
          (computed once)| its left             |

Positions run on without a gap (prefix 0..P-1, question P.., answer after it): the positions the eager path gives a
left-padded prompt. Attention is masked by position rather than slot: a key is seen when its position is at most the
query's (and, in a sliding layer, less than a window before it). Padding sits at position 2**30, after every real
token, so no real token sees it, and answer slots not yet written hold positions after the current one.

Answers end where `model.generate` would have ended them (EOS, cbe.backends.base's newline rule, a stop string that
starts a word: `answer_ended`), decided on the host every few steps: the device never waits for a per-token check.

Sampled answers draw each token on the device (`draw`) with the uniform of its question and answer position, which
sit in a device tensor for the whole batch before its first step: the graph's step reads its column by the step
counter, without a host sync.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StopStringCriteria

from cbe.backends.base import NewlineStop
from cbe.backends.sampling import GREEDY, UNITS, Sampling
from cbe.eval.parse import marker_at_word_start
from cbe.ranks import is_main_process

PAD_POSITION = 1 << 30  # after every real position: causality hides padding from real tokens
CHECK_EVERY = 8  # decode steps between the host's looks at which answers have ended


def shared_prefix_length(ids: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every prompt shares, leaving each at least one token of its own (whose logits give
    the first answer token)."""
    shortest = min(len(row) for row in ids)
    first = np.array(ids[0][:shortest])
    length = shortest - 1
    for row in ids[1:]:
        differ = np.flatnonzero(np.array(row[:length]) != first[:length])
        length = int(differ[0]) if len(differ) else length
    return max(0, length)


def attention_masks(key_positions: torch.Tensor, query_positions: torch.Tensor, config) -> dict[str, torch.Tensor]:
    """Per layer type, [rows, 1, queries, slots]: True where a query sees a key, decided by their positions."""
    keys, queries = key_positions[:, None, None, :], query_positions[:, None, :, None]
    seen = keys <= queries
    masks = {}
    for kind in set(config.layer_types):
        if kind == "full_attention":
            masks[kind] = seen
        elif kind == "sliding_attention":
            masks[kind] = seen & (queries - keys < config.sliding_window)
        else:
            raise NotImplementedError(f"no attention mask for {kind} layers in cbe.backends.hf.generate")
    return masks


@contextlib.contextmanager
def sdpa_attention(model: torch.nn.Module):
    """Run the model's attention through sdpa, which takes our boolean masks (training may use flex or varlen)."""
    config = model.config.get_text_config()
    before = config._attn_implementation
    config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        config._attn_implementation = before


def draw(logits: torch.Tensor, u: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """cbe.backends.sampling's draw in torch, on the device and without a host sync (a CUDA graph captures it): the
    token ids [rows, 1] that `logits` [rows, vocab] and one uniform each (`u`, [rows]) give."""
    x, order = torch.sort(logits.float() / sampling.temperature, dim=-1, descending=True, stable=True)
    if sampling.top_k > 0:
        x[:, sampling.top_k :] = -torch.inf
    e = torch.exp(x - x[:, :1])  # the softmax as the reference writes it (torch.softmax rounds differently)
    units = (e / e.sum(-1, keepdim=True) * UNITS).floor().long()
    if sampling.top_p < 1:  # keep a token while the tokens before it hold less than top_p
        before = units.cumsum(-1) - units
        units = units.masked_fill(before.float() >= sampling.top_p * units.sum(-1, keepdim=True).float(), 0)
    cdf = units.cumsum(-1)
    threshold = u[:, None] * cdf[:, -1:].float()
    pick = torch.minimum((cdf.float() <= threshold).sum(-1, keepdim=True), (units > 0).sum(-1, keepdim=True) - 1)
    return order.gather(-1, pick)


def next_tokens(logits: torch.Tensor, u: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Each row's next token [rows, 1]: greedy (argmax) at temperature 0, else drawn with its uniform."""
    return logits.argmax(-1, keepdim=True) if sampling.greedy else draw(logits, u, sampling)


class SlotCache:
    """Every layer's keys and values in fixed [rows, kv heads, slots, head dim] buffers (transformers' cache
    interface, `update`): a forward writes its tokens' keys and values at `slots`."""

    def __init__(self, config, rows: int, slots: int, dtype: torch.dtype, device: torch.device):
        shape = (rows, config.num_key_value_heads, slots, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.slots = torch.zeros(1, dtype=torch.long, device=device)

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.slots, keys)
        self.values[layer_idx].index_copy_(2, self.slots, values)
        return self.keys[layer_idx], self.values[layer_idx]


class AnswerEnds:
    """Where each answer ends, as cbe.backends.base.answer_ended says: at EOS, at a newline after the answer's first
    non-blank text (NewlineStop), or at a stop string that starts a word. Transformers' StopStringCriteria finds the
    tokens where a stop string ends (reused, not re-derived: a stop string may end inside a token), wherever it is
    ("FAQ:" too); the answer's text up to such a token, decoded for those rows alone, says whether one starts a
    word there."""

    def __init__(self, tokenizer, stop_strings: Sequence[str], newline_stop: NewlineStop):
        self.eos, self.newline, self.tokenizer = tokenizer.eos_token_id, newline_stop, tokenizer
        self.strings = StopStringCriteria(tokenizer, list(stop_strings)) if stop_strings else None
        self.markers = marker_at_word_start(stop_strings)
        self.context = self.strings.maximum_token_len if self.strings else 1  # prompt tokens a match may span

    def __call__(self, prompt_tails: np.ndarray, generated: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row, how many generated tokens the answer keeps, and whether it ended; `prompt_tails` are each
        prompt's last `context` tokens."""
        text = ~self.newline.blank[generated]
        text_before = (np.cumsum(text, 1) - text) > 0
        stop = self.newline.ends_alone[generated] | (self.newline.newline[generated] & text_before)
        if self.eos is not None:
            stop |= generated == self.eos
        if self.strings is not None:  # one window per generated token: it and the `context - 1` tokens before it
            windows = sliding_window_view(np.concatenate([prompt_tails, generated], 1), self.context, axis=1)[:, 1:]
            matched = self.strings(torch.from_numpy(windows.reshape(-1, self.context).astype(np.int64)), None)
            candidates = matched.numpy().reshape(generated.shape) & (np.cumsum(stop, 1) == 0)  # before other ends
            stop |= self.word_starts(generated, candidates)
        ended = stop.any(1)
        return np.where(ended, stop.argmax(1) + 1, generated.shape[1]), ended

    def word_starts(self, generated: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Per row, the first candidate token up to which the answer's text holds a stop string that starts a word."""
        found = np.zeros_like(candidates)
        for row in np.flatnonzero(candidates.any(1)):
            for t in np.flatnonzero(candidates[row]):
                if self.markers.search(self.tokenizer.decode(generated[row, : t + 1], skip_special_tokens=True)):
                    found[row, t] = True
                    break
        return found


class StaticDecoder:
    """One call's decoding state at fixed addresses (the cache, the step's inputs and outputs), so that a CUDA graph
    of the decode step can replay it; every batch of the call reuses it."""

    def __init__(
        self,
        model,
        rows: int,
        prefix: Sequence[int],
        question_slots: int,
        max_new_tokens: int,
        graph: bool,
        sampling: Sampling = GREEDY,
    ):
        self.model, self.config, self.sampling = model, model.config.get_text_config(), sampling
        embeddings = model.get_input_embeddings().weight
        self.device, self.dtype = embeddings.device, embeddings.dtype
        self.prefix_length, self.max_new_tokens, self.use_graph = len(prefix), max_new_tokens, graph
        self.answer_slot = len(prefix) + question_slots  # where the first answer token's keys go
        slots = self.answer_slot + max_new_tokens
        self.cache = SlotCache(self.config, rows, slots, self.dtype, self.device)
        long = {"dtype": torch.long, "device": self.device}
        self.key_positions = torch.full((rows, slots), PAD_POSITION, **long)
        self.key_positions[:, : len(prefix)] = torch.arange(len(prefix), **long)
        self.tokens = torch.zeros(rows, 1, **long)  # the step's input: each row's latest token...
        self.positions = torch.zeros(rows, 1, **long)  # ...its position...
        self.decode_slot = torch.zeros(1, **long)  # ...and its slot
        self.step = torch.zeros(1, **long)
        self.answer = torch.zeros(rows, max_new_tokens, **long)
        self.uniforms = torch.zeros(rows, max_new_tokens, dtype=torch.float32, device=self.device)  # sampled only
        self.graph = None
        if prefix:
            self.prefill_prefix(prefix)

    def forward(self, cache: SlotCache, ids: torch.Tensor, positions: torch.Tensor, key_positions: torch.Tensor):
        """The next-token logits after the last of `ids`, their keys written at `cache.slots`."""
        masks = attention_masks(key_positions, positions, self.config)
        out = self.model(
            input_ids=ids, position_ids=positions, attention_mask=masks, cache=cache, use_cache=True, logits_to_keep=1
        )
        return out.logits[:, -1]

    def prefill_prefix(self, prefix: Sequence[int]) -> None:
        """The prefix's keys and values, computed once for one row and copied into every row."""
        alone = SlotCache(self.config, 1, len(prefix), self.dtype, self.device)
        alone.slots = torch.arange(len(prefix), device=self.device)
        self.forward(alone, torch.tensor([list(prefix)], device=self.device), alone.slots[None], alone.slots[None])
        for mine, its in zip(self.cache.keys + self.cache.values, alone.keys + alone.values):
            mine[:, :, : len(prefix)] = its

    def prefill_questions(self, questions: Sequence[Sequence[int]], pad_id: int) -> None:
        """Each row's question after the prefix (left-padded up to the longest of the batch) and the first answer
        token; sets the decode state at that token."""
        width, p = max(len(q) for q in questions), self.prefix_length
        ids = np.full((len(questions), width), pad_id, dtype=np.int64)
        positions = np.full((len(questions), width), PAD_POSITION, dtype=np.int64)
        for row, question in enumerate(questions):
            ids[row, width - len(question) :] = question
            positions[row, width - len(question) :] = p + np.arange(len(question))
        positions = torch.from_numpy(positions).to(self.device)
        lengths = torch.tensor([len(q) for q in questions], device=self.device)[:, None]
        self.key_positions[:, p : self.answer_slot] = PAD_POSITION  # earlier batches' longer questions
        self.key_positions[:, self.answer_slot - width : self.answer_slot] = positions
        self.key_positions[:, self.answer_slot :] = p + lengths + torch.arange(self.max_new_tokens, device=self.device)
        self.cache.slots = torch.arange(self.answer_slot - width, self.answer_slot, device=self.device)
        logits = self.forward(self.cache, torch.from_numpy(ids).to(self.device), positions, self.key_positions)
        self.tokens.copy_(next_tokens(logits, self.uniforms[:, 0], self.sampling))
        self.answer[:, :1] = self.tokens
        self.positions.copy_(p + lengths)
        self.cache.slots = self.decode_slot
        self.decode_slot.fill_(self.answer_slot)
        self.step.fill_(1)

    def decode_step(self) -> None:
        """Feed every row's latest token, write its keys, and make its successor (greedy or drawn with the uniform
        of this answer position) the next input."""
        logits = self.forward(self.cache, self.tokens, self.positions, self.key_positions)
        u = self.uniforms.index_select(1, self.step)[:, 0]
        self.tokens.copy_(next_tokens(logits, u, self.sampling))
        self.answer.index_copy_(1, self.step, self.tokens)
        for counter in (self.positions, self.decode_slot, self.step):
            counter.add_(1)

    def capture(self) -> torch.cuda.CUDAGraph:
        """One decode step recorded as a CUDA graph (after one eager warm-up step, then the state put back)."""
        state = (self.tokens, self.positions, self.decode_slot, self.step, self.answer)
        saved = [t.clone() for t in state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # cuBLAS handles and workspaces are made outside the capture
            self.decode_step()
        torch.cuda.current_stream().wait_stream(side)
        for tensor, value in zip(state, saved):
            tensor.copy_(value)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.decode_step()
        return graph

    def answers(
        self, questions: Sequence[Sequence[int]], pad_id: int, ends, uniforms: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Answer tokens of one batch ([rows, n <= max_new_tokens]) and how many of each to keep; `ends` says which
        answers have ended, so decoding stops once all have. `uniforms` [rows, max_new_tokens]: each row's draws
        (sampled decoding)."""
        if uniforms is not None:
            self.uniforms.copy_(torch.from_numpy(uniforms))
        self.prefill_questions(questions, pad_id)
        n = 1
        while n < self.max_new_tokens:
            if n % CHECK_EVERY == 0 and ends(self.answer[:, :n].cpu().numpy())[1].all():
                break
            if self.use_graph:
                if self.graph is None:
                    self.graph = self.capture()
                self.graph.replay()
            else:
                self.decode_step()
            n += 1
        generated = self.answer[:, :n].cpu().numpy()
        return generated, ends(generated)[0]


@torch.no_grad()
def decode_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    stop_strings: Sequence[str],
    newline_stop: NewlineStop,
    sampling: Sampling = GREEDY,
    question_ids: Sequence[int] | None = None,
    cuda_graph: bool | None = None,
) -> list[str]:
    """Answers, prompt excluded, ended where `model.generate` ends them with EOS, the stop strings and the newline
    rule as stopping criteria (greedy: identical to its answers); batches of `batch_size` (or of all prompts, when
    fewer). Sampled answers draw with the uniforms of `question_ids` (each prompt's index among all questions;
    default: its index here). `cuda_graph` (default: on a GPU) replays the decode step as a CUDA graph."""
    if not prompts:
        return []
    question_ids = range(len(prompts)) if question_ids is None else question_ids
    uniforms = None if sampling.greedy else sampling.uniforms(question_ids, max_new_tokens)
    ids = tokenizer(list(prompts))["input_ids"]
    prefix = shared_prefix_length(ids)
    questions = [row[prefix:] for row in ids]
    rows = min(batch_size, len(prompts))  # one shape per call: the CUDA graph is captured once per call
    graph = model.get_input_embeddings().weight.device.type == "cuda" if cuda_graph is None else cuda_graph
    ends = AnswerEnds(tokenizer, stop_strings, newline_stop)
    pad = tokenizer.pad_token_id
    tails = np.array([([pad] * ends.context + row)[-ends.context :] for row in ids])
    answers = [""] * len(prompts)
    with sdpa_attention(model):
        slots = -(-(prefix + max(map(len, questions)) + max_new_tokens) // 16) * 16  # aligned rows for sdpa's kernels
        question_slots = slots - prefix - max_new_tokens
        decoder = StaticDecoder(model, rows, ids[0][:prefix], question_slots, max_new_tokens, graph, sampling)
        order = sorted(range(len(prompts)), key=lambda i: len(questions[i]))
        quiet = None if is_main_process() else True  # None: shown where there is a terminal
        bar = tqdm(total=len(prompts), desc="generating", unit="question", leave=False, disable=quiet)
        for start in range(0, len(order), rows):
            batch = order[start : start + rows]
            batch += [batch[-1]] * (rows - len(batch))  # the last batch keeps the shape, so the graph fits it
            draws = None if uniforms is None else uniforms[batch]
            generated, kept = decoder.answers(
                [questions[i] for i in batch], pad, lambda g: ends(tails[batch], g), draws
            )
            for i, tokens, n in zip(batch, generated, kept):
                answers[i] = tokenizer.decode(tokens[:n], skip_special_tokens=True)
            bar.update(min(rows, len(order) - start))
        bar.close()
    return answers


class NewlineStopCriteria(StoppingCriteria):
    """For HF `generate` (the reference this decoder is tested and timed against): ends a row at a newline after its
    first non-blank generated text, checked on the device from NewlineStop."""

    def __init__(self, stop: NewlineStop, prompt_length: int, device: torch.device):
        self.prompt_length = prompt_length
        self.newline, self.ends_alone, self.blank = (
            torch.from_numpy(a).to(device) for a in (stop.newline, stop.ends_alone, stop.blank)
        )

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        generated = input_ids[:, self.prompt_length :]
        text = (~self.blank[generated]).int()
        text_before = (text.cumsum(1) - text) > 0  # some earlier generated token was not blank
        return (self.ends_alone[generated] | (self.newline[generated] & text_before)).any(1)
