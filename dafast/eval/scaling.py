"""The report's scaling view: the same strategies on models of several sizes.

The paper's claim to test is that merging's emergent gain needs scale (SmolLM-1.7B showed none,
the 7-8B models did). The view puts each strategy's accuracy, and each merge's synergy, against
the model's parameter count:

    view = scaling_view([{"name": "small", "parameters": parameter_count(dir_small),
                          "rows": rows_small, "report": "../reports/small/report.md"}, ...],
                        primary="cloze")

``rows`` are one model's report rows (see dafast.eval.report) with the names of a one-model run
(``instruct``, ``cpt-sft``, ``cpt-sft-slerp``): a strategy is a variant name, the same across
models. Accuracies are overall accuracies in the primary column with their 95% bootstrap
interval; synergy is dafast.eval.synergy's merged - expected and improvement with their joint
intervals. :func:`markdown` renders the view, dafast.eval.plots.plot_scaling plots it.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence

from dafast.eval import stats
from dafast.eval.synergy import synergy_table

_WEIGHTS_INDEX = "model.safetensors.index.json"


def parameter_count(model_dir: str | pathlib.Path) -> int:
    """The parameters of an HF model directory, from its safetensors headers (no weights read):
    the shards its index names, else model.safetensors. (A directory may hold other
    safetensors files, such as Mistral's consolidated.safetensors, that transformers does not
    load; counting them would count the model twice.) Tied weights are stored once, so they
    count once, as in ``sum(p.numel() for p in model.parameters())``."""
    from safetensors import safe_open

    model_dir = pathlib.Path(model_dir)
    index = model_dir / _WEIGHTS_INDEX
    if index.is_file():
        try:
            names = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index ({e})") from None
        files = {model_dir / shard: set() for shard in names.values()}
        for name, shard in names.items():
            files[model_dir / shard].add(name)
    elif (model_dir / "model.safetensors").is_file():
        files = {model_dir / "model.safetensors": None}
    else:
        raise ValueError(f"{model_dir}: no model.safetensors or {_WEIGHTS_INDEX} to count the "
                         "parameters from")
    total = 0
    for path, wanted in files.items():
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if wanted is None or name in wanted:
                    count = 1
                    for size in f.get_slice(name).get_shape():
                        count *= size
                    total += count
    return total


def short_count(n: int | None) -> str:
    """135M, 1.7B, 12.3K: a parameter count as the model names write it."""
    if n is None:
        return "?"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            value = n / scale
            return f"{value:.3g}{suffix}"
    return str(n)


def _column(rows: Sequence[Mapping], primary: str) -> str:
    """The report's rule: the primary column if it ran, else the first column that did."""
    from dafast.eval.runner import COLUMNS

    ran = [c for c in COLUMNS if any(r["summary"].get(c) for r in rows)]
    return primary if primary in ran or not ran else ran[0]


def _accuracy(row: Mapping, column: str) -> tuple[float | None, tuple[float, float] | None]:
    value = (row["summary"].get(column) or {}).get("overall")
    correct = stats.outcomes(row["records"], column) if row.get("records") else None
    interval = stats.accuracy_interval(correct) if correct is not None and len(correct) else None
    return value, interval


def scaling_view(models: Sequence[Mapping], *, primary: str = "cloze") -> dict:
    """``{"column", "models": [{"name", "parameters", "report"}] (smallest first; an unknown
    count last), "accuracy": {strategy: [point]}, "synergy": {merge: [point]}}``; an accuracy
    point is ``{"model", "parameters", "accuracy", "interval"}``, a synergy point ``{"model",
    "parameters", "merged", "expected", "vs_expected", "improvement", "intervals"}`` (intervals
    of dafast.eval.synergy, or None without records). Strategies keep the order of the rows."""
    for i, model in enumerate(models):
        if not isinstance(model, Mapping) or not {"name", "parameters", "rows"} <= model.keys():
            raise ValueError(f"models[{i}]: expected a dict with 'name', 'parameters', 'rows'")
    ordered = sorted(models, key=lambda m: (m["parameters"] is None, m["parameters"] or 0))
    column = _column([row for m in ordered for row in m["rows"]], primary)
    accuracy: dict[str, list[dict]] = {}
    synergy: dict[str, list[dict]] = {}
    for model in models:  # first appearance: the pipeline's order
        for row in model["rows"]:
            accuracy.setdefault(row["variant"], [])
    for model in ordered:
        point = {"model": model["name"], "parameters": model["parameters"]}
        for row in model["rows"]:
            value, interval = _accuracy(row, column)
            if value is not None:
                accuracy[row["variant"]].append({**point, "accuracy": value, "interval": interval})
        for entry in synergy_table(model["rows"], column=column, instruct="instruct"):
            synergy.setdefault(entry["merge"], []).append({
                **point, **{k: entry[k] for k in ("merged", "expected", "vs_expected",
                                                  "improvement", "intervals")}})
    return {"column": column,
            "models": [{"name": m["name"], "parameters": m["parameters"],
                        "report": m.get("report")} for m in ordered],
            "accuracy": {k: v for k, v in accuracy.items() if v}, "synergy": synergy}


# --- rendering ---------------------------------------------------------------------------------

def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(line) + " |" for line in lines])


def _percent(value: float, interval) -> str:
    if interval is None:
        return f"{100 * value:.1f}"
    return f"{100 * value:.1f} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def _points(value: float, interval) -> str:
    if interval is None:
        return f"{100 * value:+.1f}"
    return f"{100 * value:+.1f} [{100 * interval[0]:+.1f}, {100 * interval[1]:+.1f}]"


def _by_model(view: Mapping, points: Mapping[str, list[dict]], cell) -> list[list[str]]:
    names = [m["name"] for m in view["models"]]
    lines = []
    for strategy, series in points.items():
        at = {p["model"]: p for p in series}
        lines.append([strategy] + [cell(at[n]) if n in at else "–" for n in names])
    return lines


def markdown(view: Mapping) -> list[str]:
    """The report's "Scaling" section."""
    models = view["models"]
    header = [f"{m['name']} ({short_count(m['parameters'])})" for m in models]
    column = view["column"]
    parts = ["## Scaling", "",
             f"The same strategies on {len(models)} models, smallest first (parameters counted "
             "from each model's safetensors files). Each model's own report, with every variant "
             "compared with that model's instruct model, is linked below.", "",
             *_table(["model", "parameters", "report"],
                     [[m["name"], f"{m['parameters']:,}" if m["parameters"] is not None else "?",
                       f"[{m['report']}]({m['report']})" if m.get("report") else "–"]
                      for m in models]), "",
             f"Accuracy (%, {column}, overall) with its 95% bootstrap interval:", "",
             *_table(["strategy", *header], _by_model(view, view["accuracy"], lambda p: _percent(
                 p["accuracy"], p["interval"]))), ""]
    if view["synergy"]:
        parts += ["Merge synergy against size, in points with its 95% interval (the merge and "
                  "its parents resampled jointly): merged − expected (P1+P2)/2, > 0 where the "
                  "merge beats its parents' average; improvement, merged − max(P1, P2), > 0 "
                  "where it beats both (the paper's emergent gain).", ""]
        for measure in ("vs_expected", "improvement"):
            title = "merged − expected" if measure == "vs_expected" else "improvement"
            parts += [*_table([f"merge: {title}", *header], _by_model(
                view, view["synergy"], lambda p: _points(p[measure], (p["intervals"] or {})
                                                         .get(measure)))), ""]
    return parts + ["![accuracy and synergy against parameters](scaling.png)", ""]
