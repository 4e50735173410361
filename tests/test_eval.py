"""Tests for dafast.eval: the benchmark loader, the answer parser, the runner, synergy, report.

Everything but the last test runs in seconds on a tiny random Llama with a tiny BPE tokenizer
trained here (so no model download or conversion is needed); the last one asks the real
SmolLM2-135M-Instruct 20 questions.
"""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
import torch

from conftest import tiny_llama
from dafast.eval import (
    ANSWER_PREFIX, GROUPS, BenchmarkError, diversity, evaluate, evaluate_dir, expected,
    improvement, load_benchmark, parse_answer, prompt_text, synergy_table, write_report,
)
from dafast.eval.__main__ import main as eval_main
from dafast.eval.report import csv_header
from dafast.eval.runner import (Record, _score_continuations, _shared_prefix, calibrated_choices,
                                summarize)

# SmolLM2's chat template, so the tiny tokenizer formats prompts like the real model.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# --- the answer parser ---------------------------------------------------------------------

OPTIONS = {"A": "Flagelliform silk", "B": "Piriform silk",
           "C": "A temporary auxiliary spiral that stabilises the web", "D": "Tubuliform silk"}


@pytest.mark.parametrize("text, expected_answer", [
    ("B", "B"), (" C.", "C"), ("b)", "B"), ("B.", "B"), ("(C)", "C"), ("[D]", "D"),
    ("The answer is C.", "C"), ("**A**", "A"), ("Answer: D", "D"), ("A. Flagelliform silk", "A"),
    ("\n\n  C", "C"), (" C. Major ampullate silk", "C"), ("D: Tubuliform", "D"), ("c", "C"),
    ("Option B", "B"), ("The correct answer is: **B. Piriform silk**", "B"),
    ("I think the answer is B.", "B"), ("C Major ampullate silk", "C"), ("`D`", "D"),
    # a word that starts with a letter is never the letter
    ("Because the silk is sticky", None), ("Both A and B", None), ("Deep", None),
    # "A" + word is the English article; lower case + word is prose
    ("A spider spins it", None), ("a spider", None),
    # letters that are not options, empty replies, True/False for an mc question
    ("E.", None), ("", None), ("   \n", None), ("True", None), ("None of the above", None),
])
def test_parse_mc(text, expected_answer):
    assert parse_answer(text, "mc") == expected_answer


@pytest.mark.parametrize("text, expected_answer", [
    ("Piriform silk", "B"),  # an option's text instead of its letter
    ("A temporary auxiliary spiral that stabil", "C"),  # cut off by max_new_tokens; not article A
    ("A Flagelliform silk", "A"),  # "A" + option A's text is the letter
    ("A spider", None),
    ("silk", None),  # too short to match an option's text
    ("E", None),
])
def test_parse_mc_with_options(text, expected_answer):
    assert parse_answer(text, "mc", OPTIONS) == expected_answer


def test_parse_mc_letters_follow_options():
    options = {"A": "x", "B": "y", "C": "z", "D": "w", "E": "v"}
    assert parse_answer("E.", "mc", options) == "E"
    assert parse_answer("D.", "mc", {"A": "x", "B": "y"}) is None


@pytest.mark.parametrize("text, expected_answer", [
    ("True", "True"), ("true.", "True"), (" False.", "False"), ("False, because it is", "False"),
    ("TRUE", "True"), ("**False**", "False"), ("Answer: True", "True"),
    ("The statement is false.", "False"), (" False: False: False:", "False"),
    ("Yes", None), ("No", None), ("T", None), ("Truly", None), ("", None),
    ("True or false: silk is a protein", None), ("This is not true", None),
])
def test_parse_tf(text, expected_answer):
    assert parse_answer(text, "tf") == expected_answer


def test_parse_rejects_unknown_type():
    with pytest.raises(ValueError, match="qtype"):
        parse_answer("A", "open")


# --- the benchmark loader ------------------------------------------------------------------

