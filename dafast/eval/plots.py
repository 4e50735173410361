"""The report's plots (matplotlib's Figure with the Agg canvas: no pyplot, no global state).

Made to be read at a glance: each accuracy is a point with its 95% interval as an error bar, the
chance level is drawn, the axes are fitted to the data (a 0-100 axis squeezes 25-45% into a
strip), the variants keep the order they are given (the pipeline's), the primary column comes
first, and the synergy scatter numbers its points and names them in a legend.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence

from dafast.eval.synergy import is_merge

HEADLINE_GROUPS = ("overall", "corpus_only", "held_out", "mc", "tf")
GROUP_TITLES = {
    "overall": "overall", "basic": "basic", "advanced": "advanced", "mc": "mc", "tf": "tf",
    "corpus_only": "corpus-only", "not_corpus_only": "not corpus-only", "tune": "tune half",
    "held_out": "held-out half",
}
_TRAINED, _MERGED = "tab:blue", "tab:orange"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _fitted(values: Sequence[float], pad: float = 3.0) -> tuple[float, float]:
    """Axis limits around ``values`` (percent) with a margin, inside [0, 100]."""
    return max(0.0, min(values) - pad), min(100.0, max(values) + pad)


def plot_accuracy(rows: Sequence[Mapping], analysis: Mapping, path: pathlib.Path) -> None:
    """One panel per (column, headline group): each variant's accuracy with its interval,
    the chance level (dashed) and the instruct model's accuracy (dotted)."""
    columns = analysis["columns"]
    names = [r["variant"] for r in rows]
    merges = {r["variant"] for r in rows if is_merge(r)}
    figure = _figure(2.6 * len(HEADLINE_GROUPS) + 1.5, (0.28 * len(rows) + 1.1) * len(columns) + 0.4)
    axes = figure.subplots(len(columns), len(HEADLINE_GROUPS), squeeze=False, sharey=True)
    for line, column in zip(axes, columns):
        for ax, group in zip(line, HEADLINE_GROUPS):
            points = []
            for y, row in enumerate(rows):
                value = ((row["summary"].get(column) or {}).get(group))
                if value is None:
                    continue
                lo, hi = (analysis["intervals"].get(row["variant"], {}).get(column, {})
                          .get(group) or (value, value))
                color = _MERGED if row["variant"] in merges else _TRAINED
                ax.errorbar(100 * value, y, xerr=[[100 * (value - lo)], [100 * (hi - value)]],
                            fmt="o", color=color, markersize=4, capsize=2, linewidth=1)
                points += [100 * lo, 100 * hi]
            chance = analysis["chance"].get(group)
            if chance is not None:
                ax.axvline(100 * chance, color="grey", linestyle="--", linewidth=1, label="chance")
                points.append(100 * chance)
            instruct = analysis.get("instruct")
            base = next((r for r in rows if r["variant"] == instruct), None)
            if base and (base["summary"].get(column) or {}).get(group) is not None:
                ax.axvline(100 * base["summary"][column][group], color="tab:green",
                           linestyle=":", linewidth=1.2, label=instruct)
            if points:
                ax.set_xlim(*_fitted(points))
            primary = " (primary)" if column == analysis["primary"] else ""
            ax.set_title(f"{column}{primary}: {GROUP_TITLES[group]}", fontsize=9)
            ax.grid(axis="x", alpha=0.3)
            ax.tick_params(labelsize=8)
        line[0].set_yticks(range(len(names)), names)
    for ax in axes[-1]:
        ax.set_xlabel("accuracy (%)", fontsize=8)
    axes[0, 0].invert_yaxis()  # shared: the pipeline reads top to bottom
    axes[0, 0].legend(fontsize=7, loc="best")
    figure.suptitle("accuracy with 95% intervals (orange: merges)", fontsize=10)
    figure.savefig(path)


