"""DPO on TRL's DPOTrainer (sigmoid loss), its log-probs from dafast's fused head. The reference
is the stage's starting model: with LoRA the same model with the adapter disabled (no second
copy), with full fine-tuning a second load of the starting directory."""

from __future__ import annotations

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from dafast import data


def build_dataset(kind: str, settings, tokenizer) -> Dataset:
    conversational = tokenizer.chat_template is not None
    rows = data.load_rows(settings.data, kind)
    return Dataset.from_list([data.preference_example(row, conversational) for row in rows])


def build_trainer(kind, settings, model, tokenizer, dataset, arguments, peft_config, callbacks):
    config = DPOConfig(**arguments, beta=settings.beta, loss_type=["sigmoid"],
                       max_length=settings.max_length,
                       precompute_ref_log_probs=settings.precompute_ref, dataset_num_proc=None)
    return DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=peft_config, callbacks=callbacks)