MC = {"id": "q-1", "type": "mc", "category": "basic", "corpus_only": True,
      "question": "Which?\nA. one\nB. two\nC. three\nD. four", "answer": "B"}
TF = {"id": "q-2", "type": "tf", "category": "advanced", "corpus_only": False,
      "question": "True or false: silk is a protein.", "answer": "True"}


def _write(tmp_path, lines):
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


def test_load_valid(tmp_path):
    questions = load_benchmark(_write(tmp_path, [MC, TF]))
    assert [q.id for q in questions] == ["q-1", "q-2"]
    assert questions[0].options == {"A": "one", "B": "two", "C": "three", "D": "four"}
    assert questions[0].choices == ("A", "B", "C", "D")
    assert questions[1].choices == ("True", "False")
    no_flag = {k: v for k, v in TF.items() if k != "corpus_only"}
    assert load_benchmark(_write(tmp_path, [no_flag]))[0].corpus_only is False


@pytest.mark.parametrize("bad, line, message", [
    ('{"id": "q-2", "type": ', 2, "not valid JSON"),
    ("[1, 2]", 2, "JSON object"),
    ({**TF, "answer": None}, 2, "field 'answer'"),
    ({k: v for k, v in TF.items() if k != "answer"}, 2, "missing field 'answer'"),
    ({k: v for k, v in TF.items() if k != "question"}, 2, "missing field 'question'"),
    ({**TF, "type": "open"}, 2, "field 'type'"),
    ({**TF, "category": "expert"}, 2, "field 'category'"),
    ({**TF, "corpus_only": "yes"}, 2, "field 'corpus_only'"),
    ({**TF, "id": ""}, 2, "field 'id'"),
    ({**TF, "answer": "true"}, 2, "True' or 'False"),
    ({**MC, "id": "q-3", "answer": "E"}, 2, "not among the options"),
    ({**MC, "id": "q-3", "question": "Which? one, two or three"}, 2, "option lines"),
    ({**MC, "id": "q-3", "question": "Which?\nA. one\nC. three"}, 2, "consecutive"),
    ({**MC}, 2, "duplicate id 'q-1' (first used on line 1)"),
])
def test_load_reports_file_and_line(tmp_path, bad, line, message):
    path = _write(tmp_path, [MC, bad, TF])
    with pytest.raises(BenchmarkError) as info:
        load_benchmark(path)
    assert f"{path}:{line}:" in str(info.value)
    assert message in str(info.value)


def test_blank_lines_are_skipped_and_lines_keep_their_numbers(tmp_path):
    path = _write(tmp_path, [MC, "", "   ", TF, {**TF, "answer": "maybe"}])
    with pytest.raises(BenchmarkError, match=re.escape(f"{path}:5: field 'answer'")):
        load_benchmark(path)
    path = _write(tmp_path, ["", MC, " \t", TF, ""])
    assert [q.id for q in load_benchmark(path)] == ["q-1", "q-2"]


