"""Packing keeps every corpus token, trains each target once, and marks every document boundary."""

import numpy as np
import pytest

from cbe.data.packing import (
    IGNORE,
    back_to_back,
    best_fit_decreasing,
    corpus_rows,
    document_rows,
    epochs_seen,
    pack_documents,
    repetition_report,
    split_long,
    tokenize_file,
    training_order,
)
from cbe.errors import UserError


def docs_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [np.concatenate([[2], rng.integers(10, 99, n), [1]]).astype(np.int32) for n in lengths]


def segments(rows):
    """(row, start, end) of every chunk, read back from the restarting position ids."""
    out = []
    for r in range(len(rows)):
        starts = list(np.flatnonzero(rows.position_ids[r] == 0)) + [rows.input_ids.shape[1]]
        out += [(r, a, b) for a, b in zip(starts, starts[1:])]
    return out


def test_coverage_trained_tokens_equal_corpus_tokens_plus_separators():
    docs = docs_of([3, 50, 7, 300, 64, 1, 130, 20, 62])  # some longer than a row
    rows = pack_documents(docs, length=64, pad_id=0)
    text_tokens = sum(len(d) - 2 for d in docs)
    assert rows.trained_tokens == text_tokens + len(docs)  # every text token and each document's EOS
    # Each document's targets appear exactly once, in order: nothing truncated, nothing duplicated.
    targets = (tuple(rows.labels[r, a:b][rows.labels[r, a:b] != IGNORE]) for r, a, b in segments(rows))
    trained = sorted(t for t in targets if t)  # the padding segment has none
    expected = sorted(tuple(c[1:]) for d in docs for c in split_long(d, 64))
    assert trained == expected
    assert rows.real_tokens == sum(len(c) for d in docs for c in split_long(d, 64))


def test_long_documents_split_with_one_token_of_context():
    doc = np.arange(200, dtype=np.int32)
    chunks = split_long(doc, 64)
    assert all(len(c) <= 64 for c in chunks)
    assert np.array_equal(np.concatenate([chunks[0]] + [c[1:] for c in chunks[1:]]), doc)
    assert all(a[-1] == b[0] for a, b in zip(chunks, chunks[1:]))


def test_short_documents_stay_whole_and_padding_is_never_trained():
    rows = pack_documents(docs_of([10, 40, 20, 5, 30]), length=64, pad_id=0)
    pad = rows.input_ids == 0
    assert (rows.labels[pad] == IGNORE).all()
    assert len(rows) == 2 and 0 < rows.padding_fraction < 0.2
    # every chunk starts with BOS (no short document was cut) and its first token is context only
    for r, a, b in segments(rows):
        if not pad[r, a]:
            assert rows.input_ids[r, a] == 2 and rows.labels[r, a] == IGNORE


def test_document_rows_cut_each_document_to_the_row_with_its_eos_kept():
    docs = docs_of([3, 62, 63, 200])  # [BOS] text [EOS]: 5, 64, 65 and 202 tokens, rows of 64
    rows = document_rows(docs, length=64, pad_id=0)
    assert len(rows) == 4 and rows.one_document_per_row
    assert list(rows.lengths) == [5, 64, 64, 64]
    for row, doc in enumerate(docs):
        n = rows.lengths[row]
        kept = rows.input_ids[row, :n]
        assert kept[0] == 2 and kept[-1] == 1  # BOS first, EOS last, also where the document was cut
        assert np.array_equal(kept[:-1], doc[: n - 1])  # the document's own first tokens
        assert rows.labels[row, 0] == IGNORE and np.array_equal(rows.labels[row, 1:n], kept[1:])  # BOS is no target
        assert (rows.labels[row, n:] == IGNORE).all()
    assert rows.cut_tokens == (65 - 64) + (202 - 64)
    assert "3 documents at the 64-token limit, 139 tokens (" in rows.describe("train")


def test_back_to_back_lays_real_tokens_end_to_end_without_padding():
    rows = document_rows(docs_of([3, 62, 20, 200]), length=64, pad_id=0)
    index = np.array([3, 0, 2])
    laid = back_to_back(rows, index)
    assert laid.input_ids.shape == (1, 64 + 5 + 22)  # exactly the real tokens: none of the padding
    expected = np.concatenate([rows.input_ids[i, : rows.lengths[i]] for i in index])
    assert np.array_equal(laid.input_ids[0], expected)
    assert list(np.flatnonzero(laid.position_ids[0] == 0)) == [0, 64, 69]  # each document restarts its positions
    assert laid.trained_tokens == sum(rows.lengths[i] - 1 for i in index)  # every token after each BOS, no more
    # In parts (one per device), each padded at its end to a common length rounded up to `multiple`.
    two = back_to_back(rows, index, parts=2, multiple=32)
    assert two.input_ids.shape == (2, 96) and list(two.lengths) == [69, 22]
    assert (two.labels[1, 22:] == IGNORE).all() and two.trained_tokens == laid.trained_tokens


def test_best_fit_decreasing_fills_tightly():
    bins = best_fit_decreasing([60, 40, 30, 30, 20, 10, 10], capacity=100)
    assert sorted(sum([60, 40, 30, 30, 20, 10, 10][i] for i in b) for b in bins) == [100, 100]


