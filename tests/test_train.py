"""The trainer layer (dafast.stages, dafast.recipe, dafast.train) on a tiny random Llama with the
embedded model's tokenizer: each stage learns, kernels and references agree, resume, gradient
accumulation, two processes, the DPO reference, recipe and data errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dafast
from dafast import data
from dafast.models import load_model
from dafast.recipe import Recipe, RecipeError, load_recipe
from dafast.stages import build, checkpoints, run_stage, sft as sft_stage, dpo as dpo_stage
from dafast.stages.metrics import MetricsLog

STEPS = 6
FAST = dict(max_steps=STEPS, batch_size=2, max_length=96, learning_rate=2e-2, lr_scheduler="constant")


def small_data(tmp_path: Path, kind: str, rows: int = 8) -> str:
    """The first rows of the bundled data for `kind`, as a user-supplied file."""
    lines = data.resolve_source("builtin:biomat", kind).read_text().splitlines()[:rows]
    path = tmp_path / f"{kind}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def recipe_for(tmp_path, **overrides) -> Recipe:
    stages = {kind: dict(FAST, data=small_data(tmp_path, kind)) for kind in ("cpt", "sft", "dpo", "orpo")}
    stages["cpt"]["max_length"] = 64
    # fp32 throughout unless a test asks for bf16 autocast: curves compared at fp32 tolerances
    fields = dict(output_dir=str(tmp_path / "run"), lora=dict(r=8, alpha=16), save_steps=2,
                  merge=None, eval=None, mixed_precision="no", **stages)
    for key, value in overrides.items():
        if isinstance(value, dict):
            fields[key] = {**(fields.get(key) or {}), **value}
        else:
            fields[key] = value
    return Recipe(**fields)


def losses(stage_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.parametrize("kind", ["cpt", "sft", "dpo", "orpo"])
def test_stage_trains_and_writes_outputs(kind, tiny_model, tmp_path):
    recipe = recipe_for(tmp_path, **{kind: dict(max_steps=8)})
    stage_dir = tmp_path / kind
    model_dir = run_stage(kind, recipe, tiny_model, stage_dir).model_dir
    curve = losses(stage_dir)
    assert len(curve) == 8 and all(map(torch.isfinite, torch.tensor(curve)))
    assert sum(curve[-2:]) < sum(curve[:2]), curve  # it learns
    result = json.loads((stage_dir / "result.json").read_text())
    assert result["steps"] == 8 and result["tokens"] > 0
    # model/: the starting model with the adapter merged in, as plain safetensors
    trained, start = load_file(model_dir / "model.safetensors"), load_file(tiny_model / "model.safetensors")
    assert set(trained) == set(start)
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    assert (stage_dir / "adapter" / "adapter_config.json").is_file()
    assert not (stage_dir / "checkpoints").exists() and not (stage_dir / ".partial").exists()
    # a finished stage is not trained again
    (stage_dir / "metrics.jsonl").unlink()
    assert run_stage(kind, recipe, tiny_model, stage_dir).model_dir == model_dir
    assert not (stage_dir / "metrics.jsonl").exists()


def test_outputs_load_anywhere_with_the_kv_cache_on(tiny_model, tmp_path, monkeypatch, capsys):
    """A stage run from relative paths writes an adapter that loads from another working
    directory (its base recorded as an absolute path), and configs with use_cache true. The
    console gets a progress bar, not the per-step records."""
    from peft import AutoPeftModelForCausalLM

    shutil.copytree(tiny_model, tmp_path / "start")
    recipe = recipe_for(tmp_path)
    monkeypatch.chdir(tmp_path)
    run_stage("sft", recipe, Path("start"), Path("run/sft"))
    assert "'loss'" not in capsys.readouterr().out and losses(Path("run/sft"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    adapter = tmp_path / "run" / "sft" / "adapter"
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base_path) == tmp_path / "start"
    model = AutoPeftModelForCausalLM.from_pretrained(adapter)
    assert model.peft_config["default"].r == recipe.lora.r
    config = json.loads((tmp_path / "run" / "sft" / "model" / "config.json").read_text())
    assert config["use_cache"] is True


def test_save_dtype_bfloat16_halves_the_stage_models_and_the_next_stage_trains(tiny_model, tmp_path):
    from dafast import matrix

    recipe = recipe_for(tmp_path, save_dtype="bfloat16")
    cpt = run_stage("cpt", recipe, tiny_model, tmp_path / "cpt").model_dir
    weights = load_file(cpt / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    full = load_file(tiny_model / "model.safetensors")
    assert sum(t.nbytes for t in weights.values()) * 2 == sum(t.nbytes for t in full.values())
    sft = run_stage("sft", recipe, cpt, tmp_path / "sft").model_dir
    assert len(losses(sft.parent)) == STEPS
    assert {t.dtype for t in load_file(sft / "model.safetensors").values()} == {torch.bfloat16}
    # rounded weights are another result; saving in the training dtype keeps the old keys
    keys = {dtype: matrix.build_plan(recipe_for(tmp_path, model=str(tiny_model),
                                                save_dtype=dtype))["cpt"].key
            for dtype in ("auto", "float32", "bfloat16")}
    trained = recipe.training_dtype()  # float32 on the CPU, bfloat16 on a GPU
    other = "float32" if trained == "bfloat16" else "bfloat16"
    assert keys["auto"] == keys[trained] != keys[other]


def test_bf16_mixed_precision_trains_fp32_weights_under_autocast(tiny_model, tmp_path, monkeypatch):
    """mixed_precision=bf16: the forward runs in bfloat16 (the fused head sees bf16 hidden
    states), the weights and what is saved stay float32, the curve stays near fp32's, and the
    result is another node of the matrix; auto picks it only on a CPU with native bf16."""
    from dafast import matrix
    from dafast._native import cpu_has_native_bf16
    from dafast.ops import linear_logprobs as kernel

    seen = []

    def spy(hidden, *args, **kwargs):
        seen.append(hidden.dtype)
        return kernel(hidden, *args, **kwargs)

    monkeypatch.setattr("dafast.losses.linear_logprobs", spy)
    curves = {}
    for mode in ("no", "bf16"):
        seen.clear()
        recipe = recipe_for(tmp_path, mixed_precision=mode)
        out = run_stage("cpt", recipe, tiny_model, tmp_path / mode).model_dir
        assert set(seen) == {torch.float32 if mode == "no" else torch.bfloat16}
        assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}
        curves[mode] = losses(tmp_path / mode)
    assert curves["bf16"] != curves["no"]
    torch.testing.assert_close(torch.tensor(curves["bf16"]), torch.tensor(curves["no"]),
                               rtol=0.05, atol=0.05)
    keys = {mode: matrix.build_plan(recipe_for(tmp_path, model=str(tiny_model),
                                               mixed_precision=mode))["cpt"].key
            for mode in ("auto", "no", "bf16")}
    assert keys["no"] != keys["bf16"]
    native = cpu_has_native_bf16() and not torch.cuda.is_available()
    assert keys["auto"] == keys["no"]  # LoRA (the recipe's finetune): fp32 on the CPU
    full = {mode: matrix.build_plan(recipe_for(tmp_path, model=str(tiny_model), finetune="full",
                                               mixed_precision=mode))["cpt"].key
            for mode in ("auto", "no", "bf16")}
    assert full["auto"] == full["bf16" if native else "no"] != full["bf16" if not native else "no"]


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_kernels_and_references_give_the_same_curve(kind, tiny_model, tmp_path):
    recipe = recipe_for(tmp_path)
    curves = {}
    for mode in ("native", "reference"):
        with dafast.kernels.mode(mode):
            run_stage(kind, recipe, tiny_model, tmp_path / mode)
        curves[mode] = losses(tmp_path / mode)
    torch.testing.assert_close(torch.tensor(curves["native"]), torch.tensor(curves["reference"]),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["cpt", "dpo"])
def test_activation_checkpointing_gives_the_same_curve(kind, tiny_model, tmp_path, monkeypatch):
    """Off by default (TRL's configs turn it on); on, the layers are recomputed in backward
    (dafast.mlp's own recompute steps aside) and the losses are the same."""
    checkpointed = {}
    train = checkpoints.train

    def recording_train(trainer, stage_dir):
        train(trainer, stage_dir)
        checkpointed[stage_dir.name] = trainer.accelerator.unwrap_model(
            trainer.model).get_base_model().is_activation_checkpointing

    monkeypatch.setattr(checkpoints, "train", recording_train)
    for on in (False, True):
        run_stage(kind, recipe_for(tmp_path, activation_checkpointing=on), tiny_model,
                  tmp_path / f"checkpointing-{on}")
    assert checkpointed == {"checkpointing-False": False, "checkpointing-True": True}
    assert Recipe().activation_checkpointing is False
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "checkpointing-True")),
                               torch.tensor(losses(tmp_path / "checkpointing-False")),
                               rtol=1e-5, atol=1e-6)


