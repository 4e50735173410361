"""The study's report: a CSV of accuracies, a Markdown page with tables and plots, and the data.

A row is one evaluated variant, a plain dict (so the strategy matrix needs nothing from here):

    {"variant": "cpt-sft-slerp",                 # unique name; "<X>-SLERP" marks a merge
     "parents": ["cpt-sft", "instruct"],         # merges: [trained variant, instruct]; else []
     "summary": result.summary,                  # dafast.eval.runner.summarize()
     "records": [...]}                           # optional: the eval file's per-question records

With records every accuracy carries a 95% bootstrap interval, each variant is compared with the
instruct model and each merge with its parents (paired bootstrap and exact McNemar, see
:mod:`dafast.eval.stats`), and variants answering mostly one letter or truth value are flagged;
rows without records (old eval files) get the accuracies alone. The rows' order is kept
everywhere (the matrix passes them in pipeline order).

``write_report(out_dir, rows, ..., primary="cloze")`` writes into ``out_dir``:

    results.csv     one line per variant: every accuracy of every column with its interval, the
                    difference to the instruct model, the most common answers' shares
    report.md       the primary column's headline table and verdicts, the flags, every column's
                    table, the synergy tables, the plots, the run's config/times/machine
    accuracy.png    each variant's accuracy with its interval, per column and headline group
    synergy.png     expected (P1+P2)/2 against the merged score, with the diagonal (if merges)
    loss.png        training-loss curves (if given)
    scaling.png     accuracy and merge synergy against parameter count (a run of several models)
    report.json     everything passed in and the statistics, to re-render or compare later
    judged/         with ``judged``: every judged text with its scores, the design prompts, a
                    plot (dafast.eval.judged.write_files); report.md gets a section per task

Everything is written to a temporary directory next to ``out_dir`` and renamed into place, so a
reader never sees a half-written report. An existing ``out_dir`` is replaced only if it holds
nothing but report files: pointing the report at a run directory must not delete checkpoints.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Mapping, Sequence

from dafast.eval import stats
from dafast.eval.plots import (GROUP_TITLES, HEADLINE_GROUPS, plot_accuracy, plot_loss,
                               plot_scaling, plot_synergy)
from dafast.eval.runner import COLUMNS, GROUPS
from dafast.eval.scaling import markdown as scaling_markdown
from dafast.eval.synergy import synergy_table

REPORT_FILES = frozenset(
    {"results.csv", "report.md", "report.json", "accuracy.png", "synergy.png", "loss.png",
     "judged",  # judged/: the judged tasks' files (dafast.eval.judged.write_files)
     "scaling.png"}
)
_TITLES = {"generation": "generation (the paper's protocol)", "loglik": "letter log-likelihood",
           "calibrated": "calibrated letter log-likelihood", "cloze": "cloze (option text, per byte)",
           "pmi": "cloze PMI (option text less its unconditional log-prob)"}


def csv_header() -> list[str]:
    """results.csv columns: accuracies are fractions in [0, 1], empty where not measured; ``_lo``
    and ``_hi`` bound the 95% interval; ``_vs_instruct`` is the overall difference to the
    instruct model (``_p``: exact McNemar); ``_top_mc``/``_top_tf`` the most common answer's share."""
    return (["variant", "parents", "n"] + [f"generation_{g}" for g in GROUPS]
            + ["unparseable"] + [f"{c}_{g}" for c in COLUMNS[1:] for g in GROUPS]
            + [f"{c}_{g}_{end}" for c in COLUMNS for g in GROUPS for end in ("lo", "hi")]
            + [f"{c}_vs_instruct{end}" for c in COLUMNS for end in ("", "_lo", "_hi", "_p")]
            + [f"{c}_top_{t}" for c in COLUMNS for t in ("mc", "tf")])


