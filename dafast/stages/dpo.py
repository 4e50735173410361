"""DPO (sigmoid loss) on TRL's DPO trainer with dafast's loss (dafast.trainers). The reference is
the stage's starting model: with LoRA the same model with the adapter disabled (no second copy);
with full fine-tuning a second load of the starting directory, or none when its log-probs are
precomputed (precompute_ref)."""

from __future__ import annotations

from datasets import Dataset
from peft import PeftModel
from trl import DPOConfig

from dafast import data, kernels, models
from dafast.recipe import StageSettings
from dafast.trainers import DPOTrainerOnHiddenStates


def build_dataset(settings: StageSettings, tokenizer) -> Dataset:
    return preference_dataset("dpo", settings, tokenizer)


def preference_dataset(kind: str, settings: StageSettings, tokenizer) -> Dataset:
    """The prompt / chosen / rejected rows of a DPO or ORPO stage, as TRL's trainers take them."""
    conversational = tokenizer.chat_template is not None
    rows = data.load_rows(settings.data, kind)
    return Dataset.from_list([data.preference_example(row, conversational) for row in rows])


def build_trainer(*, model, tokenizer, dataset: Dataset, settings: StageSettings,
                  arguments: dict, callbacks: list) -> DPOTrainerOnHiddenStates:
    config = DPOConfig(**arguments, beta=settings.beta, loss_type=["sigmoid"],
                       max_length=settings.max_length,
                       precompute_ref_log_probs=settings.precompute_ref, dataset_num_proc=None)
    return DPOTrainerOnHiddenStates(model=model, ref_model=reference_model(model, settings),
                                    args=config, train_dataset=dataset,
                                    processing_class=tokenizer, callbacks=callbacks)


def reference_model(model, settings):
    """The frozen starting model full fine-tuning compares against, on dafast's kernels; None
    where the trainer needs none (LoRA, or precomputed reference log-probs)."""
    if isinstance(model, PeftModel) or settings.precompute_ref:
        return None
    reference, _ = models.load_model(model.name_or_path, dtype=model.dtype, device=model.device)
    kernels.apply(reference)
    return reference.requires_grad_(False)
