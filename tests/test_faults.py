"""Faults while a stage runs: a full disk or a kill mid-checkpoint, a truncated checkpoint, a
kill after the final checkpoint, two runs on one output directory. Each rerun must end with the
same weights and metrics.jsonl as an uninterrupted run, and leave no stray files."""

import errno
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer

import dafast.stages
from dafast.stages import run_stage
from dafast.stages.checkpoints import CHECKPOINT_DONE, checkpoint_complete, last_checkpoint
from test_train import recipe_for

TIMING = ("train_runtime", "train_samples_per_second", "train_steps_per_second",
          "train_tokens_per_second", "tokens_per_second")


def metrics(stage_dir):
    """metrics.jsonl without the wall-clock fields (and the summary's train_loss, an average
    over the steps of the last attempt only)."""
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING + ("train_loss",)} for r in records]


def assert_same_as_whole(stage_dir, whole_dir):
    got, expected = metrics(stage_dir), metrics(whole_dir)
    assert [sorted(r) for r in got] == [sorted(r) for r in expected]
    for g, e in zip(got, expected):
        assert g == {k: pytest.approx(v, rel=1e-6) for k, v in e.items()}
    assert sum("train_loss" in json.loads(line) for line in
               (stage_dir / "metrics.jsonl").read_text().splitlines()) == 1
    whole = load_file(whole_dir / "adapter" / "adapter_model.safetensors")
    resumed = load_file(stage_dir / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == whole.keys()
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=1e-5, atol=1e-7)
    assert sorted(p.name for p in stage_dir.iterdir()) == sorted(p.name for p in whole_dir.iterdir())


class _Killed(Exception):
    pass


@pytest.fixture
def whole(tiny_model, tmp_path):
    recipe = recipe_for(tmp_path)
    run_stage("sft", recipe, tiny_model, tmp_path / "whole")
    return recipe


def test_full_disk_while_saving_a_checkpoint(whole, tiny_model, tmp_path, monkeypatch):
    """ENOSPC after the weights and optimizer of checkpoint-4 are written, before its
    trainer_state.json: the rerun resumes from checkpoint-2 and deletes checkpoint-4."""
    save_rng = Trainer._save_rng_state

    def full_disk(self, output_dir):
        if self.state.global_step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        save_rng(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", full_disk)
    with pytest.raises(OSError, match="No space"):
        run_stage("sft", whole, tiny_model, tmp_path / "resumed")
    checkpoints = tmp_path / "resumed" / "checkpoints"
    assert (checkpoints / "checkpoint-4").is_dir()
    assert not checkpoint_complete(checkpoints / "checkpoint-4")
    monkeypatch.setattr(Trainer, "_save_rng_state", save_rng)
    assert last_checkpoint(tmp_path / "resumed").endswith("checkpoint-2")
    run_stage("sft", whole, tiny_model, tmp_path / "resumed")
    assert_same_as_whole(tmp_path / "resumed", tmp_path / "whole")


@pytest.mark.parametrize("damage", ["truncated weights", "no trainer_state.json", "no marker"])
def test_damaged_last_checkpoint_is_skipped(damage, whole, tiny_model, tmp_path, monkeypatch):
    """Killed after training, before the stage's outputs: checkpoint-6 (the last) is damaged,
    so the rerun resumes from checkpoint-4 and trains steps 5 and 6 again."""
    finish = dafast.stages.write_outputs
    monkeypatch.setattr(dafast.stages, "write_outputs", lambda *a, **k: (_ for _ in ()).throw(_Killed()))
    with pytest.raises(_Killed):
        run_stage("sft", whole, tiny_model, tmp_path / "resumed")
    last = tmp_path / "resumed" / "checkpoints" / "checkpoint-6"
    if damage == "truncated weights":
        weights = last / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "no trainer_state.json":
        (last / "trainer_state.json").unlink()
    else:
        (last / CHECKPOINT_DONE).unlink()
    monkeypatch.setattr(dafast.stages, "write_outputs", finish)
    run_stage("sft", whole, tiny_model, tmp_path / "resumed")
    assert_same_as_whole(tmp_path / "resumed", tmp_path / "whole")


@pytest.mark.parametrize("limit", ["max_steps", "epochs"])
def test_killed_after_the_final_checkpoint_takes_no_extra_step(limit, tiny_model, tmp_path,
                                                               monkeypatch):
    # max_steps 5 is no whole number of epochs (4 steps each): transformers would start step 6
    sft = dict(max_steps=5) if limit == "max_steps" else dict(max_steps=-1, epochs=1)
    recipe = recipe_for(tmp_path, sft=sft)
    run_stage("sft", recipe, tiny_model, tmp_path / "whole")
    finish = dafast.stages.write_outputs
    monkeypatch.setattr(dafast.stages, "write_outputs", lambda *a, **k: (_ for _ in ()).throw(_Killed()))
    with pytest.raises(_Killed):
        run_stage("sft", recipe, tiny_model, tmp_path / "resumed")
    monkeypatch.setattr(dafast.stages, "write_outputs", finish)
    run_stage("sft", recipe, tiny_model, tmp_path / "resumed")
    steps = json.loads((tmp_path / "resumed" / "result.json").read_text())["steps"]
    assert steps == json.loads((tmp_path / "whole" / "result.json").read_text())["steps"]
    assert_same_as_whole(tmp_path / "resumed", tmp_path / "whole")


def test_a_second_run_on_one_output_dir_is_refused(tiny_model, tmp_path, capsys):
    """The first run holds OUTPUT_DIR/.dafast.lock; a second is refused naming it, and a kill -9
    of the first releases the lock."""
    from dafast import train
    from dafast.runlock import run_lock

    out = tmp_path / "run"
    script = ("import sys, time\nfrom pathlib import Path\nfrom dafast.runlock import run_lock\n"
              "with run_lock(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(120)\n")
    first = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE,
                             text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        assert first.stdout.readline().strip() == "held"
        code = train.main([f"model={tiny_model}", f"output_dir={out}", "pipelines=[sft]",
                           "merge=null", "eval=null", "sft.max_steps=1"])
        assert code == 2
        err = capsys.readouterr().err
        assert f"in use by another run (pid {first.pid} on " in err and "started 20" in err
        assert not (out / "stages").exists()  # refused before any work
    finally:
        first.kill()
        first.wait()
    with run_lock(out):  # released by the kernel with the killed process
        pass


@pytest.mark.slow
def test_kill9_at_a_random_point_then_rerun_equals_uninterrupted(tmp_path):
    """tests/kill9_stage.py: SIGKILL at a random moment of a real `python -m dafast.train`."""
    import kill9_stage

    assert kill9_stage.main(["--kills", "1", "--workdir", str(tmp_path)]) == 0
