"""CPT and SFT on TRL's SFTTrainer, fed with dafast's own tokenisation (dafast.data): CPT on the
corpus (with its re-ordered variants and mixed-in conversations) packed into BOS-led chunks, SFT with labels on the assistant tokens only. The loss runs on
dafast's fused head: no [batch, tokens, vocab] logits."""

from __future__ import annotations

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from dafast import data


def build_dataset(kind: str, settings, tokenizer) -> Dataset:
    rows = data.load_rows(settings.data, kind)
    if kind == "cpt":
        conversations = (data.rendered_conversations(data.load_rows(settings.sft_data, "sft"),
                                                     settings.mix_sft, tokenizer)
                         if settings.mix_sft else [])
        texts = data.cpt_texts([row["text"] for row in rows], variants=settings.variants,
                               reorder=settings.reorder, conversations=conversations)
        chunks = data.pack_corpus(texts, tokenizer, settings.max_length)
        return Dataset.from_dict({"input_ids": chunks})
    examples = [data.sft_example(row, tokenizer, settings.max_length) for row in rows]
    return Dataset.from_list(examples)


def build_trainer(kind, settings, model, tokenizer, dataset, arguments, peft_config, callbacks):
    config = SFTConfig(**arguments, max_length=settings.max_length, packing=False,
                       dataset_num_proc=None)
    return SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=peft_config, callbacks=callbacks)