def _check_rows(rows: Sequence[Mapping]) -> None:
    seen = set()
    for i, row in enumerate(rows):
        where = f"rows[{i}]"
        if not isinstance(row, Mapping) or not isinstance(row.get("variant"), str):
            raise ValueError(f"{where}: a row is a dict with a 'variant' string")
        if row["variant"] in seen:
            raise ValueError(f"{where}: variant {row['variant']!r} appears twice")
        seen.add(row["variant"])
        summary = row.get("summary")
        if not isinstance(summary, Mapping) or not isinstance(summary.get("generation"), Mapping):
            raise ValueError(f"{where} ({row['variant']}): 'summary' must be the summary dict of "
                             "dafast.eval.evaluate (with a 'generation' entry)")
        if not isinstance(row.get("parents", []), (list, tuple)):
            raise ValueError(f"{where} ({row['variant']}): 'parents' must be a list of names")
        records = row.get("records")
        if records is not None and not (isinstance(records, (list, tuple)) and all(
                isinstance(r, Mapping) and {"id", "gold", "type"} <= r.keys() for r in records)):
            raise ValueError(f"{where} ({row['variant']}): 'records' must be the eval file's list "
                             "of per-question records (dicts with 'id', 'gold', 'type', 'answers')")


def _fraction(value) -> str:
    return "" if value is None else f"{value:.4f}"


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _points(value) -> str:
    return f"{100 * value:+.1f}"


def _with_interval(value, interval) -> str:
    """"41.2 [35.0, 47.5]": an accuracy (%) and its 95% interval, when there is one."""
    if value is None or interval is None:
        return _percent(value)
    return f"{100 * value:.1f} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def _pvalue(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _csv_rows(rows: Sequence[Mapping], analysis: Mapping) -> list[list]:
    lines = []
    for row in rows:
        s, name = row["summary"], row["variant"]
        intervals = analysis["intervals"].get(name, {})
        versus = analysis["vs_instruct"].get(name, {})
        shares = analysis["degenerate"].get(name, {})
        line = ([name, ";".join(row.get("parents") or []), s.get("n", {}).get("overall", "")]
                + [_fraction(s["generation"].get(g)) for g in GROUPS]
                + [s.get("unparseable", "")]
                + [_fraction((s.get(c) or {}).get(g)) for c in COLUMNS[1:] for g in GROUPS])
        for c in COLUMNS:
            for g in GROUPS:
                interval = intervals.get(c, {}).get(g)
                line += [_fraction(interval[0]), _fraction(interval[1])] if interval else ["", ""]
        for c in COLUMNS:
            v = versus.get(c)
            line += [_fraction(v[k]) for k in ("diff", "lo", "hi")] + [f"{v['p']:.4g}"] if v \
                else ["", "", "", ""]
        for c in COLUMNS:
            line += [_fraction(shares.get(c, {}).get(t, {}).get("share")) for t in ("mc", "tf")]
        lines.append(line)
    return lines


def _cell(value) -> str:
    """A table cell: a '|' or a line break (error messages have both) would end it early."""
    return str(value).replace("|", "\\|").replace("\n", "<br>")


def _table(header: list[str], lines: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_cell(cell) for cell in line) + " |" for line in lines]
    return "\n".join(out)


def _accuracy_table(rows: Sequence[Mapping], column: str, analysis: Mapping,
                    groups: Sequence[str] = GROUPS) -> str:
    header = ["variant"] + [GROUP_TITLES[g] for g in groups]
    if column == "generation":
        header.append("unparseable")
    lines = []
    for row in rows:
        accuracies = row["summary"].get(column) or {}
        intervals = analysis["intervals"].get(row["variant"], {}).get(column, {})
        line = [row["variant"]] + [_with_interval(accuracies.get(g), intervals.get(g)) for g in groups]
        if column == "generation":
            line.append(row["summary"].get("unparseable", ""))
        lines.append(line)
    return _table(header, lines)


