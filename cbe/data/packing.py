"""Tokenize a corpus once (cached on disk) and lay it out as training rows, in one of two layouts (data.packing).
Every document becomes [BOS] text [EOS].

- Packed (`pack_documents`, data.packing=true): documents longer than a row are cut into row-sized chunks that
  overlap by one token, so the first token of a continuation is context and every token after a BOS is a training
  target exactly once; nothing is truncated away. Chunks are packed best-fit-decreasing, so short documents stay
  whole, and an optimizer step's rows hold as many tokens as fit.
- One document per row (`document_rows`, data.packing=false, the benchmark's layout): a document longer than a row
  is cut to the row with its EOS kept as the last token, the rest dropped; an optimizer step's rows are exactly
  `training.effective_batch_size` documents.

Each row carries position ids that restart at every chunk: the backend turns them into a block-diagonal mask, so
attention never crosses documents. Padding (only at row ends) and the first token of each chunk have label -100 and
are never trained on. With one document per row the padding is storage only: `back_to_back` lays a micro-batch's
real tokens end to end, so no step computes it.
"""

from __future__ import annotations

import bisect
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cbe.data.jsonl import load_corpus
from cbe.errors import UserError
from cbe.run import write_atomic

IGNORE = -100  # the label of a position that is not trained on


@dataclass
class PackedRows:
    """Training rows, all of one length: token ids, per-document position ids, and labels."""

    input_ids: np.ndarray  # [rows, length] int32
    position_ids: np.ndarray  # [rows, length] int32, restarting at 0 at every chunk
    labels: np.ndarray  # [rows, length] int32, IGNORE at padding and at each chunk's first token
    lengths: np.ndarray  # [rows] the tokens of each row that are not padding (padding only follows them)
    one_document_per_row: bool = False  # the benchmark's layout (document_rows); else packed (pack_documents)
    cut_tokens: int = 0  # tokens that document_rows cut off long documents

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def real_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def trained_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    @property
    def padding_fraction(self) -> float:
        return 1.0 - float(self.real_tokens) / max(1, self.input_ids.size)

    @classmethod
    def concatenate(cls, parts: list["PackedRows"]) -> "PackedRows":
        """Rows of several corpora end to end (a continual run's stages)."""
        if len(parts) == 1:
            return parts[0]
        arrays = (np.concatenate([getattr(p, a) for p in parts]) for a in ("input_ids", "position_ids", "labels"))
        return cls(*arrays, np.concatenate([p.lengths for p in parts]), parts[0].one_document_per_row)

    def describe(self, name: str) -> str:
        """The run log's line on this corpus: its layout, its size and, one document per row, what was cut."""
        length = self.input_ids.shape[1]
        if not self.one_document_per_row:
            return (
                f"{name}: {len(self)} packed rows of {length} tokens, {self.real_tokens:,} tokens per "
                f"epoch ({self.trained_tokens:,} trained), padding {self.padding_fraction:.1%}"
            )
        cut = int((self.lengths == length).sum())  # a row filled to the end may have been cut
        return (
            f"{name}: {len(self)} documents, one per example (data.packing=false), {self.real_tokens:,} tokens per "
            f"epoch ({self.trained_tokens:,} trained); {_count(cut, 'document')} at the {length}-token limit, "
            f"{self.cut_tokens:,} tokens ({self.cut_tokens / max(1, self.real_tokens + self.cut_tokens):.1%}) cut off"
        )


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identifies a tokenizer's behaviour, for the cache key."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{spec}|{tokenizer.bos_token_id}|{tokenizer.eos_token_id}".encode()).hexdigest()


def tokenize_documents(texts: list[str], tokenizer: Any, batch_size: int = 1000) -> list[np.ndarray]:
    """[BOS] text [EOS] for each text, with the batched fast tokenizer."""
    from tqdm.auto import tqdm

    docs = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="tokenizing", unit="batch", leave=False, disable=len(starts) <= 1):
        ids = tokenizer(texts[start : start + batch_size], add_special_tokens=False)["input_ids"]
        docs += [np.array([tokenizer.bos_token_id, *d, tokenizer.eos_token_id], dtype=np.int32) for d in ids]
    return docs


