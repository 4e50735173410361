"""The settings that make training teach facts: re-ordered CPT variants, conversations mixed into
CPT, fine-tuning chosen per stage, and a check that training on invented facts makes their
answers more likely than the alternatives (which fails on a training no-op)."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from dafast import data, matrix
from dafast.eval.cloze import score_after
from dafast.eval.runner import load_model
from dafast.stages import run_stage
from dafast.stages.cpt import build_dataset
from test_train import recipe_for

DOCUMENT = ("Silk is spun from protein. It is strong.\n\nNacre is layered. Its tablets are "
            "aragonite. They slide.\n\nBone is a composite. It remodels.")


def _paragraphs(text):
    return Counter(p for p in text.split("\n\n"))


def _sentences(text):
    return Counter(s for p in text.split("\n\n") for s in data._SENTENCE_END.split(p))


@pytest.mark.parametrize("reorder, units", [("paragraphs", _paragraphs), ("sentences", _sentences)])
def test_cpt_variants_reorder_each_document_and_keep_its_content(reorder, units):
    other = "Wood is cellulose. Lignin binds it.\n\nBamboo is graded. Its fibres run along it."
    texts = data.cpt_texts([DOCUMENT, other], variants=3, reorder=reorder)
    assert len(texts) == 8
    assert texts == data.cpt_texts([DOCUMENT, other], variants=3, reorder=reorder)  # seeded
    variants = [t for t in texts if units(t) == units(DOCUMENT)]
    assert len(variants) == 4  # the document and its three variants, each with the same units
    assert len(set(variants)) > 1  # and some in a new order
    if reorder == "sentences":  # paragraphs stay in place, sentences move within them
        assert all(len(v.split("\n\n")) == 3 for v in variants)
    assert data.cpt_texts([DOCUMENT], variants=0) == [DOCUMENT]


def test_mix_sft_adds_a_share_of_the_conversations_in_the_chat_template(tiny_model, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = data.load_rows("builtin:biomat", "sft")[:8]
    texts = data.rendered_conversations(rows, 0.5, tokenizer)
    assert len(texts) == 4
    for row, text in zip(rows, texts):
        assert text == tokenizer.apply_chat_template(row["messages"], tokenize=False)
        assert row["messages"][-1]["content"] in text
    assert data.rendered_conversations(rows, 0.0, tokenizer) == []

    recipe = recipe_for(tmp_path)
    plain = build_dataset(recipe.cpt, tokenizer)
    mixed = build_dataset(recipe.cpt.model_copy(update={
        "variants": 1, "mix_sft": 1.0, "sft_data": recipe.sft.data}), tokenizer)
    corpus = sum(len(ids) - 1 for ids in plain["input_ids"])  # less one BOS per chunk
    added = sum(len(ids) - 1 for ids in mixed["input_ids"]) - 2 * corpus
    conversations = data.rendered_conversations(data.load_rows(recipe.sft.data, "sft"), 1.0,
                                                tokenizer)
    expected = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1
                   for t in conversations)
    assert abs(added - expected) <= len(conversations)  # re-ordered text may tokenise a bit apart


def test_finetune_per_stage_full_cpt_then_lora_sft(tiny_model, tmp_path):
    recipe = recipe_for(tmp_path, finetune="lora", cpt=dict(finetune="full"))
    cpt = run_stage("cpt", recipe, tiny_model, tmp_path / "cpt").model_dir
    assert not (tmp_path / "cpt" / "adapter").exists()
    start, trained = load_file(tiny_model / "model.safetensors"), load_file(cpt / "model.safetensors")
    # Full fine-tuning moves every weight, the embedding and the norms too (LoRA would not).
    assert all(not torch.equal(start[name], trained[name]) for name in start)
    sft = run_stage("sft", recipe, cpt, tmp_path / "sft").model_dir
    assert (tmp_path / "sft" / "adapter" / "adapter_config.json").is_file()
    assert sft.is_dir()

    keys = {mode: matrix.build_plan(recipe_for(tmp_path, model=str(tiny_model), pipelines=["cpt"],
                                               cpt=dict(finetune=mode)))["cpt"].key
            for mode in ("full", "lora", None)}
    assert keys["full"] != keys["lora"] == keys[None]  # None: the recipe's (lora)


# --- training on invented facts ----------------------------------------------------------

CREATURES = ["glimmerwort", "tarnhopper", "vexilmoth", "quorrel", "spindlefin", "ashgrub"]
SUBSTANCES = ["talvine", "merrocite", "plosk", "ubrene", "kastolith", "fendrel"]


def _facts(tmp_path: Path) -> str:
    """A corpus stating which invented creature secretes which invented substance."""
    documents = [f"The {creature} is a small animal of the northern marsh. The {creature} "
                 f"secretes {substance}, a sticky material it uses to build its nest. Only the "
                 f"{creature} makes {substance}." for creature, substance in zip(CREATURES, SUBSTANCES)]
    corpus = tmp_path / "facts.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    return str(corpus)


def _margins(model_dir) -> list[float]:
    """Per creature: log p(its substance | "The {creature} secretes") less the best of the
    other substances' (dafast.eval.cloze.score_after, the cloze columns' scorer)."""
    model, tokenizer = load_model(model_dir, device="cpu", dtype=torch.float32)
    contexts = [[tokenizer.bos_token_id] + tokenizer(f"The {c} secretes")["input_ids"]
                for c in CREATURES]
    options = [tokenizer(f" {s}")["input_ids"] for s in SUBSTANCES]
    pairs = [(i, option) for i in range(len(CREATURES)) for option in options]
    with torch.inference_mode():
        scores = score_after(model, contexts, pairs, tokenizer.pad_token_id)
    margins = []
    for i in range(len(CREATURES)):
        row = scores[i * len(options):(i + 1) * len(options)]
        margins.append(row[i] - max(v for k, v in enumerate(row) if k != i))
    return margins


def test_training_on_invented_facts_makes_their_answers_the_likely_ones(tiny_model, tmp_path):
    """Every substance is named equally often in the corpus, so only learning which creature
    secretes which one can lift the right one over the others; a training no-op (or a stage
    that saves the starting weights) leaves the margins where they were."""
    corpus = _facts(tmp_path)
    recipe = recipe_for(tmp_path, cpt=dict(data=corpus, finetune="full", variants=0,
                                           max_steps=150, learning_rate=1e-2, batch_size=2,
                                           max_length=48))
    before = _margins(tiny_model)
    after = _margins(run_stage("cpt", recipe, tiny_model, tmp_path / "cpt").model_dir)
    assert sum(m > 0 for m in before) <= 3, before  # the untrained model does not know them
    assert all(m > 1.0 for m in after), (before, after)  # e^1: the right one is the likely one