def _comparison_cells(v: Mapping | None) -> list[str]:
    if v is None:
        return ["–", "–"]
    return [f"{_points(v['diff'])} [{_points(v['lo'])}, {_points(v['hi'])}]", _pvalue(v["p"])]


def _sentence(a: str, b: str, column: str, v: Mapping) -> str:
    """One comparison in words: the difference, its interval and test, and what they mean."""
    verdict = stats.verdict(v)
    meaning = {"real": "a real difference (the interval excludes 0 and p < 0.05)",
               "noise": "within noise (the interval contains 0 and p ≥ 0.05)",
               "borderline": "borderline (the interval and the test disagree)"}[verdict]
    return (f"- **{a}** vs **{b}**: {_points(v['diff'])} points "
            f"[{_points(v['lo'])}, {_points(v['hi'])}], McNemar p = {_pvalue(v['p'])} "
            f"({v['a_only']} questions only {a} got right, {v['b_only']} only {b}): {meaning}.")


def _headline(rows: Sequence[Mapping], analysis: Mapping) -> list[str]:
    column, base = analysis["primary"], analysis["instruct"]
    parts = [f"## Headline: {_TITLES[column]}", ""]
    if analysis["requested"] != column:
        parts += [f"The primary column `{analysis['requested']}` did not run for these variants; "
                  f"the headline shows `{column}` instead.", ""]
    if not analysis["intervals"]:
        return parts + [_accuracy_table(rows, column, analysis, HEADLINE_GROUPS), "",
                        "No per-question records were given: no intervals or paired tests.", ""]
    header = ["variant"] + [GROUP_TITLES[g] for g in HEADLINE_GROUPS] + [
        f"Δ vs {base} [95%]" if base else "Δ vs instruct", "McNemar p"]
    lines = []
    for row in rows:
        accuracies = row["summary"].get(column) or {}
        intervals = analysis["intervals"].get(row["variant"], {}).get(column, {})
        lines.append([row["variant"]]
                     + [_with_interval(accuracies.get(g), intervals.get(g)) for g in HEADLINE_GROUPS]
                     + _comparison_cells(analysis["vs_instruct"].get(row["variant"], {}).get(column)))
    parts += [_table(header, lines), ""]
    merges = [m for m in analysis["vs_parents"] if column in m["comparisons"]]
    if merges:
        parts += ["Each merge against each parent:", "",
                  _table(["merge", "parent", "Δ merge − parent [95%]", "McNemar p"],
                         [[m["merge"], m["parent"], *_comparison_cells(m["comparisons"][column])]
                          for m in merges]), ""]
    sentences = [_sentence(name, base, column, v[column])
                 for name, v in analysis["vs_instruct"].items() if column in v]
    sentences += [_sentence(m["merge"], m["parent"], column, m["comparisons"][column])
                  for m in merges if m["parent"] != base]
    if sentences:
        parts += [f"In words ({column}, overall accuracy, paired over the same questions):", "",
                  *sentences, ""]
    return parts


def _degenerate(analysis: Mapping) -> list[str]:
    limits = ", ".join(f"{t} > {100 * s:.0f}%" for t, s in stats.DEGENERATE_SHARE.items())
    parts = ["## Degenerate answers", "",
             "A variant is flagged when its most common answer, per question type, passes a share "
             f"of that type's questions ({limits}; the benchmark's golds are close to even), i.e. "
             "it answers mostly one letter or one truth value whatever the question.", ""]
    flagged = [[name, column, t, share["answer"], f"{100 * share['share']:.1f}% of {share['n']}"]
               for name, columns in analysis["degenerate"].items()
               for column, types in columns.items() for t, share in types.items() if share["flagged"]]
    if flagged:
        parts += [_table(["variant", "column", "type", "most common answer", "share"], flagged)]
    else:
        parts += ["No variant is flagged in any column."]
    return parts + [""]


