"""CPT: next-token loss on the domain corpus (with its re-ordered variants and mixed-in
conversations, dafast.data.cpt_texts) packed into BOS-led chunks of max_length tokens."""

from __future__ import annotations

from datasets import Dataset

from dafast import data
from dafast.recipe import StageSettings
from dafast.stages.sft import build_trainer  # noqa: F401  (the same trainer and loss)


def build_dataset(settings: StageSettings, tokenizer) -> Dataset:
    rows = data.load_rows(settings.data, "cpt")
    conversations = (data.rendered_conversations(data.load_rows(settings.sft_data, "sft"),
                                                 settings.mix_sft, tokenizer)
                     if settings.mix_sft else [])
    texts = data.cpt_texts([row["text"] for row in rows], variants=settings.variants,
                           reorder=settings.reorder, conversations=conversations)
    return Dataset.from_dict({"input_ids": data.pack_corpus(texts, tokenizer, settings.max_length)})