def test_load_empty_and_missing(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(BenchmarkError, match="no questions"):
        load_benchmark(empty)
    with pytest.raises(FileNotFoundError, match="builtin:biomat"):
        load_benchmark(tmp_path / "missing.jsonl")


def test_builtin_benchmark():
    questions = load_benchmark("builtin:biomat")
    assert len(questions) == 240
    assert sum(q.type == "mc" for q in questions) == 140
    assert sum(q.category == "advanced" for q in questions) == 70
    assert sum(q.corpus_only for q in questions) == 123
    assert all(len(q.options) == 4 for q in questions if q.type == "mc")
    assert [q.id for q in load_benchmark("biomat")] == [q.id for q in questions]


def test_builtin_invented_fact_benchmark():
    # The second bundled domain parses with the same loader as the first.
    questions = load_benchmark("builtin:keldara")
    assert len(questions) == 40
    assert sum(q.type == "mc" for q in questions) == 24
    assert sum(q.corpus_only for q in questions) == 20
    assert all(len(q.options) == 4 for q in questions if q.type == "mc")


# --- synergy -------------------------------------------------------------------------------

def _summary(overall, loglik=None, unparseable=0):
    return {"n": {g: 10 for g in GROUPS}, "generation": {g: overall for g in GROUPS},
            "loglik": None if loglik is None else {g: loglik for g in GROUPS},
            "unparseable": unparseable}


def _scored(qid, type_, gold, scores):
    best = max(scores, key=scores.get)
    return Record(qid, "basic", type_, False, gold, best, best, best == gold,
                  loglik_choice=best, loglik_correct=best == gold, loglik_scores=scores,
                  answers={"generation": best, "loglik": best})


def test_calibration_removes_a_fixed_letter_preference():
    """A model that adds +5 to "C" whatever the question picks C everywhere; calibrated, its
    knowledge (the +1 on the gold letter) decides. tf questions are calibrated on their own."""
    golds = "ABCDABCD"
    records = [_scored(f"m{i}", "mc", gold, {c: (5.0 if c == "C" else 0.0) + (c == gold)
                                              for c in "ABCD"})
               for i, gold in enumerate(golds)]
    records += [_scored("t0", "tf", "True", {"True": -1.0, "False": -0.5}),
                _scored("t1", "tf", "False", {"True": -3.0, "False": -1.0})]
    assert [r.loglik_choice for r in records[:8]] == ["C"] * 8
    chosen = calibrated_choices(records)
    assert [chosen[f"m{i}"] for i in range(8)] == list(golds)
    # tf means: True -2.0, False -0.75; residuals t0 (1.0, 0.25) -> True, t1 (-1.0, -0.25) -> False
    assert (chosen["t0"], chosen["t1"]) == ("True", "False")
    for record in records:  # as evaluate() records them
        record.answers["calibrated"] = chosen[record.id]
    summary = summarize(records)
    assert summary["loglik"]["mc"] == pytest.approx(0.25) and summary["loglik"]["tf"] == 0.5
    assert summary["calibrated"]["mc"] == 1.0 and summary["calibrated"]["tf"] == 1.0


def test_synergy_arithmetic():
    assert expected(0.4, 0.6) == pytest.approx(0.5)
    assert improvement(0.7, 0.4, 0.6) == pytest.approx(0.1)
    assert improvement(0.5, 0.4, 0.6) == pytest.approx(-0.1)
    assert diversity(0.4, 0.6) == pytest.approx(0.2) == diversity(0.6, 0.4)


def test_synergy_table():
    rows = [
        {"variant": "Instruct", "parents": [], "summary": _summary(0.5, 0.55)},
        {"variant": "CPT", "parents": [], "summary": _summary(0.3, 0.35)},
        {"variant": "CPT-SLERP", "parents": [], "summary": _summary(0.6, 0.4)},  # from the name
        {"variant": "SFT", "parents": [], "summary": _summary(0.2)},
        {"variant": "SFT-SLERP", "parents": ["SFT", "Instruct"], "summary": _summary(0.45)},
    ]
    table = synergy_table(rows)
    assert [t["merge"] for t in table] == ["CPT-SLERP", "SFT-SLERP"]
    cpt = table[0]
    assert (cpt["parent"], cpt["instruct"]) == ("CPT", "Instruct")
    assert cpt["expected"] == pytest.approx(0.4)
    assert cpt["improvement"] == pytest.approx(0.1)
    assert cpt["diversity"] == pytest.approx(0.2)
    assert cpt["vs_expected"] == pytest.approx(0.2)
    # SFT has no log-likelihood column, so its merge is left out of that table
    assert [t["merge"] for t in synergy_table(rows, column="loglik")] == ["CPT-SLERP"]
    with pytest.raises(ValueError, match="parent 'DPO' is not among"):
        synergy_table(rows + [{"variant": "DPO-SLERP", "parents": [], "summary": _summary(0.1)}])


# --- runner and report on a tiny model -----------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    """A tiny random Llama (hidden 32, 2 layers) and a BPE tokenizer trained on the benchmark."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    questions = load_benchmark("builtin:biomat")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        [q.question for q in questions],
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>",
                                        unk_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    model = tiny_llama(tokenizer=tokenizer, hidden=32, intermediate=64, max_positions=1024,
                       seed=0).eval()
    picked = [q for q in questions if q.type == "mc"][:3] + [q for q in questions if q.type == "tf"][:3]
    return model, tokenizer, picked


def test_prompt_ends_with_answer_prefix(tiny):
    model, tokenizer, questions = tiny
    text = prompt_text(tokenizer, questions[0].question)
    assert text.endswith("<|im_start|>assistant\n" + ANSWER_PREFIX)
    assert "You respond with one word or letter. Select the correct answer to this question: " in text

    class Plain:  # a base-model tokenizer without a chat template
        chat_template = None
    assert prompt_text(Plain(), "Q?").endswith("Q?\n" + ANSWER_PREFIX)


def test_evaluate_tiny(tiny):
    model, tokenizer, questions = tiny
    result = evaluate(model, tokenizer, questions, batch_size=4, max_new_tokens=4)
    assert [r.id for r in result.records] == [q.id for q in questions]
    for record, question in zip(result.records, questions):
        assert record.gold == question.answer
        assert record.correct == (record.parsed == question.answer)
        assert set(record.loglik_scores) == set(question.choices)
        assert record.loglik_choice == max(record.loglik_scores, key=record.loglik_scores.get)
        assert all(math.isfinite(s) and s < 0 for s in record.loglik_scores.values())
    summary = result.summary
    assert summary["n"]["overall"] == 6 and summary["n"]["mc"] == 3
    assert set(summary["generation"]) == set(GROUPS) == set(summary["loglik"])
    assert summary["unparseable"] == sum(r.parsed is None for r in result.records)
    json.dumps(result.to_dict())  # records and summary are plain JSON

    # deterministic, and independent of the batch (padding) a question lands in
    again = evaluate(model, tokenizer, questions, batch_size=4, max_new_tokens=4)
    assert again.to_dict() == result.to_dict()
    single = evaluate(model, tokenizer, questions, batch_size=1, max_new_tokens=4)
    assert [r.generated for r in single.records] == [r.generated for r in result.records]
    for a, b in zip(single.records, result.records):
        assert a.loglik_scores == pytest.approx(b.loglik_scores, abs=1e-4)

    assert evaluate(model, tokenizer, questions, loglik=False).summary["loglik"] is None


def test_loglik_scores_are_the_log_probability_of_each_choice_text(tiny):
    """Each choice's score is log p(" A" | prompt) (" True", ...) of the model, computed here
    from one plain forward over the prompt text followed by the choice text."""
    model, tokenizer, questions = tiny
    picked = [questions[0], questions[-1]]  # an mc and a tf question
    result = evaluate(model, tokenizer, picked, batch_size=2, max_new_tokens=1, cloze=False)
    for record, question in zip(result.records, picked):
        prompt = prompt_text(tokenizer, question.question)
        context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        expected = {}
        for choice in question.choices:
            ids = tokenizer(prompt + " " + choice, add_special_tokens=False)["input_ids"]
            assert ids[:len(context)] == context  # the choice is its own tokens here
            with torch.inference_mode():
                logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            expected[choice] = sum(logp[i - 1, ids[i]].item()
                                   for i in range(len(context), len(ids)))
        assert record.loglik_scores == pytest.approx(expected, abs=1e-4)


def test_shared_prefix_cache_changes_nothing(tiny):
    """The prompts' common opening is prefilled once and shared; with padding between it and
    each prompt's own tokens, answers and scores must equal a full prefill of every prompt."""
    from dafast.eval.answers import encode_prompt

    model, tokenizer, questions = tiny
    prompts = [encode_prompt(tokenizer, q.question) for q in questions]
    shared = _shared_prefix(prompts)
    assert shared > 10 and len({tuple(p[:shared]) for p in prompts}) == 1
    assert len({p[shared] for p in prompts}) > 1
    cached = evaluate(model, tokenizer, questions, batch_size=4, max_new_tokens=4)
    full = evaluate(model, tokenizer, questions, batch_size=4, max_new_tokens=4, share_prefix=False)
    assert [r.generated for r in cached.records] == [r.generated for r in full.records]
    for a, b in zip(cached.records, full.records):
        assert a.loglik_scores == pytest.approx(b.loglik_scores, abs=1e-4)


def test_shared_prefix_leaves_a_token_per_row():
    assert _shared_prefix([[1, 2, 3], [1, 2, 4]]) == 2
    assert _shared_prefix([[1, 2], [1, 2, 3]]) == 1
    assert _shared_prefix([[5, 1], [6, 1]]) == 0


def test_loglik_fast_path_matches_full_scoring(tiny):
    """Single-token continuations come from generation's first step; they must equal a full
    forward over prompt + continuation (the path multi-token continuations take)."""
    from dafast.eval.answers import encode_prompt

    model, tokenizer, questions = tiny
    question = questions[0]
    prompt = encode_prompt(tokenizer, question.question)
    with torch.inference_mode():
        logprobs = model(torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
        tokens = list(range(10, 14))
        scores = _score_continuations(model, prompt, [[t] for t in tokens] + [[10, 11]], 0)
    assert scores[:4] == pytest.approx([logprobs[t].item() for t in tokens], abs=1e-5)
    with torch.inference_mode():
        two = model(torch.tensor([prompt + [10]])).logits[0, -1].log_softmax(-1)[11].item()
    assert scores[4] == pytest.approx(logprobs[10].item() + two, abs=1e-5)


def test_evaluate_dir_and_cli(tiny, tmp_path, capsys):
    model, tokenizer, questions = tiny
    model_dir = tmp_path / "tiny-model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"id": q.id, "type": q.type, "category": q.category,
                                         "corpus_only": q.corpus_only, "question": q.question,
                                         "answer": q.answer}) + "\n" for q in questions))
    result = evaluate_dir(model_dir, bench, limit=4, max_new_tokens=2)
    assert len(result.records) == 4

    out = tmp_path / "results.json"
    assert eval_main([str(model_dir), "--bench", str(bench), "--out", str(out), "--limit", "3",
                      "--max-new-tokens", "2"]) == 0
    data = json.loads(out.read_text())
    assert len(data["records"]) == 3 and data["summary"]["n"]["overall"] == 3
    assert "generation" in capsys.readouterr().out
    assert eval_main([str(model_dir), "--bench", str(tmp_path / "nope.jsonl")]) == 2


