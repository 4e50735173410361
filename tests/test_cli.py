"""What `python -m dafast.train` tells a user: --help shows the values the run would use,
override errors name the override, one pipeline may be given as a plain string, and --plan may
stand anywhere among the overrides."""

import subprocess
import sys

import pytest
import yaml

from dafast import train
from dafast.recipe import RecipeError, load_recipe


def help_text(*argv) -> str:
    result = subprocess.run([sys.executable, "-m", "dafast.train", *argv, "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_help_shows_the_default_recipes_values_not_the_schemas():
    text = help_text()
    default = load_recipe()
    for key in ("cpt.learning_rate", "dpo.learning_rate", "sft.batch_size", "sft.max_length",
                "save_steps", "dpo.beta"):
        section, _, field = key.rpartition(".")
        value = getattr(getattr(default, section) if section else default, field)
        assert f"  {key} ({value!r}): " in text, key
    # the schema's own defaults differ for these, so the lines above could not come from it
    assert "  cpt.learning_rate (0.0001)" not in text and "  save_steps (50)" not in text
    assert "default.yaml" in text


def test_help_after_a_recipe_and_overrides_shows_their_values(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"cpt": {"learning_rate": 7e-4}, "eval": None}))
    text = help_text(str(path), "lora.r=4")
    assert "  cpt.learning_rate (0.0007): " in text and "  lora.r (4): " in text
    assert "eval (null: off): " in text and "mine.yaml with the overrides" in text


def test_override_errors_name_the_override_and_file_errors_the_file(tmp_path):
    with pytest.raises(RecipeError) as error:
        load_recipe(None, ["cpt.epoch=2"])
    message = str(error.value)
    assert "cpt.epoch: Extra inputs are not permitted (from override 'cpt.epoch=2')" in message
    assert message.startswith("the command-line overrides") and "default.yaml" not in message
    path = tmp_path / "bad.yaml"
    path.write_text("sft: {batch_size: 0}\n")
    with pytest.raises(RecipeError) as error:
        load_recipe(path, ["lora.r=4"])
    assert str(error.value).startswith(f"{path}: invalid recipe")
    assert f"sft.batch_size: Input should be greater than or equal to 1 (from {path})" \
        in str(error.value)


def test_one_pipeline_as_a_string():
    assert load_recipe(None, ["pipelines=cpt-sft"]).pipelines == ["cpt-sft"]
    with pytest.raises(RecipeError, match="unknown stage 'kto'"):
        load_recipe(None, ["pipelines=cpt-kto"])


def test_plan_anywhere_among_the_overrides(tmp_path, capsys):
    args = train.parse_args(["cpt.epochs=2", "--plan", "lora.r=4"])
    assert (args.plan, args.recipe, args.overrides) == (True, None, ["cpt.epochs=2", "lora.r=4"])
    args = train.parse_args(["r.yaml", "cpt.epochs=2", "--plan"])
    assert (args.plan, args.recipe, args.overrides) == (True, "r.yaml", ["cpt.epochs=2"])
    assert train.main([f"output_dir={tmp_path}", "--plan", "pipelines=cpt", "merge=null"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["instruct", "cpt"]
    assert lines[1].split()[2:] == ["train,", "evaluate"]  # nothing on disk yet


def test_a_run_prints_one_line_per_stage_and_no_step_records(tiny_model, tmp_path):
    """Outside pytest's warning filters: the console of a real run."""
    from test_train import recipe_for

    recipe = recipe_for(tmp_path, model=str(tiny_model), pipelines=["cpt-sft"])
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    result = subprocess.run([sys.executable, "-m", "dafast.train", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    trained = [line for line in result.stdout.splitlines() if ": trained 6 steps" in line]
    assert len(trained) == 2 and "cpt (cpt): trained" in trained[0] and " loss " in trained[0]
    assert "{'loss'" not in result.stdout + result.stderr
    assert "is_gradient_checkpointing" not in result.stderr
    assert "6/6" in result.stderr  # the progress bar
