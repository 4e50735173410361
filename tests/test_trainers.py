"""dafast.trainers and dafast.kernels on tiny random Llamas: the deferred head gives the hidden
states and back, the losses on hidden states equal the losses on logits, dafast's SFT, DPO and
ORPO trainers take TRL's trainers' steps (losses, every logged metric, weights), and right-padded
batches run causal-only attention with the same results."""

import copy
import warnings

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import trl
import dafast.kernels
from dafast import losses, trainers

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer


def tiny_llama(tied=True, vocab=300, **extra):
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=tied, pad_token_id=0, eos_token_id=1,
                         bos_token_id=1, **extra)
    return LlamaForCausalLM(config)


# ---- dafast.kernels: the head deferred to the loss ------------------------------------------

@pytest.mark.parametrize("tied", [True, False])
def test_deferred_head_returns_the_hidden_states_and_revert_the_logits(tied):
    model = tiny_llama(tied)
    ids = torch.randint(0, 300, (2, 9))
    logits = model(input_ids=ids).logits
    applied = dafast.kernels.apply(model)
    assert applied.head_deferred and applied.mlps == 2 and applied.head_kept_because is None
    hidden = model(input_ids=ids).logits
    assert hidden.shape == (2, 9, 32)
    torch.testing.assert_close(hidden, model.model(input_ids=ids).last_hidden_state)
    weight = dafast.kernels.deferred_head_weight(model)
    assert weight is model.lm_head.weight
    assert (weight is model.model.embed_tokens.weight) == tied
    torch.testing.assert_close(hidden @ weight.T, logits, rtol=1e-5, atol=1e-5)
    dafast.kernels.revert(model)
    assert dafast.kernels.deferred_head_weight(model) is None
    torch.testing.assert_close(model(input_ids=ids).logits, logits)
    assert set(model.state_dict()) == set(tiny_llama(tied).state_dict())


def test_heads_the_kernel_does_not_cover_keep_their_logits():
    model = tiny_llama(final_logit_softcapping=30.0)
    applied = dafast.kernels.apply(model)
    assert not applied.head_deferred and "soft-capping" in applied.head_kept_because
    assert dafast.kernels.deferred_head_weight(model) is None
    assert model(input_ids=torch.randint(0, 300, (1, 5))).logits.shape == (1, 5, 300)


def test_losses_on_hidden_states_equal_losses_on_logits():
    """The fused path (hidden states and the head weight) and the logits path (weight None)
    give one loss, metrics and gradient, for each loss."""
    hidden = torch.randn(4, 11, 32, dtype=torch.float64)
    weight = torch.randn(300, 32, dtype=torch.float64)
    labels = torch.randint(0, 300, (4, 11))
    labels[:, :4] = -100
    refs = torch.randn(2, dtype=torch.float64), torch.randn(2, dtype=torch.float64)

    def run(loss_fn, fused):
        h = hidden.float().clone().requires_grad_()
        w = weight.float().clone().requires_grad_()
        inputs = (h, w) if fused else (h @ w.T, None)
        loss, metrics = loss_fn(*inputs)
        loss.backward()
        return loss.detach(), metrics, h.grad, w.grad

    for loss_fn in (lambda h, w: losses.causal_lm_loss(h, w, labels, return_metrics=True),
                    lambda h, w: losses.dpo_loss(h, w, labels, *refs, beta=0.1),
                    lambda h, w: losses.orpo_loss(h, w, labels, beta=0.1)):
        fused, logits = run(loss_fn, True), run(loss_fn, False)
        torch.testing.assert_close(fused[0], logits[0], rtol=1e-5, atol=1e-6)
        assert fused[1].keys() == logits[1].keys()
        for name in fused[1]:
            torch.testing.assert_close(fused[1][name].float(), logits[1][name].float(),
                                       rtol=1e-5, atol=1e-5, msg=name)
        for got, want in zip(fused[2:], logits[2:]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


# ---- right-padded batches: causal-only attention, no padding mask ---------------------------

def test_drop_right_padding_mask():
    drop = trainers.drop_right_padding_mask
    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    assert drop(right) is None
    assert drop(right.bool()) is None
    assert drop(torch.ones(2, 4, dtype=torch.long)) is None
    assert drop(None) is None
    for kept in (torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]),   # left-padded
                 torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]]),   # a zero inside a row
                 torch.tensor([[0, 1, 1, 0]]),                  # both sides
                 right[None]):                                  # not 2-D (a custom 4-D mask)
        assert drop(kept) is kept
    # targets aligned with the hidden states (labels[:, 1:]): every pad position's target ignored
    targets = torch.tensor([[5, 6, 7], [5, -100, -100], [-100, -100, -100]])
    assert drop(right, targets) is None
    targets[1, 2] = 7  # a pad position scored: its hidden state would count
    assert drop(right, targets) is right
    left_targets = torch.tensor([[5, 6, 7], [-100, -100, 9]])  # left-padded, pads ignored: kept
    assert drop(torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]), left_targets) is not None