def test_report(tiny, tmp_path):
    from PIL import Image

    model, tokenizer, questions = tiny
    summary = evaluate(model, tokenizer, questions, max_new_tokens=2).summary
    shifted = {**summary, "generation": {g: 0.5 for g in GROUPS}}
    rows = [
        {"variant": "Instruct", "parents": [], "summary": summary},
        {"variant": "CPT-SFT", "parents": [], "summary": shifted},
        {"variant": "CPT-SFT-SLERP", "parents": ["CPT-SFT", "Instruct"], "summary": summary},
    ]
    out = tmp_path / "report"
    write_report(out, rows, loss_curves={"CPT": [(0, 3.0), (10, 2.5), (20, 2.2)], "SFT": [(0, 2.0), (5, 1.8)]},
                 config={"model": "tiny", "lr": 2e-5}, timings={"cpt": 12.5, "eval": 3.0},
                 machine={"cpu": "2 cores", "torch": torch.__version__})

    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == csv_header()
    assert [r["variant"] for r in table] == ["Instruct", "CPT-SFT", "CPT-SFT-SLERP"]
    assert float(table[1]["generation_basic"]) == 0.5
    assert "loglik_corpus_only" in table[0] and "unparseable" in table[0]
    assert "calibrated_overall" in table[0]
    markdown = (out / "report.md").read_text()
    assert "| variant | overall | basic | advanced |" in markdown
    assert "## Synergy of merges" in markdown and "CPT-SFT-SLERP (CPT-SFT × Instruct)" in markdown
    for png in ("accuracy.png", "synergy.png", "loss.png"):
        assert f"]({png})" in markdown
        with Image.open(out / png) as image:
            image.verify()
            assert image.format == "PNG"
    assert "12.5" in markdown and "2 cores" in markdown and '"lr": 2e-05' in markdown
    assert json.loads((out / "report.json").read_text())["rows"][2]["variant"] == "CPT-SFT-SLERP"

    # rewriting replaces the old report; no temporary directory is left behind
    write_report(out, rows[:1])
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "report.json", "report.md", "results.csv"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    # a directory holding anything but a report is never replaced
    (out / "model.safetensors").write_text("weights")
    with pytest.raises(FileExistsError, match="not a report"):
        write_report(out, rows)
    assert (out / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="appears twice"):
        write_report(tmp_path / "r2", rows + rows[:1])