def test_tokenization_is_cached_by_file_and_tokenizer(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    import cbe.data.packing

    tok = AutoTokenizer.from_pretrained("cbe/assets/tiny_tokenizer")
    corpus = tmp_path / "train.jsonl"
    corpus.write_text('{"text": "The Zorblat eats ember moss."}\n{"text": "A second document."}\n')
    first = tokenize_file(corpus, tok, tmp_path / "cache")
    assert [d[0] for d in first] == [tok.bos_token_id] * 2 and [d[-1] for d in first] == [tok.eos_token_id] * 2
    assert tok.decode(first[0][1:-1]) == "The Zorblat eats ember moss."
    assert len(list((tmp_path / "cache" / "tokens").glob("*.npz"))) == 1

    # A cache hit reads the stored tokens and never runs the tokenizer again.
    with monkeypatch.context() as m:
        m.setattr(cbe.data.packing, "tokenize_documents", lambda *a, **k: pytest.fail("re-tokenized on a cache hit"))
        again = tokenize_file(corpus, tok, tmp_path / "cache")
    assert len(again) == 2 and all(np.array_equal(a, b) for a, b in zip(first, again))

    # Another tokenizer (here one word more) gets an entry of its own, holding its own ids, not the first's.
    other = AutoTokenizer.from_pretrained("cbe/assets/tiny_tokenizer")
    other.add_tokens(["Zorblat"])
    theirs = tokenize_file(corpus, other, tmp_path / "cache")
    assert other.convert_tokens_to_ids("Zorblat") in theirs[0] and not np.array_equal(theirs[0], first[0])
    assert other.decode(theirs[0][1:-1]) == "The Zorblat eats ember moss."
    assert len(list((tmp_path / "cache" / "tokens").glob("*.npz"))) == 2
    assert np.array_equal(tokenize_file(corpus, tok, tmp_path / "cache")[0], first[0])  # the first entry stays

    corpus.write_text('{"text": "Changed."}\n')
    assert len(tokenize_file(corpus, tok, tmp_path / "cache")) == 1
    assert len(list((tmp_path / "cache" / "tokens").glob("*.npz"))) == 3
    rows = corpus_rows("data/sample/train.jsonl", tok, 256, tmp_path / "cache", packing=True)
    assert rows.describe("train").startswith("train: ") and rows.trained_tokens > 1000
    assert len(rows) == 8  # the sample track's rows, which the repetition tests below count with


def test_the_sample_recipe_is_told_that_each_step_holds_the_whole_corpus():
    """The sample track packs into 8 rows; its recipe takes 8 rows a step for 160 steps: 1 epoch a step, 160 in all."""
    report = repetition_report(num_rows=8, effective_batch_size=8, num_train_steps=160)
    assert report == [
        "repetition: the training corpus is 8 packed rows; one optimizer step (8 packed rows) is 1 epoch, the whole "
        "run (160 steps) 160 epochs",
        "warning: one optimizer step holds the whole training corpus (8 packed rows a step, 8 packed rows), so every "
        "step sees every row and the run repeats the corpus 160 times; lower training.effective_batch_size or train on "
        "a larger corpus",
    ]


def test_repetition_counts_epochs_per_step_and_per_run():
    # The tiny corpus: 4 rows under a batch of 32 for 30 steps, 8 times a step and 240 times over the run.
    tiny = repetition_report(4, 32, 30)
    assert "one optimizer step (32 packed rows) is 8 epochs, the whole run (30 steps) 240 epochs" in tiny[0]
    assert tiny[1].startswith(
        "warning: one optimizer step holds the training corpus 8 times over (32 packed rows a step, "
    )
    assert "the run repeats the corpus 240 times" in tiny[1]
    # A corpus larger than a step is only reported, however many epochs the run makes of it.
    assert repetition_report(5000, 32, 10_000) == [
        "repetition: the training corpus is 5,000 packed rows; one optimizer step (32 packed rows) is 0.0064 epochs, "
        "the whole run (10,000 steps) 64 epochs"
    ]
    assert repetition_report(3000, 32, 100, "document")[0].startswith(
        "repetition: the training corpus is 3,000 documents; one optimizer step (32 documents) is 0.0107 epochs"
    )
    assert len(repetition_report(33, 32, 10_000)) == 1 and len(repetition_report(32, 32, 1)) == 2
    assert len(repetition_report(8, 8, 0)) == 1  # a run of no steps repeats nothing
    # The epoch the backends log: rows seen / packed rows.
    assert epochs_seen(3, 32, 4) == 24.0 and epochs_seen(1, 8, 16) == 0.5 and epochs_seen(160, 8, 8) == 160.0


def test_an_empty_training_corpus_is_a_user_error():
    with pytest.raises(UserError, match="data.train_path"):
        repetition_report(0, 8, 160)


def test_training_order_is_fixed_by_the_seed():
    order = training_order(num_rows=8, num_examples=24, seed=1)
    assert np.array_equal(order, training_order(8, 24, seed=1))
    assert not np.array_equal(order, training_order(8, 24, seed=2))


def test_each_epoch_of_the_training_order_is_a_fresh_permutation_of_every_row():
    order = training_order(num_rows=8, num_examples=20, seed=0)  # two whole epochs, then half of a third
    assert len(order) == 20
    first, second, third = order[:8], order[8:16], order[16:]
    assert sorted(first) == sorted(second) == list(range(8))
    assert len(set(third)) == 4  # no row twice within an epoch, even a partial one
    assert list(first) != list(range(8)) and list(first) != list(second)  # shuffled, and again each epoch


def test_a_longer_run_reads_a_shorter_runs_order_first():
    """A run resumed with more steps (or stopped at any step) continues the same order: order[:k] never changes."""
    whole = training_order(num_rows=8, num_examples=40, seed=3)
    for k in range(41):
        assert np.array_equal(training_order(8, k, seed=3), whole[:k]), k
    assert len(training_order(0, 0, seed=3)) == 0
