"""The strategy matrix (dafast.matrix) end to end on the tiny Llama of tests/conftest.py.

One run of the [cpt, cpt-sft] pipelines with SLERP merges and a 6-question benchmark is shared
by the module: its report covers every variant and agrees with the cached evals; a rerun
computes nothing and a changed SFT setting recomputes only what depends on SFT; a stage
interrupted mid-training resumes from its checkpoint (and a merge without its marker is redone);
a failing node fails only its descendants, the report lists it and the CLI exits with 1.
Tests that rerun the matrix work on a copy of the shared run's output directory.
"""

import csv
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import TrainerCallback

import dafast.eval.runner
import dafast.merge
from dafast import matrix, sources, train
from dafast.eval.benchmark import load_benchmark
from dafast.recipe import Recipe
import dafast.stages
from dafast.stages import checkpoints
from dafast.stages.output import is_complete
from test_train import losses, recipe_for

PLAN = ["instruct", "cpt", "cpt-sft", "cpt-slerp", "cpt-sft-slerp"]  # all evaluated
QUESTIONS = 6


def with_changes(recipe: Recipe, **changes) -> Recipe:
    """`recipe` with fields replaced (a dict updates a section), validated again."""
    fields = recipe.model_dump()
    for key, value in changes.items():
        fields[key] = {**(fields[key] or {}), **value} if isinstance(value, dict) else value
    return Recipe.model_validate(fields)


@pytest.fixture(scope="module")
def first_run(tiny_model, tmp_path_factory):
    """(recipe, nodes) of the shared run. Not to be written to: rerun on a copy (`copy_of`)."""
    recipe = recipe_for(tmp_path_factory.mktemp("matrix"), model=str(tiny_model),
                        pipelines=["cpt", "cpt-sft"], merge=dict(dtype="float32"),
                        eval=dict(limit=QUESTIONS, batch_size=3))
    return recipe, matrix.run(recipe)


def copy_of(first_run, tmp_path: Path, **changes) -> Recipe:
    """The shared run's recipe (with `changes`) writing to a copy of its output directory."""
    recipe, _ = first_run
    shutil.copytree(recipe.output_dir, tmp_path / "run", symlinks=True)  # models/ are links
    return with_changes(recipe, output_dir=str(tmp_path / "run"), **changes)


@pytest.fixture
def work(monkeypatch):
    """The directories that get trained, merged into and evaluated, in call order."""
    done = {"train": [], "merge": [], "eval": []}

    def spy(module, function, kind, position):
        real = getattr(module, function)

        def recording(*args, **kwargs):
            done[kind].append(Path(args[position]))
            return real(*args, **kwargs)
        monkeypatch.setattr(module, function, recording)

    spy(checkpoints, "train", "train", 1)                               # (trainer, stage_dir)
    spy(dafast.merge, "slerp_merge", "merge", 2)                 # (instruct, trained, out)
    spy(dafast.eval.runner, "evaluate_dir", "eval", 0)           # (model_dir, ...)
    return done


def files(root: Path) -> dict[str, int]:
    """Every file the nodes wrote (the report and the run lock aside), with its modification
    time."""
    from dafast.runlock import LOCK_FILE

    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and "report" not in p.relative_to(root).parts and p.name != LOCK_FILE}


def report_rows(root: Path) -> dict[str, dict]:
    with open(root / "report" / "results.csv", newline="") as f:
        return {row["variant"]: row for row in csv.DictReader(f)}


