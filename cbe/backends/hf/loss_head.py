"""The LM head's loss over a batch's trained tokens (`backend.trainer.loss_head`), patched into the model's forward.

`model(..., labels=labels, scored=True, num_items_in_batch=n)` runs the backbone, then scores only the positions
whose next-token label is trained, and returns `Scores`: the loss (their summed -log p over n), and each trained
token's log-probability and whether its label is the model's top-1 token. Without `scored` the forward is the
model's own (generation is unchanged). The forward is patched rather than wrapped so that DDP's and FSDP's hooks on
the model's call run as they do for any forward.

- fused: the trained tokens go through the head in chunks of at most CHUNK_LOGITS logits; each chunk's forward also
  computes the loss's gradients with respect to its hidden states and to the head's weight, which the backward pass
  only scales by its incoming gradient. The head's matmuls run 3 times (logits, d hidden, d weight), not 4 as in a
  head that recomputes its logits in backward, and one chunk's logits are the most ever held. On a GPU each chunk's
  softmax arithmetic is one compiled kernel. The weight's gradient adds up over the chunks in the weight's dtype
  (each chunk's matmul accumulates in fp32): in bf16 that rounds once per chunk, as gradient accumulation over
  micro-batches rounds once per micro-batch, and holds no more memory than the gradient itself.
- plain: the full logits of every trained token and log_softmax by autograd: the reference the fused head is tested
  against, for small vocabularies.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from cbe.backends.hf.models import unwrapped
from cbe.data.packing import IGNORE

# Logits per fused chunk: 2,048 tokens at Gemma 3's 262k vocabulary, 1 GB of bf16 logits and 1 GB of their gradient.
# Larger chunks make the weight gradient's matmul longer (tokens are its inner dimension), its sum over chunks shorter.
CHUNK_LOGITS = 2**29


@dataclass
class Scores:
    loss: torch.Tensor  # the trained tokens' summed -log p, over num_items_in_batch (default: their count)
    log_probs: torch.Tensor  # (trained tokens,) each label's log-probability, no gradient
    is_top1: torch.Tensor  # (trained tokens,) whether the label is the most likely token


def softmax_terms(logits: torch.Tensor, labels: torch.Tensor, softcap: float | None, with_grad: bool):
    """From one chunk's (tokens, vocabulary) logits: each label's log-probability, whether it is the top-1 token
    (ties count), and d(-log p)/d logits = softmax - one_hot (through the soft cap, if any) in the logits' dtype,
    or None without with_grad."""
    z = logits.float()
    if softcap:
        capped = torch.tanh(z / softcap)
        z = capped * softcap
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    target = z.gather(1, labels[:, None])
    log_probs = (target - lse).squeeze(1)
    is_top1 = target.squeeze(1) >= z.amax(dim=-1)
    if not with_grad:
        return log_probs, is_top1, None
    grad = torch.exp(z - lse).scatter_add(1, labels[:, None], torch.full_like(target, -1.0))
    if softcap:
        grad = grad * (1 - capped * capped)
    return log_probs, is_top1, grad.to(logits.dtype)


@functools.cache
def compiled_softmax_terms():
    """softmax_terms as one fused kernel per chunk shape (the last, shorter chunk adds one dynamic-shape program)."""
    return torch.compile(softmax_terms)


class FusedHead(torch.autograd.Function):
    """(hidden (T, H), weight (V, H), labels (T,)) -> (summed -log p, log-probabilities, is_top1), the gradients
    computed in forward, chunk by chunk (see the module's docstring). Only the sum carries a gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, softcap, chunk_tokens, grad_enabled):
        need_hidden, need_weight = (grad_enabled and needed for needed in ctx.needs_input_grad[:2])
        need_grad = need_hidden or need_weight
        terms = compiled_softmax_terms() if hidden.is_cuda else softmax_terms
        log_probs = torch.empty(len(labels), dtype=torch.float32, device=hidden.device)
        is_top1 = torch.empty(len(labels), dtype=torch.bool, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        for start in range(0, len(labels), chunk_tokens):
            part = slice(start, start + chunk_tokens)
            h = hidden[part]
            log_probs[part], is_top1[part], grad = terms(h @ weight.T, labels[part], softcap, need_grad)
            if need_hidden:
                grad_hidden[part] = grad @ weight
            if need_weight:  # in place, in the weight's dtype (in-place ops are not autocast)
                grad_weight.addmm_(grad.T.to(weight.dtype), h.to(weight.dtype))
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(log_probs, is_top1)
        return -log_probs.sum(), log_probs, is_top1

    @staticmethod
    def backward(ctx, grad_loss, _log_probs, _is_top1):
        grad_hidden, grad_weight = ctx.saved_tensors
        scaled = [None if g is None else g * grad_loss.to(g.dtype) for g in (grad_hidden, grad_weight)]
        return *scaled, None, None, None, None


def fused_scores(hidden, weight, labels, softcap=None, chunk_tokens=None):
    """The fused head on trained tokens' hidden states (T, H): (summed -log p, log-probabilities, is_top1)."""
    chunk_tokens = chunk_tokens or max(1, CHUNK_LOGITS // weight.shape[0])
    # needs_input_grad says True under no_grad too: evaluation's loss would compute every gradient for nothing
    return FusedHead.apply(hidden, weight, labels, softcap, chunk_tokens, torch.is_grad_enabled())


def plain_scores(hidden, weight, labels, softcap=None):
    """The reference head: every trained token's full logits, then log_softmax, by autograd."""
    z = (hidden @ weight.T).float()
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    log_probs = z.log_softmax(dim=-1).gather(1, labels[:, None]).squeeze(1)
    is_top1 = z.gather(1, labels[:, None]).squeeze(1) >= z.amax(dim=-1)
    return -log_probs.sum(), log_probs.detach(), is_top1


HEADS = {"fused": fused_scores, "plain": plain_scores}


def add_loss_head(model: torch.nn.Module, kind: str = "fused") -> None:
    """Patch `model` (a transformers causal LM, or the base model under its PEFT wrapper) so that
    `model(..., labels=..., scored=True)` returns `Scores` from the `kind` head (see the module's docstring)."""
    base = unwrapped(model)
    head = HEADS[kind]
    softcap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)
    original = base.forward

    @functools.wraps(type(base).forward)  # generate() checks its keyword arguments against this signature
    def forward(self, *args, scored=False, **kwargs):
        if not scored:
            return original(*args, **kwargs)
        labels, items = kwargs.pop("labels")[:, 1:], kwargs.pop("num_items_in_batch", None)
        # The backbone and the head are looked up at each call: FSDP and PEFT replace modules after patching.
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        trained = labels != IGNORE
        weight = self.get_output_embeddings().weight
        if isinstance(weight, DTensor):  # FSDP2 shards the head: gather it whole for the tokens' projections
            weight = weight.full_tensor()
        loss_sum, log_probs, is_top1 = head(hidden[trained], weight, labels[trained], softcap)
        items = trained.sum().clamp(min=1) if items is None else items
        return Scores(loss=loss_sum / items, log_probs=log_probs, is_top1=is_top1)

    base.forward = types.MethodType(forward, base)
