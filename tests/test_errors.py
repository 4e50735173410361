"""Bad input that used to escape validation, and user errors that used to end in a traceback:
each is now an error naming the file, line or field (an `error:` line from the CLIs)."""

import json
import logging

import pytest

from dafast import data
from dafast.eval.benchmark import BenchmarkError, load_benchmark
from dafast.recipe import RecipeError, load_recipe
from dafast.stages import run_stage
from test_train import recipe_for, small_data


def _with_bad_byte(path, line=2):
    lines = path.read_bytes().splitlines(keepends=True)
    lines[line - 1] = lines[line - 1][:5] + b"\xff" + lines[line - 1][5:]
    path.write_bytes(b"".join(lines))


def test_non_utf8_data_names_the_file_and_line(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(open(small_data(tmp_path, "sft")).read())
    _with_bad_byte(path)
    with pytest.raises(data.DataError, match=r"sft.jsonl:2: not UTF-8 text \(byte 0xff at column 6\)"):
        data.load_rows(str(path), "sft")


def test_non_utf8_benchmark_names_the_file_and_line(tmp_path, capsys):
    from importlib import resources

    source = resources.files("dafast") / "data" / "biomat" / "benchmark.jsonl"
    path = tmp_path / "bench.jsonl"
    path.write_bytes(b"".join(source.read_bytes().splitlines(keepends=True)[:3]))
    _with_bad_byte(path, line=3)
    with pytest.raises(BenchmarkError, match=r"bench.jsonl:3: not UTF-8"):
        load_benchmark(path)
    from dafast.eval.__main__ import main

    assert main(["default", "--bench", str(path)]) == 2
    assert "error: " in capsys.readouterr().err


def test_eval_cli_reports_an_unwritable_output(tiny_model, tmp_path, capsys):
    from dafast.eval.__main__ import main

    code = main([str(tiny_model), "--limit", "1", "--no-loglik", "--max-new-tokens", "1",
                 "--device", "cpu", "--out", str(tmp_path / "missing" / "out.json")])
    assert code == 2
    assert "error: cannot write" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_rows_truncated_to_nothing_are_an_error(kind, tiny_model, tmp_path):
    recipe = recipe_for(tmp_path, **{kind: dict(max_length=8)})
    with pytest.raises(data.DataError, match=rf"all 8 rows dropped: max_length 8 .* {kind}.max_length"):
        run_stage(kind, recipe, tiny_model, tmp_path / kind)


def test_rows_truncated_to_nothing_are_counted(tiny_model, tmp_path, caplog):
    path = tmp_path / "sft-long.jsonl"
    rows = [json.loads(line) for line in open(small_data(tmp_path, "sft"))]
    long_prompt = {"messages": [{"role": "user", "content": "word " * 200},
                                {"role": "assistant", "content": "yes"}]}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + [long_prompt]))
    recipe = recipe_for(tmp_path, sft=dict(data=str(path), max_steps=1))
    with caplog.at_level(logging.WARNING, logger="dafast.stages"):
        run_stage("sft", recipe, tiny_model, tmp_path / "sft")
    assert "1 of 9 rows dropped: max_length 96" in caplog.text


@pytest.mark.parametrize("override, field", [("sft.warmup_ratio=1.0", "sft.warmup_ratio"),
                                             ("pipelines=[]", "pipelines")])
def test_recipe_values_that_did_nothing_useful_are_refused(override, field):
    with pytest.raises(RecipeError, match=field):
        load_recipe(None, [override])


def test_non_utf8_recipe_is_a_recipe_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"seed: 1\n# \xff\n")
    with pytest.raises(RecipeError, match="r.yaml: cannot read the recipe"):
        load_recipe(path)


def test_train_cli_reports_a_missing_model(tmp_path, capsys):
    from dafast import train

    code = train.main([f"model={tmp_path / 'nowhere'}", f"output_dir={tmp_path / 'run'}",
                       "merge=null", "eval=null"])
    assert code == 2
    assert "error: unknown model" in capsys.readouterr().err