def _synergy_markdown(table: list[dict]) -> str:
    header = ["merge", "P1 (trained)", "P2 (instruct)", "expected (P1+P2)/2 [95%]", "merged [95%]",
              "merged − expected [95%]", "improvement (merged − max) [95%]",
              "diversity \\|P1−P2\\| [95%]"]

    def signed(t, key):
        iv = (t.get("intervals") or {}).get(key)
        fmt = _percent if key == "diversity" else _points  # diversity is never negative
        return fmt(t[key]) if iv is None else f"{fmt(t[key])} [{fmt(iv[0])}, {fmt(iv[1])}]"

    lines = [[f"{t['merge']} ({t['parent']} × {t['instruct']})", _percent(t["p1"]),
              _percent(t["p2"]),
              _with_interval(t["expected"], (t.get("intervals") or {}).get("expected")),
              _with_interval(t["merged"], (t.get("intervals") or {}).get("merged")),
              signed(t, "vs_expected"), signed(t, "improvement"), signed(t, "diversity")]
             for t in table]
    return _table(header, lines)


def _check_curves(curves: Mapping[str, Sequence]) -> dict[str, list[tuple[float, float]]]:
    checked = {}
    for name, points in curves.items():
        pairs = []
        for i, point in enumerate(points):
            try:
                step, loss = (float(v) for v in point)
            except (TypeError, ValueError):
                raise ValueError(f"loss_curves[{name!r}][{i}]: expected (step, loss), got {point!r}") from None
            pairs.append((step, loss))
        if pairs:
            checked[name] = pairs
    return checked


# --- the report --------------------------------------------------------------------------------

def _halves(rows: Sequence[Mapping]) -> str:
    n = rows[0]["summary"].get("n", {}) if rows else {}
    return ("The benchmark has two fixed halves (each question's `split`, by default from its id): "
            f"settings are tuned on the **tune** half ({n.get('tune', '?')} questions); the "
            f"**held-out** half ({n.get('held_out', '?')} questions) is never tuned on, so its "
            "column shows whether a choice carries over.")


def _markdown(rows, analysis, tables, curves, config, timings, machine, failures=None,
              judged_section=(), scaling=None) -> str:
    chance = analysis["chance"]
    parts = [
        "# dafast report",
        "",
        "Accuracy (%) on the domain benchmark with 95% bootstrap intervals over questions "
        "(10,000 resamples). Columns: *generation*, the paper's protocol (greedy reply after "
        "\"The correct answer is:\", unparseable = wrong); *loglik*, the most probable letter or "
        "True/False; *calibrated*, the same less each choice's mean log-prob, so a fixed letter "
        "preference scores chance; *cloze*, each option's own text scored after the question stem "
        "(per byte; tf by a calibrated True/False margin); *pmi*, cloze less each option's "
        f"unconditional log-prob. Chance: mc {_percent(chance.get('mc'))}%, tf "
        f"{_percent(chance.get('tf'))}%, overall {_percent(chance.get('overall'))}% (weighted).",
        "",
        _halves(rows),
        "",
    ]
    if failures:
        parts += ["## Failed", "", _table(["node", "why"], [[k, v] for k, v in failures.items()]),
                  ""]
    if scaling:  # a run of several models leads with what changes with size
        parts += scaling_markdown(scaling)
    if rows:
        parts += _headline(rows, analysis) + _degenerate(analysis)
        parts += ["![accuracy per variant](accuracy.png)", ""]
    for column in analysis["columns"]:
        parts += [f"## Accuracy: {_TITLES[column]}", "", _accuracy_table(rows, column, analysis), ""]
    if any(tables.values()):
        parts += ["## Synergy of merges", "",
                  "P1 is the trained parent, P2 the instruct model; improvement > 0 means the merge "
                  "beats both parents. Intervals: the three variants resampled jointly over "
                  "questions.", ""]
        for column, table in tables.items():
            if table:
                parts += [f"### {column}", "", _synergy_markdown(table), ""]
        parts += ["![expected vs actual](synergy.png)", ""]
    if curves:
        parts += ["## Training loss", "", "![training loss](loss.png)", ""]
    parts += list(judged_section)
    parts += ["## Run", ""]
    if config:
        parts += ["### Config", "", "```json", json.dumps(config, indent=2, default=str), "```", ""]
    if timings:
        parts += ["### Times", "", _table(["step", "seconds"],
                                          [[k, f"{float(v):.1f}"] for k, v in timings.items()]), ""]
    if machine:
        parts += ["### Machine", "", _table(["", "value"], [[k, v] for k, v in machine.items()]), ""]
    return "\n".join(parts)


