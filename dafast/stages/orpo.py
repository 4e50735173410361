"""ORPO on TRL's ORPO trainer (trl.experimental.orpo) with dafast's loss (dafast.trainers): the
same preference rows as DPO, no reference model."""

from __future__ import annotations

import warnings

from datasets import Dataset

from dafast.recipe import StageSettings
from dafast.stages.dpo import preference_dataset
from dafast.trainers import ORPOTrainerOnHiddenStates

with warnings.catch_warnings():  # TRL warns that the experimental namespace may change
    warnings.simplefilter("ignore")
    from trl.experimental.orpo import ORPOConfig


def build_dataset(settings: StageSettings, tokenizer) -> Dataset:
    return preference_dataset("orpo", settings, tokenizer)


def build_trainer(*, model, tokenizer, dataset: Dataset, settings: StageSettings,
                  arguments: dict, callbacks: list) -> ORPOTrainerOnHiddenStates:
    arguments = {**arguments, "include_num_input_tokens_seen": "no"}  # counted by the trainer
    config = ORPOConfig(**arguments, beta=settings.beta, max_length=settings.max_length,
                        dataset_num_proc=None)
    return ORPOTrainerOnHiddenStates(model=model, args=config, train_dataset=dataset,
                                     processing_class=tokenizer, callbacks=callbacks)