def test_report_covers_every_variant_and_agrees_with_the_cached_evals(first_run):
    recipe, nodes = first_run
    root = Path(recipe.output_dir)
    assert {n: node.status for n, node in nodes.items()} == dict.fromkeys(PLAN, "done")
    assert [n for n, node in nodes.items() if node.evaluate] == PLAN
    assert nodes["cpt-sft"].parents == ["cpt"]
    assert nodes["cpt-sft-slerp"].parents == ["cpt-sft", "instruct"]

    rows = report_rows(root)
    assert sorted(rows) == sorted(PLAN)
    assert rows["cpt-sft-slerp"]["parents"] == "cpt-sft;instruct" and rows["cpt"]["parents"] == ""
    cached = {p.name.rsplit("-", 1)[0]: json.loads(p.read_text())  # NAME-HASH.json
              for p in (root / "eval").glob("*.json")}
    assert sorted(cached) == sorted(PLAN)
    for name, payload in cached.items():
        records = payload["records"]
        assert len(records) == QUESTIONS and int(rows[name]["n"]) == QUESTIONS
        generation = sum(r["correct"] for r in records) / QUESTIONS
        loglik = sum(r["loglik_correct"] for r in records) / QUESTIONS
        assert payload["summary"]["generation"]["overall"] == pytest.approx(generation)
        assert payload["summary"]["loglik"]["overall"] == pytest.approx(loglik)
        for column in ("generation", "loglik"):  # the CSV holds the cached summary, group by group
            for group, accuracy in payload["summary"][column].items():
                cell = rows[name][f"{column}_{group}"]
                if accuracy is None:
                    assert cell == ""
                else:
                    assert float(cell) == pytest.approx(accuracy, abs=5e-5)
        assert int(rows[name]["unparseable"]) == sum(r["parsed"] is None for r in records)
        assert nodes[name].summary == payload["summary"]

    report = root / "report"
    for plot in ("accuracy.png", "synergy.png", "loss.png"):
        image = (report / plot).read_bytes()
        assert image.startswith(b"\x89PNG") and len(image) > 1000, plot
    markdown = (report / "report.md").read_text()
    for name in PLAN:
        assert f"| {name} |" in markdown
    assert "## Synergy of merges" in markdown and "## Failed" not in markdown
    assert "cpt-slerp (cpt × instruct)" in markdown
    assert "cpt-sft-slerp (cpt-sft × instruct)" in markdown
    curves = json.loads((report / "report.json").read_text())["loss_curves"]
    assert sorted(curves) == ["cpt", "cpt-sft"] and all(len(c) == 6 for c in curves.values())


def test_rerun_reuses_every_node_and_a_changed_setting_recomputes_only_its_descendants(
        first_run, tmp_path, work):
    recipe = copy_of(first_run, tmp_path)
    root = Path(recipe.output_dir)
    before = files(root)
    nodes = matrix.run(recipe)
    assert {n: node.status for n, node in nodes.items()} == dict.fromkeys(PLAN, "done")
    assert work == {"train": [], "merge": [], "eval": []}
    assert files(root) == before
    assert {n: node.summary for n, node in nodes.items()} == {
        n: node.summary for n, node in first_run[1].items()}
    assert report_rows(root) == report_rows(Path(first_run[0].output_dir))
    times = json.loads((root / "report" / "report.json").read_text())["timings"]
    first_times = json.loads((Path(first_run[0].output_dir) / "report" / "report.json")
                             .read_text())["timings"]
    assert times == first_times  # the times of the work, not of the rerun that reused it
    assert sorted(times) == sorted(["cpt: training", "cpt-sft: training", "cpt-slerp: merge",
                                    "cpt-sft-slerp: merge", *(f"{n}: evaluation" for n in PLAN)])
    assert times["cpt: training"] > 0 and times["cpt-sft: training"] > 0
    assert "| cpt-sft: training | " in (root / "report" / "report.md").read_text()

    changed = matrix.run(with_changes(recipe, sft=dict(learning_rate=1e-3)))
    assert {n: node.status for n, node in changed.items()} == dict.fromkeys(PLAN, "done")
    for reused in ("instruct", "cpt", "cpt-slerp"):
        assert changed[reused].model_dir == nodes[reused].model_dir
    for recomputed in ("cpt-sft", "cpt-sft-slerp"):
        assert changed[recomputed].key != nodes[recomputed].key
    assert work["train"] == [changed["cpt-sft"].model_dir.parent]
    assert work["merge"] == [changed["cpt-sft-slerp"].model_dir]
    assert work["eval"] == [changed["cpt-sft"].model_dir, changed["cpt-sft-slerp"].model_dir]
    after = files(root)
    assert {k: after.get(k) for k in before} == before  # the old SFT stays, for the old setting

    new_cpt = matrix.build_plan(with_changes(recipe, cpt=dict(learning_rate=1e-3)))
    assert [n for n in PLAN if new_cpt[n].key == nodes[n].key] == ["instruct"]  # all below CPT


class Killed(Exception):
    pass


class KillAtStep3(TrainerCallback):
    def on_log(self, args, state, control, **kwargs):
        if state.global_step == 3:  # step 3 logged, past the checkpoint of step 2
            raise Killed


