"""A drop-in for TRL 1.16's fused LM head, on dafast's linear_logprobs kernel.

TRL's SFT and DPO trainers call `trl.trainer.utils.add_fused_lm_head(model, ...)` when they are
built; it patches `model.forward` so that `model(..., labels=labels, fused_lm_head=True)` returns
a `FusedCausalLMOutput` with per-token log-probabilities (and optional entropy, mean logit and
top-1 flags) instead of logits. `add_fused_lm_head` below has the same signature and output, and

    import dafast.fused_head
    dafast.fused_head.use_in_trl()          # before building the trainer

makes those trainers use it, with no other change. Tied input/output embeddings need nothing
special: the head's weight is the embedding Parameter, and its gradient lands there.

What dafast's head does not cover stays on TRL's own head, which is installed underneath as the
fallback: LM heads with a bias, logit soft-capping or logit scaling (Gemma 2, Granite, Cohere,
...), MoE router losses, FSDP-sharded (DTensor) heads, and the `log_sum_sq_probs` output (WPO
weighting). Entropy comes back without gradient (TRL's trainers only log it).

A right-padded batch (TRL's SFT and DPO collators, ORPO's concatenated pairs) runs its SDPA
attention causal-only, without the padding mask: exact for every scored token, and on the CPU
about 13% less attention time at SmolLM2's shapes (drop_right_padding_mask).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types

import torch
from torch.distributed.tensor import DTensor
from trl.trainer import utils as trl_utils
from trl.trainer.utils import FusedCausalLMOutput

from dafast.ops.linear_logprobs import LOGIT_TRANSFORMS, linear_logprobs

# Trainers that build their models' fused head at construction time (`from .utils import ...`).
TRL_TRAINER_MODULES = ("trl.trainer.sft_trainer", "trl.trainer.dpo_trainer")
SUPPORTED_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
# Forward kwargs that leave a plain causal-LM forward (one text sequence per row, positions
# 0..T-1, no cache) as it is. Any other kwarg with a value (position_ids, a cache, packed-sequence
# boundaries, images, token types, ...) keeps the attention mask: see drop_right_padding_mask.
_PLAIN_FORWARD_KWARGS = frozenset({"input_ids", "inputs_embeds", "attention_mask", "use_cache",
                                   "output_attentions", "output_hidden_states", "return_dict"})


def drop_right_padding_mask(attention_mask, position_ids=None, targets=None, ignore_index=-100):
    """None where a right-padded batch's 2-D attention mask can go, else the mask unchanged.

    With a padding mask, transformers hands SDPA a 4-D [B, 1, T, T] mask and is_causal=False, and
    the kernel reads and applies that mask on every query-key block; with no mask it passes
    is_causal=True (torch 2.13's CPU kernel: 296 vs 341 ms per SmolLM2 layer, forward and backward,
    8 x 505 tokens with 20% padding; kernels that skip the blocks above the diagonal save up to
    half). For a right-padded batch (each row ones, then zeros) dropping the mask changes nothing
    for the tokens that count:

    - a real token attends, causally, to earlier positions only, and those are all real: the
      padding mask hides nothing from it;
    - with no position_ids, every token's position is its index 0..T-1 with or without the mask,
      so real tokens keep their rotary / absolute positions (hence position_ids given: kept);
    - pad positions get other hidden states, but only their own (and later pads') outputs depend
      on them, and the head scores position t on targets[:, t]: where every pad position's target
      is ignore_index (checked when targets are given) the head drops those rows before
      computing anything, so log-probs, statistics, loss and gradients are the same.

    A left-padded mask (a zero before a one), a zero inside a row (packed sequences), a mask that
    is not 2-D, given position_ids or a scored target at a pad position: the mask is kept. An
    all-ones mask is right-padded (transformers drops it by itself too).
    targets: [B, n], aligned with the hidden states (position t scored on targets[:, t]), n <= T.
    One host synchronisation for all the checks.
    """
    if (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2
            or position_ids is not None or attention_mask.shape[1] == 0):
        return attention_mask
    real = attention_mask != 0
    wrong = (real[:, 1:] & ~real[:, :-1]).any()  # a one after a zero: not right-padded
    if targets is not None:
        if (not isinstance(targets, torch.Tensor) or targets.dim() != 2
                or targets.shape[0] != real.shape[0] or targets.shape[1] > real.shape[1]):
            return attention_mask
        pads = ~real[:, :targets.shape[1]]
        wrong = wrong | (pads & (targets.to(real.device) != ignore_index)).any()
    return attention_mask if bool(wrong) else None


def _supported(model, outputs) -> bool:
    config = model.config.get_text_config()
    return (set(outputs) <= set(SUPPORTED_OUTPUTS)
            and all(getattr(config, name, None) is None for name in LOGIT_TRANSFORMS)
            and not getattr(config, "output_router_logits", False))


def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple[str, ...] = ("log_probs",)) -> None:
    """`trl.trainer.utils.add_fused_lm_head`, computed by dafast.ops.linear_logprobs."""
    trl_utils.add_fused_lm_head(model, temperature, cast_lm_head_to_fp32, outputs)
    if not _supported(model, outputs):
        return
    trl_forward = model.forward  # TRL's patched forward: the plain forward and the fallback
    want_stats = any(name in outputs for name in SUPPORTED_OUTPUTS[1:])

    @functools.wraps(type(model).forward)
    def _fused_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None,
                       num_items_in_batch=None, **kwargs):
        lm_head = self.get_output_embeddings()
        if (not fused_lm_head or lm_head.bias is not None
                or isinstance(lm_head.weight, DTensor)
                or kwargs.get("output_router_logits")):
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels,
                               shift_labels=shift_labels, num_items_in_batch=num_items_in_batch,
                               **kwargs)
        kwargs["use_cache"] = False
        targets = labels[:, 1:] if shift_labels is None else shift_labels
        if (kwargs.get("attention_mask") is not None
                and getattr(self.config, "_attn_implementation", None) == "sdpa"
                and all(value is None for name, value in kwargs.items()
                        if name not in _PLAIN_FORWARD_KWARGS)):
            kwargs["attention_mask"] = drop_right_padding_mask(
                kwargs["attention_mask"], kwargs.get("position_ids"), targets)
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden = hidden[:, :-1]
        labels = targets
        weight = lm_head.weight
        hidden, labels = hidden.to(weight.device), labels.to(weight.device)
        mask = labels != -100
        device_type = hidden.device.type
        autocast = contextlib.nullcontext()
        if cast_lm_head_to_fp32:
            dtype = torch.float32
            autocast = torch.autocast(device_type, enabled=False)
        elif torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype = hidden.dtype
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        if temperature != 1.0:
            hidden = hidden / temperature
        with autocast:
            result = linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight,
                                     labels.reshape(-1), return_stats=want_stats)
        log_probs, stats = result if want_stats else (result, None)
        log_probs = log_probs.view(mask.shape)

        def field(name, value):
            return value.view(mask.shape) if name in outputs else None

        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None
                                   else num_items_in_batch)
        return FusedCausalLMOutput(
            loss=loss,
            log_probs=log_probs,
            entropy=field("entropy", stats.entropy) if stats else None,
            mean_logits=field("mean_logits", stats.mean_logit) if stats else None,
            is_top1=field("is_top1", stats.is_top1) if stats else None,
            label_mask=mask,
        )

    model.forward = types.MethodType(_fused_forward, model)


def use_in_trl(enabled: bool = True) -> None:
    """Make TRL's SFT and DPO trainers give their models dafast's fused head (enabled=False:
    TRL's own again). Affects trainers built afterwards."""
    head = add_fused_lm_head if enabled else trl_utils.add_fused_lm_head
    for name in TRL_TRAINER_MODULES:
        importlib.import_module(name).add_fused_lm_head = head