def tokenize_file(path: str | Path, tokenizer: Any, cache_dir: str | Path) -> list[np.ndarray]:
    """The tokenized documents of a corpus file, computed once per (file content, tokenizer)."""
    path = Path(path)
    key = hashlib.sha256(path.read_bytes() + tokenizer_fingerprint(tokenizer).encode()).hexdigest()[:20]
    cache = Path(cache_dir).expanduser() / "tokens" / f"{path.stem}-{key}.npz"
    if cache.exists():
        stored = np.load(cache)
        return np.split(stored["tokens"], stored["offsets"][1:-1])
    docs = tokenize_documents([r["text"] for r in load_corpus(path)], tokenizer)
    buffer = io.BytesIO()
    np.savez(buffer, tokens=np.concatenate(docs), offsets=np.cumsum([0] + [len(d) for d in docs]))
    write_atomic(cache, buffer.getvalue())
    return docs


def split_long(doc: np.ndarray, length: int) -> list[np.ndarray]:
    """Row-sized chunks of a document; each continuation repeats the previous chunk's last token as context."""
    if len(doc) <= length:
        return [doc]
    return [doc[start : start + length] for start in range(0, len(doc) - 1, length - 1)]


def best_fit_decreasing(sizes: list[int], capacity: int) -> list[list[int]]:
    """Group item indices into bins of `capacity`: longest first, each into the fullest bin it fits."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted; full bins drop out
    for item in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        size = sizes[item]
        slot = bisect.bisect_left(free, (size, -1))
        if slot == len(free):
            bins.append([item])
            room, index = capacity - size, len(bins) - 1
        else:
            room, index = free.pop(slot)
            bins[index].append(item)
            room -= size
        if room > 0:
            bisect.insort(free, (room, index))
    return bins


def pack_documents(docs: list[np.ndarray], length: int, pad_id: int) -> PackedRows:
    """Pack tokenized documents into rows of `length` tokens (see the module docstring)."""
    chunks = [chunk for doc in docs for chunk in split_long(doc, length)]
    bins = best_fit_decreasing([len(c) for c in chunks], length)
    input_ids = np.full((len(bins), length), pad_id, dtype=np.int32)
    position_ids = np.zeros((len(bins), length), dtype=np.int32)
    labels = np.full((len(bins), length), IGNORE, dtype=np.int32)
    for row, members in enumerate(bins):
        at = 0
        for item in members:
            chunk = chunks[item]
            end = at + len(chunk)
            input_ids[row, at:end] = chunk
            position_ids[row, at:end] = np.arange(len(chunk))
            labels[row, at + 1 : end] = chunk[1:]
            at = end
        position_ids[row, at:] = np.arange(length - at)  # padding is a segment of its own
    lengths = np.array([sum(len(chunks[i]) for i in members) for members in bins], dtype=np.int64)
    return PackedRows(input_ids, position_ids, labels, lengths)


def document_rows(docs: list[np.ndarray], length: int, pad_id: int) -> PackedRows:
    """One document per row (see the module docstring); BOS is not a target, every token after it is, EOS included."""
    input_ids = np.full((len(docs), length), pad_id, dtype=np.int32)
    labels = np.full((len(docs), length), IGNORE, dtype=np.int32)
    lengths = np.array([min(len(d), length) for d in docs], dtype=np.int64)
    for row, doc in enumerate(docs):
        kept = doc if len(doc) <= length else np.append(doc[: length - 1], doc[-1])
        input_ids[row, : len(kept)] = kept
        labels[row, 1 : len(kept)] = kept[1:]
    at = np.arange(length)
    position_ids = (at - np.where(at >= lengths[:, None], lengths[:, None], 0)).astype(np.int32)  # padding: its own
    cut = int(sum(max(0, len(d) - length) for d in docs))
    return PackedRows(input_ids, position_ids, labels, lengths, one_document_per_row=True, cut_tokens=cut)


def corpus_rows(path: str | Path, tokenizer: Any, length: int, cache_dir: str | Path, packing: bool) -> PackedRows:
    """Tokenize (cached) one corpus file and lay it out: packed rows, or one document per row."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    layout = pack_documents if packing else document_rows
    return layout(tokenize_file(path, tokenizer, cache_dir), length, pad_id)


