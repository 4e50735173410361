"""Run the benchmark on a model: the columns of COLUMNS, one answer per question in each.

- Generation (the paper's protocol): greedy decoding of a few tokens after the prompt of
  :mod:`dafast.eval.answers`, read by :func:`parse_answer`; an unparseable reply is wrong.
- Log-likelihood (lm-evaluation-harness's multiple-choice scoring): the summed log-probability
  of each choice's continuation (" A".." D" or " True"/" False") after the same prompt; the
  argmax is the model's choice. It cannot be unparseable, and it separates "knows the fact"
  from "follows the answer format", which matters for base and heavily fine-tuned models.
- Calibrated log-likelihood: the same scores less each choice's mean over the benchmark
  (:func:`calibrated_choices`), for models whose choice is mostly a fixed letter preference.
- Cloze and PMI (:mod:`dafast.eval.cloze`): each option's own text scored as the answer to the
  question without the option list; the columns that small models can be read by.

All are deterministic: greedy decoding, no sampling, batches formed in a fixed order. Prompts
are sorted by length so a batch holds similar lengths (less padding); numerics can depend on
the batch a prompt lands in at the last bit, so compare runs at the same batch size.

Every prompt opens with the same tokens (the chat template's system turn and the protocol's
instruction: 40 of about 96 tokens on the bundled benchmark with SmolLM2). Their keys and values
are computed once and shared by every batch (:func:`_prefix_cache`), which saves that part of
the prefill, the bulk of an evaluation's time on a CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from collections.abc import Sequence

import torch

from dafast.eval.answers import continuations, encode_prompt, parse_answer, prompt_text
from dafast.eval.benchmark import Question, load_benchmark
from dafast.eval.cloze import cloze_answers, cloze_scores, continuation_ids
from dafast.models import load_model

logger = logging.getLogger(__name__)

# The accuracy groups of a summary, in report order. "tune" and "held_out" are the benchmark's
# two fixed halves (:attr:`Question.split`): settings are chosen on one, reported on both.
GROUPS = ("overall", "basic", "advanced", "mc", "tf", "corpus_only", "not_corpus_only",
          "tune", "held_out")
# The answer columns, in report order (see the module docstring and dafast.eval.cloze).
COLUMNS = ("generation", "loglik", "calibrated", "cloze", "pmi")


@dataclasses.dataclass
class Record:
    """One question's outcome in both columns."""

    id: str
    category: str
    type: str
    corpus_only: bool
    gold: str
    generated: str  # the decoded reply, special tokens dropped
    parsed: str | None  # None: unparseable
    correct: bool
    loglik_choice: str | None = None  # None when the log-likelihood column was not run
    loglik_correct: bool | None = None
    loglik_scores: dict[str, float] | None = None  # choice -> summed log-prob
    split: str = "tune"  # the benchmark half: "tune" | "held_out"
    cloze_scores: dict[str, float] | None = None  # choice -> log-prob per byte (tf: raw)
    pmi_scores: dict[str, float] | None = None  # choice -> log-prob less the unconditional one
    # column -> the choice it made (None: unparseable or not run), for every column in COLUMNS
    answers: dict[str, str | None] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class EvalResult:
    records: list[Record]
    summary: dict  # see summarize()

    def to_dict(self) -> dict:
        return {"summary": self.summary, "records": [dataclasses.asdict(r) for r in self.records]}


def _in_group(record: Record, group: str) -> bool:
    return {
        "overall": True,
        "basic": record.category == "basic",
        "advanced": record.category == "advanced",
        "mc": record.type == "mc",
        "tf": record.type == "tf",
        "corpus_only": record.corpus_only,
        "not_corpus_only": not record.corpus_only,
        "tune": record.split == "tune",
        "held_out": record.split == "held_out",
    }[group]


def calibrated_choices(records: Sequence[Record]) -> dict[str, str]:
    """Question id -> the log-likelihood choice after batch calibration (Zhou et al. 2023):
    each choice's mean log-prob over the questions of its type is subtracted first.

    A small model can prefer one letter (or "False") whatever the question; the plain
    log-likelihood then mostly measures that prior. Calibrated, a model that ranks every choice
    by the same prior scores chance, so a gain above chance is knowledge, not format."""
    chosen = {}
    for type_ in sorted({r.type for r in records}):
        members = [r for r in records if r.type == type_]
        prior = {c: sum(r.loglik_scores[c] for r in members) / len(members)
                 for c in members[0].loglik_scores}
        for r in members:
            chosen[r.id] = max(r.loglik_scores, key=lambda c: r.loglik_scores[c] - prior[c])
    return chosen


