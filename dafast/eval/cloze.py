"""The cloze columns: each option's own text scored as the answer to the question's stem.

Small models read a lettered option list poorly: their letter choice mostly follows a prior over
letters (PriDe, arXiv 2309.03882), so the paper's protocol and the letter log-likelihood can
stay at chance while the model does know the facts. The cloze form (OLMES, arXiv 2406.08446;
lm-evaluation-harness's ``acc_norm``) asks the question without the list and scores each option
as the continuation, which is the form continued pretraining trains:

    <BOS>Question: {stem}\\nAnswer: {option text}

- ``cloze`` (mc): the option's summed log-probability divided by its length in UTF-8 bytes
  (longer options are not penalised for their length).
- ``pmi`` (mc): the summed log-probability less the option's log-probability after the bare
  context ``Answer:`` (pointwise mutual information with the question), so an option that is
  likely whatever the question (a common word, a familiar phrase) gains nothing from that.
- tf, in both columns: a statement has no alternatives to compare, and a benchmark row carries no
  negation of it (writing one automatically is unreliable: quantities, double negatives). The
  statement is asked in the same cloze form with the continuations " True" and " False", and
  the True-minus-False margin is calibrated: a statement is called True when its margin is above
  the mean margin over the benchmark's tf statements. A model that answers every statement alike
  scores as a coin would, and only a margin that follows the facts lifts it.

The context starts with BOS as CPT's packed chunks do. Each batch computes its contexts once
(keys and values cached) and then scores all their options after them in one forward.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from dafast.eval.benchmark import Question
from dafast.ops.linear_logprobs import linear_logprobs, lm_head_weight

CLOZE_TEMPLATE = "Question: {stem}\nAnswer:"
UNCONDITIONAL = "Answer:"
_OPTION_LINE = re.compile(r"^[A-Z]\.\s+\S.*$", re.MULTILINE)


def stem(question: Question) -> str:
    """The question text without its option lines (mc), or the statement as asked (tf)."""
    text = _OPTION_LINE.sub("", question.question) if question.type == "mc" else question.question
    return " ".join(text.split())


def _encode(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ids if bos is None else [bos] + ids


def continuation_ids(tokenizer, prompt: str, text: str) -> list[int]:
    """Tokens of ``text`` as they follow ``prompt``, split the way lm-evaluation-harness does.

    Encoding prompt+text and cutting off the prompt's tokens keeps tokenizers that merge across
    the boundary or add a prefix space (SentencePiece) honest; when the prompt's tokens are not
    a prefix of the joint encoding, the text is encoded alone.
    """
    context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    whole = tokenizer(prompt + text, add_special_tokens=False)["input_ids"]
    if whole[: len(context)] == context and len(whole) > len(context):
        return whole[len(context):]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _left_pad(rows: list[list[int]], pad_id: int):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


def _right_pad(rows: list[list[int]], pad_id: int):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def _scoring_order(continuations: Sequence[tuple[int, list[int]]]) -> list[int]:
    """Continuations grouped by context, the groups ordered by their longest continuation and
    each group by length: a batch then holds few contexts and little padding."""
    longest: dict[int, int] = {}
    for context, tokens in continuations:
        longest[context] = max(longest.get(context, 0), len(tokens))
    return sorted(range(len(continuations)), key=lambda k: (
        longest[continuations[k][0]], continuations[k][0], len(continuations[k][1])))


def _last_states(model, head, last_only: bool = False, **inputs) -> torch.Tensor:
    """What the head scores at every position (``last_only``: at the last one): the final
    hidden states when ``head`` is the LM head's weight (the log-probabilities then come from
    linear_logprobs, no logits held), else the logits."""
    if head is not None:
        states = model.get_decoder()(**inputs).last_hidden_state
        return states[:, -1:] if last_only else states
    return model(**inputs, logits_to_keep=1 if last_only else 0).logits


def _target_logprobs(head, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[i] | states[i]) for rows of :func:`_last_states`' output."""
    if head is not None:
        return linear_logprobs(states, head, targets)
    return states.float().log_softmax(-1).gather(-1, targets[:, None])[:, 0]


