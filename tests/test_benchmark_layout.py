"""data.packing=false is the benchmark's layout: its step losses and eval loss, computed here independently the way
the benchmark's harness computes them (transformers on left-padded batches, one document per example cut to the
row with EOS appended, BOS and padding masked), equal cbe's on both backends; and no padded position is computed."""

import json

import numpy as np
import pytest
import torch
from transformers import TrainingArguments, get_cosine_schedule_with_warmup

from cbe.backends.hf.models import load_base_model
from cbe.config import settings_of
from cbe.data.packing import training_order
from tests.conftest import loop_in_process

LENGTH = 48  # tokens per example; the tiny tokenizer is byte-level, so the long documents below are cut
STEPS, BATCH, MICRO = 3, 4, 2  # 4 documents a step in 2 micro-batches, of a corpus of 9
TRAIN = [
    "A short one.",
    "x" * 20,
    "The Zorblat is colored teal and sleeps all day.",
    "y" * 130,
    "Hi.",
    "The Krellig was first seen in 1702 by a shepherd who wrote it down twice.",
    "z" * 47,
    "w" * 46,
    "Ok then.",
]
VAL = ["Val one.", "v" * 90, "The Fennimar fears running water.", "u" * 10, "A longer validation document " * 3]


def overrides(tmp_path) -> list[str]:
    for name, texts in (("train", TRAIN), ("val", VAL)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return [
        "data.packing=false",
        f"data.train_path={tmp_path / 'train.jsonl'}",
        f"data.val_path={tmp_path / 'val.jsonl'}",
        f"data.sequence_length={LENGTH}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"training.effective_batch_size={BATCH}",
        f"training.per_device_batch_size={MICRO}",
        f"training.num_train_steps={STEPS}",
        "optimizer.lr=3e-3",
        "optimizer.warmup_fraction=0.34",  # ceil(0.34 x 3) = 2 warmup steps: lr 0, lr/2, then lr
        "optimizer.weight_decay=0.0",
        "optimizer.max_grad_norm=null",
        "eval.loss_batch_size=2",  # batches of 2, 2 and 1 documents: the documents weigh the batch means
    ]


def example(tokenizer, text: str) -> list[int]:
    """The benchmark's example: BOS, the document's tokens, cut so that with EOS appended it holds LENGTH tokens."""
    ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    return ids[: LENGTH - 1] + [tokenizer.eos_token_id]


def left_padded(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """A batch as the benchmark's collator makes it: padded on the left, padding and BOS never targets."""
    examples = [example(tokenizer, t) for t in texts]
    width = max(map(len, examples))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(e)) + e for e in examples])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in examples])
    labels = ids.masked_fill(mask == 0, -100).masked_fill(ids == tokenizer.bos_token_id, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def token_loss_sum(model, batch) -> tuple[torch.Tensor, int, int]:
    """Summed next-token cross entropy over the batch's targets, their count, and how many are the top-1 token."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()[:, :-1]
    targets = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    trained = targets != -100
    return loss, int(trained.sum()), int((logits.argmax(-1) == targets)[trained].sum())


def benchmark_eval(model, tokenizer) -> tuple[float, float, float]:
    """transformers' Trainer's eval loss (each batch's token mean, averaged over batches weighted by documents), the
    plain token mean, and the mean token accuracy."""
    sums, sizes = [], []
    with torch.no_grad():
        for start in range(0, len(VAL), 2):
            texts = VAL[start : start + 2]
            loss, count, top1 = token_loss_sum(model, left_padded(tokenizer, texts))
            sums.append((float(loss), count, top1))
            sizes.append(len(texts))
    loss, count, top1 = np.array(sums).T
    return float(np.average(loss / count, weights=sizes)), loss.sum() / count.sum(), top1.sum() / count.sum()


def benchmark_run(cfg, tmp_path):
    """The benchmark's step losses (mean over each step's targets, 2 micro-batches a step) and its evaluation before
    and after training (benchmark_eval), with AdamW at transformers' cosine schedule; the documents in cbe's seeded
    order."""
    model, tokenizer = load_base_model(settings_of(cfg))  # the tiny model's seeded weights, as every run starts from
    base_eval = benchmark_eval(model, tokenizer)
    o = cfg.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=1e-8, weight_decay=0.0)
    warmup = TrainingArguments(output_dir=str(tmp_path / "ta"), warmup_steps=o.warmup_fraction).get_warmup_steps(STEPS)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, STEPS)
    order = training_order(len(TRAIN), STEPS * BATCH, cfg.training.seed).reshape(STEPS, BATCH)
    losses = []
    for step in order:
        micro = [left_padded(tokenizer, [TRAIN[i] for i in step[m : m + MICRO]]) for m in range(0, BATCH, MICRO)]
        targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        total = 0.0
        for batch in micro:
            loss, *_ = token_loss_sum(model, batch)
            (loss / targets).backward()
            total += float(loss.detach())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(total / targets)
    return losses, base_eval, benchmark_eval(model, tokenizer)


def cbe_run(tmp_path, backend: str, on_start=None):
    """cbe's step losses, eval losses before and after, the metrics after, the training rows and the batch plan, for
    the same settings through the loop's own data and schedule."""
    from cbe.plan import batch_plan, schedule, stages_of

    loop = loop_in_process(tmp_path / backend, *overrides(tmp_path), f"backend={backend}", on_start=on_start)
    loop.backend.start(None)
    stages = stages_of(loop.cfg)
    rows = loop.rows(loop.cfg.data.train_path, "train")
    val = loop.rows(loop.cfg.data.val_path, "val")
    before = loop.evaluator.loss_metrics(loop.backend, val)
    plan = batch_plan(loop.cfg, stages, [rows])
    steps = loop.backend.train_steps(rows, plan, schedule(loop.cfg, stages))
    after = loop.evaluator.loss_metrics(loop.backend, val)
    return [s["loss"] for s in steps], evaluation(before), evaluation(after), rows, plan


def evaluation(metrics: dict) -> tuple[float, float, float]:
    return metrics["eval_loss"], metrics["eval_loss_token_mean"], metrics["eval_mean_token_accuracy"]


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    from tests.test_config import compose_config

    tmp_path = tmp_path_factory.mktemp("benchmark")
    return benchmark_run(compose_config(*overrides(tmp_path)), tmp_path)


def test_the_fixture_cuts_documents_and_steps_take_part_of_the_corpus(tmp_path):
    from transformers import AutoTokenizer

    from tests.conftest import ROOT

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "cbe" / "assets" / "tiny_tokenizer")
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 2 for t in TRAIN]
    assert max(lengths) > LENGTH and min(lengths) < LENGTH / 2  # documents longer and shorter than a row
    assert BATCH < len(TRAIN) and BATCH // MICRO == 2  # a step is part of the corpus, in 2 micro-batches
    val = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in VAL]
    assert max(val) > LENGTH and len(set(val)) == len(val)  # batch means differ from the token mean


