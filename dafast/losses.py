"""Training losses on dafast's fused log-probabilities: the code every stage trains with
(dafast.trainers), numerically TRL 1.16's.

Every loss takes the final hidden states [B, T, H] and the LM head weight [V, H] (never the
[B, T, V] logits) with labels [B, T] in the usual causal-LM convention: position t is scored on
labels[:, t + 1], and ignore_index marks tokens without loss (prompt, padding). Preference losses
take the chosen and the rejected sequences of a pair in ONE batch, chosen first, as TRL's
trainers concatenate them: hidden [2B, T, H], labels [2B, T], so one forward serves both.
weight None: `hidden` are the model's logits [B, T, V] instead, for the heads the fused kernel
does not cover (a bias, logit soft-capping or scaling; see dafast.kernels); the same losses then
come from log_softmax.

Gradients flow to hidden and weight through dafast.ops.linear_logprobs; a frozen head (LoRA)
never pays for dW. Under autocast the head runs in the autocast dtype, as an nn.Linear head would.
Metrics come back as detached 0-d tensors (no host synchronisation), named as TRL logs them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dafast.ops.linear_logprobs import LogprobStats, linear_logprobs, logprobs_from_logits


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor | None, labels: torch.Tensor, *,
                   ignore_index: int = -100, shift: bool = True, return_stats: bool = False):
    """log p(labels[:, t + 1] | hidden[:, t]) as [B, T - 1] float32 (shift=False: labels are
    already aligned with hidden, [B, T]); 0 where the label is ignored. With return_stats, also
    LogprobStats (entropy, mean logit, is_top1), each shaped like the log-probs."""
    if shift:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    shape = labels.shape
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if weight is None:
        out = logprobs_from_logits(hidden, labels, ignore_index, return_stats)
    else:
        device = hidden.device.type
        if torch.is_autocast_enabled(device):  # the op is not autocast-aware: cast as Linear is
            dtype = torch.get_autocast_dtype(device)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        out = linear_logprobs(hidden, weight, labels, ignore_index, return_stats=return_stats)
    if not return_stats:
        return out.view(shape)
    logp, stats = out
    return logp.view(shape), LogprobStats(*(s.view(shape) for s in stats))


def sequence_logps(hidden: torch.Tensor, weight: torch.Tensor | None, labels: torch.Tensor, *,
                   ignore_index: int = -100, average: bool = False) -> torch.Tensor:
    """[B] sum (average=True: mean) of the non-ignored tokens' log-probabilities per sequence.
    Reference log-probs for DPO are this, under torch.no_grad(), from the reference weights: the
    same model with its adapters disabled, or precomputed once per dataset."""
    logp = token_logprobs(hidden, weight, labels, ignore_index=ignore_index)
    total = logp.sum(-1)
    if not average:
        return total
    return total / (labels[:, 1:] != ignore_index).sum(-1)  # NaN for an empty sequence, as TRL


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor | None, labels: torch.Tensor, *,
                   ignore_index: int = -100,
                   num_items_in_batch: int | torch.Tensor | None = None,
                   return_metrics: bool = False):
    """Next-token cross-entropy, summed over non-ignored labels and divided by their count (or
    by num_items_in_batch under gradient accumulation): transformers' ForCausalLMLoss and TRL's
    SFT loss. CPT: labels = input_ids. SFT on completions / assistant turns only: the other
    tokens' labels set to ignore_index. A batch without labels gives 0, as in TRL.
    return_metrics: (loss, metrics) with the entropy and mean_token_accuracy TRL's SFT logs."""
    out = token_logprobs(hidden, weight, labels, ignore_index=ignore_index,
                         return_stats=return_metrics)
    logp, stats = out if return_metrics else (out, None)
    if num_items_in_batch is None:
        num_items_in_batch = (labels[:, 1:] != ignore_index).sum()
    loss = -logp.sum() / torch.as_tensor(num_items_in_batch, device=logp.device).clamp(min=1)
    if not return_metrics:
        return loss
    scored = (labels[:, 1:] != ignore_index).sum().clamp(min=1)
    return loss, {"entropy": stats.entropy.sum() / scored,
                  "mean_token_accuracy": stats.is_top1.sum() / scored}


def dpo_loss_from_logps(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                        ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *,
                        beta: float = 0.1, label_smoothing: float = 0.0):
    """DPO's sigmoid loss on sequence log-probs [B]: -log sigmoid(beta * (chosen log-ratio -
    rejected log-ratio)), averaged; the metrics TRL logs. label_smoothing > 0 gives conservative
    DPO, -(1 - ls) log sigmoid(x) - ls log sigmoid(-x) (TRL 1.16's "sigmoid" has no smoothing, so
    it equals it only at 0; its "robust" loss is another, unbiased, variant)."""
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    logits = beta * (chosen_logratios - rejected_logratios)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    metrics = _preference_metrics(beta * chosen_logratios, beta * rejected_logratios,
                                  chosen_logps, rejected_logps)
    return losses.mean(), metrics