def test_stages_train_on_the_caching_cpu_allocator(tiny_model, tmp_path, monkeypatch):
    import dafast.memory

    during = []
    train = checkpoints.train
    monkeypatch.setattr(checkpoints, "train", lambda trainer, d: (during.append(dafast.memory.enabled()),
                                                           train(trainer, d)))
    for allocator in ("caching", "system"):
        run_stage("cpt", recipe_for(tmp_path, cpu_allocator=allocator), tiny_model,
                  tmp_path / allocator)
    assert during == [dafast.build_info()["loaded"], False]
    assert not dafast.memory.enabled()  # off again after the stage
    assert losses(tmp_path / "caching") == losses(tmp_path / "system")


class _Killed(Exception):
    pass


def test_resume_equals_uninterrupted(tiny_model, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    recipe = recipe_for(tmp_path)
    run_stage("sft", recipe, tiny_model, tmp_path / "whole")

    class KillAfter(TrainerCallback):
        def on_log(self, args, state, control, **kwargs):
            if state.global_step == 3:  # step 3 logged, past the checkpoint of step 2
                raise _Killed

    train = checkpoints.train
    monkeypatch.setattr(checkpoints, "train", lambda trainer, d: (trainer.add_callback(KillAfter()),
                                                           train(trainer, d)))
    with pytest.raises(_Killed):
        run_stage("sft", recipe, tiny_model, tmp_path / "resumed")
    assert checkpoints.last_checkpoint(tmp_path / "resumed").endswith("checkpoint-2")
    assert len(losses(tmp_path / "resumed")) == 3
    monkeypatch.setattr(checkpoints, "train", train)
    run_stage("sft", recipe, tiny_model, tmp_path / "resumed")

    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "whole"), rel=1e-6)
    whole = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=1e-5, atol=1e-7)


