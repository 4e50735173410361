"""The paper's synergy analysis of SLERP merges.

A merge of parents scoring P1 and P2 is expected, if merging only averaged their abilities, to
score E = (P1 + P2) / 2. The paper reports the merged score against E, the improvement over the
better parent (P_merged - max(P1, P2); positive = a capability neither parent had), and the
parents' diversity |P1 - P2|. Scores are accuracies in [0, 1].

Rows are the report's rows: ``{"variant": str, "parents": list[str], "summary": dict}`` with the
summary of :func:`dafast.eval.runner.summarize`, and optionally ``"records"`` (the eval
file's per-question records): then every measure carries a 95% interval, the three variants
resampled jointly over questions (:func:`dafast.eval.stats.synergy_intervals`). A merge is a row named ``"<X>-SLERP"``: its
parents are the row's ``parents`` when given (the trained variant X and the instruct model),
else X and the instruct model named by the caller (default: the row named "Instruct").
"""

from __future__ import annotations

from collections.abc import Sequence

from dafast.eval import stats

MERGE_SUFFIX = "-SLERP"


def expected(p1: float, p2: float) -> float:
    """What a merge would score if it only averaged its parents."""
    return (p1 + p2) / 2


def improvement(p_merged: float, p1: float, p2: float) -> float:
    """Gain of the merge over its better parent; > 0 is the paper's emergent capability."""
    return p_merged - max(p1, p2)


def diversity(p1: float, p2: float) -> float:
    """How different the parents are in score."""
    return abs(p1 - p2)


def is_merge(row: dict) -> bool:
    """A row with ``parents``, or one named ``<X>-SLERP``."""
    return bool(row.get("parents")) or row["variant"].upper().endswith(MERGE_SUFFIX)


def merge_parents(row: dict, instruct: str) -> list[str]:
    """The two parents of a merge row: its ``parents``, else [<X>, instruct] from its name."""
    parents = list(row.get("parents") or [])
    if not parents:
        parents = [row["variant"][: -len(MERGE_SUFFIX)], instruct]
    if len(parents) != 2:
        raise ValueError(
            f"merge {row['variant']!r}: expected two parents, got {parents!r}"
        )
    return parents


def score(row: dict, column: str = "generation", group: str = "overall") -> float | None:
    """A row's accuracy in ``column`` ("generation" | "loglik") for ``group`` (see GROUPS)."""
    accuracies = row["summary"].get(column)
    return None if accuracies is None else accuracies.get(group)


def synergy_table(
    rows: Sequence[dict],
    *,
    column: str = "generation",
    group: str = "overall",
    instruct: str | None = None,
) -> list[dict]:
    """One entry per merge row: parents, their scores, E, the merged score and the measures.

    Entries: ``{"merge", "parent", "instruct", "p1", "p2", "merged", "expected",
    "improvement", "diversity", "vs_expected"}`` (p1 = the trained parent, p2 = instruct,
    vs_expected = merged - expected), and ``"intervals"``: measure -> (lo, hi) for improvement,
    diversity, vs_expected, expected and merged, or None when a row has no records. Merges whose parents have no score in ``column`` (e.g. no
    log-likelihood column) are left out. A parent that is not among the rows is an error.
    """
    by_name = {row["variant"]: row for row in rows}
    if instruct is None:
        instruct = next((name for name in by_name if name.lower() == "instruct"), "Instruct")
    table = []
    for row in rows:
        if not is_merge(row):
            continue
        parent, base = merge_parents(row, instruct)
        for name in (parent, base):
            if name not in by_name:
                raise ValueError(
                    f"merge {row['variant']!r}: parent {name!r} is not among the evaluated "
                    f"variants ({', '.join(sorted(by_name))})"
                )
        p1, p2, merged = (score(by_name[parent], column, group), score(by_name[base], column, group),
                          score(row, column, group))
        if None in (p1, p2, merged):
            continue
        table.append({
            "merge": row["variant"], "parent": parent, "instruct": base, "p1": p1, "p2": p2,
            "merged": merged, "expected": expected(p1, p2),
            "improvement": improvement(merged, p1, p2), "diversity": diversity(p1, p2),
            "vs_expected": merged - expected(p1, p2),
            "intervals": _intervals([by_name[parent], by_name[base], row], column, group),
        })
    return table


def _intervals(rows: Sequence[dict], column: str, group: str) -> dict | None:
    """Joint bootstrap intervals of the measures from the rows' records (None without them)."""
    if not all(row.get("records") for row in rows):
        return None
    members = stats.in_group(rows[-1]["records"], group)
    ids = [r["id"] for r in members]
    arrays = [stats.outcomes(row["records"], column, ids) for row in rows]
    if not ids or any(a is None for a in arrays):
        return None
    return stats.synergy_intervals(*arrays)
