"""The cloze and PMI columns (dafast.eval.cloze) and the benchmark's fixed halves."""

import json

import pytest
import torch

from dafast.eval.benchmark import SPLITS, Question, load_benchmark, parse_benchmark, split_of
from dafast.eval.cloze import CLOZE_TEMPLATE, cloze_answers, cloze_scores, score_after, stem
from dafast.eval.runner import COLUMNS, evaluate, load_model
from dafast.ops.linear_logprobs import lm_head_weight

MC = Question("q1", "mc", "basic", True,
              "Which silk forms the capture spiral?\nA. Dragline silk\nB. Flagelliform silk\n"
              "C. Aciniform silk\nD. Pyriform silk", "B",
              {"A": "Dragline silk", "B": "Flagelliform silk", "C": "Aciniform silk",
               "D": "Pyriform silk"})
TF = Question("q2", "tf", "basic", False, "True or false: Nacre is made of aragonite.", "True")


def test_stem_drops_the_option_lines_and_keeps_a_statement():
    assert stem(MC) == "Which silk forms the capture spiral?"
    assert stem(TF) == "True or false: Nacre is made of aragonite."


def _plain_score(model, context: list[int], tokens: list[int]) -> float:
    """log p(tokens | context) from one unpadded forward of context + tokens."""
    ids = torch.tensor([context + tokens])
    logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)
    return sum(logprobs[len(context) - 1 + j, t].item() for j, t in enumerate(tokens))


@pytest.mark.parametrize("head", ["linear_logprobs", "logits"])
def test_score_after_equals_a_plain_forward_of_each_pair(tiny_model, head):
    """The batched path (left-padded contexts, cached and repeated, right-padded continuations)
    scores exactly what one forward of each context + continuation does, whatever the batch;
    through linear_logprobs on the hidden states, and through the model's logits where the
    head is not a plain linear map (a config with soft-capping, which Llama itself ignores)."""
    model, _ = load_model(tiny_model, device="cpu", dtype=torch.float32)
    if head == "logits":
        model.config.final_logit_softcapping = 30.0
        assert lm_head_weight(model) is None
    else:
        assert lm_head_weight(model) is model.lm_head.weight
    generator = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, 1000, (n,), generator=generator).tolist()

    contexts = [ids(n) for n in (1, 5, 12, 3)]
    conts = [(0, ids(4)), (1, ids(1)), (1, ids(6)), (2, ids(2)), (3, ids(9)), (0, ids(1)),
             (2, ids(5))]
    expected = [_plain_score(model, contexts[c], tokens) for c, tokens in conts]
    with torch.inference_mode():
        for batch_size in (1, 3, 64):
            got = score_after(model, contexts, conts, pad_id=0, batch_size=batch_size)
            assert got == pytest.approx(expected, abs=2e-4), batch_size


def test_cloze_scores_are_per_byte_and_pmi_subtracts_the_unconditional(tiny_model):
    model, tokenizer = load_model(tiny_model, device="cpu", dtype=torch.float32)
    with torch.inference_mode():
        cloze, pmi = cloze_scores(model, tokenizer, [MC, TF], tokenizer.pad_token_id)
        context = tokenizer(CLOZE_TEMPLATE.format(stem=stem(MC)), add_special_tokens=False)
        bare = tokenizer("Answer:", add_special_tokens=False)["input_ids"]
        bos = [tokenizer.bos_token_id]
        for letter, text in MC.options.items():
            tokens = tokenizer(CLOZE_TEMPLATE.format(stem=stem(MC)) + " " + text,
                               add_special_tokens=False)["input_ids"][len(context["input_ids"]):]
            logp = _plain_score(model, bos + context["input_ids"], tokens)
            assert cloze[0][letter] == pytest.approx(logp / len(text.encode()), abs=1e-4)
            alone = tokenizer("Answer: " + text, add_special_tokens=False)["input_ids"][len(bare):]
            assert pmi[0][letter] == pytest.approx(logp - _plain_score(model, bos + bare, alone),
                                                   abs=2e-4)
    assert set(cloze[1]) == {"True", "False"} and cloze[1] == pmi[1]


def test_tf_is_called_by_the_margin_above_the_benchmark_mean():
    tf = [Question(f"t{i}", "tf", "basic", False, "True or false: x.", "True") for i in range(4)]
    # Margins 3, 1, -1, -5 (mean -0.5): a prior towards False shifts all of them alike.
    scores = [{"True": m, "False": 0.0} for m in (3.0, 1.0, -1.0, -5.0)]
    assert cloze_answers(tf, scores) == ["True", "True", "False", "False"]
    shifted = [{"True": s["True"] - 100, "False": 0.0} for s in scores]
    assert cloze_answers(tf, shifted) == cloze_answers(tf, scores)
    assert cloze_answers([MC], [{"A": -1.0, "B": -0.5, "C": -2.0, "D": -0.5}]) == ["B"]


def test_evaluate_runs_every_column_and_summarizes_from_the_answers(tiny_model):
    model, tokenizer = load_model(tiny_model, device="cpu", dtype=torch.float32)
    questions = load_benchmark("builtin:biomat")[:12]
    result = evaluate(model, tokenizer, questions, batch_size=4, max_new_tokens=2)
    for record in result.records:
        assert set(record.answers) == set(COLUMNS)
        assert record.answers["cloze"] == max(record.cloze_scores, key=record.cloze_scores.get) \
            or record.type == "tf"
    for column in COLUMNS:
        hits = sum(r.answers[column] == r.gold for r in result.records)
        assert result.summary[column]["overall"] == pytest.approx(hits / 12)
    held = [r for r in result.records if r.split == "held_out"]
    if held:
        assert result.summary["cloze"]["held_out"] == pytest.approx(
            sum(r.answers["cloze"] == r.gold for r in held) / len(held))
    without = evaluate(model, tokenizer, questions[:3], batch_size=4, max_new_tokens=2,
                       loglik=False, cloze=False)
    assert without.summary["cloze"] is None and without.summary["loglik"] is None
    assert without.summary["generation"] is not None


def test_split_is_fixed_by_the_id_roughly_even_and_can_be_given():
    questions = load_benchmark("builtin:biomat")
    assert all(q.split == split_of(q.id) for q in questions)
    tune = sum(q.split == "tune" for q in questions)
    assert 0.4 < tune / len(questions) < 0.6
    assert {split_of(f"x-{i}") for i in range(20)} == set(SPLITS)
    row = {"id": "q-1", "type": "tf", "category": "basic", "question": "True or false: a.",
           "answer": "True"}
    given = "held_out" if split_of("q-1") == "tune" else "tune"
    assert parse_benchmark(json.dumps({**row, "split": given}), "b.jsonl")[0].split == given
    with pytest.raises(ValueError, match=r"b.jsonl:1: field 'split'"):
        parse_benchmark(json.dumps({**row, "split": "test"}), "b.jsonl")


def test_every_bundled_stem_is_a_question_without_its_options():
    for q in load_benchmark("builtin:biomat") + load_benchmark("builtin:keldara"):
        text = stem(q)
        assert text and "\n" not in text
        if q.type == "mc":
            assert not any(f"{letter}. {option}" in text for letter, option in q.options.items())
