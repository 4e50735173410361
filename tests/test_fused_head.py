"""dafast.fused_head: the drop-in for TRL 1.16's fused LM head on tiny random Llamas: the same
outputs and gradients as TRL's head, TRL's own DPO and SFT trainers giving TRL's losses, and
right-padded batches running causal-only attention with the same results."""

import copy

import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl.trainer.utils import add_fused_lm_head as trl_add_fused_lm_head  # noqa: E402

from dafast import fused_head  # noqa: E402

ALL_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


def tiny_llama(tied=True, vocab=300, **extra):
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=tied, pad_token_id=0, eos_token_id=1,
                         bos_token_id=1, **extra)
    return LlamaForCausalLM(config)


def both_heads(model, **kwargs):
    theirs, ours = copy.deepcopy(model), copy.deepcopy(model)
    trl_add_fused_lm_head(theirs, **kwargs)
    fused_head.add_fused_lm_head(ours, **kwargs)
    return theirs, ours


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("shifted", [False, True])
def test_same_outputs_and_gradients_as_trl_head(tied, temperature, shifted):
    theirs, ours = both_heads(tiny_llama(tied), temperature=temperature, outputs=ALL_OUTPUTS)
    input_ids = torch.randint(0, 300, (3, 19))
    labels = input_ids.clone()
    labels[:, :6] = -100
    kwargs = dict(shift_labels=labels) if shifted else dict(labels=labels)
    out_theirs = theirs(input_ids=input_ids, fused_lm_head=True, **kwargs)
    out_ours = ours(input_ids=input_ids, fused_lm_head=True, **kwargs)
    assert type(out_ours) is type(out_theirs)
    for name in ("loss", "log_probs", "entropy", "mean_logits"):
        torch.testing.assert_close(getattr(out_ours, name), getattr(out_theirs, name),
                                   rtol=1e-5, atol=1e-5)
    assert torch.equal(out_ours.is_top1, out_theirs.is_top1)
    assert torch.equal(out_ours.label_mask, out_theirs.label_mask)
    assert out_ours.log_sum_sq_probs is None
    out_theirs.loss.backward()
    out_ours.loss.backward()
    for (name, p_theirs), p_ours in zip(theirs.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p_ours.grad, p_theirs.grad, rtol=1e-5,
                                   atol=1e-6 * p_theirs.grad.abs().max().item(), msg=name)
    if tied:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_plain_forward_and_unrequested_outputs():
    theirs, ours = both_heads(tiny_llama(), outputs=("log_probs",))
    input_ids = torch.randint(0, 300, (2, 9))
    torch.testing.assert_close(ours(input_ids=input_ids).logits, theirs(input_ids=input_ids).logits)
    out = ours(input_ids=input_ids, labels=input_ids, fused_lm_head=True, num_items_in_batch=7)
    assert out.entropy is None and out.is_top1 is None and out.mean_logits is None
    torch.testing.assert_close(out.loss, -out.log_probs.sum() / 7)


def test_unsupported_models_keep_trls_head(monkeypatch):
    calls = []
    monkeypatch.setattr(fused_head, "linear_logprobs", lambda *a, **k: calls.append(1))
    model = tiny_llama(final_logit_softcapping=30.0)
    fused_head.add_fused_lm_head(model, outputs=ALL_OUTPUTS)
    input_ids = torch.randint(0, 300, (2, 9))
    assert model(input_ids=input_ids, labels=input_ids, fused_lm_head=True).log_probs.shape == (2, 8)
    model = tiny_llama()
    fused_head.add_fused_lm_head(model, outputs=("log_probs", "log_sum_sq_probs"))
    assert model(input_ids=input_ids, labels=input_ids, fused_lm_head=True).log_sum_sq_probs is not None
    assert calls == []


# ---- right-padded batches: causal-only attention, no padding mask ---------------------------

def test_drop_right_padding_mask():
    drop = fused_head.drop_right_padding_mask
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
    position_ids = torch.arange(4).expand(3, 4)  # given position_ids: kept, even the default ones
    assert drop(right, position_ids) is right
    assert drop(torch.ones(2, 4, dtype=torch.long), position_ids[:2]) is not None
    # targets aligned with the hidden states (labels[:, 1:]): every pad position's target ignored
    targets = torch.tensor([[5, 6, 7], [5, -100, -100], [-100, -100, -100]])
    assert drop(right, targets=targets) is None
    targets[1, 2] = 7  # a pad position scored: its hidden state would count
    assert drop(right, targets=targets) is right
    left_targets = torch.tensor([[5, 6, 7], [-100, -100, 9]])  # left-padded, pads ignored: kept
    assert drop(torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]), targets=left_targets) is not None


