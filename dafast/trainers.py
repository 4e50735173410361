"""The trainers of the study's stages: TRL's SFT, DPO and ORPO trainers with their loss computed
by dafast.losses on the model's final hidden states.

TRL supplies the data collation, the loop, checkpoints, logging and accelerate; each trainer here
overrides only `compute_loss` (DPO also `compute_ref_log_probs`):

    batch -> model(input_ids, attention_mask)      # dafast.kernels.apply(model) deferred its head:
          -> outputs.logits = hidden states [B, T, H]    # no [B, T, V] logits
          -> dafast.losses.causal_lm_loss / dpo_loss / orpo_loss(hidden, head weight, labels)

A model whose head dafast.kernels did not defer (see there) gives logits, and the same losses
take them (weight None). Under mixed precision the loss runs under accelerate's autocast too:
accelerate hands the model's outputs back in fp32, and the head belongs in the autocast dtype, as
every other linear layer of the forward. The metrics each trainer logs are the ones TRL's trainer logs for that
loss; they are averaged over the micro-batches of a logging step.
"""

from __future__ import annotations

import collections
import contextlib
import warnings

import torch
from peft import PeftModel
from trl import DPOTrainer, SFTTrainer

from dafast import kernels, losses

with warnings.catch_warnings():  # TRL warns that the experimental namespace may change
    warnings.simplefilter("ignore")
    from trl.experimental.orpo import ORPOTrainer


def drop_right_padding_mask(attention_mask, targets=None, ignore_index=-100):
    """None where a right-padded batch's 2-D attention mask can go, else the mask unchanged.

    With a padding mask, transformers hands SDPA a 4-D [B, 1, T, T] mask and is_causal=False, and
    the kernel reads and applies that mask on every query-key block; with no mask it passes
    is_causal=True, which the kernels run faster. For a right-padded batch (each row ones, then
    zeros) dropping the mask changes nothing for the tokens that count:

    - a real token attends, causally, to earlier positions only, and those are all real: the
      padding mask hides nothing from it;
    - with no position_ids (the trainers here pass none), every token's position is its index
      0..T-1 with or without the mask, so real tokens keep their rotary / absolute positions;
    - pad positions get other hidden states, but only their own (and later pads') outputs depend
      on them, and the loss scores position t on targets[:, t]: where every pad position's
      target is ignore_index (checked when targets are given) the loss never reads them.

    A left-padded mask (a zero before a one), a zero inside a row (packed sequences), a mask that
    is not 2-D or a scored target at a pad position: the mask is kept. An all-ones mask is
    right-padded (transformers drops it by itself too).
    targets: [B, n], aligned with the hidden states (position t scored on targets[:, t]), n <= T.
    One host synchronisation for all the checks.
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 \
            or attention_mask.shape[1] == 0:
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


class _LossOnHiddenStates:
    """What the three trainers share: the forward to the final hidden states, and metrics kept
    until the next log() (TRL's trainers keep theirs the same way)."""

    def hidden_states(self, model, input_ids, attention_mask, labels):
        """(final hidden states [B, T, H] and the head weight) or (logits [B, T, V], None) for a
        batch whose loss scores labels (causal convention: position t on labels[:, t + 1])."""
        unwrapped = self.accelerator.unwrap_model(model)
        if getattr(unwrapped.config, "_attn_implementation", None) == "sdpa":
            attention_mask = drop_right_padding_mask(attention_mask, labels[:, 1:])
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return outputs.logits, kernels.deferred_head_weight(unwrapped)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_metrics = {"train": collections.defaultdict(list),
                             "eval": collections.defaultdict(list)}

    def record(self, metrics: dict[str, torch.Tensor]) -> None:
        """Metrics of one micro-batch (0-d tensors), averaged over the processes."""
        store = self.loss_metrics["train" if self.model.training else "eval"]
        for name, value in metrics.items():
            store[name].append(self.accelerator.gather_for_metrics(value.detach()).mean().item())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        for name, values in self.loss_metrics[mode].items():
            logs[prefix + name] = sum(values) / len(values)
        self.loss_metrics[mode].clear()
        super().log(logs, start_time)


class CausalLMTrainer(_LossOnHiddenStates, SFTTrainer):
    """CPT and SFT: next-token cross-entropy on the labelled tokens (TRL's SFT loss, "nll")."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        hidden, weight = self.hidden_states(model, inputs["input_ids"],
                                            inputs.get("attention_mask"), labels)
        with self.accelerator.autocast():
            loss, metrics = losses.causal_lm_loss(hidden, weight, labels,
                                                  num_items_in_batch=num_items_in_batch,
                                                  return_metrics=True)
        # As Trainer.compute_loss: num_items_in_batch counts every process's tokens, and DDP
        # averages the gradients across processes.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        self.record(metrics)
        return (loss, None) if return_outputs else loss


class DPOTrainerOnHiddenStates(_LossOnHiddenStates, DPOTrainer):
    """DPO, sigmoid loss. The reference is the stage's starting model: with LoRA the policy with
    its adapter disabled, with full fine-tuning the `ref_model` given, or log-probs precomputed
    once (precompute_ref_log_probs) from the policy before training."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = _completion_labels(inputs)
        if self.args.precompute_ref_log_probs:
            reference = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            reference = self.compute_ref_log_probs(self.ref_model or model, inputs)
        hidden, weight = self.hidden_states(model, inputs["input_ids"], inputs["attention_mask"],
                                            labels)
        with self.accelerator.autocast():
            loss, metrics = losses.dpo_loss(hidden, weight, labels, *reference, beta=self.beta)
        self.record(metrics)
        return (loss, None) if return_outputs else loss

    def compute_ref_log_probs(self, model, inputs):
        """The reference's sequence log-probs (chosen, rejected) [B] each, of a padded batch."""
        labels = _completion_labels(inputs)
        unwrapped = self.accelerator.unwrap_model(model)
        adapter_off = (unwrapped.disable_adapter() if isinstance(unwrapped, PeftModel)
                       else contextlib.nullcontext())
        with torch.no_grad(), adapter_off, self.accelerator.autocast():
            hidden, weight = self.hidden_states(model, inputs["input_ids"],
                                                inputs["attention_mask"], labels)
            return losses.sequence_logps(hidden, weight, labels).chunk(2)


def _completion_labels(inputs) -> torch.Tensor:
    """TRL's DPO batch: chosen rows then rejected rows; the loss scores the completions."""
    return inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)


