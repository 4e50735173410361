"""Statistics of the evaluation: intervals for accuracies, paired tests, degenerate answers.

An accuracy on a benchmark of a few hundred questions moves by several points between two
models that know the same things, so every number of the report carries a 95% interval and every
comparison a paired test on the same questions. The unit of resampling is the question: a
bootstrap draws the benchmark's questions with replacement (the same draw for every variant of a
comparison, so their shared difficulty cancels). Every function is pure and seeded: the same
answers give the same interval on every run.

Outcomes are arrays of booleans, one per question (True: answered correctly), aligned across
variants by :func:`outcomes`, which reads the records of :mod:`dafast.eval.runner` (as dicts, the
way the eval JSON files hold them).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95
SEED = 0
# A variant "answers mostly one thing" above these shares of its most common answer. The bundled
# benchmark's golds are balanced (each letter 25% of mc, True 56% of tf), so a model that answers
# from knowledge follows that spread: an mc share above 50% is twice the even share, a letter
# chosen over the question; tf has only two values, and above 80% (4 to 1) one value drowns the
# other. Both stay clear of what a good model shows on a balanced benchmark.
DEGENERATE_SHARE = {"mc": 0.5, "tf": 0.8}


def outcomes(records: Sequence[Mapping], column: str, ids: Sequence[str] | None = None) -> np.ndarray | None:
    """Correctness per question in ``column`` (``answers[column] == gold``), in the order of
    ``ids`` (default: the records' order); None when a record lacks the column (an old eval file
    without ``answers``, or a column that did not run). An unparseable answer is wrong."""
    by_id = {}
    for r in records:
        answers = r.get("answers")
        if not isinstance(answers, Mapping) or column not in answers:
            return None
        by_id[r["id"]] = answers[column] is not None and answers[column] == r["gold"]
    order = [r["id"] for r in records] if ids is None else ids
    missing = [i for i in order if i not in by_id]
    if missing:
        raise ValueError(f"records lack question(s) {', '.join(missing[:5])}: variants compared "
                         "must be evaluated on the same questions")
    return np.fromiter((by_id[i] for i in order), dtype=bool, count=len(order))


def resample_indices(n: int, *, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """[resamples, n] question indices drawn with replacement: one bootstrap benchmark a row.
    Read-only and shared by every call with the same arguments (a report asks for the same few
    group sizes hundreds of times)."""
    if n < 1:
        raise ValueError("a bootstrap needs at least one question")
    return _indices(n, resamples, seed)


@functools.lru_cache(maxsize=8)
def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    index = np.random.default_rng(seed).integers(0, n, size=(resamples, n), dtype=np.int32)
    index.setflags(write=False)
    return index


def _percentile(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    lo, hi = np.quantile(values, [tail, 1 - tail])
    return float(lo), float(hi)


def accuracy_interval(correct: np.ndarray, *, resamples: int = RESAMPLES, seed: int = SEED,
                      level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``correct``: the ``(1-level)/2`` and
    ``(1+level)/2`` quantiles of the accuracy over ``resamples`` redrawn benchmarks."""
    correct = np.asarray(correct, dtype=float)
    means = correct[resample_indices(len(correct), resamples=resamples, seed=seed)].mean(1)
    return _percentile(means, level)


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value of ``b`` and ``c`` discordant pairs (questions only the
    first, resp. only the second variant got right): under no difference each discordant pair
    falls either way with probability 1/2, so p = min(1, 2 P(X <= min(b, c))), X ~ Bin(b + c,
    1/2). Summed in integers, so it is exact for any benchmark size."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative, got {b} and {c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2 ** n)  # int / int: Python rounds the exact ratio once


def paired_difference(a: np.ndarray, b: np.ndarray, *, resamples: int = RESAMPLES,
                      seed: int = SEED, level: float = LEVEL) -> dict:
    """Variant ``a`` against ``b`` on the same questions: ``diff`` = acc(a) - acc(b), its paired
    bootstrap interval ``lo``, ``hi`` (both redrawn on the same questions), the discordant counts
    ``a_only``, ``b_only`` and the exact McNemar ``p``."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes differ in length: {a.shape[0]} and {b.shape[0]}")
    delta = a.astype(float) - b.astype(float)  # per question: +1, 0 or -1
    diffs = delta[resample_indices(len(delta), resamples=resamples, seed=seed)].mean(1)
    lo, hi = _percentile(diffs, level)
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    return {"diff": float(delta.mean()), "lo": lo, "hi": hi, "a_only": a_only, "b_only": b_only,
            "p": mcnemar_p(a_only, b_only)}


def verdict(comparison: Mapping, alpha: float = 1 - LEVEL) -> str:
    """"real" when the interval excludes 0 and McNemar's p < alpha, "noise" when neither,
    "borderline" when the two disagree (a difference at the edge of what the benchmark shows)."""
    excludes = comparison["lo"] > 0 or comparison["hi"] < 0
    significant = comparison["p"] < alpha
    return "real" if excludes and significant else "noise" if not (excludes or significant) \
        else "borderline"


def synergy_intervals(p1: np.ndarray, p2: np.ndarray, merged: np.ndarray, *,
                      resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> dict:
    """Intervals of the synergy measures of a merge and its parents (outcomes on the same
    questions), the three redrawn jointly: ``improvement`` = P_merged - max(P1, P2),
    ``diversity`` = |P1 - P2|, ``vs_expected`` = P_merged - (P1 + P2) / 2, and ``expected`` and
    ``merged`` themselves. Each is ``(lo, hi)``. |.| and max() make the percentile interval of
    diversity and improvement lean away from 0 when the parents are close: read it together
    with the parents' paired comparison."""
    outcomes3 = np.stack([np.asarray(x, dtype=float) for x in (p1, p2, merged)])
    index = resample_indices(outcomes3.shape[1], resamples=resamples, seed=seed)
    s1, s2, sm = (row[index].mean(1) for row in outcomes3)
    measures = {"improvement": sm - np.maximum(s1, s2), "diversity": np.abs(s1 - s2),
                "vs_expected": sm - (s1 + s2) / 2, "expected": (s1 + s2) / 2, "merged": sm}
    return {name: _percentile(values, level) for name, values in measures.items()}