def spy_on_sdpa(monkeypatch):
    """[(attn_mask is None, is_causal)] for each call of torch's SDPA (through transformers'
    sdpa_attention, which looks it up on torch.nn.functional at each call)."""
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, is_causal=False, **kwargs):
        calls.append((attn_mask is None, is_causal))
        return sdpa(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def padded_batch(side, lengths=(19, 13, 6), vocab=300):
    """input_ids, attention_mask and labels (-100 at the pads and at each row's first token),
    padded on `side`."""
    width = max(lengths)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    if side == "left":
        mask = mask.flip(1)
    input_ids = torch.randint(2, vocab, mask.shape).masked_fill(mask == 0, 0)
    labels = input_ids.masked_fill(mask == 0, -100)
    labels[torch.arange(len(lengths)), mask.argmax(1)] = -100  # the first real token has no loss
    return dict(input_ids=input_ids, attention_mask=mask, labels=labels)


def forward_backward(model, batch):
    model.zero_grad()
    out = model(**batch, fused_lm_head=True)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_as_with_mask(model, batch, monkeypatch):
    """dafast's head as it is vs. with the padding mask always kept: the same log-probs (and
    entropies) at the scored positions, the same loss and parameter gradients."""
    out, grads = forward_backward(model, batch)
    with monkeypatch.context() as patch:
        patch.setattr(fused_head, "drop_right_padding_mask", lambda mask, *args, **kwargs: mask)
        out_masked, grads_masked = forward_backward(model, batch)
    assert torch.equal(out.label_mask, out_masked.label_mask)
    scored = out.label_mask
    assert scored.any()
    for name in ("log_probs", "entropy"):
        torch.testing.assert_close(getattr(out, name)[scored], getattr(out_masked, name)[scored],
                                   rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(out.loss, out_masked.loss, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_masked[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_same_log_probs_and_gradients(side, monkeypatch):
    """Right-padded: the attention runs causal-only (SDPA with is_causal=True and no mask) and
    gives what the masked attention gives. Left-padded: the mask is kept."""
    model = tiny_llama(attn_implementation="sdpa")
    fused_head.add_fused_lm_head(model, outputs=ALL_OUTPUTS)
    assert model.config._attn_implementation == "sdpa"
    calls = spy_on_sdpa(monkeypatch)
    assert_same_as_with_mask(model, padded_batch(side), monkeypatch)
    ours = calls[:model.config.num_hidden_layers]  # the first forward: dafast's head as it is
    assert len(ours) == model.config.num_hidden_layers
    assert ours == ([(True, True)] if side == "right" else [(False, False)]) * len(ours)
    assert all(call == (False, False) for call in calls[len(ours):])  # the masked reference


def test_dropping_a_left_padded_mask_would_be_caught(monkeypatch):
    """The comparison above sees a wrongly dropped mask: left-padded real tokens would attend to
    the pads before them."""
    model = tiny_llama(attn_implementation="sdpa")
    fused_head.add_fused_lm_head(model, outputs=ALL_OUTPUTS)
    monkeypatch.setattr(fused_head, "drop_right_padding_mask", lambda mask, *args, **kwargs: None)
    with pytest.raises(AssertionError):
        assert_same_as_with_mask(model, padded_batch("left"), monkeypatch)


def test_mask_kept_for_position_ids_and_other_inputs(monkeypatch):
    model = tiny_llama(attn_implementation="sdpa")
    fused_head.add_fused_lm_head(model)
    calls = spy_on_sdpa(monkeypatch)
    batch = padded_batch("right")
    position_ids = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    model(**batch, position_ids=position_ids, fused_lm_head=True)
    labels = batch["labels"].clone()
    labels[1, -1] = 5  # a scored label at a pad position
    model(**{**batch, "labels": labels}, fused_lm_head=True)
    assert calls and all(call == (False, False) for call in calls)
    calls.clear()
    eager = tiny_llama(attn_implementation="eager")  # only SDPA gains: mask left to the model
    fused_head.add_fused_lm_head(eager)
    seen = []
    monkeypatch.setattr(fused_head, "drop_right_padding_mask",
                        lambda mask, *args, **kwargs: seen.append(1) or mask)
    eager(**batch, fused_lm_head=True)
    assert seen == []


# ---- TRL's trainers, unchanged, on dafast's head -------------------------------------------

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


def train(trainer_cls, config_cls, dataset, model, use_dafast, tmp_path, **config):
    fused_head.use_in_trl(use_dafast)
    config.setdefault("use_cpu", True)  # tests/test_cuda.py passes use_cpu=False
    try:
        args = config_cls(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                          learning_rate=1e-2, logging_steps=1, report_to="none",
                          save_strategy="no", seed=0, disable_tqdm=True, **config)
        extra = {"ref_model": copy.deepcopy(model)} if trainer_cls is trl.DPOTrainer else {}
        trainer = trainer_cls(model=model, args=args, train_dataset=dataset,
                              processing_class=char_tokenizer(), **extra)
        head_source = trainer.model.forward.__func__.__code__.co_filename
        assert head_source.endswith("dafast/fused_head.py" if use_dafast else "trl/trainer/utils.py")
        trainer.train()
        return [log for log in trainer.state.log_history if "loss" in log], model
    finally:
        fused_head.use_in_trl(False)


def assert_same_training(trainer_cls, config_cls, dataset, tmp_path, rtol, compare_weights=True,
                         **config):
    base = tiny_llama(vocab=64)
    logs_trl, model_trl = train(trainer_cls, config_cls, dataset, copy.deepcopy(base), False,
                                tmp_path / "trl", **config)
    logs_ours, model_ours = train(trainer_cls, config_cls, dataset, copy.deepcopy(base), True,
                                  tmp_path / "dafast", **config)
    assert len(logs_ours) == len(logs_trl) == 2
    for ours, theirs in zip(logs_ours, logs_trl):
        for key, value in theirs.items():
            if key not in ("learning_rate", "epoch", "step", "num_tokens"):
                assert ours[key] == pytest.approx(value, rel=rtol, abs=rtol), key
    if compare_weights:
        for p_ours, p_trl in zip(model_ours.parameters(), model_trl.parameters()):
            torch.testing.assert_close(p_ours, p_trl, rtol=rtol, atol=rtol)


def test_dpo_trainer_steps_give_trls_losses(tmp_path):
    """Two DPOTrainer steps (loss + every logged metric, then the weights) on TRL's head and on
    dafast's, fp32."""
    assert_same_training(trl.DPOTrainer, trl.DPOConfig, Dataset.from_list(PREFERENCES), tmp_path,
                         rtol=1e-5, bf16=False, beta=0.1)


@pytest.mark.parametrize("trainer", ["dpo", "sft"])
def test_trl_trainers_right_padded_batches_run_causal_only(trainer, tmp_path, monkeypatch):
    """TRL's DPO and SFT collators pad on the right, with -100 labels (DPO: the completion mask)
    at the pads: on dafast's head every forward (policy and reference) drops the padding mask and
    every SDPA call is causal-only. (The two tests around this one: the same losses as TRL's.)"""
    seen, drop = [], fused_head.drop_right_padding_mask

    def recording_drop(mask, *args, **kwargs):
        kept = drop(mask, *args, **kwargs)
        seen.append((bool((mask == 0).any()), kept is None))
        return kept

    monkeypatch.setattr(fused_head, "drop_right_padding_mask", recording_drop)
    calls = spy_on_sdpa(monkeypatch)
    if trainer == "dpo":
        train(trl.DPOTrainer, trl.DPOConfig, Dataset.from_list(PREFERENCES), tiny_llama(vocab=64),
              True, tmp_path, bf16=False, beta=0.1)
    else:
        dataset = Dataset.from_list([{"prompt": p["prompt"], "completion": p["chosen"]}
                                     for p in PREFERENCES])
        train(trl.SFTTrainer, trl.SFTConfig, dataset, tiny_llama(vocab=64), True, tmp_path,
              bf16=False)
    assert len(seen) == (4 if trainer == "dpo" else 2)  # 2 steps, DPO: policy + reference
    assert all(padded for padded, _ in seen) and all(dropped for _, dropped in seen)
    assert calls and all(call == (True, True) for call in calls)


def test_sft_trainer_steps_give_trls_losses(tmp_path):
    dataset = Dataset.from_list([{"prompt": p["prompt"], "completion": p["chosen"]}
                                 for p in PREFERENCES])
    assert_same_training(trl.SFTTrainer, trl.SFTConfig, dataset, tmp_path, rtol=1e-5, bf16=False)


def test_dpo_trainer_bf16_autocast_close_to_trl(tmp_path):
    """Under bf16 autocast (DPOConfig's default) TRL rounds each logits tile to bf16; dafast keeps
    them in fp32, so the logged losses and metrics agree to bf16 accuracy only (and Adam's
    normalised step magnifies that in the weights of near-zero gradients: not compared)."""
    assert_same_training(trl.DPOTrainer, trl.DPOConfig, Dataset.from_list(PREFERENCES), tmp_path,
                         rtol=2e-2, compare_weights=False, beta=0.1)
