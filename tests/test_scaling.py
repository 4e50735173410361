"""Scaling: `models:` runs the matrix for each of two tiny random Llamas of different sizes.

One run ([cpt] with SLERP merges and a 6-question benchmark, per model) is shared by the module:
both models' nodes train under their own names and directories, with the keys their one-model
recipes give them; the report leads with the scaling view (parameter counts, each strategy's
accuracy and each merge's synergy against size, a plot) and each model gets its own report. A
model whose stage fails leaves the other's results and the report standing. The recipe schema:
`model` or `models`, names, per-model overrides.
"""

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import save_tiny_llama
from dafast import matrix, train
from dafast.eval.scaling import parameter_count, short_count
from dafast.models import default_model_dir
from dafast.recipe import Recipe, RecipeError, load_recipe
from dafast.stages.output import is_complete
from test_train import STEPS, recipe_for

QUESTIONS = 6
LOCAL = ["instruct", "cpt", "cpt-slerp"]  # one model's plan, as its one-model run names it


@pytest.fixture(scope="module")
def sizes(tmp_path_factory):
    """name -> model directory: two random Llamas with SmolLM2's tokenizer, 2 and 3 layers."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    root = tmp_path_factory.mktemp("sizes")
    common = dict(tied=True, max_positions=None)
    return {"small": save_tiny_llama(root / "small", tokenizer, hidden=32, intermediate=64,
                                     seed=0, **common),
            "large": save_tiny_llama(root / "large", tokenizer, hidden=48, intermediate=96,
                                     layers=3, seed=1, **common)}


def scaling_recipe(tmp_path, sizes, **changes) -> Recipe:
    return recipe_for(tmp_path, models=[{"name": n, "path": str(p)} for n, p in sizes.items()],
                      pipelines=["cpt"], merge=dict(dtype="float32"),
                      eval=dict(limit=QUESTIONS, batch_size=3), **changes)


@pytest.fixture(scope="module")
def scaled(sizes, tmp_path_factory):
    recipe = scaling_recipe(tmp_path_factory.mktemp("scaling"), sizes)
    return recipe, matrix.run(recipe)


def expected_parameters(path: Path) -> int:
    """Counted from the loaded model, independently of the safetensors headers."""
    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())


def csv_variants(report: Path) -> list[str]:
    with open(report / "results.csv", newline="") as f:
        return [row["variant"] for row in csv.DictReader(f)]


def test_both_models_train_under_their_own_names_and_keys(scaled, sizes, tmp_path):
    recipe, nodes = scaled
    root = Path(recipe.output_dir)
    assert list(nodes) == [f"{m}/{n}" for m in sizes for n in LOCAL]
    assert all(node.status == "done" for node in nodes.values()), {
        n: node.error for n, node in nodes.items() if node.error}
    for model, path in sizes.items():
        cpt = nodes[f"{model}/cpt"]
        assert cpt.model == model and cpt.parents == [f"{model}/instruct"]
        assert nodes[f"{model}/cpt-slerp"].parents == [f"{model}/cpt", f"{model}/instruct"]
        assert nodes[f"{model}/instruct"].source == path.resolve()
        stage_dir = cpt.model_dir.parent
        assert stage_dir.parent == root / "stages" / model and is_complete(stage_dir)
        assert json.loads((stage_dir / "result.json").read_text())["steps"] == STEPS
        trained = AutoModelForCausalLM.from_pretrained(cpt.model_dir)
        assert trained.config.hidden_size == AutoModelForCausalLM.from_pretrained(
            path).config.hidden_size  # trained from its own model, not the other's
        assert (root / "models" / model / "cpt").resolve() == cpt.model_dir.resolve()
        assert nodes[f"{model}/cpt-slerp"].model_dir.parent == root / "merges" / model

        # the keys of the model's one-model recipe: a cache of that run stays valid
        one = matrix.build_plan(recipe_for(tmp_path, model=str(path), pipelines=["cpt"],
                                           merge=dict(dtype="float32"),
                                           eval=dict(limit=QUESTIONS, batch_size=3)))
        assert list(one) == LOCAL
        assert {n: one[n].key for n in LOCAL} == {n: nodes[f"{model}/{n}"].key for n in LOCAL}
    assert nodes["small/cpt"].key != nodes["large/cpt"].key
    assert (nodes["small/instruct"].summary["n"]["overall"]
            == nodes["large/instruct"].summary["n"]["overall"] == QUESTIONS)


def test_report_leads_with_the_scaling_view(scaled, sizes):
    recipe, nodes = scaled
    report = Path(recipe.output_dir) / "report"
    counts = {m: expected_parameters(p) for m, p in sizes.items()}
    assert counts["small"] < counts["large"]
    assert {m: parameter_count(p) for m, p in sizes.items()} == counts

    markdown = (report / "report.md").read_text()
    section = markdown.split("## Scaling", 1)[1].split("\n## ", 1)[0]
    assert markdown.index("## Scaling") < markdown.index("## Headline")
    for model in sizes:  # smallest first, exact count, the model's own report linked
        assert re.search(rf"\| {model} \| {counts[model]:,} \| \[\.\./reports/{model}/report\.md\]",
                         section), model
    assert section.index("| small |") < section.index("| large |")
    header = f"| strategy | small ({short_count(counts['small'])}) | " \
             f"large ({short_count(counts['large'])}) |"
    assert header in section
    column = recipe.eval.primary
    for strategy in LOCAL:  # the nodes' own accuracies, each with an interval around it
        cells = [f"{100 * nodes[f'{m}/{strategy}'].summary[column]['overall']:.1f} ["
                 for m in ("small", "large")]
        assert re.search(rf"\| {strategy} \| {re.escape(cells[0])}[^|]*\| "
                         rf"{re.escape(cells[1])}[^|]*\|", section), strategy
    assert "| merge: merged − expected |" in section and "| merge: improvement |" in section
    assert re.search(r"\| cpt-slerp \| [+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\] \|", section)

    view = json.loads((report / "report.json").read_text())["scaling"]
    assert view["column"] == column
    assert [(m["name"], m["parameters"]) for m in view["models"]] == [
        ("small", counts["small"]), ("large", counts["large"])]
    for strategy, points in view["accuracy"].items():
        assert [p["model"] for p in points] == ["small", "large"], strategy
        for p in points:
            lo, hi = p["interval"]
            assert lo <= p["accuracy"] <= hi
    for p in view["synergy"]["cpt-slerp"]:
        merged, cpt, instruct = (nodes[f"{p['model']}/{n}"].summary[column]["overall"]
                                 for n in ("cpt-slerp", "cpt", "instruct"))
        assert p["vs_expected"] == pytest.approx(merged - (cpt + instruct) / 2)
        assert p["improvement"] == pytest.approx(merged - max(cpt, instruct))
    image = (report / "scaling.png").read_bytes()
    assert image.startswith(b"\x89PNG") and len(image) > 1000
    assert csv_variants(report) == list(nodes)  # every node of every model, by its full name


def test_each_model_gets_its_one_model_report(scaled, sizes):
    recipe, nodes = scaled
    for model in sizes:
        report = Path(recipe.output_dir) / "reports" / model
        assert csv_variants(report) == LOCAL
        markdown = (report / "report.md").read_text()
        assert "## Scaling" not in markdown and not (report / "scaling.png").exists()
        assert "**cpt** vs **instruct**" in markdown  # compared with its own instruct model
        assert "cpt-slerp (cpt × instruct)" in markdown
        assert "scaling" not in json.loads((report / "report.json").read_text())
        config = json.loads((report / "report.json").read_text())["config"]
        assert config["model"] == str(sizes[model]) and config["models"] is None


def test_a_failing_model_leaves_the_other_and_the_report(scaled, sizes, tmp_path, capsys):
    """The large model's CPT gets bad data through its overrides: its CPT fails and its merge
    is skipped; the small model's nodes are reused and the scaling report still shows it."""
    recipe, first = scaled
    shutil.copytree(recipe.output_dir, tmp_path / "run", symlinks=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txet": "typo"}\n')
    fields = recipe.model_dump()
    fields["output_dir"] = str(tmp_path / "run")
    fields["models"][1]["overrides"] = {"cpt": {"data": str(bad)}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(fields))
    assert train.main([str(path)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"large/cpt\s+cpt\s+failed\s+DataError", out)
    assert re.search(r"large/cpt-slerp\s+merge\s+skipped\s+large/cpt did not finish", out)
    assert re.search(r"small/cpt-slerp\s+merge\s+done", out)

    nodes = matrix.run(load_recipe(path), only_plan=True)
    assert nodes["large/cpt"].key != first["large/cpt"].key  # the override is its setting
    assert [n for n, node in nodes.items() if node.action == "cached, eval cached"] == [
        "small/cpt", "small/cpt-slerp"]
    report = tmp_path / "run" / "report"
    markdown = (report / "report.md").read_text()
    assert "| large/cpt | DataError" in markdown.split("## Failed", 1)[1]
    view = json.loads((report / "report.json").read_text())["scaling"]
    assert [p["model"] for p in view["accuracy"]["cpt"]] == ["small"]
    assert [p["model"] for p in view["accuracy"]["instruct"]] == ["small", "large"]
    assert [p["model"] for p in view["synergy"]["cpt-slerp"]] == ["small"]
    assert csv_variants(tmp_path / "run" / "reports" / "large") == ["instruct"]


def test_models_schema(tmp_path):
    recipe = Recipe(models=["/m/SmolLM2-360M-Instruct/", {"name": "big", "path": "/m/x",
                                                          "base_model": "/m/x-base",
                                                          "overrides": {"dpo": {"beta": 0.01}}}])
    assert [(m.name, m.path) for m in recipe.models] == [
        ("SmolLM2-360M-Instruct", "/m/SmolLM2-360M-Instruct/"), ("big", "/m/x")]
    per_model = recipe.model_recipes()
    assert per_model["big"].model == "/m/x" and per_model["big"].base_model == "/m/x-base"
    assert per_model["big"].dpo.beta == 0.01 and per_model["big"].dpo.learning_rate == 5e-6
    assert per_model["SmolLM2-360M-Instruct"].dpo.beta == recipe.dpo.beta
    assert all(r.models is None for r in per_model.values())
    assert Recipe.model_validate(recipe.model_dump()) == recipe  # a dumped recipe loads again
    assert Recipe().model_recipes() == {"": Recipe()}

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": "default", "models": ["/a"]}))
    with pytest.raises(RecipeError,
                       match=r"(?s)r\.yaml: invalid recipe.*both `models` and `model`"):
        load_recipe(path)
    for models, message in [([], "no models"), (["/a/m", "/b/m"], "m given twice"),
                            ([{"name": "a/b", "path": "/p"}], "model name 'a/b'"),
                            ([{"name": "a", "path": "/p", "overrides": {"eval": None}}],
                             r"models\.0\.overrides: .*eval: not settable per model"),
                            ([{"name": "a", "path": "/p", "overrides": {"lora": {"r": 0}}}],
                             r"models\[0\] \(a\)\.overrides: lora\.r: Input should be greater")]:
        with pytest.raises(RecipeError, match=message):
            load_recipe(None, [f"models={json.dumps(models)}", "model=null"])


def test_the_readmes_scaling_recipe_validates():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("### Several models: scaling", 1)[1].split("```yaml", 1)[1]
    recipe = Recipe.model_validate(yaml.safe_load(block.split("```", 1)[0]))
    names = [m.name for m in recipe.models]
    assert len(names) == 5 and {"smollm2-135m", "smollm2-1.7b", "llama-3.1-8b"} <= set(names)
    assert recipe.model_recipes()["mistral-7b"].dpo.beta == 0.01


def test_parameter_count_reads_the_shards_the_index_names(tmp_path):
    """A sharded model counts the tensors its index maps, not a stray file beside the shards
    (Mistral's repositories ship a consolidated.safetensors next to them)."""
    import torch
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3, 5), "b": torch.zeros(7)}, tmp_path / "model-1.safetensors")
    save_file({"c": torch.zeros(2, 2, 2)}, tmp_path / "model-2.safetensors")
    save_file({"a": torch.zeros(3, 5), "b": torch.zeros(7), "c": torch.zeros(2, 2, 2)},
              tmp_path / "consolidated.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-1.safetensors", "b": "model-1.safetensors", "c": "model-2.safetensors"}}))
    assert parameter_count(tmp_path) == 15 + 7 + 8
    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(ValueError, match="no model.safetensors"):
        parameter_count(tmp_path)
    assert [short_count(n) for n in (999, 12_345, 134_515_008, 1_711_376_384)] == [
        "999", "12.3K", "135M", "1.71B"]
