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
While the stage runs, TRL's checkpoints go to checkpoints/; a rerun resumes from the newest
complete one (see CheckpointMarker) and deletes the incomplete ones a kill or a full disk left.
"""

from __future__ import annotations

import json
import logging
import os
import re
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
CHECKPOINT_DONE = "dafast-checkpoint.json"  # in a checkpoint: its files, written after them
log = logging.getLogger("dafast.stages")


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


def trainer_arguments(recipe: Recipe, kind: str, stage_dir: Path) -> dict:
    """TRL/transformers TrainingArguments fields shared by every stage."""
    dtype = training_dtype(recipe)
    settings = recipe.stage(kind)
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
        bf16=dtype == torch.bfloat16 or recipe.autocast_bf16(kind),
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
    it first drops records past the checkpoint, and an earlier attempt's end-of-training summary,
    so the file reads as one uninterrupted run."""

    def __init__(self, path: Path):
        self.path = path
        self._clock = None
        self._tokens_before = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._tokens_before = 0.0
        if state.is_world_process_zero:
            trim_metrics(self.path, state.global_step, keep_summary=False)
            if state.global_step and self.path.exists():
                # TRL's num_tokens counts from this train() call, not from the checkpoint
                records = [json.loads(line) for line in self.path.read_text().splitlines()]
                self._tokens_before = next((r["num_tokens"] for r in reversed(records)
                                            if "num_tokens" in r), 0.0)
        self._clock = (time.perf_counter(), state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        start, start_tokens = self._clock
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        if "num_tokens" in record:
            record["num_tokens"] += self._tokens_before
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


def trim_metrics(path: Path, step: int, *, keep_summary: bool) -> None:
    """Keep the records up to `step` (and the summary row, written once training ended, only
    if asked); a line cut short by a kill is dropped too."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["step"] <= step and (keep_summary or "train_loss" not in record):
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete: transformers calls on_save once the checkpoint is written
    (weights, optimizer, scheduler, RNG, trainer_state.json), and the marker lists those files
    with their sizes. A kill or a full disk mid-save, or a rotation cut short, leaves a
    checkpoint without a marker or with a file missing or truncated: it is not resumed from.
    (Data-parallel: the main process marks once its own files are written.)"""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            mark_complete(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


def mark_complete(checkpoint: Path) -> None:
    files = {str(p.relative_to(checkpoint)): p.stat().st_size
             for p in sorted(checkpoint.rglob("*")) if p.is_file() and p.name != CHECKPOINT_DONE}
    tmp = checkpoint / (CHECKPOINT_DONE + ".tmp")
    with tmp.open("w") as f:
        json.dump({"files": files}, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(checkpoint / CHECKPOINT_DONE)


def checkpoint_complete(checkpoint: Path) -> bool:
    try:
        files = json.loads((checkpoint / CHECKPOINT_DONE).read_text())["files"]
        return "trainer_state.json" in files and all(
            (checkpoint / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def last_checkpoint(stage_dir: Path) -> str | None:
    """The newest complete checkpoint; incomplete ones are deleted (main process), since a run
    holds the output directory's lock and nothing else writes them."""
    root = stage_dir / "checkpoints"
    if not root.is_dir():
        return None
    steps = sorted(((int(m.group(1)), p) for p in root.iterdir()
                    if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))),
                   reverse=True)
    newest = None
    for _, path in steps:
        if newest is None and checkpoint_complete(path):
            newest = path
        elif not checkpoint_complete(path) and int(os.environ.get("RANK", "0")) == 0:
            log.warning("%s: incomplete checkpoint (interrupted while saving), deleting it", path)
            shutil.rmtree(path, ignore_errors=True)
    return str(newest) if newest else None


def use_dafast_kernels(model) -> None:
    """The model's LoRA layers on dafast.ops.lora_linear, its SwiGLU MLPs on dafast.ops.swiglu."""
    dafast.lora.patch(model)
    dafast.mlp.patch(model)


def train(trainer, stage_dir: Path) -> None:
    """Patch the model onto dafast's kernels and train, resuming from the last checkpoint. A
    checkpoint of the final step is loaded, not resumed: transformers would take one more step."""
    use_dafast_kernels(trainer.model)
    checkpoint = last_checkpoint(stage_dir)
    if checkpoint is not None:
        from transformers import TrainerState

        state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            load_checkpoint_weights(trainer.model, Path(checkpoint))
            trainer.state = state
            if trainer.accelerator.is_main_process:
                trim_metrics(stage_dir / "metrics.jsonl", state.global_step, keep_summary=True)
            return
    trainer.train(resume_from_checkpoint=checkpoint)


def load_checkpoint_weights(model, checkpoint: Path) -> None:
    """The trained weights of a checkpoint: the LoRA adapter, or the full model."""
    from safetensors.torch import load_file

    adapter = checkpoint / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(adapter))
        unexpected = result.unexpected_keys
    else:
        weights = load_file(checkpoint / "model.safetensors")
        unexpected = model.load_state_dict(weights, strict=False).unexpected_keys
        missing = set(model.state_dict()) - set(weights)
        tied = {name for name in missing if "lm_head" in name}  # saved once, with the embedding
        if missing - tied:
            raise RuntimeError(f"{checkpoint}: the checkpoint lacks {sorted(missing - tied)[:5]}")
    if unexpected:
        raise RuntimeError(f"{checkpoint}: tensors the model does not have: {unexpected[:5]}")


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