def score_after(model, contexts: Sequence[list[int]], continuations: Sequence[tuple[int, list[int]]],
                pad_id: int, batch_size: int = 64) -> list[float]:
    """Summed log p(tokens | contexts[i]) for every (i, tokens) in ``continuations``.

    Continuations are taken ``batch_size`` at a time (see _scoring_order); the contexts they
    follow are run once per batch (left-padded, KV cache kept), the cache is repeated per
    continuation, and the continuations run after it right-padded. The first token of a
    continuation is scored at its context's last position, each later one at the position
    before it; only those positions reach the head."""
    from transformers.cache_utils import DynamicCache

    device = next(model.parameters()).device
    head = lm_head_weight(model)
    order = _scoring_order(continuations)
    scores = [0.0] * len(continuations)
    for first in range(0, len(order), batch_size):
        batch = order[first:first + batch_size]
        used = sorted({continuations[k][0] for k in batch})
        slot = {c: s for s, c in enumerate(used)}
        ctx_ids, ctx_mask = _left_pad([list(contexts[c]) for c in used], pad_id)
        positions = (ctx_mask.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache()
        context_last = _last_states(model, head, input_ids=ctx_ids.to(device),
                                    attention_mask=ctx_mask.to(device),
                                    position_ids=positions.to(device), past_key_values=cache,
                                    use_cache=True, last_only=True)[:, -1]
        rows = [slot[continuations[k][0]] for k in batch]
        cache.batch_select_indices(torch.tensor(rows, device=device))
        tokens = [continuations[k][1] for k in batch]
        cont_ids, cont_mask = _right_pad(tokens, pad_id)
        lengths = ctx_mask.sum(1)[rows]
        cont_positions = lengths[:, None] + torch.arange(cont_ids.shape[1])[None]
        states = _last_states(model, head, input_ids=cont_ids.to(device),
                              attention_mask=torch.cat([ctx_mask[rows], cont_mask], 1).to(device),
                              position_ids=cont_positions.to(device), past_key_values=cache,
                              use_cache=True)
        # Token j of a continuation is predicted at its position j - 1 (j = 0: the context's end).
        later = cont_mask.clone()
        later[torch.arange(len(batch)), cont_mask.sum(1) - 1] = 0
        scored = torch.cat([context_last[rows], states[later.bool().to(device)]])
        targets = torch.cat([cont_ids[:, 0], cont_ids[:, 1:][later[:, :-1].bool()]]).to(device)
        owner = torch.cat([torch.arange(len(batch)), later[:, :-1].nonzero()[:, 0]]).to(device)
        totals = torch.zeros(len(batch), dtype=torch.float64, device=device)
        totals.index_add_(0, owner, _target_logprobs(head, scored, targets).double())
        for row, k in enumerate(batch):
            scores[k] = totals[row].item()
    return scores


def cloze_scores(model, tokenizer, questions: Sequence[Question], pad_id: int,
                 batch_size: int = 64) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """Per question, {choice: cloze score} and {choice: pmi score} (tf: the raw True/False
    log-probabilities in both; :func:`cloze_answers` calibrates them)."""
    contexts = [_encode(tokenizer, CLOZE_TEMPLATE.format(stem=stem(q))) for q in questions]
    texts = [CLOZE_TEMPLATE.format(stem=stem(q)) for q in questions]
    conts, owners, options = [], [], []
    for i, q in enumerate(questions):
        choices = q.options if q.type == "mc" else {c: c for c in q.choices}
        for choice, text in choices.items():
            conts.append((i, continuation_ids(tokenizer, texts[i], " " + text)))
            owners.append((i, choice))
            options.append(text)
    conditional = score_after(model, contexts, conts, pad_id, batch_size)

    unique = sorted({text for (i, _), text in zip(owners, options) if questions[i].type == "mc"})
    bare = [(0, continuation_ids(tokenizer, UNCONDITIONAL, " " + text)) for text in unique]
    prior = dict(zip(unique, score_after(model, [_encode(tokenizer, UNCONDITIONAL)], bare,
                                         pad_id, batch_size))) if unique else {}

    cloze: list[dict[str, float]] = [{} for _ in questions]
    pmi: list[dict[str, float]] = [{} for _ in questions]
    for (i, choice), text, logp in zip(owners, options, conditional):
        if questions[i].type == "mc":
            cloze[i][choice] = logp / len(text.encode("utf-8"))
            pmi[i][choice] = logp - prior[text]
        else:
            cloze[i][choice] = pmi[i][choice] = logp
    return cloze, pmi


def cloze_answers(questions: Sequence[Question], scores: Sequence[dict[str, float]]) -> list[str]:
    """The chosen answer per question: the best-scoring option (mc; ties go to the first), or
    True when the statement's True-False margin is above the mean margin of the tf questions."""
    margins = [s["True"] - s["False"] for q, s in zip(questions, scores) if q.type == "tf"]
    threshold = sum(margins) / len(margins) if margins else 0.0
    answers = []
    for q, s in zip(questions, scores):
        if q.type == "tf":
            answers.append("True" if s["True"] - s["False"] > threshold else "False")
        else:
            answers.append(max(s, key=lambda c: s[c]))
    return answers
