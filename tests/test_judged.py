"""dafast.eval.judged end to end: two tiny random chat models answer the bundled questions and
write design prompts with the paper's sampling, and a real judge, dafast.serve on the tiny model
over HTTP (llguidance keeps its JSON to the schema), scores them. Checked: every item answered
and scored in range, the summary's means and intervals against numpy, the readable files and the
report's section and plot, seeded reruns, a rerun served by the caches alone, and the errors of
a broken judge (malformed JSON, scores off the scale, no endpoint) with nothing written. The
matrix runs both tasks for its evaluated nodes and caches them by node key."""

import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import save_tiny_llama
from served import free_port, requires_server

from dafast.eval import judged
from dafast.eval.report import write_report
from dafast.recipe import JudgedSettings, load_recipe
from dafast.teacher import Teacher, TeacherConfig, TeacherError

pytestmark = requires_server

LIMIT = 2
TOKENS = 8


def settings(url, cache, **changes) -> JudgedSettings:
    return JudgedSettings(limit=LIMIT, max_new_tokens=TOKENS, **changes,
                          judge=dict(base_url=url, model="tiny", cache_dir=str(cache), retries=0))


def cache_entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*.json"))


@pytest.fixture(scope="module")
def variants(tiny_model, tmp_path_factory):
    """Two tiny chat models of different random weights (the second named as a merge)."""
    from transformers import AutoTokenizer

    other = tmp_path_factory.mktemp("other") / "model"
    save_tiny_llama(other, AutoTokenizer.from_pretrained(tiny_model), hidden=32, intermediate=64,
                    tied=True, max_positions=None, seed=1)
    return {"instruct": Path(tiny_model), "cpt-slerp": other}


@pytest.fixture(scope="module")
def judged_run(variants, tiny_server, tmp_path_factory):
    """(root, settings, variant -> task -> result) of one judged run on both variants."""
    root = tmp_path_factory.mktemp("judged")
    config = settings(tiny_server, root / "cache")
    results = {name: judged.evaluate_variant(model_dir, name, config,
                                             lambda task, name=name: root / f"{name}-{task}.json")
               for name, model_dir in variants.items()}
    return root, config, results


def by_task(results):
    return {task: {v: r[task] for v, r in results.items()} for task in judged.TASKS}


def test_every_item_is_answered_and_scored_on_the_rubric(judged_run):
    root, _, results = judged_run
    for task, spec in judged.TASKS.items():
        items = judged.load_items("builtin:biomat", task)[:LIMIT]
        for variant, per_task in results.items():
            result = per_task[task]
            assert json.loads((root / f"{variant}-{task}.json").read_text()) == result
            assert [row["id"] for row in result["items"]] == [item["id"] for item in items]
            for row in result["items"]:
                assert isinstance(row["text"], str) and 0 < row["tokens"] <= TOKENS
                assert set(row["scores"]) == set(spec.criteria)
                assert all(isinstance(s, int) and 1 <= s <= 10 for s in row["scores"].values())
            scores = np.array([[row["scores"][c] for c in spec.criteria] for row in result["items"]])
            summary = result["summary"]
            assert summary["n"] == LIMIT
            for k, criterion in enumerate(spec.criteria):
                entry = summary[criterion]
                assert entry["mean"] == pytest.approx(scores[:, k].mean())
                assert scores[:, k].min() <= entry["lo"] <= entry["mean"] <= entry["hi"] \
                    <= scores[:, k].max()
            assert summary["overall"]["mean"] == pytest.approx(scores.mean())
    design = results["instruct"]["design"]["items"][0]
    assert design["concepts"] == judged.load_items("builtin:biomat", "design")[0]["concepts"]
    assert all(c in design["prompt"] for c in design["concepts"])  # the variant was given them
    # Different weights, different texts (the judge saw what each variant wrote).
    assert [r["text"] for r in results["instruct"]["conversations"]["items"]] != \
        [r["text"] for r in results["cpt-slerp"]["conversations"]["items"]]


def test_sampling_is_seeded_so_reruns_write_the_same_texts(judged_run, variants):
    from dafast.generation import ChatModel

    _, config, results = judged_run
    items = judged.load_items("builtin:biomat", "conversations", LIMIT)
    again = judged.generate("conversations", items, "instruct", ChatModel(variants["instruct"]),
                            sampling=judged.sampling(TOKENS, config.temperature), seed=config.seed)
    assert [r["text"] for r in again] == \
        [r["text"] for r in results["instruct"]["conversations"]["items"]]
    other_seed = judged.generate("conversations", items, "instruct",
                                 ChatModel(variants["instruct"]),
                                 sampling=judged.sampling(TOKENS, config.temperature), seed=1000)
    assert [r["text"] for r in other_seed] != [r["text"] for r in again]