def back_to_back(rows: PackedRows, index: np.ndarray, parts: int = 1, multiple: int = 1) -> PackedRows:
    """The real tokens of rows[index] laid end to end, no padding between them, in `parts` rows of
    len(index) / parts source rows each; the rows are padded at their ends to one length, the longest rounded up to
    a multiple of `multiple` (1: no padding at all in a single part). Documents keep their position ids, so they
    stay apart; each row's first label is IGNORE, so no token learns across a boundary."""
    groups = np.array_split(np.asarray(index), parts)
    sizes = [int(rows.lengths[g].sum()) for g in groups]
    width = -(-max(sizes) // multiple) * multiple
    input_ids = np.zeros((parts, width), dtype=np.int32)
    position_ids = np.zeros((parts, width), dtype=np.int32)
    labels = np.full((parts, width), IGNORE, dtype=np.int32)
    for part, group in enumerate(groups):
        keep = np.arange(rows.input_ids.shape[1]) < rows.lengths[group][:, None]
        for dest, source in zip((input_ids, position_ids, labels), (rows.input_ids, rows.position_ids, rows.labels)):
            dest[part, : sizes[part]] = source[group][keep]
        position_ids[part, sizes[part] :] = np.arange(width - sizes[part])  # end padding: a segment of its own
    return PackedRows(input_ids, position_ids, labels, np.array(sizes, dtype=np.int64), rows.one_document_per_row)


def training_order(num_rows: int, num_examples: int, seed: int) -> np.ndarray:
    """The row index of each training example: one seeded permutation per epoch, back to back. Both backends read
    rows in this order, so a seed means the same batches everywhere; a longer run extends a shorter one's order, so
    resuming with more steps continues where it stopped."""
    epochs = -(-num_examples // num_rows) if num_rows else 0
    order = [np.random.default_rng([seed, epoch]).permutation(num_rows) for epoch in range(epochs)]
    return np.concatenate(order)[:num_examples] if order else np.zeros(0, dtype=np.int64)


def epochs_seen(steps: int, effective_batch_size: int, num_rows: int) -> float:
    """How many times `steps` optimizer steps have read the packed corpus: rows seen / rows."""
    return steps * effective_batch_size / num_rows


def repetition_report(
    num_rows: int, effective_batch_size: int, num_train_steps: int, unit: str = "packed row"
) -> list[str]:
    """How often a run repeats its training corpus, as run-log lines; `warning:` where one step holds it all, as every
    step then sees every row (beyond one epoch, the same rows more than once in one gradient), so the batch buys
    nothing a smaller one would not: almost always a corpus too small for the batch. Many epochs over a whole run are
    only reported: memorizing a corpus, which this benchmark measures, repeats it on purpose."""
    if num_rows == 0:
        raise UserError(
            "the training corpus (data.train_path) holds no documents; point data.train_path at a corpus with text"
        )
    per_step = epochs_seen(1, effective_batch_size, num_rows)
    run = epochs_seen(num_train_steps, effective_batch_size, num_rows)
    lines = [
        f"repetition: the training corpus is {_count(num_rows, unit)}; one optimizer step "
        f"({_count(effective_batch_size, unit)}) is {_count(per_step, 'epoch')}, the whole run "
        f"({_count(num_train_steps, 'step')}) {_count(run, 'epoch')}"
    ]
    if num_train_steps and per_step >= 1:
        holds = "the whole training corpus" if per_step == 1 else f"the training corpus {_count(per_step, 'time')} over"
        lines.append(
            f"warning: one optimizer step holds {holds} ({_count(effective_batch_size, unit)} a step, "
            f"{_count(num_rows, unit)}), so every step sees every row and the run repeats the corpus "
            f"{_count(run, 'time')}; lower training.effective_batch_size or train on a larger corpus"
        )
    return lines


def _count(x: float, noun: str) -> str:
    """`x noun(s)`, with x to 3 significant digits below 10 and whole above (1 epoch, 0.0312 epochs, 2,400 epochs)."""
    return f"{x:,.0f} {noun}s" if x >= 10 else f"{x:.3g} {noun}{'' if x == 1 else 's'}"
