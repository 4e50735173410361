"""dafast.fused_head: the drop-in for TRL 1.16's fused LM head on tiny random Llamas: the same
outputs and gradients as TRL's head, and TRL's own DPO and SFT trainers giving TRL's losses."""

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
    try:
        args = config_cls(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                          learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True,
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
