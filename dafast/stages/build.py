"""What every stage builds from the recipe: its model (PEFT-wrapped for LoRA, on dafast's
kernels) and the TRL/transformers TrainingArguments fields they share."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import transformers

from dafast import kernels, models
from dafast.recipe import Recipe

# PEFT and TRL read transformers' deprecated `is_gradient_checkpointing` while a trainer sets
# up, once per stage; nothing a user can change, so it is not shown.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                        category=FutureWarning)


def training_model(recipe: Recipe, kind: str, start: Path):
    """(model, tokenizer): the starting model in the training dtype, with a new LoRA adapter when
    the stage trains LoRA, patched onto dafast's kernels (dafast.kernels.apply)."""
    model, tokenizer = models.load_model(start, dtype=getattr(torch, recipe.training_dtype()))
    if recipe.stage_finetune(kind) == "lora":
        from peft import LoraConfig, get_peft_model

        transformers.set_seed(recipe.seed)  # the adapter's initial weights (as TRL seeds them)
        lora = recipe.lora
        model = get_peft_model(model, LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    kernels.apply(model)
    return model, tokenizer


def trainer_arguments(recipe: Recipe, kind: str, stage_dir: Path) -> dict:
    """TRL/transformers TrainingArguments fields shared by every stage."""
    settings = recipe.stage(kind)
    return dict(
        output_dir=str(Path(stage_dir) / "checkpoints"),
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        train_sampling_strategy=settings.sampling_strategy(),
        seed=recipe.seed,
        data_seed=recipe.seed,
        bf16=recipe.training_dtype() == "bfloat16" or recipe.autocast_bf16(kind),
        activation_checkpointing=recipe.activation_checkpointing,  # TRL defaults it to True
        activation_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=recipe.logging_steps,
        save_steps=recipe.save_steps,
        save_total_limit=2,
        report_to=["tensorboard"] if recipe.tensorboard else "none",
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
