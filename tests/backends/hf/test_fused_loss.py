"""The training loss the HF backend uses (TRL's fused LM head: logits in tiles, never the full vocabulary at
once) gives the plain full-logits loss and its gradients."""

import copy

import numpy as np
import torch
from trl.trainer.utils import add_fused_lm_head

from cbe.data.packing import pack_documents, tokenize_documents
from tests.backends.hf.test_packed_attention import tiny_model


def test_fused_lm_head_loss_and_gradients_equal_the_plain_path():
    model, tokenizer = tiny_model()
    model.train()
    fused = copy.deepcopy(model)
    add_fused_lm_head(fused, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer patches the model
    texts = ["The Zorblat lives in the Glass Marsh.", "A second, longer document about nothing much at all."] * 3
    rows = pack_documents(tokenize_documents(texts, tokenizer), length=64, pad_id=tokenizer.pad_token_id)
    batch = {
        k: torch.from_numpy(v.astype(np.int64))
        for k, v in {"input_ids": rows.input_ids, "position_ids": rows.position_ids, "labels": rows.labels}.items()
    }

    plain_loss = model(**batch, use_cache=False).loss
    fused_loss = fused(**batch, use_cache=False, fused_lm_head=True).loss
    plain_loss.backward()
    fused_loss.backward()

    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