class ORPOTrainerOnHiddenStates(_LossOnHiddenStates, ORPOTrainer):
    """ORPO (trl.experimental.orpo's loss): NLL of the chosen sequence plus beta times the log
    odds ratio of the length-averaged completion log-probs. TRL's trainer builds the [2 x pairs,
    tokens, vocab] logits; this one scores the pair with one fused call."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = self.concatenated_inputs(inputs, padding_value=self.padding_value,
                                         device=self.accelerator.device)
        input_ids = batch["concatenated_input_ids"]
        attention_mask = batch["concatenated_attention_mask"]
        labels = batch["concatenated_labels"]  # the completions; prompt and padding -100
        pairs = input_ids.shape[0] // 2
        if self.model.training:  # Trainer's token count cannot see the concatenated batch
            self.state.num_input_tokens_seen += int(
                self.accelerator.gather(attention_mask.sum()).sum())
        # TRL's NLL term scores the chosen prompt and completion: every attended token
        nll_labels = torch.where(attention_mask[:pairs] == 1, input_ids[:pairs], -100)
        hidden, weight = self.hidden_states(
            model, input_ids, attention_mask, losses.orpo_scored_labels(labels, nll_labels))
        with self.accelerator.autocast():
            loss, metrics = losses.orpo_loss(hidden, weight, labels, beta=self.beta,
                                             nll_labels=nll_labels)
        self.record(metrics)
        return (loss, None) if return_outputs else loss


__all__ = ["CausalLMTrainer", "DPOTrainerOnHiddenStates", "ORPOTrainerOnHiddenStates",
           "drop_right_padding_mask"]