def test_summarize_counts_by_hand():
    """Four questions, three answered right, one reply unparseable: the accuracies of every
    group, counted by hand."""
    def record(qid, category, type_, corpus_only, gold, answer):
        return Record(qid, category, type_, corpus_only, gold, str(answer), answer, answer == gold,
                      answers={"generation": answer})

    summary = summarize([record("m0", "basic", "mc", True, "A", "A"),
                         record("m1", "advanced", "mc", False, "B", "B"),
                         record("t0", "basic", "tf", False, "True", None),
                         record("t1", "advanced", "tf", False, "False", "False")])
    assert summary["n"] == {"overall": 4, "basic": 2, "advanced": 2, "mc": 2, "tf": 2,
                            "corpus_only": 1, "not_corpus_only": 3, "tune": 4, "held_out": 0}
    assert summary["generation"] == {"overall": 0.75, "basic": 0.5, "advanced": 1.0, "mc": 1.0,
                                     "tf": 0.5, "corpus_only": 1.0,
                                     "not_corpus_only": pytest.approx(2 / 3), "tune": 0.75,
                                     "held_out": None}
    assert summary["unparseable"] == 1
    assert summary["loglik"] is None  # no record has a log-likelihood answer


def test_summarize_empty_groups():
    only_mc = summarize([_scored("m0", "mc", "A", {"A": 0.0, "B": -1.0})])
    assert only_mc["generation"]["mc"] == 1.0 and only_mc["generation"]["tf"] is None
    assert only_mc["cloze"] is None  # a column that did not run
    assert summarize([])["generation"] is None


