"""Training data: local JSON Lines in TRL's standard formats, validated before anything trains.

    text          {"text": ...}                                   CPT corpus
    messages      {"messages": [{"role", "content"}, ...]}        SFT (loss on assistant turns)
    prompt/completion {"prompt": ..., "completion": ...}          SFT (loss on the completion)
    preference    {"prompt": ..., "chosen": ..., "rejected": ...} DPO, ORPO (strings or messages)

Sources (a file, a dataset directory, `builtin:NAME` or a bare bundled NAME) resolve in
dafast.sources, and rows validate against the models of dafast.formats, so the stages, the
benchmark and distillation read data one way. The first bad row raises DataError naming the file,
the line and the field, so nothing trains on half-read data.

Tokenisation is dafast's own, not the trainers': CPT packs the corpus into fixed chunks that each
start with a BOS token (the paper's recipe, which TRL's packing does not do), and SFT labels the
assistant tokens by rendering the chat template turn by turn, which works for any template that
renders a conversation's prefix as a prefix (TRL needs `{% generation %}` markers instead).
"""

from __future__ import annotations

import hashlib
import os
import random
import re

from dafast import sources
# Public here too. One row validator for every reader: check_row(row, "file:line", kind) -> the
# row's model (dafast.formats); one resolver and one reader (dafast.sources).
from dafast.formats import DataError, check_row  # noqa: F401
from dafast.sources import read_jsonl, resolve as resolve_source  # noqa: F401

IGNORE_INDEX = -100
# A sentence ends at . ! or ? followed by white space and a capital letter or digit.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9])")


def load_rows(source: str | os.PathLike, kind: str) -> list[dict]:
    """Read and validate every row of `source` for a stage of `kind` (cpt, sft, dpo, orpo)."""
    _, rows = sources.read(source, kind)
    return [row for _, row, _ in rows]


# --- tokenisation ---------------------------------------------------------------------------

def pack_corpus(texts: list[str], tokenizer, seq_len: int) -> list[list[int]]:
    """The paper's CPT packing: documents tokenised, each closed by EOS, concatenated, and cut
    into chunks of seq_len tokens that each start with BOS (so every chunk looks like the start
    of a document to the model). The last, shorter chunk is kept (the collator pads it)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise ValueError("CPT packing needs a tokenizer with BOS and EOS tokens")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
    body = seq_len - 1
    return [[bos] + stream[i:i + body] for i in range(0, len(stream), body)]


def _reordered(text: str, unit: str, rng: random.Random) -> str:
    """``text`` with its paragraphs, or the sentences within each paragraph, shuffled."""
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    if unit == "paragraphs":
        rng.shuffle(paragraphs)
        return "\n\n".join(paragraphs)
    shuffled = []
    for paragraph in paragraphs:
        sentences = _SENTENCE_END.split(paragraph)
        rng.shuffle(sentences)
        shuffled.append(" ".join(sentences))
    return "\n\n".join(shuffled)


def cpt_texts(documents: list[str], *, variants: int = 0, reorder: str = "paragraphs",
              conversations: list[str] = ()) -> list[str]:
    """The CPT corpus as packed: every document, ``variants`` re-ordered copies of each (see
    :func:`_reordered`), and the rendered ``conversations``, in one shuffled order so a packed
    chunk mixes documents and forms. Seeded by the texts themselves: the same corpus and
    settings always give the same texts."""
    texts = list(documents)
    for document in documents:
        rng = random.Random(hashlib.sha256(document.encode("utf-8")).digest())
        texts.extend(_reordered(document, reorder, rng) for _ in range(variants))
    texts.extend(conversations)
    if variants or conversations:
        random.Random(len(texts)).shuffle(texts)
    return texts


def rendered_conversations(rows: list[dict], share: float, tokenizer) -> list[str]:
    """The first ``share`` of SFT rows (in file order) as text in the tokenizer's chat template
    (plain "role: content" lines without one): question-answer data for the CPT corpus."""
    count = round(share * len(rows))
    texts = []
    for row in rows[:count]:
        messages = row["messages"] if "messages" in row else (
            _as_messages(row["prompt"], "user") + _as_messages(row["completion"], "assistant"))
        if getattr(tokenizer, "chat_template", None):
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
        else:
            texts.append("\n".join(f"{m['role']}: {m['content']}" for m in messages))
    return texts


def _as_messages(value, role: str) -> list[dict]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def sft_example(row: dict, tokenizer, max_length: int | None = None) -> dict:
    """input_ids and labels of one SFT row: labels are the assistant tokens (for prompt/completion
    rows: the completion), IGNORE_INDEX elsewhere. The chat template is rendered one prefix at a
    time; what an assistant turn adds to the rendering (its text and end-of-turn token) is
    labelled, so the model learns to stop."""
    if "messages" in row:
        messages = row["messages"]
    else:
        messages = _as_messages(row["prompt"], "user") + _as_messages(row["completion"], "assistant")
    input_ids: list[int] = []
    labels: list[int] = []
    for end in range(1, len(messages) + 1):
        assistant = messages[end - 1]["role"] == "assistant"
        if assistant:  # the prompt of this turn, with the template's generation prompt
            prompt = _render(tokenizer, messages[:end - 1], generation_prompt=True)
            _extend(input_ids, labels, prompt, labelled=False)
        _extend(input_ids, labels, _render(tokenizer, messages[:end]), labelled=assistant)
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    if not messages and not generation_prompt:
        return []
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                              add_generation_prompt=generation_prompt)["input_ids"])


def _extend(input_ids: list[int], labels: list[int], rendered: list[int], labelled: bool) -> None:
    """Append what `rendered` (the rendering of a longer prefix) adds to input_ids."""
    if rendered[:len(input_ids)] != input_ids:
        raise ValueError("the chat template does not render a conversation's prefix as a prefix "
                         "of the conversation, so assistant tokens cannot be located")
    added = rendered[len(input_ids):]
    input_ids.extend(added)
    labels.extend(added if labelled else [IGNORE_INDEX] * len(added))


def preference_example(row: dict, conversational: bool) -> dict:
    """A preference row in the form TRL's DPO and ORPO trainers read. With a chat model
    (conversational=True), plain strings become one user and one assistant message, so the
    trainers apply the chat template the model was tuned with."""
    if not conversational:
        return {k: row[k] for k in ("prompt", "chosen", "rejected")}
    return {"prompt": _as_messages(row["prompt"], "user"),
            "chosen": _as_messages(row["chosen"], "assistant"),
            "rejected": _as_messages(row["rejected"], "assistant")}