class StepsTaken(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def test_interrupted_stage_resumes_and_an_unmarked_merge_is_redone(first_run, tmp_path, monkeypatch):
    recipe = copy_of(first_run, tmp_path)
    root = Path(recipe.output_dir)
    for derived in [*root.glob("stages/cpt-sft-*"), *root.glob("merges/cpt-sft-*"),
                    *root.glob("eval/cpt-sft-*")]:  # as if the run had never reached cpt-sft
        shutil.rmtree(derived) if derived.is_dir() else derived.unlink()
    plan = matrix.build_plan(recipe)
    stage_dir = root / "stages" / f"cpt-sft-{plan['cpt-sft'].key}"
    train_stage = checkpoints.train

    def train_with(callback):
        monkeypatch.setattr(checkpoints, "train", lambda trainer, d: (trainer.add_callback(callback),
                                                               train_stage(trainer, d)))

    train_with(KillAtStep3())
    nodes = matrix.run(recipe)
    assert nodes["cpt-sft"].status == "failed" and nodes["cpt-sft"].error.startswith("Killed")
    assert nodes["cpt-sft-slerp"].status == "skipped" and nodes["cpt-slerp"].status == "done"
    assert not is_complete(stage_dir) and len(losses(stage_dir)) == 3
    assert Path(checkpoints.last_checkpoint(stage_dir)).name == "checkpoint-2"
    actions = {n: node.action for n, node in matrix.run(recipe, only_plan=True).items()}
    assert actions["cpt-sft"] == "resume from checkpoint-2, evaluate"
    assert actions["cpt"] == "cached, eval cached" and actions["cpt-sft-slerp"] == "merge, evaluate"
    unmarked = root / "merges" / f"cpt-sft-slerp-{plan['cpt-sft-slerp'].key}"
    unmarked.mkdir(parents=True)  # a merge directory without merge.json: stopped before its marker
    (unmarked / "model.safetensors").write_bytes(b"truncated")

    resumed = StepsTaken()
    train_with(resumed)
    nodes = matrix.run(recipe)
    assert {n: node.status for n, node in nodes.items()} == dict.fromkeys(PLAN, "done")
    assert resumed.steps == [3, 4, 5, 6]  # from the checkpoint of step 2, cpt not retrained
    uninterrupted = first_run[1]["cpt-sft"].model_dir.parent
    assert losses(stage_dir) == pytest.approx(losses(uninterrupted), rel=1e-6)
    assert is_complete(stage_dir) and not (stage_dir / "checkpoints").exists()
    assert (unmarked / "merge.json").is_file()
    assert (unmarked / "model.safetensors").read_bytes() != b"truncated"
    assert sorted(report_rows(root)) == sorted(PLAN)
    assert "## Failed" not in (root / "report" / "report.md").read_text()


def test_failing_node_fails_only_its_descendants(first_run, tmp_path, capsys):
    bad = tmp_path / "bad_sft.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", '
                   '"content": "a"}]}\n{"messages": [{"role": "robot", "content": "q"}]}\n')
    recipe = copy_of(first_run, tmp_path, sft=dict(data=str(bad)),
                     pipelines=["cpt", "cpt-sft", "cpt-sft-dpo"])
    root = Path(recipe.output_dir)
    nodes = matrix.run(recipe)
    assert {n: node.status for n, node in nodes.items()} == {
        "instruct": "done", "cpt": "done", "cpt-sft": "failed", "cpt-sft-dpo": "skipped",
        "cpt-slerp": "done", "cpt-sft-slerp": "skipped", "cpt-sft-dpo-slerp": "skipped"}
    error = nodes["cpt-sft"].error
    assert error.startswith("DataError: ") and "bad_sft.jsonl:2" in error
    assert nodes["cpt-sft-dpo"].error == nodes["cpt-sft-slerp"].error == "cpt-sft did not finish"
    assert [n for n, node in nodes.items() if node.summary] == ["instruct", "cpt", "cpt-slerp"]
    assert sorted(report_rows(root)) == ["cpt", "cpt-slerp", "instruct"]
    markdown = (root / "report" / "report.md").read_text()
    failed = markdown.split("## Failed", 1)[1].split("\n## ", 1)[0]
    assert f"| cpt-sft | {error} |" in failed
    for skipped in ("cpt-sft-dpo", "cpt-sft-slerp", "cpt-sft-dpo-slerp"):  # each names its parent
        assert f"| {skipped} | {nodes[skipped].parents[0]} did not finish |" in failed
    assert "cpt-slerp (cpt × instruct)" in markdown

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    assert train.main([str(path)]) == 1
    assert "DataError" in capsys.readouterr().out


