"""Varlen attention (documents kept apart by their boundaries, no mask) computes what the sdpa packed path computes.

On the CPU the flash kernel is absent and its stand-in, per-document sdpa with varlen_attn's window semantics, runs
instead; the tiny model's sliding window is cut to 4 tokens here, shorter than every document, so the sliding
layers' window is exercised as well as the documents' separation, the query scale and the grouped K/V heads.
"""

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from cbe.backends.hf.attention import VARLEN, attention_implementation, varlen_inputs
from cbe.config import register_configs, validate
from cbe.data.packing import document_rows, pack_documents, tokenize_documents
from cbe.errors import UserError
from cbe.loop import build
from cbe.run import RunDir
from tests.conftest import ROOT

WINDOW = 4
TEXTS = [
    "The Zorblat lives in the Glass Marsh.",
    "A second, longer document about nothing much at all, really.",
    "Short one, still longer than the window.",
    "Rivers of the north flow into a cold sea.",
    "Four of these fit a row with room to spare.",
    "The last document of the corpus ends here.",
]


def compose_config(*overrides: str):
    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        return validate(compose("config", overrides=["model=tiny", *overrides]))


def trainer(tmp_path, attention: str):
    """The HF backend on the tiny model (same seed, same weights) with `attention`, a 4-token sliding window and
    queries scaled by 16^-0.5 rather than head_dim^-0.5."""
    cfg = compose_config(
        f"backend.trainer.attn_implementation={attention}",
        f"model.architecture.sliding_window={WINDOW}",
        "model.architecture.query_pre_attn_scalar=16",  # a query scale other than head_dim's (as Gemma 3 27B has)
        "training.per_device_batch_size=1",
        "training.effective_batch_size=2",
    )
    backend, _ = build(cfg, RunDir(tmp_path / attention))
    backend.start(None)
    return backend


@pytest.fixture
def backends(tmp_path):
    sdpa, varlen = trainer(tmp_path, "sdpa"), trainer(tmp_path, VARLEN)
    for (name, p), q in zip(sdpa.model.named_parameters(), varlen.model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)  # the comparisons below compare attention only
    return sdpa, varlen


@pytest.fixture
def rows(backends):
    tokenizer = backends[0].tokenizer
    docs = tokenize_documents(TEXTS, tokenizer)
    assert min(len(d) for d in docs) > 2 * WINDOW  # every document is longer than the window
    rows = pack_documents(docs, length=80, pad_id=tokenizer.pad_token_id)
    assert len(rows) == 2 and ((rows.position_ids == 0).sum(1) >= 3).all()  # several documents in every row
    return rows


def test_documents_and_their_padding_become_cumulative_lengths_of_a_fixed_size():
    position_ids = np.array([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1]])  # 3 + 2 documents (or padding)
    inputs = varlen_inputs(position_ids, capacity=8, layer_types=["sliding_attention", "full_attention"], device="cpu")
    assert inputs["cu_seq_lens_q"].tolist() == [0, 3, 5, 8, 14, 16, 16, 16, 16]
    assert inputs["cu_seq_lens_q"].dtype == torch.int32 and inputs["cu_seq_lens_k"] is inputs["cu_seq_lens_q"]
    assert inputs["max_length_q"] == inputs["max_length_k"] == 8
    assert inputs["attention_mask"] == {"sliding_attention": None, "full_attention": None}  # transformers builds none


def test_varlen_logits_loss_and_gradients_equal_the_sdpa_packed_path(backends, rows):
    sdpa, varlen = backends
    index = np.arange(len(rows))
    assert "cu_seq_lens_q" not in sdpa.tensors(rows, index) and "cu_seq_lens_q" in varlen.tensors(rows, index)
    outputs = {}
    for name, backend in (("sdpa", sdpa), ("varlen", varlen)):
        out = backend.model(**backend.tensors(rows, index), use_cache=False)
        out.loss.backward()
        outputs[name] = out
    torch.testing.assert_close(outputs["varlen"].logits, outputs["sdpa"].logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outputs["varlen"].loss, outputs["sdpa"].loss, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(sdpa.model.named_parameters(), varlen.model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)

    # The comparison sees the window: without it the sliding layers attend further and the logits move.
    for module in varlen.model.modules():
        if getattr(module, "sliding_window", None):
            module.sliding_window = None
    with torch.no_grad():
        unwindowed = varlen.model(**varlen.tensors(rows, index), use_cache=False).logits
    assert not torch.allclose(unwindowed, outputs["sdpa"].logits, atol=1e-3)


def test_varlen_training_steps_equal_sdpa_steps(backends, rows):
    """Two optimizer steps (the fused loss head, micro-batches of one row) and the evaluation loss after them.
    Parameters are not compared: Adam's first step moves a weight by +-lr whatever its gradient's size, so a
    gradient within float noise of 0 may move either way; the losses see such weights only at float noise."""
    sdpa, varlen = backends
    steps = [b.train_steps(rows, np.array([[0, 1], [1, 0]]), np.array([1e-3, 1e-3])) for b in (sdpa, varlen)]
    losses = [[s["loss"] for s in backend] for backend in steps]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert losses[0][1] < losses[0][0]  # the second step saw the first one's update
    batches = [np.array([0]), np.array([1])]
    assert varlen.loss_sums(rows, batches) == pytest.approx(sdpa.loss_sums(rows, batches), rel=1e-5)
    # One document per row (data.packing=false): a micro-batch's documents laid end to end, the boundaries varlen's.
    documents = document_rows([rows.input_ids[0, :40], rows.input_ids[1, :90], rows.input_ids[0, 5:20]], 64, 0)
    both = [b.loss_sums(documents, [np.array([2, 0, 1])]) for b in (sdpa, varlen)]
    assert both[1] == pytest.approx(both[0], rel=1e-5)


@torch.no_grad()
def test_transformers_generate_under_varlen_pads_and_answers_as_sdpa(backends):
    """Generation has no document boundaries: under the varlen name transformers' generate runs sdpa with its
    padding mask and KV cache, so a model loaded with varlen generates what it would with sdpa."""
    prompts = ["Q: Where does the Zorblat live?\nA:", "Q: Why?\nA:", "Q: And what flows into a cold sea?\nA:"]
    outputs = []
    for backend in backends:
        inputs = backend.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        assert not inputs["attention_mask"].all()  # the shorter prompts are padded
        outputs.append(backend.model.generate(**inputs, max_new_tokens=6, do_sample=False))
    assert torch.equal(outputs[1], outputs[0])


def test_auto_is_sdpa_without_a_gpu_and_an_unknown_attention_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert attention_implementation("auto") == "sdpa"
    with pytest.raises(UserError, match=r"^backend.trainer.attn_implementation='flash' is not one of auto, varlen"):
        compose_config("backend.trainer.attn_implementation=flash")