def summarize(records: Sequence[Record]) -> dict:
    """Accuracies (fractions in [0, 1]; None for an empty group) of every column that ran.

    ``{"n": {group: count}, COLUMN: {group: acc} | None for each of COLUMNS,
    "unparseable": count}`` with the groups of GROUPS; a column is None when it did not run
    (no answer in the records' ``answers``).
    """
    def accuracy(flags: list[bool]) -> float | None:
        return sum(flags) / len(flags) if flags else None

    members = {g: [r for r in records if _in_group(r, g)] for g in GROUPS}
    summary: dict = {"n": {g: len(rs) for g, rs in members.items()}}
    for column in COLUMNS:
        ran = bool(records) and all(column in r.answers for r in records)
        summary[column] = ({g: accuracy([r.answers[column] == r.gold for r in rs])
                            for g, rs in members.items()} if ran else None)
    summary["unparseable"] = sum(r.parsed is None for r in records)
    return summary


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding: every prompt then ends at the last column, where generation starts."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def _shared_prefix(rows: Sequence[list[int]]) -> int:
    """Length of the token prefix common to every row, leaving each row at least one token."""
    shortest = min(len(r) for r in rows)
    first = rows[0]
    length = 0
    while length < shortest - 1 and all(r[length] == first[length] for r in rows):
        length += 1
    return length


