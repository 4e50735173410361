"""What a stage shows and records while it trains: metrics.jsonl (one line per logging step)
and a progress bar with the latest loss."""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback


class MetricsLog(TrainerCallback):
    """Appends each log record to metrics.jsonl (main process only), with num_tokens (the
    non-padding tokens trained on so far) and tokens/s. On resume
    it first drops records past the checkpoint, and an earlier attempt's end-of-training summary,
    so the file reads as one uninterrupted run."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._clock = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            trim_metrics(self.path, state.global_step, keep_summary=False)
        self._clock = (time.perf_counter(), state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        start, start_tokens = self._clock
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        if "loss" in logs:
            record["num_tokens"] = float(tokens)
        if now > start and tokens > start_tokens:
            record["tokens_per_second"] = (tokens - start_tokens) / (now - start)
        self._clock = (now, tokens)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line cut short by a kill is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def trim_metrics(path: Path, step: int, *, keep_summary: bool) -> None:
    """Keep the records up to `step` (and the summary row, written once training ended, only
    if asked); a line cut short by a kill is dropped too."""
    if not path.exists():
        return
    kept = [record for record in read_metrics(path)
            if record["step"] <= step and (keep_summary or "train_loss" not in record)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in kept))
    tmp.replace(path)


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
