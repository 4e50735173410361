"""The training stages of the study: cpt, sft, dpo, orpo, each a thin layer over a TRL trainer
running on dafast's kernels (LoRA layers patched onto dafast.ops.lora_linear, log-probs from
dafast's fused head).

    run_stage("sft", recipe, start=Path("runs/x/cpt/model"), stage_dir=Path("runs/x/cpt-sft"))

trains one stage from the model in `start` and returns the directory of the trained model (see
dafast.stages.base for what the stage directory holds). A stage directory that holds a finished
result is returned as is; one with checkpoints resumes from the newest.
"""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path

import dafast.memory
from dafast.data import DataError
from dafast.recipe import Recipe
from dafast.stages import base

MODULES = {"cpt": "sft", "sft": "sft", "dpo": "dpo", "orpo": "orpo"}
log = logging.getLogger("dafast.stages")


def run_stage(kind: str, recipe: Recipe, start: Path, stage_dir: Path) -> Path:
    stage_dir = Path(stage_dir)
    if base.is_complete(stage_dir):
        return stage_dir / "model"
    started = time.time()
    stage_dir.mkdir(parents=True, exist_ok=True)
    module = importlib.import_module(f"dafast.stages.{MODULES[kind]}")
    settings = recipe.stage(kind)
    base.use_dafast_head()
    model, tokenizer = base.load_model(Path(start), base.training_dtype(recipe))
    dataset = module.build_dataset(kind, settings, tokenizer)  # validates every row first
    trainer = module.build_trainer(kind, settings, model, tokenizer, dataset,
                                   base.trainer_arguments(recipe, kind, stage_dir),
                                   base.peft_config(recipe, kind),
                                   [base.MetricsLog(stage_dir / "metrics.jsonl"),
                                    base.CheckpointMarker()])
    base.quiet_console(trainer)
    _check_dropped_rows(kind, settings, dataset, trainer.train_dataset)
    with dafast.memory.caching_cpu_allocator(recipe.cpu_allocator == "caching"):
        base.train(trainer, stage_dir)
    return base.finish(trainer, tokenizer, recipe, settings, stage_dir, kind, started)


def _check_dropped_rows(kind: str, settings, rows, kept) -> None:
    """TRL drops rows that max_length leaves without a trained token (the prompt fills it):
    say how many, and refuse a stage left with none."""
    dropped = len(rows) - len(kept)
    if dropped <= 0:
        return
    why = (f"max_length {settings.max_length} leaves them no trained token (the prompt alone "
           f"fills it); raise {kind}.max_length or shorten the prompts")
    if len(kept) == 0:
        raise DataError(f"{settings.data}: all {len(rows)} rows dropped: {why}")
    log.warning("%s: %d of %d rows dropped: %s", settings.data, dropped, len(rows), why)


__all__ = ["run_stage"]
