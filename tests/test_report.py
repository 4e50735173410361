"""Tests for dafast.eval.report with made-up records (no model): intervals, paired tests in
words, degenerate flags, synergy intervals, the CSV's new columns, and old rows without records."""

from __future__ import annotations

import csv
import json
import random

import pytest

from dafast.eval import write_report
from dafast.eval.__main__ import format_table
from dafast.eval.report import csv_header
from dafast.eval.runner import Record, summarize

N_MC, N_TF = 120, 80


def _variant(skill: float, seed: int, letter: str | None = None) -> dict:
    """A row whose every column answers right with probability ``skill`` (``letter``: its
    generation column answers that letter to every mc question)."""
    rng = random.Random(seed)
    records = []
    for i in range(N_MC + N_TF):
        mc = i < N_MC
        gold = "ABCD"[i % 4] if mc else ("True" if i % 2 else "False")
        choices = list("ABCD") if mc else ["True", "False"]
        answers = {c: gold if rng.random() < skill else rng.choice([x for x in choices if x != gold])
                   for c in ("generation", "loglik", "calibrated", "cloze", "pmi")}
        if letter and mc:
            answers["generation"] = letter
        records.append(Record(f"q{i}", "basic", "mc" if mc else "tf", i % 3 == 0, gold, "", None,
                              False, loglik_scores=dict.fromkeys(choices, -1.0),
                              split="tune" if i % 2 else "held_out", answers=answers))
    return {"summary": summarize(records), "records": [r.__dict__ for r in records]}


@pytest.fixture(scope="module")
def rows():
    return [
        {"variant": "instruct", "parents": [], **_variant(0.3, 0)},
        {"variant": "cpt", "parents": [], **_variant(0.7, 1, letter="C")},  # far better
        {"variant": "cpt-slerp", "parents": ["cpt", "instruct"], **_variant(0.3, 2)},  # alike
    ]


def test_report_with_records(rows, tmp_path):
    out = write_report(tmp_path / "report", rows, instruct="instruct", primary="cloze")
    markdown = (out / "report.md").read_text()
    headline = markdown.split("## Headline: cloze")[1].split("## Degenerate")[0]
    assert "| variant | overall | corpus-only | held-out half | mc | tf | Δ vs instruct [95%] |" in headline
    cpt = rows[1]["summary"]["cloze"]["overall"]
    assert f"| cpt | {100 * cpt:.1f} [" in headline
    assert "**cpt** vs **instruct**" in headline and "a real difference" in headline.split(
        "**cpt** vs **instruct**")[1].split("\n")[0]
    assert "within noise" in headline.split("**cpt-slerp** vs **instruct**")[1].split("\n")[0]
    assert "| cpt-slerp | cpt |" in headline  # each merge against each parent
    assert "tune** half (100 questions)" in markdown and "held-out** half (100" in markdown
    # the letter-C variant is flagged in generation with its share, no one else
    flags = markdown.split("## Degenerate answers")[1].split("![")[0]
    assert "| cpt | generation | mc | C | 100.0% of 120 |" in flags
    assert flags.count("| cpt |") == 1 and "instruct |" not in flags
    # the primary column's table comes first among the per-column tables
    assert markdown.index("## Accuracy: cloze") < markdown.index("## Accuracy: generation")
    synergy = markdown.split("### cloze")[1]
    assert "cpt-slerp (cpt × instruct)" in synergy and synergy.count("[") >= 4

    with open(out / "results.csv", newline="") as f:
        table = {r["variant"]: r for r in csv.DictReader(f)}
    assert list(next(iter(table.values()))) == csv_header()
    for name, row in table.items():
        for column in ("generation", "cloze", "pmi"):
            for group in ("overall", "held_out", "tune"):
                lo, acc, hi = (float(row[f"{column}_{group}{end}"]) for end in ("_lo", "", "_hi"))
                assert lo <= acc <= hi and hi - lo > 0.05
    assert table["instruct"]["cloze_vs_instruct"] == ""
    assert float(table["cpt"]["cloze_vs_instruct_lo"]) > 0 and float(table["cpt"]["cloze_vs_instruct_p"]) < 0.05
    assert float(table["cpt"]["generation_top_mc"]) == 1.0
    stats = json.loads((out / "report.json").read_text())["statistics"]
    assert stats["primary"] == "cloze" and stats["columns"][0] == "cloze"
    assert stats["chance"]["overall"] == pytest.approx((N_MC * 0.25 + N_TF * 0.5) / (N_MC + N_TF))


def test_report_without_records_and_primary_fallback(rows, tmp_path):
    old = [{k: v for k, v in row.items() if k != "records"} for row in rows]
    for row in old:  # an eval file from before the cloze columns
        row["summary"] = {**row["summary"], "cloze": None, "pmi": None}
    out = write_report(tmp_path / "old", old, instruct="instruct", primary="cloze")
    markdown = (out / "report.md").read_text()
    assert "## Headline: generation" in markdown  # cloze did not run: the first column that did
    assert "The primary column `cloze` did not run" in markdown
    assert "No per-question records were given" in markdown and " [" not in markdown.split(
        "## Accuracy")[1].split("##")[0]
    with open(out / "results.csv", newline="") as f:
        assert next(csv.DictReader(f))["loglik_overall_lo"] == ""
    with pytest.raises(ValueError, match="eval.primary: 'nope'"):
        write_report(tmp_path / "bad", rows, primary="nope")
    broken = [{**rows[0], "records": [{"id": "q0"}]}]
    with pytest.raises(ValueError, match=r"rows\[0\] \(instruct\): 'records'"):
        write_report(tmp_path / "bad", broken)


def test_cli_table_has_intervals_and_flags(rows):
    text = format_table(rows[1]["summary"], rows[1]["records"])
    header, overall = text.splitlines()[:2]
    assert header.split()[1:] == ["generation", "loglik", "calibrated", "cloze", "pmi"]
    cloze = rows[1]["summary"]["cloze"]["overall"]
    assert overall.startswith("overall (200)") and f"{100 * cloze:.1f} [" in overall
    assert "degenerate: generation answers 'C' to 100% of 120 mc questions" in text
    assert "[" not in format_table(rows[1]["summary"])  # no records: no intervals