def test_sweeps_add_cpt_epoch_and_t_schedule_variants(first_run, tmp_path, work):
    """sweep.cpt_epochs and merge.alternatives add variants; what the first run already has is
    reused, and an alternative schedule's merge gets its own synergy row."""
    recipe = copy_of(first_run, tmp_path, pipelines=["cpt"], sweep=dict(cpt_epochs=[1, 2]),
                     merge=dict(alternatives={"half": 0.5}))
    nodes = matrix.run(recipe)
    assert list(nodes) == ["instruct", "cpt", "cpt_e2", "cpt-slerp", "cpt-slerp_half",
                           "cpt_e2-slerp", "cpt_e2-slerp_half"]
    assert all(n.status == "done" for n in nodes.values())
    assert [p.name.rsplit("-", 1)[0] for p in work["train"]] == ["cpt_e2"]  # cpt was done
    assert nodes["cpt_e2"].recipe.cpt.epochs == 2 and nodes["cpt-slerp_half"].merge_t == 0.5
    trained = yaml.safe_load((nodes["cpt_e2"].model_dir.parent / "config.yaml").read_text())
    assert trained["settings"]["epochs"] == 2 and trained["recipe"]["cpt"]["epochs"] == 2
    report = (Path(recipe.output_dir) / "report" / "report.md").read_text()
    assert "cpt_e2-slerp_half (cpt_e2 × instruct)" in report


def test_a_failed_evaluation_skips_the_merges_that_need_it(first_run, tmp_path, monkeypatch):
    """A trained model whose evaluation fails leaves its merge out (no synergy without both
    scores); the report is still written and names both."""
    recipe = copy_of(first_run, tmp_path)
    for cached in (Path(recipe.output_dir) / "eval").glob("cpt-sft-*.json"):
        cached.unlink()
    real = dafast.eval.runner.evaluate_dir

    def failing(model_dir, *args, **kwargs):
        if Path(model_dir).parent.name.startswith("cpt-sft-"):
            raise RuntimeError("out of memory | in the middle\nof the eval")
        return real(model_dir, *args, **kwargs)
    monkeypatch.setattr(dafast.eval.runner, "evaluate_dir", failing)
    nodes = matrix.run(recipe)
    assert nodes["cpt-sft"].status == "failed" and "out of memory" in nodes["cpt-sft"].error
    assert nodes["cpt-sft-slerp"].status == "skipped"
    assert nodes["cpt-slerp"].summary is not None
    report = (Path(recipe.output_dir) / "report" / "report.md").read_text()
    assert "out of memory \\| in the middle<br>of the eval" in report  # one table row
    assert "cpt-sft-slerp" in report


def test_keys_follow_data_contents_not_paths(first_run, tmp_path):
    recipe, nodes = first_run
    sft_data = Path(recipe.sft.data)
    copy = tmp_path / "sft.jsonl"
    shutil.copy(sft_data, copy)
    same = matrix.build_plan(with_changes(recipe, sft=dict(data=str(copy))))
    assert same["cpt-sft"].key == nodes["cpt-sft"].key  # same rows, another path: reused
    copy.write_text("\n".join(sft_data.read_text().splitlines()[1:]) + "\n")
    edited = matrix.build_plan(with_changes(recipe, sft=dict(data=str(copy))))
    assert edited["cpt"].key == nodes["cpt"].key
    assert edited["cpt-sft"].key != nodes["cpt-sft"].key  # one row fewer: retrained


def _eval_key(recipe: Recipe, bench) -> str:
    recipe = with_changes(recipe, eval=dict(bench=str(bench)))
    return matrix._eval_path(matrix.build_plan(recipe)["instruct"], recipe, Path(recipe.output_dir)).name