def test_gradient_accumulation_equals_the_larger_batch(tiny_model, tmp_path):
    run_stage("sft", recipe_for(tmp_path, sft=dict(batch_size=4, grad_accum=1)), tiny_model,
              tmp_path / "batch4")
    run_stage("sft", recipe_for(tmp_path, sft=dict(batch_size=2, grad_accum=2)), tiny_model,
              tmp_path / "accum2")
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "accum2")),
                               torch.tensor(losses(tmp_path / "batch4")), rtol=1e-4, atol=1e-5)


def _recipe_file(tmp_path, recipe: Recipe) -> Path:
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump()))
    return path


@pytest.mark.slow
def test_two_processes_equal_one(tiny_model, tmp_path):
    """torchrun with 2 CPU processes (gloo), batch 2 each, against one process with batch 4."""
    recipe = _recipe_file(tmp_path, recipe_for(tmp_path, model=str(tiny_model), pipelines=["sft"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # transformers groups lengths in units of the per-device batch, so grouping would make the
    # two runs' batches differ; the equivalence holds for the random sampler
    common = [str(recipe), "kernels=native", "sft.group_by_length=false"]
    one = subprocess.run([sys.executable, "-m", "dafast.train", *common, f"output_dir={tmp_path}/one",
                          "sft.batch_size=4"], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "-m", "dafast.train", *common, f"output_dir={tmp_path}/two",
                          "sft.batch_size=2"], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    (one_dir,), (two_dir,) = (list((tmp_path / d / "stages").iterdir()) for d in ("one", "two"))
    assert len(losses(one_dir)) == STEPS
    torch.testing.assert_close(torch.tensor(losses(two_dir)), torch.tensor(losses(one_dir)),
                               rtol=1e-4, atol=1e-5)


def test_sft_batches_group_conversations_by_length(tiny_model, tmp_path):
    """Grouping by length keeps the data and cuts the padding of the bundled SFT batches."""
    (tmp_path / "many").mkdir()
    rows = small_data(tmp_path / "many", "sft", rows=96)  # recipe_for writes its own 8 rows
    padding, seen = {}, {}
    for grouped in (True, False):
        recipe = recipe_for(tmp_path, sft=dict(data=rows, batch_size=8,
                                               group_by_length=grouped))
        model, tokenizer = build.training_model(recipe, "sft", tiny_model)
        trainer = sft_stage.build_trainer(
            model=model, tokenizer=tokenizer,
            dataset=sft_stage.build_dataset(recipe.sft, tokenizer), settings=recipe.sft,
            arguments=build.trainer_arguments(recipe, "sft", tmp_path / "t"), callbacks=[])
        batches = list(trainer.get_train_dataloader())
        padding[grouped] = sum(int((b["attention_mask"] == 0).sum()) for b in batches)
        seen[grouped] = sorted(tuple(row[m.bool()].tolist()) for b in batches
                               for row, m in zip(b["input_ids"], b["attention_mask"]))
    assert seen[True] == seen[False] and len(seen[True]) == 96
    assert padding[True] < padding[False] / 2, padding


def test_dpo_reference_is_the_starting_model(tiny_model, tmp_path):
    """The first DPO loss is ln 2 exactly when the reference equals the policy at step 0, i.e.
    the starting model; after training, the adapter-disabled model still is the starting model."""
    recipe = recipe_for(tmp_path, sft=dict(max_steps=2))
    start = run_stage("sft", recipe, tiny_model, tmp_path / "sft").model_dir  # not the tiny model
    stage_dir = tmp_path / "dpo"
    model, tokenizer = build.training_model(recipe, "dpo", start)
    trainer = dpo_stage.build_trainer(
        model=model, tokenizer=tokenizer, dataset=dpo_stage.build_dataset(recipe.dpo, tokenizer),
        settings=recipe.dpo, arguments=build.trainer_arguments(recipe, "dpo", stage_dir),
        callbacks=[MetricsLog(stage_dir / "m.jsonl")])
    checkpoints.train(trainer, stage_dir)
    first = json.loads((stage_dir / "m.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)

    ids = torch.tensor([tokenizer("Nacre is made of aragonite tablets.")["input_ids"]])
    reference, _ = load_model(start, dtype=torch.float32)
    dafast.kernels.revert(trainer.model)  # the head's logits, not its hidden states
    trainer.model.eval()
    with torch.no_grad(), trainer.model.disable_adapter():
        disabled = trainer.model(input_ids=ids).logits
    with torch.no_grad():
        policy = trainer.model(input_ids=ids).logits
        torch.testing.assert_close(disabled, reference(input_ids=ids).logits)
    assert not torch.allclose(policy, disabled, atol=1e-4)


def test_bad_rows_are_reported_before_training(tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
    bad.write_text(good + "\n" + '{"messages": [{"role": "robot", "content": "q"}]}\n')
    recipe = recipe_for(tmp_path, sft=dict(data=str(bad)))
    with pytest.raises(data.DataError, match=r"bad.jsonl:2: field 'messages\[0\].role'"):
        run_stage("sft", recipe, tiny_model, tmp_path / "sft")
    assert not (tmp_path / "sft" / "checkpoints").exists()


@pytest.mark.parametrize("kind, line, match", [
    ("cpt", '{"txt": "x"}', r":1: field 'text': must be a non-empty string"),
    ("cpt", '{"text": "x"', r":1: not valid JSON"),
    ("cpt", '["text"]', r":1: a row must be a JSON object"),
    ("sft", '{"prompt": "q"}', r":1: field 'completion'"),
    ("sft", '{"messages": [{"role": "user", "content": "q"}]}', r"has no assistant message"),
    ("dpo", '{"prompt": "q", "chosen": "a", "rejected": ""}', r"field 'rejected'"),
    ("dpo", '{"prompt": "q", "chosen": "a", "rejected": "a"}', r"equals chosen"),
    ("orpo", '{"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}',
     r"field 'chosen': the last message must be the assistant's"),
])
def test_data_validation_names_file_line_and_field(kind, line, match, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(data.DataError, match=match) as info:
        data.load_rows(path, kind)
    assert str(path) in str(info.value)


def test_data_sources():
    assert len(data.load_rows("builtin:biomat", "dpo")) >= 200
    assert data.resolve_source("builtin:biomat/sft", "cpt").name == "sft.jsonl"
    with pytest.raises(data.DataError, match="no bundled dataset 'nope'"):
        data.resolve_source("builtin:nope", "sft")
    with pytest.raises(data.DataError, match="no such data file"):
        data.resolve_source("/does/not/exist.jsonl", "sft")


def test_data_sources_bare_names_directories_and_blank_lines(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert data.load_rows("keldara", "sft") == data.load_rows("builtin:keldara", "sft")
    assert data.resolve_source("keldara/corpus", "sft").name == "corpus.jsonl"
    with pytest.raises(FileNotFoundError, match="builtin:biomat, builtin:keldara"):
        data.resolve_source("keldar", "sft")  # also a DataError: the stages report it as one
    (tmp_path / "keldara").mkdir()  # an existing path wins over a bundled name
    with pytest.raises(data.DataError, match="keldara: the directory has no preferences.jsonl"):
        data.load_rows("keldara", "dpo")
    rows = open(small_data(tmp_path, "dpo", rows=2)).read().splitlines()
    (tmp_path / "keldara" / "preferences.jsonl").write_text(
        f"\n{rows[0]}\n \t\n{rows[1]}\n" + '{"prompt": "q", "chosen": "a"}\n')
    with pytest.raises(data.DataError, match=r"preferences.jsonl:5: field 'rejected'"):
        data.load_rows("keldara", "dpo")  # blank lines skipped, line numbers kept


def test_cpt_packing_puts_bos_first(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = [row["text"] for row in data.load_rows("builtin:biomat", "cpt")[:3]]
    chunks = data.pack_corpus(texts, tokenizer, 128)
    assert all(chunk[0] == tokenizer.bos_token_id for chunk in chunks)
    assert all(len(chunk) == 128 for chunk in chunks[:-1]) and 1 < len(chunks[-1]) <= 128
    stream = [t for chunk in chunks for t in chunk[1:]]
    assert stream.count(tokenizer.eos_token_id) == 3
    assert tokenizer.decode(stream).startswith(texts[0][:50])


def test_sft_labels_only_assistant_tokens(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    row = {"messages": [{"role": "user", "content": "What is nacre?"},
                        {"role": "assistant", "content": "Mother of pearl."},
                        {"role": "user", "content": "And bone?"},
                        {"role": "assistant", "content": "A mineralised collagen composite."}]}
    example = data.sft_example(row, tokenizer)
    full = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
    assert example["input_ids"] == list(full)
    labelled = tokenizer.decode([t for t in example["labels"] if t != data.IGNORE_INDEX])
    assert "Mother of pearl." in labelled and "A mineralised collagen composite." in labelled
    assert "What is nacre" not in labelled and "And bone" not in labelled
    assert labelled.count(tokenizer.eos_token) == 2  # the model learns to end its turn


def test_recipe_validation_and_overrides(tmp_path):
    recipe = load_recipe(None, ["cpt.epochs=3", "pipelines=[cpt-sft]", "merge=null", "lora.r=4"])
    assert (recipe.cpt.epochs, recipe.pipelines, recipe.merge, recipe.lora.r) == (3, ["cpt-sft"], None, 4)
    with pytest.raises(RecipeError, match=r"cpt.epochs: Input should be greater than 0"):
        load_recipe(None, ["cpt.epochs=0"])
    with pytest.raises(RecipeError, match=r"sft.learnig_rate: Extra inputs are not permitted"):
        load_recipe(None, ["sft.learnig_rate=1e-4"])
    with pytest.raises(RecipeError, match=r"unknown stage 'kto'"):
        load_recipe(None, ["pipelines=[cpt-kto]"])
    with pytest.raises(RecipeError, match="not key=value"):
        load_recipe(None, ["cpt.epochs"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="broken.yaml: cannot read the recipe"):
        load_recipe(broken)


def test_cli_help_and_errors():
    from dafast import train

    result = subprocess.run([sys.executable, "-m", "dafast.train", "--help"], capture_output=True,
                            text=True)
    assert result.returncode == 0
    assert "dpo.beta (0.05): DPO beta" in result.stdout and "default.yaml" in result.stdout
    assert train.main(["cpt.epochs=-1"]) == 2


def test_default_recipe_plans_the_matrix():
    from dafast import matrix

    nodes = matrix.build_plan(load_recipe())
    assert list(nodes) == ["instruct", "cpt", "cpt-sft", "cpt-sft-dpo", "cpt-sft-orpo",
                           "cpt-slerp", "cpt-sft-slerp", "cpt-sft-dpo-slerp", "cpt-sft-orpo-slerp"]
    assert nodes["cpt-sft-dpo-slerp"].parents == ["cpt-sft-dpo", "instruct"]
    changed = matrix.build_plan(load_recipe(None, ["sft.learning_rate=1e-5"]))
    assert changed["cpt"].key == nodes["cpt"].key  # a changed SFT setting keeps CPT...
    assert all(changed[n].key != nodes[n].key for n in nodes if n.startswith("cpt-sft"))  # ...only
