"""A stage's checkpoints: TRL's, in STAGE_DIR/checkpoints/, each marked complete once written, and
training resumed from the newest complete one (incomplete ones, left by a kill or a full disk,
are deleted)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from transformers import TrainerCallback, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from dafast.stages.metrics import trim_metrics

CHECKPOINT_DONE = "dafast-checkpoint.json"  # in a checkpoint: its files, written after them
log = logging.getLogger("dafast.stages")


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete: transformers calls on_save once the checkpoint is written
    (weights, optimizer, scheduler, RNG, trainer_state.json), and the marker lists those files
    with their sizes. A kill or a full disk mid-save, or a rotation cut short, leaves a
    checkpoint without a marker or with a file missing or truncated: it is not resumed from.
    (Data-parallel: the main process marks once its own files are written.)"""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
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
    root = Path(stage_dir) / "checkpoints"
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


def train(trainer, stage_dir: Path) -> None:
    """Train, resuming from the last complete checkpoint. A checkpoint of the final step is
    loaded, not resumed: transformers would take one more step."""
    checkpoint = last_checkpoint(stage_dir)
    if checkpoint is not None:
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