def test_the_eval_key_changes_iff_the_evaluated_questions_change(tiny_model, tmp_path, monkeypatch):
    """The key of a cached evaluation and the benchmark evaluated cannot come apart: a bundled
    benchmark named bare or as builtin:NAME, or copied with blank lines and CRLF line ends, is one
    key; a question fewer or changed is another; a local directory of the bundled name is read
    and keyed instead of the bundled set."""
    monkeypatch.chdir(tmp_path)  # where "keldara" names no file, until the end
    recipe = recipe_for(tmp_path, model=str(tiny_model), eval=dict(limit=3))
    lines = sources.resolve("builtin:keldara", "benchmark").read_text().splitlines()
    variants = {"spaced": "\n" + "\n\n".join(lines) + "\n   \n", "crlf": "\r\n".join(lines),
                "fewer": "\n".join(lines[:-1]) + "\n",
                "changed": "\n".join([json.dumps({**json.loads(lines[0]), "id": "renamed"})]
                                     + lines[1:]) + "\n"}
    specs = ["builtin:keldara", "keldara"]
    for name, text in variants.items():
        (tmp_path / f"{name}.jsonl").write_bytes(text.encode())
        specs.append(tmp_path / f"{name}.jsonl")
    specs.append("builtin:biomat")
    keys = [_eval_key(recipe, spec) for spec in specs]
    evaluated = [load_benchmark(spec) for spec in specs]
    for i, j in itertools.combinations(range(len(specs)), 2):
        assert (keys[i] == keys[j]) == (evaluated[i] == evaluated[j]), (specs[i], specs[j])
    assert len(set(keys)) == 4  # keldara (4 ways), fewer, changed, biomat

    (tmp_path / "keldara").mkdir()  # an existing path wins over the bundled name
    shutil.copy(tmp_path / "fewer.jsonl", tmp_path / "keldara" / "benchmark.jsonl")
    assert load_benchmark("keldara") == evaluated[specs.index(tmp_path / "fewer.jsonl")]
    assert _eval_key(recipe, "keldara") == keys[specs.index(tmp_path / "fewer.jsonl")]


def test_stage_keys_read_bare_names_and_blank_lines_as_the_stage_does(tiny_model, tmp_path,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = recipe_for(tmp_path, model=str(tiny_model), pipelines=["sft"])
    key = lambda data: matrix.build_plan(with_changes(recipe, sft=dict(data=data)))["sft"].key
    bundled = sources.resolve("builtin:keldara", "sft")
    spaced = tmp_path / "spaced.jsonl"
    spaced.write_text("\n\n".join(bundled.read_text().splitlines()) + "\n")
    assert key("keldara") == key("builtin:keldara") == key(str(spaced)) != key("builtin:biomat")


def test_the_sweeps_recipe_reuses_the_default_runs_nodes():
    from dafast.recipe import builtin_recipe, load_recipe

    default = matrix.build_plan(load_recipe())
    recipe = load_recipe(builtin_recipe("sweeps.yaml"))
    sweeps = matrix.build_plan(recipe)
    swept = [n for n in recipe.sweep.cpt_epochs if n != recipe.cpt.epochs]  # the base is "cpt"
    assert [f"cpt_e{n:g}" for n in swept] == [n for n in sweeps if n.startswith("cpt_e")
                                            and "-" not in n]
    for name in ("instruct", "cpt", "cpt-sft", "cpt-slerp", "cpt-sft-slerp"):
        assert sweeps[name].key == default[name].key
    assert {n.rsplit("_", 1)[1] for n in sweeps if "-slerp_" in n} == {"uniform", "swapped", "light"}


def test_plan_on_a_finished_run_reports_every_node_cached(first_run, tmp_path, capsys, caplog):
    recipe = copy_of(first_run, tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    assert train.main([str(path), "--plan"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == PLAN
    for line in lines:
        name, kind, *action = line.split()
        assert " ".join(action) == ("model, eval cached" if kind == "model" else
                                    "cached, eval cached"), line
    caplog.set_level(logging.INFO, logger="dafast.matrix")
    assert train.main([str(path)]) == 0  # the rerun's log says so too
    assert "cpt (cpt): cached" in caplog.text and "cpt-sft-slerp (merge): cached" in caplog.text
    assert "trained" not in caplog.text and "cpt-sft: evaluated (cached)" in caplog.text


def test_the_readmes_merge_example_runs_on_the_main_jobs_output(first_run, tmp_path):
    """The README's merge command, as written, from a directory holding the main job's
    runs/default (here the tiny run's), merges its CPT-SFT model with its instruct model."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    command = next(line.split("#")[0].split() for line in readme.splitlines()
                   if line.startswith("python -m dafast.merge "))
    assert command[:3] == ["python", "-m", "dafast.merge"]
    shutil.copytree(first_run[0].output_dir, tmp_path / "runs" / "default", symlinks=True)
    config = Path(dafast.merge.__file__).parents[1] / "recipes" / "merge-slerp-paper.yml"
    assert command[3] == "dafast/recipes/merge-slerp-paper.yml"
    (tmp_path / "dafast" / "recipes").mkdir(parents=True)
    shutil.copy(config, tmp_path / command[3])  # as in a clone, the command's path relative
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}  # this checkout's dafast
    result = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    merged = tmp_path / command[4]
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.config.num_hidden_layers == 2  # the tiny model, not the embedded default
