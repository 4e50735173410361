"""What every stage shares: loading the starting model, TRL arguments from the recipe, metrics,
resume, and the stage's output written all at once.

A stage directory, when finished:

    model/          HF model directory (safetensors): the starting model with this stage's LoRA
                    adapter merged in (LoRA) or the trained weights (full fine-tuning), + tokenizer
    adapter/        the PEFT adapter alone (LoRA only), on top of the starting model
    metrics.jsonl   one line per logging step: step, loss, learning rate, tokens/s, TRL's metrics
    config.yaml     the resolved settings the stage ran with
    result.json     written last: the stage is complete (the matrix's cache marker)

Merging the adapter after each stage (rather than stacking adapters) keeps the chain simple: the
next stage starts from a plain model, DPO's reference is that model with the new adapter
disabled, and every stage output can be merged, evaluated or shipped as it is.
While the stage runs, TRL's checkpoints go to checkpoints/; a rerun resumes from the newest.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from transformers.trainer_callback import ProgressCallback

import dafast.fused_head
import dafast.lora
import dafast.mlp
from dafast.recipe import Recipe, StageSettings

RESULT = "result.json"


def is_complete(stage_dir: Path) -> bool:
    return (Path(stage_dir) / RESULT).is_file()


def training_dtype(recipe: Recipe) -> torch.dtype:
    return getattr(torch, recipe.training_dtype())


def load_model(model_dir: Path, dtype: torch.dtype):
    """An HF causal LM from a local directory: safetensors only, no remote code. The path is made
    absolute first: PEFT writes it into the adapter as base_model_name_or_path, which must load
    from any working directory."""
    model_dir = Path(model_dir).absolute()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True,
                                                 trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def peft_config(recipe: Recipe, kind: str):
    if recipe.stage_finetune(kind) != "lora":
        return None
    from peft import LoraConfig

    lora = recipe.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type="CAUSAL_LM")


def trainer_arguments(recipe: Recipe, settings: StageSettings, stage_dir: Path) -> dict:
    """TRL/transformers TrainingArguments fields shared by every stage."""
    dtype = training_dtype(recipe)
    return dict(
        output_dir=str(stage_dir / "checkpoints"),
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
        bf16=dtype == torch.bfloat16,
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


class MetricsLog(TrainerCallback):
    """Appends each log record to metrics.jsonl (main process only), with tokens/s. On resume
    it first drops records past the checkpoint, so the file reads as one uninterrupted run."""

    def __init__(self, path: Path):
        self.path = path
        self._clock = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= state.global_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._clock = (time.perf_counter(), state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        start, start_tokens = self._clock
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        if now > start and tokens > start_tokens:
            record["tokens_per_second"] = (tokens - start_tokens) / (now - start)
        self._clock = (now, tokens)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class StageProgress(ProgressCallback):
    """transformers' progress bar, with the latest loss on the bar instead of every log record
    printed under it (those go to metrics.jsonl)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs \
                and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4g}", refresh=False)


def quiet_console(trainer) -> None:
    """The trainer shows a progress bar, not one dict per step."""
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(StageProgress())


# PEFT and TRL read transformers' deprecated `is_gradient_checkpointing` while a trainer sets
# up, once per stage; nothing a user can change, so it is not shown.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                        category=FutureWarning)


def last_checkpoint(stage_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    root = stage_dir / "checkpoints"
    return get_last_checkpoint(str(root)) if root.is_dir() else None


def use_dafast_kernels(model) -> None:
    """The model's LoRA layers on dafast.ops.lora_linear, its SwiGLU MLPs on dafast.ops.swiglu."""
    dafast.lora.patch(model)
    dafast.mlp.patch(model)


def train(trainer, stage_dir: Path) -> None:
    """Patch the model onto dafast's kernels and train, resuming from the last checkpoint."""
    use_dafast_kernels(trainer.model)
    trainer.train(resume_from_checkpoint=last_checkpoint(stage_dir))


def finish(trainer, tokenizer, recipe: Recipe, settings: StageSettings, stage_dir: Path,
           kind: str, started: float) -> Path:
    """Write model/, adapter/, config.yaml and result.json; nothing appears half-written."""
    trainer.accelerator.wait_for_everyone()
    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.accelerator.is_main_process:
        partial = stage_dir / ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        dafast.mlp.unpatch(model)
        if recipe.stage_finetune(kind) == "lora":
            dafast.lora.unpatch(model)
            model.save_pretrained(partial / "adapter")
            model = model.merge_and_unload()
        model = model.to(getattr(torch, recipe.saved_dtype()))
        # Training turns the KV cache off; a saved model is for generation too.
        model.config.use_cache = True
        model.save_pretrained(partial / "model", safe_serialization=True)
        tokenizer.save_pretrained(partial / "model")
        (partial / "config.yaml").write_text(yaml.safe_dump(
            {"stage": kind, "settings": settings.model_dump(), "recipe": recipe.model_dump()},
            sort_keys=False))
        for entry in partial.iterdir():
            target = stage_dir / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            entry.replace(target)
        partial.rmdir()
        shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)
        history = [r for r in trainer.state.log_history if "loss" in r]
        result = {"stage": kind, "steps": trainer.state.global_step,
                  "tokens": trainer.state.num_input_tokens_seen,
                  "seconds": time.time() - started,
                  "first_loss": history[0]["loss"] if history else None,
                  "final_loss": history[-1]["loss"] if history else None}
        tmp = stage_dir / (RESULT + ".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(stage_dir / RESULT)
    trainer.accelerator.wait_for_everyone()
    return stage_dir / "model"


def use_dafast_head() -> None:
    """TRL's SFT and DPO trainers build their fused LM head with dafast's kernel."""
    dafast.fused_head.use_in_trl()