def _label_offsets(points: Sequence[tuple[float, float]], near: float) -> list[tuple[int, int]]:
    """Text offsets (points) for numbered labels: a label whose point lies within ``near`` of
    earlier ones takes the next free direction around it, so coinciding points stay legible."""
    directions = [(5, 3), (-12, 3), (5, -12), (-12, -12), (-3, 9), (-3, -17), (10, -4), (-17, -4)]
    offsets = []
    for k, (x, y) in enumerate(points):
        crowd = sum(abs(x - px) < near and abs(y - py) < near for px, py in points[:k])
        offsets.append(directions[crowd % len(directions)])
    return offsets


def plot_synergy(tables: Mapping[str, list[dict]], path: pathlib.Path) -> None:
    """Expected (P1+P2)/2 against the merged accuracy, one panel per column (given in report
    order, the primary first), with their intervals, the diagonal merged = expected, and numbered points named in
    the legend (the same number for a merge in every panel)."""
    from matplotlib.lines import Line2D

    tables = {c: t for c, t in tables.items() if t}
    merges = list(dict.fromkeys(t["merge"] for table in tables.values() for t in table))
    ncols = min(3, len(tables))
    nrows = -(-len(tables) // ncols)
    figure = _figure(4.0 * ncols + 2.4, 4.0 * nrows + 0.5)
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(tables):]:
        ax.set_visible(False)
    for ax, (column, table) in zip(axes, tables.items()):
        xs = [100 * t["expected"] for t in table]
        ys = [100 * t["merged"] for t in table]
        spans = [v for v in xs + ys]
        for t, x, y in zip(table, xs, ys):
            color = f"C{merges.index(t['merge']) % 10}"  # one colour per merge in every panel
            iv = t.get("intervals")
            if iv:
                (elo, ehi), (mlo, mhi) = iv["expected"], iv["merged"]
                ax.errorbar(x, y, xerr=[[x - 100 * elo], [100 * ehi - x]],
                            yerr=[[y - 100 * mlo], [100 * mhi - y]], fmt="o", color=color,
                            markersize=4, capsize=2, linewidth=1)
                spans += [100 * elo, 100 * ehi, 100 * mlo, 100 * mhi]
            else:
                ax.plot(x, y, "o", color=color, markersize=4)
        lo, hi = _fitted(spans)
        for t, x, y, offset in zip(table, xs, ys, _label_offsets(list(zip(xs, ys)), 0.04 * (hi - lo))):
            k = merges.index(t["merge"])
            ax.annotate(str(k + 1), (x, y), xytext=offset, textcoords="offset points",
                        fontsize=8, weight="bold", color=f"C{k % 10}")
        ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.set_xlabel("expected (P1 + P2) / 2 (%)", fontsize=8)
        ax.set_ylabel("merged (%)", fontsize=8)
        ax.set_title(column + (" (primary)" if ax is axes[0] else ""), fontsize=9)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], linestyle="none", marker=f"${k + 1}$", color=f"C{k % 10}", markersize=7)
               for k in range(len(merges))]
    handles.append(Line2D([], [], color="grey", linestyle="--"))
    figure.legend(handles, merges + ["merged = expected"], loc="outside right upper", fontsize=8)
    figure.suptitle("merges: expected vs actual accuracy (95% intervals); above the diagonal = "
                    "better than the parents' average", fontsize=10)
    figure.savefig(path)


def plot_loss(curves: Mapping[str, Sequence], path: pathlib.Path) -> None:
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