def _preference_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict:
    """The reward and log-prob metrics TRL's DPO and ORPO trainers log, detached."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }


def dpo_loss(hidden: torch.Tensor, weight: torch.Tensor | None, labels: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *,
             beta: float = 0.1, label_smoothing: float = 0.0, ignore_index: int = -100):
    """DPO from the concatenated batch (chosen rows first): hidden [2B, T, H], labels [2B, T]
    with the prompt ignored, reference sequence log-probs [B] each. Returns (loss, metrics):
    dpo_loss_from_logps' and the token statistics TRL's DPO logs (entropy over the completions,
    mean_token_accuracy over the chosen ones, the mean logit of each side)."""
    logp, stats = token_logprobs(hidden, weight, labels, ignore_index=ignore_index,
                                 return_stats=True)
    chosen, rejected = logp.sum(-1).chunk(2)
    loss, metrics = dpo_loss_from_logps(chosen, rejected, ref_chosen_logps, ref_rejected_logps,
                                        beta=beta, label_smoothing=label_smoothing)
    scored = labels[:, 1:] != ignore_index
    chosen_scored, rejected_scored = scored.chunk(2)
    mean_logit_chosen, mean_logit_rejected = stats.mean_logit.chunk(2)

    def mean_over(values, mask):
        return values.sum() / mask.sum().clamp(min=1)

    return loss, {**metrics,
                  "entropy": mean_over(stats.entropy, scored),
                  "mean_token_accuracy": mean_over(stats.is_top1.chunk(2)[0], chosen_scored),
                  "logits/chosen": mean_over(mean_logit_chosen, chosen_scored),
                  "logits/rejected": mean_over(mean_logit_rejected, rejected_scored)}


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, switching at -ln 2 to stay accurate (as trl.experimental.orpo)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(hidden: torch.Tensor, weight: torch.Tensor | None, labels: torch.Tensor, *,
              beta: float = 0.1, nll_labels: torch.Tensor | None = None,
              ignore_index: int = -100):
    """ORPO as trl.experimental.orpo defines it, from the concatenated batch (chosen rows first).

    loss = NLL(chosen) - beta * mean(log sigmoid(log-odds ratio)), where the log-odds use the
    length-averaged log-probs of the completions (labels: prompt ignored) and the NLL is the mean
    cross-entropy over nll_labels [B, T]: TRL scores the chosen prompt AND completion there
    (input_ids where attention_mask is 1); default: the chosen rows of `labels`. nll_labels must
    agree with labels wherever labels are not ignored, so one op call scores both.
    Returns (loss, metrics).
    """
    pairs = labels.shape[0] // 2
    if nll_labels is None:
        nll_labels = labels[:pairs]
    scored = orpo_scored_labels(labels, nll_labels, ignore_index)
    logp = token_logprobs(hidden, weight, scored, ignore_index=ignore_index)
    return orpo_loss_from_token_logps(logp, labels, nll_labels, beta=beta,
                                      ignore_index=ignore_index)


def orpo_scored_labels(labels: torch.Tensor, nll_labels: torch.Tensor,
                       ignore_index: int = -100) -> torch.Tensor:
    """The labels one log-prob call scores for ORPO: nll_labels on the chosen rows (a superset of
    their completion labels), the completion labels on the rejected rows."""
    pairs = labels.shape[0] // 2
    chosen_labels = labels[:pairs]
    if not ((chosen_labels == ignore_index) | (chosen_labels == nll_labels)).all():
        raise ValueError("dafast.orpo_loss: nll_labels must equal labels wherever labels are not "
                         "ignored (the completion is part of the sequence the NLL scores)")
    return torch.cat([nll_labels, labels[pairs:]])


def orpo_loss_from_token_logps(logp: torch.Tensor, labels: torch.Tensor,
                               nll_labels: torch.Tensor, *, beta: float = 0.1,
                               ignore_index: int = -100):
    """ORPO from per-token log-probs [2B, T - 1] of orpo_scored_labels(labels, nll_labels),
    shifted as token_logprobs gives them. Returns (loss, metrics)."""
    pairs = labels.shape[0] // 2
    completion = labels[:, 1:] != ignore_index
    avg_logps = (logp * completion).sum(-1) / completion.sum(-1)
    nll_mask = nll_labels[:, 1:] != ignore_index
    nll_loss = -(logp[:pairs] * nll_mask).sum() / nll_mask.sum()
    chosen, rejected = avg_logps.chunk(2)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    loss = nll_loss - beta * ratio.mean()
    metrics = {
        **_preference_metrics(beta * chosen, beta * rejected, chosen, rejected),
        "nll_loss": nll_loss.detach(),
        "log_odds_ratio": ratio.detach().mean(),
        "log_odds_chosen": log_odds.detach().mean(),
    }
    return loss, metrics