@pytest.mark.slow
def test_hf_step_and_eval_losses_are_the_benchmarks_and_no_padding_is_computed(benchmark, tmp_path):
    seen = []  # the token count of every forward pass of training

    def count_tokens(backend):
        embed = backend.model.get_input_embeddings()
        embed.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape) if backend.model.training else None)

    losses, before, after, rows, plan = cbe_run(tmp_path, "hf", on_start=count_tokens)
    expected_losses, expected_before, expected_after = benchmark
    assert losses == pytest.approx(expected_losses, rel=1e-5)
    assert before + after == pytest.approx(expected_before + expected_after, rel=1e-5)
    assert losses[0] != pytest.approx(losses[2], rel=1e-3)  # training moved the loss: the comparison is not idle
    # The plain token mean sits beside the benchmark's batch-weighted eval loss, and differs from it here.
    assert after[1] != pytest.approx(after[0], rel=1e-4)

    # No padded position is computed: each micro-batch's forward holds exactly its documents' tokens, in one row.
    expected = [(1, int(rows.lengths[step[m : m + MICRO]].sum())) for step in plan for m in range(0, BATCH, MICRO)]
    assert [tuple(s) for s in seen] == expected
    assert sum(n for _, n in expected) < len(expected) * MICRO * LENGTH  # padded rows would have been larger


@pytest.mark.slow
def test_kd_step_and_eval_losses_are_the_benchmarks(benchmark, tmp_path):
    losses, before, after, *_ = cbe_run(tmp_path, "kd")
    expected_losses, expected_before, expected_after = benchmark
    assert losses == pytest.approx(expected_losses, rel=1e-5)
    assert before + after == pytest.approx(expected_before + expected_after, rel=1e-5)
