"""dafast.losses against independent references, in fp32 to 1e-5: the explicit logits with
torch's cross-entropy, transformers' ForCausalLMLoss, TRL 1.16's own DPO and ORPO trainers run
through their public methods (loss, gradient of every weight, the metrics they log), and the
papers' formulas on small hand-computed cases."""

import math

import pytest
import torch
import torch.nn.functional as F

import dafast
from dafast import losses

orpo = pytest.importorskip("trl.experimental.orpo")
ORPOConfig, ORPOTrainer = orpo.ORPOConfig, orpo.ORPOTrainer
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


def test_token_logprobs_equal_cross_entropy_of_the_logits():
    """Per-token log-probs, entropy and top-1 flags against the [tokens, vocab] logits computed
    explicitly: -cross_entropy, -(p log p).sum() and argmax."""
    _, _, labels = preference_batch()
    hidden, weight = leaves()
    logp, stats = losses.token_logprobs(hidden, weight, labels, return_stats=True)
    logits = (hidden @ weight.T)[:, :-1]
    targets = labels[:, 1:]
    expected = -F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), reduction="none")
    torch.testing.assert_close(logp, expected.view(targets.shape), **TOL)  # 0 where ignored
    scored = targets != -100
    log_softmax = logits.log_softmax(-1)
    entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    torch.testing.assert_close(stats.entropy[scored], entropy[scored], **TOL)
    top1 = logits.argmax(-1) == targets
    assert torch.equal(stats.is_top1[scored].bool(), top1[scored])


# DPO (Rafailov et al. 2023): loss = -log sigmoid(beta * ((log pi(y_w) - log ref(y_w)) -
# (log pi(y_l) - log ref(y_l)))) = log(1 + exp(-x)), averaged over pairs; the rewards TRL logs are
# beta * each log-ratio. Two pairs with round numbers, computed by hand:
#   chosen log-ratios  -10 - -12 = 2,   -30 - -29 = -1   -> rewards (beta 0.5)  1, -0.5
#   rejected log-ratios -14 - -12 = -2, -20 - -22 = 2    -> rewards            -1,  1
#   x = rewards chosen - rejected = 2, -1.5
DPO_PAIRS = dict(chosen_logps=torch.tensor([-10.0, -30.0]),
                 rejected_logps=torch.tensor([-14.0, -20.0]),
                 ref_chosen_logps=torch.tensor([-12.0, -29.0]),
                 ref_rejected_logps=torch.tensor([-12.0, -22.0]))


def test_dpo_loss_on_hand_computed_pairs():
    loss, metrics = losses.dpo_loss_from_logps(**DPO_PAIRS, beta=0.5)
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1.5))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert {k: round(v.item(), 6) for k, v in metrics.items()} == {
        "rewards/chosen": 0.25, "rewards/rejected": 0.0, "rewards/accuracies": 0.5,
        "rewards/margins": 0.25, "logps/chosen": -20.0, "logps/rejected": -17.0}


def test_dpo_label_smoothing_is_conservative_dpo():
    """cDPO (Mitchell 2023): the preference label flipped with probability 0.2, so each pair's
    loss is 0.8 log(1 + exp(-x)) + 0.2 log(1 + exp(x)); x = 2, -1.5 as above."""
    loss, _ = losses.dpo_loss_from_logps(**DPO_PAIRS, beta=0.5, label_smoothing=0.2)
    expected = sum(0.8 * math.log(1 + math.exp(-x)) + 0.2 * math.log(1 + math.exp(x))
                   for x in (2.0, -1.5)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_orpo_loss_on_hand_computed_probabilities():
    """ORPO (Hong et al. 2024): loss = NLL(chosen) - beta * log sigmoid(log odds(y_w) - log
    odds(y_l)), odds(y) = p / (1 - p) with p the completion's length-averaged probability (in log
    space, as TRL). One pair of 5-token rows: the chosen completion's 2 tokens at probability
    1/2 each (odds 1), the rejected's at 1/4 (odds 1/3): log-odds ratio ln 3, log sigmoid(ln 3) =
    ln 3/4. The NLL covers the chosen prompt too, 2 tokens at 1/4: (2 ln 4 + 2 ln 2) / 4."""
    labels = torch.tensor([[-100, -100, -100, 7, 8], [-100, -100, -100, 9, 10]])
    nll_labels = torch.tensor([[-100, 5, 6, 7, 8]])
    # shifted as token_logprobs gives them, log-prob 0 where a label is ignored
    logp = torch.tensor([[0.25, 0.25, 0.5, 0.5], [1.0, 1.0, 0.25, 0.25]]).log()
    beta = 0.1
    loss, metrics = losses.orpo_loss_from_token_logps(logp, labels, nll_labels, beta=beta)
    nll = (2 * math.log(4) + 2 * math.log(2)) / 4
    assert loss.item() == pytest.approx(nll - beta * math.log(3 / 4), rel=1e-6)
    expected = {"rewards/chosen": beta * math.log(1 / 2),
                "rewards/rejected": beta * math.log(1 / 4), "rewards/accuracies": 1.0, "rewards/margins": beta * math.log(2),
                "logps/chosen": math.log(1 / 2), "logps/rejected": math.log(1 / 4),
                "nll_loss": nll, "log_odds_ratio": math.log(3 / 4), "log_odds_chosen": math.log(3)}
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key].item() == pytest.approx(value, rel=1e-6, abs=1e-7), key


