"""A model onto dafast's kernels, in one place: `apply(model)` when a stage's model is built
(after PEFT has added its LoRA layers), `revert(model)` before it is saved; and
`with dafast.kernels.mode("reference"): ...`, the ops' pure-PyTorch references for a block of
code (see dafast._native).

    applied = dafast.kernels.apply(model)
    outputs = model(input_ids=..., attention_mask=...)
    weight = dafast.kernels.deferred_head_weight(model)   # not None: the head was deferred
    loss = dafast.losses.causal_lm_loss(outputs.logits, weight, labels)  # .logits: hidden states
    dafast.kernels.revert(model)

What it patches, each as an instance `forward` (parameters, state dicts and saving untouched):

- LoRA layers (PEFT's LoRA Linear) run dafast.ops.lora_linear; dafast.lora says, once, which
  layers keep PEFT's forward and why (dropout in training, DoRA, several adapters, ...).
- SwiGLU MLPs (Llama's MLP and its copies) run dafast.ops.swiglu (dafast.mlp); other MLPs are
  left as they are.
- The LM head is deferred to the loss: its forward returns its input, so `model(...).logits`
  holds the final hidden states [B, T, H], never the [B, T, V] logits, and dafast.losses applies
  the head's weight through dafast.ops.linear_logprobs. Only a plain head is deferred (no bias,
  logit soft-capping or scaling: linear_logprobs.lm_head_weight) of a model without router
  losses (MoE); otherwise the head computes logits as before, apply() says why, and
  `deferred_head_weight` returns None so the loss takes the logits path.
"""

from __future__ import annotations

import dataclasses
import logging

from torch import nn

import dafast.lora
import dafast.mlp
from dafast._native import kernels as mode
from dafast.ops.linear_logprobs import lm_head_weight

log = logging.getLogger("dafast.kernels")


@dataclasses.dataclass(frozen=True)
class Applied:
    lora_layers: int
    mlps: int
    head_deferred: bool
    head_kept_because: str | None = None


def _hidden_states(x):
    """The deferred head's forward."""
    return x


def _head(model) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if get is not None else None


def _why_head_is_kept(model) -> str | None:
    head = _head(model)
    if head is None:
        return "the model has no output embeddings"
    if lm_head_weight(model) is None:
        return ("its logits are not hidden @ weight.T (a bias, logit soft-capping or scaling): "
                "the loss computes them")
    if getattr(model.config.get_text_config(), "output_router_logits", False):
        return "router logits are on (MoE auxiliary loss): the loss computes the logits"
    if "forward" in vars(head) and vars(head)["forward"] is not _hidden_states:
        return "its forward was already replaced by someone else"
    return None


def apply(model: nn.Module) -> Applied:
    """Patch `model` (a transformers causal LM, or a PEFT model around one) onto dafast's
    kernels. Idempotent."""
    lora_layers = dafast.lora.patch(model)
    mlps = dafast.mlp.patch(model)
    reason = _why_head_is_kept(model)
    if reason is None:
        _head(model).forward = _hidden_states
    else:
        log.info("dafast.kernels: the LM head computes logits: %s", reason)
    log.debug("dafast.kernels: %d LoRA layers and %d MLPs on dafast's kernels, head %s",
              lora_layers, mlps, "deferred to the loss" if reason is None else "kept")
    return Applied(lora_layers, mlps, reason is None, reason)


def deferred_head_weight(model: nn.Module):
    """The head's weight [V, H] when apply() deferred the head (model(...).logits are then the
    final hidden states), else None."""
    head = _head(model)
    if head is not None and vars(head).get("forward") is _hidden_states:
        return head.weight
    return None


def revert(model: nn.Module) -> None:
    """Undo apply(): PEFT's LoRA forward, the models' own MLPs and head again."""
    dafast.lora.unpatch(model)
    dafast.mlp.unpatch(model)
    head = _head(model)
    if head is not None and vars(head).get("forward") is _hidden_states:
        del head.forward


__all__ = ["Applied", "apply", "deferred_head_weight", "mode", "revert"]