# --- the real default model ----------------------------------------------------------------

@pytest.mark.slow
def test_default_model_answers_in_format():
    """SmolLM2-135M-Instruct, 20 questions: most replies must parse (the prompt works)."""
    import importlib.metadata

    from dafast import models

    try:
        importlib.metadata.distribution(models.GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{models.GGUF_DISTRIBUTION} is not installed ({models.INSTALL_HINT})")
    # one batch of 20 and 4 new tokens (" C." needs 2): keeps it well under a minute on 2 cores
    result = evaluate_dir("default", "builtin:biomat", limit=20, device="cpu", batch_size=20,
                          max_new_tokens=4)
    parseable = sum(r.parsed is not None for r in result.records)
    assert parseable / len(result.records) > 0.5, [r.generated for r in result.records]
    assert result.summary["loglik"]["overall"] is not None


def test_eval_dtype_auto_is_bf16_where_bf16_matmuls_are_native(monkeypatch):
    from dafast import _native
    from dafast.eval.runner import eval_dtype

    for native in (True, False):
        monkeypatch.setattr(_native, "cpu_has_native_bf16", lambda: native)
        assert eval_dtype("cpu") == (torch.bfloat16 if native else torch.float32)
        assert eval_dtype("cuda") == torch.bfloat16
        assert eval_dtype("cpu", "float32") == torch.float32
        assert eval_dtype("cuda", "float32") == torch.float32
