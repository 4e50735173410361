"""Compare a benchmark run with a baseline run by dafast/peer time ratios.

Absolute times on a shared machine are too noisy to compare across runs, so each group's
score is median(dafast) / median(peer) measured in the same run; a run fails when a group's
score got worse than the baseline's by more than --tolerance (default 15%).

    pytest bench --benchmark-autosave                  # saves .benchmarks/<machine>/NNNN_*.json
    pytest bench --benchmark-save=baseline             # once: the run to compare against
    python bench/compare.py                            # newest run vs the baseline

With no run saved as "baseline", the oldest saved run is the baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_ratios(path: Path) -> dict[str, float]:
    """{group: median(dafast) / median(peer)} for every group that has both roles, and
    1 / ratio_median for a group that timed both in turns (bench/test_train.py)."""
    medians: dict[str, dict[str, float]] = {}
    turns: dict[str, float] = {}
    for bench in json.loads(path.read_text())["benchmarks"]:
        info = bench.get("extra_info", {})
        if "ratio_median" in info:
            turns[bench["group"]] = 1 / info["ratio_median"]
        elif info.get("role") in ("dafast", "peer"):
            medians.setdefault(bench["group"], {})[info["role"]] = bench["stats"]["median"]
    ratios = {group: m["dafast"] / m["peer"] for group, m in medians.items() if len(m) == 2}
    return {**ratios, **turns}


def saved_runs(storage: Path) -> list[Path]:
    return sorted(storage.glob("*/[0-9][0-9][0-9][0-9]_*.json"), key=lambda p: p.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", type=Path, default=Path(".benchmarks"), help="pytest-benchmark storage")
    parser.add_argument("--baseline", type=Path, help="baseline run JSON (default: the run saved as 'baseline', else the oldest)")
    parser.add_argument("--run", type=Path, help="run JSON to check (default: the newest)")
    parser.add_argument("--tolerance", type=float, default=0.15, help="allowed relative worsening of a ratio")
    args = parser.parse_args(argv)

    runs = saved_runs(args.storage)
    named = [p for p in runs if p.stem.endswith("_baseline")]
    baseline = args.baseline or (named[-1] if named else (runs[0] if runs else None))
    run = args.run or (runs[-1] if runs else None)
    if baseline is None or run is None:
        print(f"no saved benchmark runs under {args.storage}; run `pytest bench --benchmark-autosave` first")
        return 2
    old, new = load_ratios(baseline), load_ratios(run)
    print(f"baseline: {baseline}\nrun:      {run}\n")
    print(f"{'group':40s} {'baseline':>9s} {'run':>9s} {'change':>8s}")
    failed = []
    for group in sorted(new):
        if group not in old:
            print(f"{group:40s} {'-':>9s} {new[group]:9.3f}      new")
            continue
        change = new[group] / old[group] - 1
        verdict = "WORSE" if change > args.tolerance else "ok"
        print(f"{group:40s} {old[group]:9.3f} {new[group]:9.3f} {change:+7.1%} {verdict}")
        if change > args.tolerance:
            failed.append(group)
    print("\n(ratio = dafast time / peer time in the same run; lower is better)")
    if failed:
        print(f"regressed by more than {args.tolerance:.0%}: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