def plot_judged(judged: Mapping[str, Mapping[str, Mapping]], criteria: Mapping[str, Sequence[str]],
                path: pathlib.Path) -> None:
    """Judged tasks (dafast.eval.judged): one row of panels per task, one panel per criterion,
    each variant's mean score with its 95% interval on the judge's 1-10 scale."""
    tasks = list(judged)
    width = max(len(criteria[t]) for t in tasks)
    variants = list(dict.fromkeys(v for t in tasks for v in judged[t]))
    figure = _figure(2.6 * width + 1.5, (0.28 * len(variants) + 1.1) * len(tasks) + 0.4)
    axes = figure.subplots(len(tasks), width, squeeze=False, sharey=True)
    for line, task in zip(axes, tasks):
        for ax in line[len(criteria[task]):]:
            ax.set_visible(False)
        for ax, criterion in zip(line, criteria[task]):
            for y, variant in enumerate(variants):
                result = judged[task].get(variant)
                if result is None:
                    continue
                s = result["summary"][criterion]
                color = _MERGED if "-slerp" in variant.lower() else _TRAINED
                ax.errorbar(s["mean"], y, xerr=[[s["mean"] - s["lo"]], [s["hi"] - s["mean"]]],
                            fmt="o", color=color, markersize=4, capsize=2, linewidth=1)
            ax.set_xlim(0.5, 10.5)  # the judge's whole scale: scores of tasks stay comparable
            ax.set_title(f"{task}: {criterion.replace('_', ' ')}", fontsize=9)
            ax.grid(axis="x", alpha=0.3)
            ax.tick_params(labelsize=8)
        line[0].set_yticks(range(len(variants)), variants)
    for ax in axes[-1]:
        ax.set_xlabel("judge score (1-10)", fontsize=8)
    axes[0, 0].invert_yaxis()
    figure.suptitle("judged scores: means with 95% intervals (orange: merges)", fontsize=10)
    figure.savefig(path)


def plot_scaling(view: Mapping, path: pathlib.Path) -> None:
    """Two panels of dafast.eval.scaling's view against the parameter count (log scale): each
    strategy's accuracy (merges dashed), and each merge's merged - expected with the zero line;
    one line per strategy (one colour per strategy in both panels) with its 95% error bars, the
    models named on the axis. Models without a count are left out."""
    from dafast.eval.scaling import short_count

    colours = {strategy: f"C{k % 10}" for k, strategy in enumerate(view["accuracy"])}
    counted = [m for m in view["models"] if m["parameters"] is not None]
    figure = _figure(12.0, 4.8)
    left, right = figure.subplots(1, 2)
    panels = [(left, view["accuracy"], lambda p: (p["accuracy"], p["interval"]),
               f"{view['column']} accuracy (%)"),
              (right, view["synergy"],
               lambda p: (p["vs_expected"], (p["intervals"] or {}).get("vs_expected")),
               "merged − expected (P1+P2)/2 (points)")]
    for ax, series, measure, label in panels:
        for strategy, points in series.items():
            points = [p for p in points if p["parameters"] is not None]
            if not points:
                continue
            xs, ys, below, above = [], [], [], []
            for p in points:
                value, interval = measure(p)
                lo, hi = interval or (value, value)
                xs.append(p["parameters"])
                ys.append(100 * value)
                below.append(100 * (value - lo))
                above.append(100 * (hi - value))
            dashed = ax is left and strategy in view["synergy"]
            ax.errorbar(xs, ys, yerr=[below, above], fmt="o--" if dashed else "o-",
                        color=colours.get(strategy, "black"), label=strategy, markersize=4,
                        capsize=3, linewidth=1)
        ax.set_xscale("log")
        ax.set_xticks([m["parameters"] for m in counted],
                      [f"{m['name']}\n{short_count(m['parameters'])}" for m in counted])
        ax.minorticks_off()
        ax.set_xlabel("parameters (log scale)", fontsize=9)
        ax.set_ylabel(label, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.tick_params(labelsize=8)
        if ax.has_data():
            ax.legend(fontsize=7, loc="best")
    right.axhline(0, color="grey", linestyle=":", linewidth=1)
    left.set_title("each strategy against model size (dashed: merges)", fontsize=10)
    right.set_title("merge synergy against model size", fontsize=10)
    figure.savefig(path)