# The losses against TRL's own trainers, run through their public methods on a tiny random Llama
# with TRL's own LM head (dafast's is switched off while they are built): the same batch, the
# same weights; loss, the gradient of every weight, and the metrics TRL logs.
PREFERENCES = [
    {"prompt": "Nacre is made of", "chosen": " aragonite tablets.", "rejected": " pure iron."},
    {"prompt": "Bone is", "chosen": " a composite of collagen and hydroxyapatite.",
     "rejected": " a metal."},
    {"prompt": "Spider silk is spun", "chosen": " from proteins.",
     "rejected": " out of rocks that grow slowly in caves."},
]


def random_llama(tiny_model, seed):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():  # away from the saved initialisation, so policy and reference differ
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def trainer_arguments(tmp_path, beta):
    # fp32 throughout: TRL's configs default to bf16, which would run the reference under autocast
    return dict(output_dir=str(tmp_path), per_device_train_batch_size=len(PREFERENCES), beta=beta,
                max_length=64, bf16=False, activation_checkpointing=False, report_to="none",
                use_cpu=True, dataset_num_proc=None)


def assert_same_training_signal(ours, theirs, model):
    params = [p for p in model.parameters() if p.requires_grad]
    torch.testing.assert_close(ours, theirs, **TOL)
    ours_grads = torch.autograd.grad(ours, params, allow_unused=True)
    theirs_grads = torch.autograd.grad(theirs, params, allow_unused=True)
    for a, b in zip(ours_grads, theirs_grads, strict=True):
        assert (a is None) == (b is None)
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("beta, mode", [(0.1, "native"), (0.5, "reference")])
def test_dpo_equals_trls_dpo_trainer(beta, mode, tiny_model, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    policy, reference = random_llama(tiny_model, 1), random_llama(tiny_model, 2)
    trainer = DPOTrainer(model=policy, ref_model=reference, processing_class=tokenizer,
                         args=DPOConfig(**trainer_arguments(tmp_path, beta), loss_type=["sigmoid"]),
                         train_dataset=Dataset.from_list(PREFERENCES))
    batch = next(iter(trainer.get_train_dataloader()))  # chosen rows, then rejected rows
    trainer.model.train()
    theirs = trainer.compute_loss(trainer.model, batch)
    trainer.log({})
    their_metrics = trainer.state.log_history[-1]

    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        ref_chosen, ref_rejected = losses.sequence_logps(
            reference.model(**inputs).last_hidden_state, reference.lm_head.weight, labels).chunk(2)
    with dafast.kernels.mode(mode):
        ours, our_metrics = losses.dpo_loss(policy.model(**inputs).last_hidden_state,
                                            policy.lm_head.weight, labels, ref_chosen,
                                            ref_rejected, beta=beta)
    assert theirs.item() != pytest.approx(math.log(2), abs=1e-3)  # policy and reference differ
    assert_same_training_signal(ours, theirs, policy)
    # the rewards are beta * differences of sums of ~10 log-probs of -5 each: fp32 rounding of the
    # sums is about 1e-5 absolute
    for key, value in our_metrics.items():
        assert value.item() == pytest.approx(their_metrics[key], rel=1e-5, abs=1e-5), key


@pytest.mark.parametrize("beta, mode", [(0.1, "native"), (0.5, "reference")])
def test_orpo_equals_trls_orpo_trainer(beta, mode, tiny_model, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = random_llama(tiny_model, 1)
    trainer = ORPOTrainer(model=model, processing_class=tokenizer,
                          args=ORPOConfig(**trainer_arguments(tmp_path, beta)),
                          train_dataset=Dataset.from_list(PREFERENCES))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    theirs, their_metrics = trainer.get_batch_loss_metrics(trainer.model, batch)

    joined = trainer.concatenated_inputs(batch, padding_value=trainer.padding_value)
    input_ids, attention = joined["concatenated_input_ids"], joined["concatenated_attention_mask"]
    # TRL's NLL term scores the chosen prompt and completion: every attended token
    nll_labels = torch.where(attention == 1, input_ids, -100)[: input_ids.shape[0] // 2]
    hidden = model.model(input_ids=input_ids, attention_mask=attention).last_hidden_state
    with dafast.kernels.mode(mode):
        ours, our_metrics = losses.orpo_loss(hidden, model.lm_head.weight,
                                             joined["concatenated_labels"], beta=beta,
                                             nll_labels=nll_labels)
    assert_same_training_signal(ours, theirs, model)
    for key, value in our_metrics.items():
        assert value.item() == pytest.approx(float(their_metrics[key]), rel=1e-5, abs=1e-5), key


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
