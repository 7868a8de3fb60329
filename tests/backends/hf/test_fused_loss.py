"""The HF backend's loss heads (backend.trainer.loss_head, cbe/backends/hf/loss_head.py): the fused head, which
computes its gradients in forward chunk by chunk, gives the loss, per-token scores and every gradient of the plain
full-logits head and of transformers' own loss, to fp32 tolerance, on the CPU."""

import copy

import numpy as np
import pytest
import torch

from cbe.backends.hf import loss_head
from cbe.backends.hf.loss_head import add_loss_head, fused_scores, plain_scores
from cbe.config import settings_of
from cbe.data.packing import pack_documents, tokenize_documents
from tests.backends.hf.test_packed_attention import tiny_model


def head_inputs(tokens=37, hidden=24, vocab=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g, dtype=torch.float64).float().requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    return h, w, labels


def assert_fp32_close(actual, expected, name):
    """Equal to fp32 rounding, relative to the tensor's scale (softmax - 1 cancels where a label's p is near 1)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()), msg=name)


def gradients(head, h, w, labels, **kwargs):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss, log_probs, is_top1 = head(h, w, labels, **kwargs)
    (2.5 * loss).backward()  # an upstream gradient other than 1 must scale both
    return loss.detach(), log_probs, is_top1, h.grad, w.grad


@pytest.mark.parametrize("chunk_tokens", [1, 8, 37, 1000])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_fused_head_equals_the_plain_head_in_loss_scores_and_gradients(chunk_tokens, softcap):
    h, w, labels = head_inputs()
    with torch.no_grad():  # some labels are the top-1 token, some not: is_top1 is compared on both kinds
        w[labels[:5]] = h[:5] / 2
    plain = gradients(plain_scores, h, w, labels, softcap=softcap)
    fused = gradients(fused_scores, h, w, labels, softcap=softcap, chunk_tokens=chunk_tokens)
    assert 0 < int(plain[2].sum()) < len(labels)
    assert torch.equal(fused[2], plain[2])
    for name, a, b in zip(["loss", "log_probs", "d hidden", "d weight"], fused[:2] + fused[3:], plain[:2] + plain[3:]):
        assert_fp32_close(a, b, name)


def test_the_fused_head_scores_without_gradients_where_none_is_needed(monkeypatch):
    h, w, labels = head_inputs()
    asked = []  # whether each chunk was asked for the softmax's gradient
    terms = loss_head.softmax_terms
    monkeypatch.setattr(loss_head, "softmax_terms", lambda *args: asked.append(args[-1]) or terms(*args))
    with torch.no_grad():  # evaluation's loss
        loss, log_probs, _ = fused_scores(h, w, labels, chunk_tokens=8)
    assert not loss.requires_grad and asked == [False] * 5
    reference = torch.log_softmax(h @ w.T, dim=-1).gather(1, labels[:, None]).squeeze(1)
    torch.testing.assert_close(log_probs, reference.detach(), rtol=1e-5, atol=1e-6)
    w.requires_grad_(False)  # a LoRA run's frozen head: only the hidden states get a gradient
    loss, _, _ = fused_scores(h, w, labels, chunk_tokens=8)
    loss.backward()
    assert h.grad is not None and w.grad is None


def packed_batch(tokenizer):
    texts = ["The Zorblat lives in the Glass Marsh.", "A second, longer document about nothing much at all."] * 3
    rows = pack_documents(tokenize_documents(texts, tokenizer), length=64, pad_id=tokenizer.pad_token_id)
    arrays = {"input_ids": rows.input_ids, "position_ids": rows.position_ids, "labels": rows.labels}
    return {k: torch.from_numpy(v.astype(np.int64)) for k, v in arrays.items()}


@pytest.mark.parametrize("kind", ["fused", "plain"])
def test_a_patched_model_gives_transformers_loss_and_every_parameter_gradient(kind):
    """Full fine-tune of the tiny model (its head is tied to the embedding): the patched forward's loss against the
    model's own cross entropy, and every parameter's gradient."""
    model, tokenizer = tiny_model()
    model.train()
    patched = copy.deepcopy(model)
    add_loss_head(patched, kind)
    batch = packed_batch(tokenizer)
    trained = int((batch["labels"][:, 1:] != -100).sum())

    reference = model(**batch, use_cache=False).loss
    scores = patched(**batch, use_cache=False, scored=True, num_items_in_batch=trained)
    reference.backward()
    scores.loss.backward()

    torch.testing.assert_close(scores.loss, reference, rtol=1e-5, atol=1e-6)
    assert scores.log_probs.shape == (trained,) and scores.is_top1.dtype == torch.bool
    torch.testing.assert_close(-scores.log_probs.sum() / trained, reference.detach(), rtol=1e-5, atol=1e-6)
    named = dict(model.named_parameters())
    for name, p in patched.named_parameters():
        assert_fp32_close(p.grad, named[name].grad, name)
    # Without `scored`, the model's own forward: logits, as generation needs
    logits = patched(input_ids=batch["input_ids"][:, :8], use_cache=False).logits
    assert logits.shape[-1] == patched.config.get_text_config().vocab_size


def test_a_lora_model_under_peft_gets_the_adapter_gradients_of_the_plain_head():
    from hydra import compose, initialize_config_dir

    from cbe.backends.hf.models import apply_adapter
    from cbe.config import register_configs
    from tests.conftest import ROOT

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        settings = settings_of(compose("config", overrides=["model=tiny", "adapter=lora128"]))
    base, tokenizer = tiny_model()
    models = {}
    for kind in ("fused", "plain"):
        torch.manual_seed(0)
        models[kind] = apply_adapter(copy.deepcopy(base), settings).train()
        add_loss_head(models[kind], kind)
    batch = packed_batch(tokenizer)
    losses = {}
    for kind, model in models.items():
        with torch.no_grad():  # LoRA's B starts at zero: move it, so the adapter's A gets a gradient too
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.linspace(-0.05, 0.05, p.numel()).reshape(p.shape))
        losses[kind] = model(**batch, use_cache=False, scored=True).loss
        losses[kind].backward()
    torch.testing.assert_close(losses["fused"], losses["plain"], rtol=1e-5, atol=1e-6)
    plain = dict(models["plain"].named_parameters())
    trained = [(n, p) for n, p in models["fused"].named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n, _ in trained)
    for name, p in trained:
        assert p.grad.abs().sum() > 0, name
        assert_fp32_close(p.grad, plain[name].grad, name)


def test_the_compiled_softmax_terms_equal_the_eager_ones():
    """What a GPU runs for each chunk (torch.compile of softmax_terms; here inductor's CPU code): the same log p, top-1
    flags and gradient as eager, for a full chunk and a shorter last one."""
    compiled = loss_head.compiled_softmax_terms()
    g = torch.Generator().manual_seed(1)
    for tokens in (16, 7):
        logits, labels = torch.randn(tokens, 101, generator=g) * 3, torch.randint(0, 101, (tokens,), generator=g)
        labels[:3] = logits[:3].argmax(dim=-1)  # some labels are the top-1 token
        for softcap in (None, 3.0):
            eager = loss_head.softmax_terms(logits, labels, softcap, True)
            fast = compiled(logits, labels, softcap, True)
            assert torch.equal(fast[1], eager[1]) and eager[1].any()
            for name, a, b in zip(["log_probs", "d logits"], fast[::2], eager[::2]):
                assert_fp32_close(a, b, name)
