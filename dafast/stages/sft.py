"""SFT: next-token loss on the assistant turns of the conversations (dafast.data.sft_example
labels them), on TRL's SFT trainer with dafast's loss (dafast.trainers.CausalLMTrainer)."""

from __future__ import annotations

from datasets import Dataset
from trl import SFTConfig

from dafast import data
from dafast.recipe import StageSettings
from dafast.trainers import CausalLMTrainer


def build_dataset(settings: StageSettings, tokenizer) -> Dataset:
    rows = data.load_rows(settings.data, "sft")
    return Dataset.from_list([data.sft_example(row, tokenizer, settings.max_length)
                              for row in rows])


def build_trainer(*, model, tokenizer, dataset: Dataset, settings: StageSettings,
                  arguments: dict, callbacks: list) -> CausalLMTrainer:
    config = SFTConfig(**arguments, max_length=settings.max_length, packing=False,
                       dataset_num_proc=None)
    return CausalLMTrainer(model=model, args=config, train_dataset=dataset,
                           processing_class=tokenizer, callbacks=callbacks)