def spy_on_sdpa(monkeypatch):
    """[(attn_mask is None, is_causal)] for each call of torch's SDPA (through transformers'
    sdpa_attention, which looks it up on torch.nn.functional at each call)."""
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, is_causal=False, **kwargs):
        calls.append((attn_mask is None, is_causal))
        return sdpa(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


# ---- dafast's trainers take TRL's trainers' steps -------------------------------------------

def char_tokenizer():
    chars = "abcdefghijklmnopqrstuvwxyz .,?!"
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.add_special_tokens(["<pad>", "<eos>"])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>")


PREFERENCES = [
    {"prompt": "what is it? ", "chosen": "a cat.", "rejected": "a dog!"},
    {"prompt": "say hi. ", "chosen": "hi there", "rejected": "no"},
    {"prompt": "is fire hot? ", "chosen": "yes", "rejected": "no, it is cold"},
    {"prompt": "sky color? ", "chosen": "blue", "rejected": "green"},
]
COMPLETIONS = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in PREFERENCES]
# (TRL's trainer, dafast's, the config, the rows)
FAMILIES = {
    "sft": (trl.SFTTrainer, trainers.CausalLMTrainer, trl.SFTConfig, COMPLETIONS),
    "dpo": (trl.DPOTrainer, trainers.DPOTrainerOnHiddenStates, trl.DPOConfig, PREFERENCES),
    "orpo": (ORPOTrainer, trainers.ORPOTrainerOnHiddenStates, ORPOConfig, PREFERENCES),
}


def train(family: str, ours: bool, model, tmp_path, **config):
    theirs_cls, ours_cls, config_cls, rows = FAMILIES[family]
    config.setdefault("use_cpu", True)  # tests/test_cuda.py passes use_cpu=False
    if family != "sft":
        config.setdefault("beta", 0.1)
    if family == "orpo":  # ORPO's default max_length cuts nothing here; its collator needs one
        config.setdefault("max_length", 64)
    args = config_cls(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                      learning_rate=1e-2, logging_steps=1, report_to="none",
                      save_strategy="no", seed=0, disable_tqdm=True, bf16=False, **config)
    extra = {"ref_model": copy.deepcopy(model)} if family == "dpo" else {}
    if ours:
        dafast.kernels.apply(model)
        for reference in extra.values():
            dafast.kernels.apply(reference)
    trainer = (ours_cls if ours else theirs_cls)(
        model=model, args=args, train_dataset=Dataset.from_list(rows),
        processing_class=char_tokenizer(), **extra)
    trainer.train()
    if ours:
        dafast.kernels.revert(model)
    return [log for log in trainer.state.log_history if "loss" in log], model


def assert_same_training(family, tmp_path, rtol, **config):
    start = tiny_llama(vocab=64, attn_implementation="sdpa")
    logs_trl, model_trl = train(family, False, copy.deepcopy(start), tmp_path / "trl", **config)
    logs_ours, model_ours = train(family, True, copy.deepcopy(start), tmp_path / "dafast",
                                  **config)
    assert len(logs_ours) == len(logs_trl) == 2
    # TRL's ORPO logs the mean of every position's logits, which dafast never makes
    skipped = {"learning_rate", "epoch", "step", "num_tokens"} | (
        {"logits/chosen", "logits/rejected"} if family == "orpo" else set())
    for ours, theirs in zip(logs_ours, logs_trl):
        compared = set(theirs) - skipped
        assert compared >= {"loss", "grad_norm"}
        for key in compared:
            assert ours[key] == pytest.approx(theirs[key], rel=rtol, abs=rtol), key
    for p_ours, p_trl in zip(model_ours.parameters(), model_trl.parameters()):
        # two AdamW steps of lr 1e-2 move a weight by up to ~2e-2; 5e-5 of reduction-order noise
        torch.testing.assert_close(p_ours, p_trl, rtol=rtol, atol=5 * rtol)


@pytest.mark.parametrize("family", ["sft", "dpo", "orpo"])
def test_trainer_steps_give_trls_losses_metrics_and_weights(family, tmp_path):
    """Two steps of TRL's trainer (its own head and loss) and of dafast's (the loss on hidden
    states), fp32, full fine-tuning: every metric TRL logs, then the trained weights."""
    assert_same_training(family, tmp_path, rtol=1e-5)


@pytest.mark.parametrize("family", ["sft", "dpo", "orpo"])
def test_right_padded_batches_run_causal_only(family, tmp_path, monkeypatch):
    """The collators pad on the right, with -100 labels at the pads: every forward (DPO: policy
    and reference) drops the padding mask, and every SDPA call is causal-only. (The test above:
    the same losses and weights as TRL's trainers, which keep the mask.)"""
    seen, drop = [], trainers.drop_right_padding_mask

    def recording_drop(mask, *args, **kwargs):
        kept = drop(mask, *args, **kwargs)
        seen.append((bool((mask == 0).any()), kept is None))
        return kept

    monkeypatch.setattr(trainers, "drop_right_padding_mask", recording_drop)
    calls = spy_on_sdpa(monkeypatch)
    train(family, True, tiny_llama(vocab=64, attn_implementation="sdpa"), tmp_path)
    assert len(seen) == (4 if family == "dpo" else 2)  # 2 steps, DPO: policy + reference
    assert all(padded for padded, _ in seen) and all(dropped for _, dropped in seen)
    assert calls and all(call == (True, True) for call in calls)
