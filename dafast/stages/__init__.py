"""The training stages of the study: cpt, sft, dpo, orpo, each a short module (its dataset and
its TRL trainer, whose loss is dafast.losses on the hidden states: dafast.trainers).

    result = run_stage("sft", recipe, start=Path("runs/x/cpt/model"), stage_dir=Path("runs/x/cpt-sft"))
    result.model_dir, result.adapter_dir, result.metrics_path, result.summary

trains one stage from the model in `start` and returns its StageResult (see
dafast.stages.output for what the stage directory holds). A stage directory that holds a
finished result is returned as is; one with checkpoints resumes from the newest
(dafast.stages.checkpoints).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import dafast.memory
from dafast.data import DataError
from dafast.recipe import Recipe
from dafast.stages import checkpoints, cpt, dpo, orpo, sft
from dafast.stages.build import trainer_arguments, training_model
from dafast.stages.checkpoints import CheckpointMarker
from dafast.stages.metrics import MetricsLog, quiet_console
from dafast.stages.output import StageResult, is_complete, write_outputs

STAGES = {"cpt": cpt, "sft": sft, "dpo": dpo, "orpo": orpo}
log = logging.getLogger("dafast.stages")


def run_stage(kind: str, recipe: Recipe, start: Path, stage_dir: Path) -> StageResult:
    stage_dir = Path(stage_dir)
    if is_complete(stage_dir):
        return StageResult.read(stage_dir)
    started = time.time()
    stage_dir.mkdir(parents=True, exist_ok=True)
    stage, settings = STAGES[kind], recipe.stage(kind)
    model, tokenizer = training_model(recipe, kind, Path(start))
    dataset = stage.build_dataset(settings, tokenizer)  # validates every row first
    trainer = stage.build_trainer(
        model=model, tokenizer=tokenizer, dataset=dataset, settings=settings,
        arguments=trainer_arguments(recipe, kind, stage_dir),
        callbacks=[MetricsLog(stage_dir / "metrics.jsonl"), CheckpointMarker()])
    quiet_console(trainer)
    _check_dropped_rows(kind, settings, dataset, trainer.train_dataset)
    with dafast.memory.caching_cpu_allocator(recipe.cpu_allocator == "caching"):
        checkpoints.train(trainer, stage_dir)
    return write_outputs(trainer, tokenizer, recipe, kind, stage_dir, started)


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


__all__ = ["STAGES", "StageResult", "run_stage"]
