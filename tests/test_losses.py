"""dafast.losses against TRL 1.16 / transformers on the same batch: loss, gradients (hidden and
head weight) and metrics, in fp32 to 1e-5. TRL's loss code is called where it is a function;
where it is inlined in a trainer method, it is reproduced below with a pointer to the source."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import dafast
from dafast import losses

trl_utils = pytest.importorskip("trl.trainer.utils")
ORPOTrainer = pytest.importorskip("trl.experimental.orpo").ORPOTrainer
ForCausalLMLoss = pytest.importorskip("transformers.loss.loss_utils").ForCausalLMLoss

PAIRS, T, H, V = 3, 41, 48, 997
TOL = dict(rtol=1e-5, atol=1e-5)


def preference_batch(prompt_lens=(5, 9, 13), completion_lens=((20, 31), (7, 35), (27, 12))):
    """The concatenated batch TRL builds: chosen rows, then rejected rows, right-padded.
    input_ids [2B, T], attention_mask, and completion labels (prompt and padding ignored)."""
    input_ids = torch.randint(0, V, (2 * PAIRS, T))
    attention = torch.zeros(2 * PAIRS, T, dtype=torch.long)
    labels = torch.full((2 * PAIRS, T), -100)
    for i, prompt in enumerate(prompt_lens):
        input_ids[PAIRS + i, :prompt] = input_ids[i, :prompt]  # a pair shares its prompt
        for row, completion in ((i, completion_lens[i][0]), (PAIRS + i, completion_lens[i][1])):
            end = prompt + completion
            attention[row, :end] = 1
            labels[row, prompt:end] = input_ids[row, prompt:end]
    return input_ids, attention, labels


def leaves():
    hidden = torch.randn(2 * PAIRS, T, H, requires_grad=True)
    weight = (torch.randn(V, H) / H ** 0.5).requires_grad_()
    return hidden, weight


def assert_same(ours, theirs, tensors):
    """Same loss value and same gradients for every leaf."""
    torch.testing.assert_close(ours, theirs, **TOL)
    ours_grads = torch.autograd.grad(ours, tensors, retain_graph=True)
    theirs_grads = torch.autograd.grad(theirs, tensors, retain_graph=True)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("kind", ["cpt", "sft_completion_only"])
@pytest.mark.parametrize("num_items_in_batch", [None, 500])
def test_causal_lm_loss_equals_transformers(kind, num_items_in_batch):
    input_ids, attention, completion_labels = preference_batch()
    labels = input_ids.masked_fill(attention == 0, -100) if kind == "cpt" else completion_labels
    hidden, weight = leaves()
    ours = losses.causal_lm_loss(hidden, weight, labels, num_items_in_batch=num_items_in_batch)
    # What the model computes from its logits when called with labels=...
    theirs = ForCausalLMLoss(hidden @ weight.T, labels, V, num_items_in_batch=num_items_in_batch)
    assert_same(ours, theirs, (hidden, weight))


def test_causal_lm_loss_without_labels_is_zero():
    hidden, weight = leaves()
    loss = losses.causal_lm_loss(hidden, weight, torch.full((2 * PAIRS, T), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert (weight.grad == 0).all()


def trl_dpo(logits, labels, ref_chosen, ref_rejected, beta):
    """TRL 1.16, trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss: per-token log-probs summed
    over the completion, loss_type "sigmoid" (`-F.logsigmoid(self.beta * delta_score)` with
    f_divergence_type "reverse_kl"), mean over pairs; then the metrics it logs."""
    labels = labels[:, 1:]
    mask = labels != -100
    per_token = trl_utils.selective_log_softmax(logits[:, :-1], labels.masked_fill(~mask, 0)) * mask
    chosen_logps, rejected_logps = per_token.sum(dim=1).chunk(2, dim=0)
    chosen_logratios = chosen_logps - ref_chosen
    rejected_logratios = rejected_logps - ref_rejected
    loss = (-F.logsigmoid(beta * (chosen_logratios - rejected_logratios))).mean()
    chosen_rewards, rejected_rewards = beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.mean(),
        "logps/rejected": rejected_logps.mean(),
    }
    return loss, metrics


@pytest.mark.parametrize("beta", [0.1, 0.05])
@pytest.mark.parametrize("mode", ["native", "reference"])
def test_dpo_equals_trl(beta, mode):
    _, _, labels = preference_batch()
    hidden, weight = leaves()
    # Reference log-probs as the trainer gets them: the same head on frozen hidden states (the
    # adapter-disabled model), without gradient.
    with torch.no_grad():
        ref_chosen, ref_rejected = losses.sequence_logps(hidden * 0.9, weight, labels).chunk(2)
    with dafast.kernels.mode(mode):
        ours, our_metrics = losses.dpo_loss(hidden, weight, labels, ref_chosen, ref_rejected, beta=beta)
    theirs, their_metrics = trl_dpo(hidden @ weight.T, labels, ref_chosen, ref_rejected, beta)
    assert_same(ours, theirs, (hidden, weight))
    assert our_metrics.keys() == their_metrics.keys()
    for key in their_metrics:
        torch.testing.assert_close(our_metrics[key], their_metrics[key].detach(), **TOL)


def test_dpo_label_smoothing_is_conservative_dpo():
    _, _, labels = preference_batch()
    hidden, weight = leaves()
    ref_chosen, ref_rejected = torch.full((PAIRS,), -200.0), torch.full((PAIRS,), -210.0)
    ours, _ = losses.dpo_loss(hidden, weight, labels, ref_chosen, ref_rejected, beta=0.1,
                              label_smoothing=0.2)
    chosen, rejected = losses.sequence_logps(hidden, weight, labels).chunk(2)
    x = 0.1 * ((chosen - ref_chosen) - (rejected - ref_rejected))
    # cDPO, as TRL before 1.0 wrote its "sigmoid" loss with label_smoothing
    expected = (-(1 - 0.2) * F.logsigmoid(x) - 0.2 * F.logsigmoid(-x)).mean()
    torch.testing.assert_close(ours, expected, **TOL)


def trl_orpo(logits, input_ids, attention, labels, beta):
    """TRL 1.16, trl/experimental/orpo/orpo_trainer.py: ORPOTrainer.concatenated_forward (its
    inner cross_entropy_loss on the chosen rows, labels = input_ids where attention_mask is 1,
    and the static get_batch_logps with average_log_prob=True), odds_ratio_loss called as TRL's
    own method, and get_batch_loss_metrics' `loss = policy_nll_loss - losses.mean()`."""
    nll_labels = torch.where(attention == 1, input_ids, -100)[:PAIRS]
    nll = torch.nn.CrossEntropyLoss()(logits[:PAIRS, :-1].reshape(-1, V), nll_labels[:, 1:].reshape(-1))
    all_logps = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    chosen, rejected = all_logps[:PAIRS], all_logps[PAIRS:]
    trainer = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=logits.device))
    orpo_losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = (
        ORPOTrainer.odds_ratio_loss(trainer, chosen, rejected))
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen.mean(),
        "logps/rejected": rejected.mean(),
        "nll_loss": nll,
        "log_odds_ratio": log_odds_ratio,
        "log_odds_chosen": log_odds_chosen,
    }
    return nll - orpo_losses.mean(), metrics, nll_labels


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("mode", ["native", "reference"])
def test_orpo_equals_trl(beta, mode):
    input_ids, attention, labels = preference_batch()
    hidden, weight = leaves()
    theirs, their_metrics, nll_labels = trl_orpo(hidden @ weight.T, input_ids, attention, labels, beta)
    with dafast.kernels.mode(mode):
        ours, our_metrics = losses.orpo_loss(hidden, weight, labels, beta=beta, nll_labels=nll_labels)
    assert_same(ours, theirs, (hidden, weight))
    assert our_metrics.keys() == their_metrics.keys()
    for key in their_metrics:
        torch.testing.assert_close(our_metrics[key], their_metrics[key].detach(), **TOL)