def _prefix_cache(model, prefix: list[int]):
    """The KV cache of ``prefix`` (one row), or None when the model's cache cannot be shared.

    Sharing needs a plain per-layer key/value cache: a batch then copies it, repeats it per row
    and generates after it with padding between the prefix and each prompt's own tokens, which
    the attention mask hides and the position ids (from the mask) skip. Sliding-window,
    recurrent or quantised caches are not shared (padding would enter a recurrent state)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    device = next(model.parameters()).device
    cache = model(input_ids=torch.tensor([prefix], device=device), use_cache=True).past_key_values
    if type(cache) is not DynamicCache or not all(type(layer) is DynamicLayer for layer in cache.layers):
        return None
    return cache


def _batch_inputs(rows: list[list[int]], shared: int, prefix, pad_id: int, device):
    """(input_ids, attention_mask, cache) of a batch: the rows left-padded, or, with a shared
    prefix cache, the common prefix + padding + each row's own tokens and the cache repeated
    per row (generate then computes only the tokens after the prefix)."""
    ids, mask = _left_pad([row[shared:] for row in rows], pad_id, device)
    if prefix is None:
        return ids, mask, None
    ids = torch.cat([ids.new_tensor(rows[0][:shared]).expand(len(rows), -1), ids], 1)
    mask = torch.cat([mask.new_ones(len(rows), shared), mask], 1)
    cache = copy.deepcopy(prefix)  # generate extends the cache it is given
    cache.batch_repeat_interleave(len(rows))
    return ids, mask, cache


def _score_continuations(model, prompt: list[int], conts: list[list[int]], pad_id: int) -> list[float]:
    """Summed log p(continuation | prompt) for each continuation: one right-padded forward."""
    rows = [prompt + c for c in conts]
    width = max(len(r) for r in rows)
    device = next(model.parameters()).device
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    logprobs = logits.log_softmax(-1).cpu()
    scores = []
    for i, cont in enumerate(conts):
        # The token at position p is predicted by the logits at p - 1.
        positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(cont))
        scores.append(logprobs[i, positions, torch.tensor(cont)].sum().item())
    return scores


def evaluate(
    model,
    tokenizer,
    questions: Sequence[Question],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 8,
    loglik: bool = True,
    cloze: bool = True,
    share_prefix: bool = True,
) -> EvalResult:
    """Ask every question; return per-question records and summary accuracies of every column
    (generation; with ``loglik`` the letter log-likelihood and its calibration; with ``cloze``
    the cloze and PMI columns of :mod:`dafast.eval.cloze`).

    ``model`` is a causal LM (transformers), ``tokenizer`` its tokenizer. Runs on the model's
    device, in its dtype, under inference mode; the model is left in the mode it was in.
    ``share_prefix``: compute the prompts' common opening once (see the module's docstring).
    """
    from transformers import GenerationConfig

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be at least 1")
    eos_id = model.generation_config.eos_token_id
    if eos_id is None:
        eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = eos_id if isinstance(eos_id, int) else eos_id[0]
    # An explicit config, so a model's own sampling defaults can never leak in.
    generation = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos_id,
        pad_token_id=pad_id, output_logits=loglik, return_dict_in_generate=True,
    )
    device = next(model.parameters()).device

    prompts = [encode_prompt(tokenizer, q.question) for q in questions]
    conts: list[list[list[int]]] = []
    if loglik:
        for q in questions:
            text = prompt_text(tokenizer, q.question)
            conts.append([continuation_ids(tokenizer, text, c) for c in continuations(q.choices)])

    records: list[Record | None] = [None] * len(questions)
    order = sorted(range(len(questions)), key=lambda i: len(prompts[i]))
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            shared = _shared_prefix(prompts) if share_prefix and prompts else 0
            prefix = _prefix_cache(model, prompts[0][:shared]) if shared else None
            if prefix is None:
                shared = 0
            for first in range(0, len(order), batch_size):
                batch = order[first:first + batch_size]
                ids, mask, cache = _batch_inputs([prompts[i] for i in batch], shared, prefix,
                                                 pad_id, device)
                out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache,
                                     generation_config=generation)
                replies = tokenizer.batch_decode(out.sequences[:, ids.shape[1]:], skip_special_tokens=True)
                # The first generation step's logits are the next-token distribution after the
                # prompt: single-token continuations are scored from them with no extra forward.
                first_step = out.logits[0].float().log_softmax(-1).cpu() if loglik else None
                for row, i in enumerate(batch):
                    records[i] = _record(model, questions[i], replies[row], prompts[i],
                                         conts[i] if loglik else None,
                                         first_step[row] if loglik else None, pad_id)
                logger.info("evaluated %d/%d questions (%.1f s)", min(first + batch_size, len(order)),
                            len(order), time.perf_counter() - start)
            if cloze:
                cloze_by_q, pmi_by_q = cloze_scores(model, tokenizer, questions, pad_id,
                                                    batch_size=4 * batch_size)
                for record, c, p in zip(records, cloze_by_q, pmi_by_q):
                    record.cloze_scores, record.pmi_scores = c, p
                for column, scores in (("cloze", cloze_by_q), ("pmi", pmi_by_q)):
                    for record, answer in zip(records, cloze_answers(questions, scores)):
                        record.answers[column] = answer
    finally:
        model.train(was_training)
    if loglik:
        calibrated = calibrated_choices(records)
        for record in records:
            record.answers["calibrated"] = calibrated[record.id]
    return EvalResult(records, summarize(records))


def _record(model, q: Question, reply: str, prompt: list[int], conts, first_step, pad_id) -> Record:
    parsed = parse_answer(reply, q.type, q.options)
    record = Record(q.id, q.category, q.type, q.corpus_only, q.answer, reply, parsed,
                    parsed == q.answer, split=q.split, answers={"generation": parsed})
    if conts is not None:
        if all(len(c) == 1 for c in conts):
            scores = [first_step[c[0]].item() for c in conts]
        else:
            scores = _score_continuations(model, prompt, conts, pad_id)
        best = max(range(len(scores)), key=lambda k: scores[k])  # ties: the first choice
        record.loglik_choice = q.choices[best]
        record.loglik_correct = record.loglik_choice == q.answer
        record.loglik_scores = dict(zip(q.choices, scores))
        record.answers["loglik"] = record.loglik_choice
    return record


def default_device() -> str:
    """Where evaluations run unless told: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def eval_dtype(device: str, name: str = "auto") -> torch.dtype:
    """The dtype ``name`` (auto | float32 | bfloat16) means on ``device``: auto is bfloat16 on a
    GPU and on a CPU with native bf16 arithmetic (its matmuls are the fast ones there), float32
    on other CPUs, where bf16 matmuls are several times slower."""
    if name != "auto":
        return getattr(torch, name)
    from dafast._native import cpu_has_native_bf16

    native = not str(device).startswith("cpu") or cpu_has_native_bf16()
    return torch.bfloat16 if native else torch.float32


def evaluate_dir(
    model_dir: str | os.PathLike,
    bench: str | os.PathLike | Sequence[Question] = "builtin:biomat",
    *,
    device: str | None = None,
    dtype=None,
    limit: int | None = None,
    **kwargs,
) -> EvalResult:
    """Load ``model_dir`` (dafast.models.load_model) and evaluate it on ``bench`` (path,
    builtin:NAME or questions); ``limit`` keeps the first N questions; other arguments go to
    :func:`evaluate`. Default device: the GPU when there is one; default dtype: eval_dtype's auto."""
    questions = load_benchmark(bench) if isinstance(bench, (str, os.PathLike)) else list(bench)
    if limit is not None:
        questions = questions[:limit]
    device = device or default_device()
    model, tokenizer = load_model(model_dir, device=device, dtype=dtype or eval_dtype(device))
    return evaluate(model, tokenizer, questions, **kwargs)
