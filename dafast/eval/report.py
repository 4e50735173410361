"""The study's report: a CSV of accuracies, a Markdown page with tables and plots, and the data.

A row is one evaluated variant, a plain dict (so the strategy matrix needs nothing from here):

    {"variant": "CPT-SFT-SLERP",                 # unique name; "<X>-SLERP" marks a merge
     "parents": ["CPT-SFT", "Instruct"],         # merges: [trained variant, instruct]; else []
     "summary": result.summary}                  # dafast.eval.runner.summarize()

``write_report(out_dir, rows, ...)`` writes into ``out_dir``:

    results.csv     one line per variant: every accuracy of every column and the unparseable count
    report.md       accuracy tables, the synergy tables, the plots, the run's config/times/machine
    accuracy.png    bars per variant (overall, basic, advanced; one panel per column)
    synergy.png     expected (P1+P2)/2 against the merged score, with the diagonal (if merges)
    loss.png        training-loss curves (if given)
    report.json     everything passed in, to re-render or compare later

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

from dafast.eval.runner import GROUPS
from dafast.eval.synergy import synergy_table

COLUMNS = ("generation", "loglik", "calibrated")
REPORT_FILES = frozenset(
    {"results.csv", "report.md", "report.json", "accuracy.png", "synergy.png", "loss.png"}
)
_GROUP_TITLES = {
    "overall": "overall", "basic": "basic", "advanced": "advanced", "mc": "mc", "tf": "tf",
    "corpus_only": "corpus-only", "not_corpus_only": "not corpus-only",
}


def csv_header() -> list[str]:
    """results.csv columns: accuracies are fractions in [0, 1], empty where not measured."""
    return (["variant", "parents", "n"] + [f"generation_{g}" for g in GROUPS]
            + ["unparseable"] + [f"{c}_{g}" for c in COLUMNS[1:] for g in GROUPS])


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


def _fraction(value) -> str:
    return "" if value is None else f"{value:.4f}"


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _csv_rows(rows: Sequence[Mapping]) -> list[list]:
    lines = []
    for row in rows:
        s = row["summary"]
        lines.append(
            [row["variant"], ";".join(row.get("parents") or []), s.get("n", {}).get("overall", "")]
            + [_fraction(s["generation"].get(g)) for g in GROUPS]
            + [s.get("unparseable", "")]
            + [_fraction((s.get(c) or {}).get(g)) for c in COLUMNS[1:] for g in GROUPS]
        )
    return lines


def _cell(value) -> str:
    """A table cell: a '|' or a line break (error messages have both) would end it early."""
    return str(value).replace("|", "\\|").replace("\n", "<br>")


def _table(header: list[str], lines: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_cell(cell) for cell in line) + " |" for line in lines]
    return "\n".join(out)


def _accuracy_table(rows: Sequence[Mapping], column: str) -> str:
    header = ["variant"] + [_GROUP_TITLES[g] for g in GROUPS]
    if column == "generation":
        header.append("unparseable")
    lines = []
    for row in rows:
        accuracies = row["summary"].get(column) or {}
        line = [row["variant"]] + [_percent(accuracies.get(g)) for g in GROUPS]
        if column == "generation":
            line.append(row["summary"].get("unparseable", ""))
        lines.append(line)
    return _table(header, lines)


def _synergy_markdown(table: list[dict]) -> str:
    header = ["merge", "P1 (trained)", "P2 (instruct)", "expected (P1+P2)/2", "merged",
              "merged − expected", "improvement (merged − max)", "diversity \\|P1−P2\\|"]
    lines = [[f"{t['merge']} ({t['parent']} × {t['instruct']})", _percent(t["p1"]),
              _percent(t["p2"]), _percent(t["expected"]), _percent(t["merged"]),
              f"{100 * t['vs_expected']:+.1f}", f"{100 * t['improvement']:+.1f}",
              _percent(t["diversity"])] for t in table]
    return _table(header, lines)


# --- plots (matplotlib's Figure with the Agg canvas: no pyplot, no global backend state) -----

def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _plot_accuracy(rows: Sequence[Mapping], path: pathlib.Path) -> None:
    groups = ("overall", "basic", "advanced")
    columns = [c for c in COLUMNS if any(r["summary"].get(c) for r in rows)]
    figure = _figure(max(6.0, 0.6 * len(rows) * len(groups) / 2 + 2), 3.2 * len(columns))
    axes = figure.subplots(len(columns), 1, squeeze=False)[:, 0]
    width = 0.8 / len(groups)
    for ax, column in zip(axes, columns):
        for k, group in enumerate(groups):
            values = [100 * ((r["summary"].get(column) or {}).get(group) or 0.0) for r in rows]
            ax.bar([i + (k - 1) * width for i in range(len(rows))], values, width, label=group)
        ax.set_xticks(range(len(rows)), [r["variant"] for r in rows], rotation=30, ha="right")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{column} column")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small", ncols=len(groups))
    figure.savefig(path)


def _plot_synergy(tables: Mapping[str, list[dict]], path: pathlib.Path) -> None:
    figure = _figure(5.5, 5.0)
    ax = figure.subplots()
    for k, ((column, table), marker) in enumerate(zip(tables.items(), "os^")):
        xs = [100 * t["expected"] for t in table]
        ys = [100 * t["merged"] for t in table]
        ax.scatter(xs, ys, marker=marker, label=column)
        for t, x, y in zip(table, xs, ys) if k == 0 else ():  # names once: the points pair up
            ax.annotate(t["merge"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot([0, 100], [0, 100], color="grey", linestyle="--", linewidth=1, label="merged = expected")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_xlabel("expected (P1 + P2) / 2 (%)")
    ax.set_ylabel("merged (%)")
    ax.set_title("merges: expected vs actual accuracy")
    ax.legend(fontsize="small")
    figure.savefig(path)


def _plot_loss(curves: Mapping[str, Sequence], path: pathlib.Path) -> None:
    figure = _figure(7.0, 4.0)
    ax = figure.subplots()
    for name, points in curves.items():
        steps, losses = zip(*points)
        ax.plot(steps, losses, label=name, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    figure.savefig(path)


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

def _markdown(rows, tables, curves, config, timings, machine, failures=None) -> str:
    parts = [
        "# dafast report",
        "",
        "Accuracy (%) on the domain benchmark. *Generation*: the paper's protocol (greedy reply "
        "after \"The correct answer is:\", read as a letter or True/False; unparseable replies "
        "count as wrong). *Log-likelihood*: the choice whose continuation is most probable "
        "(lm-evaluation-harness style). *Calibrated*: the same after subtracting each choice's "
        "mean log-prob over the benchmark, so a model that prefers one letter whatever the "
        "question scores chance (25% mc, 50% tf) and only knowledge lifts it above.",
        "",
    ]
    if failures:
        parts += ["## Failed", "", _table(["node", "why"], [[k, v] for k, v in failures.items()]),
                  ""]
    parts += [
        "## Accuracy: generation",
        "",
        _accuracy_table(rows, "generation"),
        "",
    ]
    for column, title in (("loglik", "log-likelihood"), ("calibrated", "calibrated log-likelihood")):
        if any(r["summary"].get(column) for r in rows):
            parts += [f"## Accuracy: {title}", "", _accuracy_table(rows, column), ""]
    if rows:
        parts += ["![accuracy per variant](accuracy.png)", ""]
    if any(tables.values()):
        parts += ["## Synergy of merges", "",
                  "P1 is the trained parent, P2 the instruct model; improvement > 0 means the merge "
                  "beats both parents.", ""]
        for column, table in tables.items():
            if table:
                parts += [f"### {column}", "", _synergy_markdown(table), ""]
        parts += ["![expected vs actual](synergy.png)", ""]
    if curves:
        parts += ["## Training loss", "", "![training loss](loss.png)", ""]
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
) -> pathlib.Path:
    """Write the report for ``rows`` (see the module docstring) into ``out_dir``; return it.

    ``loss_curves``: name -> [(step, loss), ...]; ``timings``: step -> seconds; ``config`` and
    ``machine``: anything JSON-able; ``instruct``: the instruct variant's name for merges without
    ``parents`` (default: the row named "Instruct"); ``failures``: name -> why it has no
    result (listed at the top of the report).
    """
    _check_rows(rows)
    curves = _check_curves(loss_curves or {})
    tables = {c: synergy_table(rows, column=c, instruct=instruct) for c in COLUMNS}
    out = pathlib.Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with open(tmp / "results.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(csv_header())
            writer.writerows(_csv_rows(rows))
        if rows:
            _plot_accuracy(rows, tmp / "accuracy.png")
        if any(tables.values()):
            _plot_synergy({c: t for c, t in tables.items() if t}, tmp / "synergy.png")
        if curves:
            _plot_loss(curves, tmp / "loss.png")
        markdown = _markdown(rows, tables, curves, config, timings, machine, failures)
        (tmp / "report.md").write_text(markdown, encoding="utf-8")
        data = {"rows": list(rows), "failures": dict(failures or {}), "synergy": tables,
                "loss_curves": curves,
                "config": config, "timings": timings, "machine": machine}
        (tmp / "report.json").write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp makes it private; a report is for everyone to read
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed
    return out