def test_orpo_refuses_inconsistent_nll_labels():
    _, _, labels = preference_batch()
    hidden, weight = leaves()
    wrong = labels[:PAIRS].clone()
    wrong[0, 10] = (wrong[0, 10] + 1) % V
    with pytest.raises(ValueError, match="nll_labels must equal labels"):
        losses.orpo_loss(hidden, weight, labels, nll_labels=wrong)


def test_frozen_head_gets_no_gradient_and_hidden_the_same():
    """The LoRA case: a frozen head. dW is skipped; dHidden is unchanged."""
    _, _, labels = preference_batch()
    hidden, weight = leaves()
    frozen = weight.detach()
    loss = losses.causal_lm_loss(hidden, frozen, labels)
    (grad_frozen,) = torch.autograd.grad(loss, hidden)
    (grad_full,) = torch.autograd.grad(losses.causal_lm_loss(hidden, weight, labels), hidden)
    torch.testing.assert_close(grad_frozen, grad_full)


def test_token_logprobs_stats_shapes():
    _, _, labels = preference_batch()
    hidden, weight = leaves()
    logp, stats = losses.token_logprobs(hidden, weight, labels, return_stats=True)
    assert logp.shape == stats.entropy.shape == stats.is_top1.shape == (2 * PAIRS, T - 1)
    aligned = losses.token_logprobs(hidden[:, :-1], weight, labels[:, 1:], shift=False)
    torch.testing.assert_close(aligned, logp)