def _replace_dir(tmp: pathlib.Path, out: pathlib.Path) -> None:
    """Move the finished ``tmp`` to ``out``, replacing an old report there."""
    if not out.exists():
        os.replace(tmp, out)
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in REPORT_FILES)
    if not out.is_dir() or foreign:
        raise FileExistsError(
            f"{out} exists and holds files that are not a report ({', '.join(foreign[:5])}); "
            "give write_report a directory of its own"
        )
    old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)  # a directory cannot be renamed onto a non-empty one
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def write_report(
    out_dir: str | os.PathLike,
    rows: Sequence[Mapping],
    *,
    loss_curves: Mapping[str, Sequence] | None = None,
    config: Mapping | None = None,
    timings: Mapping[str, float] | None = None,
    machine: Mapping[str, object] | None = None,
    instruct: str | None = None,
    failures: Mapping[str, str] | None = None,
    primary: str = "cloze",
    judged: Mapping[str, Mapping[str, Mapping]] | None = None,
    scaling: Mapping | None = None,
) -> pathlib.Path:
    """Write the report for ``rows`` (see the module docstring) into ``out_dir``; return it.

    ``loss_curves``: name -> [(step, loss), ...]; ``timings``: step -> seconds; ``config`` and
    ``machine``: anything JSON-able; ``instruct``: the instruct variant's name for merges without
    ``parents`` (default: the row named "Instruct"); ``failures``: name -> why it has no
    result (listed at the top of the report); ``primary``: the headline column (the report and
    plots lead with it; the first column that ran when it did not); ``judged``: task ->
    variant -> dafast.eval.judged.run_task's result; ``scaling``: a view of
    :func:`dafast.eval.scaling.scaling_view` (several models), shown first with its plot.
    """
    _check_rows(rows)
    curves = _check_curves(loss_curves or {})
    analysis = stats.analyse(rows, primary=primary, instruct=instruct)
    tables = {c: synergy_table(rows, column=c, instruct=instruct) for c in analysis["columns"]}
    out = pathlib.Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with open(tmp / "results.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(csv_header())
            writer.writerows(_csv_rows(rows, analysis))
        if rows:
            plot_accuracy(rows, analysis, tmp / "accuracy.png")
        if any(tables.values()):
            plot_synergy(tables, tmp / "synergy.png")
        if curves:
            plot_loss(curves, tmp / "loss.png")
        judged_section = []
        if judged:
            from dafast.eval import judged as judged_tasks

            if judged_tasks.write_files(judged, tmp / "judged"):
                judged_section = judged_tasks.report_section(judged, "judged")
        if scaling:
            plot_scaling(scaling, tmp / "scaling.png")
        markdown = _markdown(rows, analysis, tables, curves, config, timings, machine, failures,
                             judged_section, scaling)
        (tmp / "report.md").write_text(markdown, encoding="utf-8")
        data = {"rows": list(rows), "failures": dict(failures or {}), "statistics": analysis,
                "synergy": tables, "loss_curves": curves,
                "config": config, "timings": timings, "machine": machine,
                "judged": {task: {v: {k: r[k] for k in ("judge", "settings", "summary")}
                                  for v, r in results.items()}
                           for task, results in (judged or {}).items()},
                **({"scaling": scaling} if scaling else {})}
        (tmp / "report.json").write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp makes it private; a report is for everyone to read
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed
    return out

