"""Tests for dafast.eval.stats: each against a case computable by hand."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from dafast.eval import stats


def test_mcnemar_known_tables():
    # 1 vs 9 discordant pairs: 2 * (C(10,0) + C(10,1)) / 2^10 = 22/1024
    assert stats.mcnemar_p(1, 9) == 22 / 1024
    assert stats.mcnemar_p(9, 1) == 22 / 1024  # two-sided: symmetric
    assert stats.mcnemar_p(2, 10) == pytest.approx(2 * (1 + 12 + 66) / 4096, abs=1e-15)
    assert stats.mcnemar_p(0, 5) == 2 / 32
    assert stats.mcnemar_p(3, 3) == 1.0 and stats.mcnemar_p(0, 0) == 1.0
    with pytest.raises(ValueError, match="non-negative"):
        stats.mcnemar_p(-1, 2)


def test_mcnemar_is_exact_for_large_tables():
    b, c = 130, 170  # 2^300: a float sum of terms would lose the tail
    exact = Fraction(2 * sum(math.comb(300, k) for k in range(b + 1)), 2 ** 300)
    assert stats.mcnemar_p(b, c) == float(exact)
    assert 0.02 < stats.mcnemar_p(b, c) < 0.03  # the normal approximation's neighbourhood
    assert stats.mcnemar_p(0, 3000) == 0.0  # underflows to 0, never an OverflowError


def test_accuracy_interval_contains_the_truth_and_covers_95_percent():
    assert stats.accuracy_interval(np.ones(50, bool)) == (1.0, 1.0)
    rng = np.random.default_rng(1)
    covered, widths = 0, []
    for _ in range(200):
        sample = rng.random(100) < 0.3
        lo, hi = stats.accuracy_interval(sample, resamples=2000, seed=int(rng.integers(1 << 30)))
        assert lo <= sample.mean() <= hi
        covered += lo <= 0.3 <= hi
        widths.append(hi - lo)
    # binomial: about 95% of intervals cover p; width about 2 * 1.96 * sqrt(.3 * .7 / 100)
    assert 0.90 <= covered / 200 <= 0.99
    assert np.mean(widths) == pytest.approx(2 * 1.96 * math.sqrt(0.21 / 100), rel=0.1)
    # seeded: the same answers give the same interval
    sample = rng.random(80) < 0.5
    assert stats.accuracy_interval(sample) == stats.accuracy_interval(sample)


def test_paired_difference():
    # 200 questions: 60 only a right, 20 only b right, 50 both, 70 neither
    a = np.array([1] * 60 + [0] * 20 + [1] * 50 + [0] * 70, bool)
    b = np.array([0] * 60 + [1] * 20 + [1] * 50 + [0] * 70, bool)
    v = stats.paired_difference(a, b)
    assert v["diff"] == pytest.approx(0.2) and (v["a_only"], v["b_only"]) == (60, 20)
    assert v["p"] == stats.mcnemar_p(60, 20) < 1e-4
    assert 0.1 < v["lo"] < 0.2 < v["hi"] < 0.3 and stats.verdict(v) == "real"
    same = stats.paired_difference(a, a)
    assert (same["diff"], same["lo"], same["hi"], same["p"]) == (0, 0, 0, 1.0)
    assert stats.verdict(same) == "noise"
    # pairing: b = a with 4 answers flipped (2 each way); an unpaired interval of the
    # difference would be about 2 * 1.96 * sqrt(2 * .55 * .45 / 200) = 14 points wide
    flipped = a.copy()
    flipped[[0, 1, 60, 61]] = ~flipped[[0, 1, 60, 61]]  # a right, a wrong
    close = stats.paired_difference(a, flipped)
    assert close["hi"] - close["lo"] < 0.05 and stats.verdict(close) == "noise"
    # 4 discordant pairs all one way: the bootstrap interval excludes 0, McNemar does not
    one_way = stats.paired_difference(a, np.where(np.arange(200) < 4, False, a))
    assert one_way["lo"] > 0 and one_way["p"] == 0.125 and stats.verdict(one_way) == "borderline"
    assert stats.verdict({"lo": 0.01, "hi": 0.1, "p": 0.07}) == "borderline"
    with pytest.raises(ValueError, match="length"):
        stats.paired_difference(a, b[:-1])


def test_synergy_intervals():
    n = 100
    p1 = np.ones(n, bool)  # the trained parent: all right
    p2 = np.zeros(n, bool)  # the instruct parent: all wrong
    merged = np.arange(n) % 2 == 0  # half
    iv = stats.synergy_intervals(p1, p2, merged)
    assert iv["diversity"] == (1.0, 1.0) and iv["expected"] == (0.5, 0.5)
    lo, hi = iv["improvement"]  # merged - 1
    assert -0.62 < lo < -0.5 < hi < -0.38
    lo, hi = iv["vs_expected"]  # merged - 0.5: around 0
    assert lo < 0 < hi and hi - lo == pytest.approx(iv["merged"][1] - iv["merged"][0])


def _rec(qid, type_, gold, answer, **extra):
    return {"id": qid, "type": type_, "gold": gold, "answers": {"cloze": answer}, **extra}


def test_degenerate_answers():
    mc = [_rec(f"m{i}", "mc", "ABCD"[i % 4], "C" if i < 8 else "A") for i in range(10)]
    tf = [_rec(f"t{i}", "tf", "True", "False" if i < 7 else None) for i in range(10)]
    shares = stats.answer_shares(mc + tf, "cloze")
    assert shares["mc"] == {"answer": "C", "share": 0.8, "n": 10, "flagged": True}
    assert shares["tf"] == {"answer": "False", "share": 0.7, "n": 10, "flagged": False}
    even = stats.answer_shares([_rec(f"m{i}", "mc", "A", "ABCD"[i % 4]) for i in range(8)], "cloze")
    assert even["mc"]["share"] == 0.25 and not even["mc"]["flagged"]


def test_outcomes_align_by_id_and_need_answers():
    records = [_rec("q1", "mc", "A", "A"), _rec("q2", "mc", "B", "C"), _rec("q3", "tf", "True", None)]
    assert stats.outcomes(records, "cloze").tolist() == [True, False, False]
    assert stats.outcomes(records, "cloze", ["q3", "q1"]).tolist() == [False, True]
    assert stats.outcomes(records, "pmi") is None  # a column that did not run
    assert stats.outcomes([{"id": "q1", "type": "mc", "gold": "A"}], "cloze") is None  # old file
    with pytest.raises(ValueError, match="q9"):
        stats.outcomes(records, "cloze", ["q1", "q9"])


def test_chance_is_weighted_by_choices():
    records = [_rec("m", "mc", "A", "A", loglik_scores=dict.fromkeys("ABCD", 0.0)),
               _rec("t", "tf", "True", "True", loglik_scores={"True": 0.0, "False": 0.0}),
               _rec("m3", "mc", "A", "A", loglik_scores=dict.fromkeys("ABC", 0.0))]
    chance = stats.chance(records)
    assert chance["overall"] == pytest.approx((0.25 + 0.5 + 1 / 3) / 3)
    assert chance["mc"] == pytest.approx((0.25 + 1 / 3) / 2) and chance["tf"] == 0.5
    assert stats.chance(n={"overall": 4, "mc": 2, "tf": 2})["overall"] == pytest.approx(0.375)