def test_a_rerun_makes_no_request(judged_run, variants, tmp_path):
    root, config, results = judged_run
    dead = f"http://127.0.0.1:{free_port()}/v1"
    # The stored results are read: no model, no judge (a dead endpoint would fail).
    offline = config.model_copy(update={"judge": config.judge.model_copy(update={"base_url": dead})})
    assert judged.evaluate_variant(variants["instruct"], "instruct", offline,
                                   lambda task: root / f"instruct-{task}.json") == results["instruct"]
    # Without them, the texts are written again (seeded) and every score comes from the cache.
    before = cache_entries(root / "cache")
    assert len(before) == 2 * len(judged.TASKS) * LIMIT
    rerun = judged.evaluate_variant(variants["cpt-slerp"], "cpt-slerp", offline,
                                    lambda task: tmp_path / f"{task}.json")
    for task in judged.TASKS:
        assert rerun[task]["items"] == results["cpt-slerp"][task]["items"]
    assert cache_entries(root / "cache") == before


def test_report_has_a_section_a_plot_and_every_text(judged_run, tmp_path):
    _, _, results = judged_run
    out = write_report(tmp_path / "report", [], judged=by_task(results))
    files = out / "judged"
    assert (files / "judged.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "report.md").read_text()
    for task, spec in judged.TASKS.items():
        assert f"## {spec.title}" in markdown
        readable = (files / f"{task}.md").read_text()
        rows = [json.loads(line) for line in (files / f"{task}.jsonl").read_text().splitlines()]
        assert len(rows) == 2 * LIMIT
        for variant, per_task in results.items():
            summary = per_task[task]["summary"]
            line = next(l for l in markdown.splitlines() if l.startswith(f"| {variant} | {LIMIT} |"))
            assert f"{summary['overall']['mean']:.2f} [{summary['overall']['lo']:.2f}, " in line
            assert f"## {variant}" in readable
            for row in per_task[task]["items"]:
                assert f"### {row['id']}: " in readable
                assert all(f"> {l}" in readable for l in row["text"].splitlines() if l)
                assert {**row, "variant": variant} in rows
    prompts = [json.loads(l) for l in (files / "design_prompts.jsonl").read_text().splitlines()]
    assert [(p["variant"], p["id"]) for p in prompts] == \
        [(v, row["id"]) for v in results for row in results[v]["design"]["items"]]
    saved = json.loads((out / "report.json").read_text())["judged"]
    assert saved["design"]["cpt-slerp"]["summary"] == results["cpt-slerp"]["design"]["summary"]


@pytest.fixture
def bad_judge():
    """A stdlib server answering every chat completion with `content` (set by the test)."""
    state = {"content": "", "hits": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            state["hits"] += 1
            body = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                               "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                   "role": "assistant", "content": state["content"]}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", state
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("content, message", [
    ('{"depth_of_reasoning": 7, "creat', r"not JSON"),
    ('{"depth_of_reasoning": 11, "creativity": 5, "clarity": 5, "quantitative_precision": 5}',
     r"does not follow the schema at depth_of_reasoning"),
])
def test_a_broken_judge_is_a_clear_error_and_writes_nothing(variants, bad_judge, tmp_path,
                                                            content, message):
    url, state = bad_judge
    state["content"] = content
    config = settings(url, tmp_path / "cache", design=None)
    with pytest.raises(TeacherError, match=r"request instruct/conversations/conv-0\d .*" + message):
        judged.evaluate_variant(variants["instruct"], "instruct", config,
                                lambda task: tmp_path / "out" / f"{task}.json")
    assert state["hits"] >= 1
    assert not (tmp_path / "out").exists() and cache_entries(tmp_path / "cache") == []


def test_no_endpoint_is_a_clear_error_and_writes_nothing(variants, tmp_path):
    config = settings(f"http://127.0.0.1:{free_port()}/v1", tmp_path / "cache", conversations=None)
    with pytest.raises(TeacherError, match=r"request instruct/design/design-0\d .*cannot reach"):
        judged.evaluate_variant(variants["instruct"], "instruct", config,
                                lambda task: tmp_path / "out" / f"{task}.json")
    assert list(tmp_path.rglob("*.json")) == []


def test_intervals_of_varied_scores_match_the_normal_approximation():
    """The judged run's random judge gives one score to everything; here the scores vary, and
    the bootstrap interval of each mean must agree with mean +- 1.96 sd / sqrt(n)."""
    rng = np.random.default_rng(7)
    criteria = list(judged.TASKS["conversations"].criteria)
    scores = rng.integers(1, 11, size=(200, len(criteria)))
    rows = [{"scores": dict(zip(criteria, map(int, line)))} for line in scores]
    summary = judged.summarize("conversations", rows)
    columns = {c: scores[:, k] for k, c in enumerate(criteria)} | {"overall": scores.mean(1)}
    for name, values in columns.items():
        half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
        entry = summary[name]
        assert entry["mean"] == pytest.approx(values.mean())
        assert entry["lo"] == pytest.approx(values.mean() - half, abs=0.1 * half)
        assert entry["hi"] == pytest.approx(values.mean() + half, abs=0.1 * half)
    with pytest.raises(ValueError, match="no scored items"):
        judged.summarize("design", [])


def test_bad_items_name_file_line_and_field(tmp_path):
    from dafast.formats import DataError

    path = tmp_path / "questions.jsonl"
    path.write_text('{"id": "a", "question": "Why?"}\n\n{"id": "b", "question": ""}\n')
    with pytest.raises(DataError, match=r"questions.jsonl:3: field 'question'"):
        judged.load_items(path, "conversations")
    path.write_text('{"id": "a", "question": "Why?"}\n{"id": "a", "question": "How?"}\n')
    with pytest.raises(DataError, match=r"questions.jsonl:2: field 'id': 'a' is also on line 1"):
        judged.load_items(path, "conversations")
    path.write_text('{"id": "d", "concepts": ["nacre"]}\n')
    with pytest.raises(DataError, match=r"questions.jsonl:1: field 'concepts'"):
        judged.load_items(path, "design")
    assert len(judged.load_items("builtin:biomat", "conversations")) >= 20
    assert len(judged.load_items("builtin:biomat", "design")) >= 10


def test_the_matrix_judges_every_evaluated_node_and_caches_it(tiny_model, tiny_server, tmp_path):
    from dafast import matrix
    from test_train import recipe_for

    assert load_recipe().eval.judged is None  # off by default: the default run is unchanged
    judge = dict(base_url=tiny_server, model="tiny", cache_dir=str(tmp_path / "cache"), retries=0)
    recipe = recipe_for(tmp_path, model=str(tiny_model), pipelines=["sft"],
                        sft=dict(max_steps=1), eval=dict(limit=2, batch_size=2, cloze=False,
                                                         judged=dict(limit=1, max_new_tokens=4,
                                                                     judge=judge)))
    plain = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"judged": None})})
    nodes = matrix.run(recipe)
    assert {n.name: n.error for n in nodes.values()} == {"instruct": None, "sft": None}
    root = Path(recipe.output_dir)
    for node in nodes.values():  # the benchmark's cache key does not see the judged settings
        assert matrix._eval_path(node, recipe, root) == matrix._eval_path(node, plain, root)
    stored = sorted(p.name for p in (root / "judged").glob("*.json"))
    assert len(stored) == 4 and all(p.startswith(("instruct-", "sft-")) for p in stored)
    markdown = (root / "report" / "report.md").read_text()
    for title in ("## Judged conversations", "## Design prompts"):
        section = markdown.split(title, 1)[1].split("\n## ", 1)[0]
        assert "| instruct | 1 |" in section and "| sft | 1 |" in section
    assert (root / "report" / "judged" / "judged.png").is_file()

    # A rerun reads the stored results: the judge is never asked (its endpoint is gone).
    fields = recipe.model_dump()
    fields["eval"]["judged"]["judge"]["base_url"] = f"http://127.0.0.1:{free_port()}/v1"
    offline = type(recipe).model_validate(fields)
    again = matrix.run(offline)
    assert all(n.error is None for n in again.values())
    assert {n: again[n].judged for n in again} == {n: nodes[n].judged for n in nodes}
    # Another sampling setting is another result: the dead judge is asked, and that is reported.
    changed = offline.model_copy(deep=True)
    changed.eval.judged.max_new_tokens = 5
    failed = matrix.run(changed)
    assert "cannot reach the endpoint" in failed["sft"].error
    assert failed["sft"].status == "done" and failed["sft"].summary  # the benchmark stands
    assert "judged: TeacherError" in (root / "report" / "report.md").read_text()
