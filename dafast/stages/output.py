"""A stage's output, written all at once, and what the matrix reads of it (StageResult).

A stage directory, when finished:

    model/          HF model directory (safetensors): the starting model with this stage's LoRA
                    adapter merged in (LoRA) or the trained weights (full fine-tuning), + tokenizer
    adapter/        the PEFT adapter alone (LoRA only), on top of the starting model
    metrics.jsonl   one line per logging step: step, loss, learning rate, tokens/s, the loss's
                    metrics
    config.yaml     the resolved settings the stage ran with
    result.json     written last: the stage is complete (the matrix's cache marker)

Merging the adapter after each stage (rather than stacking adapters) keeps the chain simple: the
next stage starts from a plain model, DPO's reference is that model with the new adapter
disabled, and every stage output can be merged, evaluated or shipped as it is.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
import yaml
from peft import PeftModel

from dafast import kernels
from dafast.recipe import Recipe
from dafast.stages.metrics import read_metrics

RESULT = "result.json"


@dataclasses.dataclass(frozen=True)
class StageResult:
    """A finished stage: its directories and result.json's summary (stage, steps, tokens,
    seconds, first_loss, final_loss)."""

    stage_dir: Path
    summary: dict

    @property
    def model_dir(self) -> Path:
        return self.stage_dir / "model"

    @property
    def adapter_dir(self) -> Path | None:
        adapter = self.stage_dir / "adapter"
        return adapter if adapter.is_dir() else None

    @property
    def metrics_path(self) -> Path:
        return self.stage_dir / "metrics.jsonl"

    def loss_curve(self) -> list[tuple[int, float]]:
        """(step, loss) of each logging step."""
        if not self.metrics_path.is_file():
            return []
        return [(r["step"], r["loss"]) for r in read_metrics(self.metrics_path) if "loss" in r]

    @classmethod
    def read(cls, stage_dir: Path) -> StageResult | None:
        """The finished stage in stage_dir, None if it has not finished."""
        try:
            return cls(Path(stage_dir), json.loads((Path(stage_dir) / RESULT).read_text()))
        except (OSError, ValueError):
            return None


def is_complete(stage_dir: Path) -> bool:
    return (Path(stage_dir) / RESULT).is_file()


def write_outputs(trainer, tokenizer, recipe: Recipe, kind: str, stage_dir: Path,
                  started: float) -> StageResult:
    """Write model/, adapter/, config.yaml and result.json; nothing appears half-written."""
    trainer.accelerator.wait_for_everyone()
    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.accelerator.is_main_process:
        partial = stage_dir / ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        kernels.revert(model)
        if isinstance(model, PeftModel):
            model.save_pretrained(partial / "adapter")
            model = model.merge_and_unload()
        model = model.to(getattr(torch, recipe.saved_dtype()))
        # Training turns the KV cache off; a saved model is for generation too.
        model.config.use_cache = True
        model.save_pretrained(partial / "model", safe_serialization=True)
        tokenizer.save_pretrained(partial / "model")
        (partial / "config.yaml").write_text(yaml.safe_dump(
            {"stage": kind, "settings": recipe.stage(kind).model_dump(),
             "recipe": recipe.model_dump()}, sort_keys=False))
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
    return StageResult.read(stage_dir) or StageResult(stage_dir, {})
