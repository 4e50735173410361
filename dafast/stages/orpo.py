"""ORPO on TRL's ORPOTrainer (trl.experimental.orpo), with its loss computed by dafast: TRL's
trainer materialises the [2 x pairs, tokens, vocab] logits; FusedORPOTrainer asks the model's
dafast fused head for per-token log-probs instead and applies dafast.losses' ORPO, which equals
TRL's (tests/test_losses.py). Tokenisation, batching and logging stay TRL's."""

from __future__ import annotations

import warnings

import torch
from datasets import Dataset

from dafast.fused_head import add_fused_lm_head
from dafast.losses import orpo_loss_from_token_logps, orpo_scored_labels
from dafast.stages.dpo import build_dataset  # noqa: F401  (the same preference rows)

with warnings.catch_warnings():  # TRL warns that the experimental namespace may change
    warnings.simplefilter("ignore")
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer


class FusedORPOTrainer(ORPOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        add_fused_lm_head(model)

    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        batch = self.concatenated_inputs(batch, padding_value=self.padding_value,
                                         device=self.accelerator.device)
        input_ids = batch["concatenated_input_ids"]
        attention_mask = batch["concatenated_attention_mask"]
        labels = batch["concatenated_labels"]  # the completions; prompt and padding -100
        pairs = input_ids.shape[0] // 2
        if train_eval == "train":  # TRL's token count cannot see the concatenated batch
            self.state.num_input_tokens_seen += int(self.accelerator.gather(attention_mask.sum()).sum())
        # TRL's NLL term scores the chosen prompt and completion: every attended token
        nll_labels = torch.where(attention_mask[:pairs] == 1, input_ids[:pairs], -100)
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                        labels=orpo_scored_labels(labels, nll_labels), fused_lm_head=True)
        loss, metrics = orpo_loss_from_token_logps(outputs.log_probs, labels, nll_labels,
                                                   beta=self.beta)
        prefix = "eval_" if train_eval == "eval" else ""
        gather = self.accelerator.gather_for_metrics
        return loss, {prefix + k: gather(v.detach()).mean().item() for k, v in metrics.items()}


def build_trainer(kind, settings, model, tokenizer, dataset: Dataset, arguments, peft_config,
                  callbacks):
    arguments = {**arguments, "include_num_input_tokens_seen": "no"}  # counted above
    config = ORPOConfig(**arguments, beta=settings.beta, max_length=settings.max_length,
                        dataset_num_proc=None)
    return FusedORPOTrainer(model=model, args=config, train_dataset=dataset,
                            processing_class=tokenizer, peft_config=peft_config,
                            callbacks=callbacks)