def answer_shares(records: Sequence[Mapping], column: str) -> dict[str, dict]:
    """Per question type: the most common answer in ``column`` and its share of the type's
    questions (unparseable answers count in the denominator, never as the common answer), and
    whether that share passes :data:`DEGENERATE_SHARE`. ``{type: {"answer", "share", "n",
    "flagged"}}``; types without a threshold are never flagged."""
    shares = {}
    for type_ in sorted({r["type"] for r in records}):
        answers = [(r.get("answers") or {}).get(column) for r in records if r["type"] == type_]
        counts = Counter(a for a in answers if a is not None)
        answer, count = counts.most_common(1)[0] if counts else (None, 0)
        share = count / len(answers)
        shares[type_] = {"answer": answer, "share": share, "n": len(answers),
                         "flagged": share > DEGENERATE_SHARE.get(type_, 1.0)}
    return shares


def in_group(records: Sequence[Mapping], group: str) -> list[Mapping]:
    """The records of ``group`` (one of runner.GROUPS), by the runner's own membership rule."""
    from types import SimpleNamespace

    from dafast.eval.runner import _in_group

    defaults = {"category": "", "corpus_only": False, "split": "tune"}
    return [r for r in records if _in_group(SimpleNamespace(**{**defaults, **r}), group)]


def chance(records: Sequence[Mapping] | None = None, n: Mapping | None = None) -> dict:
    """Chance accuracy per group of a uniform random guesser: 1/choices per question, averaged
    (overall is the benchmark's weighted chance). From the records' choices (their score keys)
    when given, else from the summary's counts ``n`` with 4 mc options and 2 tf values."""
    from dafast.eval.runner import GROUPS

    def guess(r):
        scores = r.get("loglik_scores") or r.get("cloze_scores")
        return 1 / len(scores) if scores else (0.25 if r["type"] == "mc" else 0.5)

    if records:
        result = {}
        for group in GROUPS:
            members = [guess(r) for r in in_group(records, group)]
            result[group] = sum(members) / len(members) if members else None
        return result
    n = n or {}
    total = n.get("overall") or 0
    overall = (0.25 * n.get("mc", 0) + 0.5 * n.get("tf", 0)) / total if total else None
    return {"overall": overall, "mc": 0.25, "tf": 0.5}


def analyse(rows: Sequence[Mapping], *, primary: str = "cloze", instruct: str | None = None) -> dict:
    """The statistics of the report's rows (see dafast.eval.report), from their records:

    ``{"primary": the headline column (``primary``, or the first column that ran when it did
    not), "requested": ``primary``, "columns": the columns that ran, primary first, "instruct": its row name or None,
    "chance": {group: accuracy}, "intervals": {variant: {column: {group: (lo, hi) | None}}},
    "vs_instruct": {variant: {column: paired_difference(variant, instruct)}} (overall),
    "vs_parents": [{"merge", "parent", "comparisons": {column: paired_difference}}],
    "degenerate": {variant: {column: answer_shares}}}``. Rows without records are left out of
    everything but "columns" and "chance"."""
    from dafast.eval.runner import COLUMNS, GROUPS
    from dafast.eval.synergy import is_merge, merge_parents

    if primary not in COLUMNS:
        raise ValueError(f"eval.primary: {primary!r} is not a column (one of {', '.join(COLUMNS)})")
    ran = [c for c in COLUMNS if any(r["summary"].get(c) for r in rows)]
    used = primary if primary in ran or not ran else ran[0]
    names = [r["variant"] for r in rows]
    if instruct is None:
        instruct = next((n for n in names if n.lower() == "instruct"), None)
    records = {r["variant"]: r["records"] for r in rows if r.get("records")}
    with_records = next(iter(records.values()), None)
    result = {"primary": used, "requested": primary, "columns": [used] + [c for c in ran if c != used],
              "instruct": instruct if instruct in names else None,
              "chance": chance(with_records, None if with_records or not rows
                               else rows[0]["summary"].get("n")),
              "intervals": {}, "vs_instruct": {}, "vs_parents": [], "degenerate": {}}
    for name, recs in records.items():
        groups = {g: in_group(recs, g) for g in GROUPS}
        for column in ran:
            if outcomes(recs, column) is None:
                continue
            result["intervals"].setdefault(name, {})[column] = {
                g: accuracy_interval(outcomes(m, column)) if m else None for g, m in groups.items()}
            result["degenerate"].setdefault(name, {})[column] = answer_shares(recs, column)

    def compare(a: str, b: str) -> dict:
        ids = [r["id"] for r in records[b]]
        pairs = {c: (outcomes(records[a], c, ids), outcomes(records[b], c, ids)) for c in ran}
        return {c: paired_difference(x, y) for c, (x, y) in pairs.items()
                if x is not None and y is not None}

    base = result["instruct"]
    for name in names:
        if base in records and name in records and name != base:
            result["vs_instruct"][name] = compare(name, base)
    for row in rows:
        if is_merge(row):
            for parent in merge_parents(row, instruct or "Instruct"):
                if row["variant"] in records and parent in records:
                    result["vs_parents"].append({"merge": row["variant"], "parent": parent,
                                                 "comparisons": compare(row["variant"], parent)})
    return result
