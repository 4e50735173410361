"""The GPU run's figures: one long CSV row per figure, with the device, versions, date and shape
on every row, so a row read alone still says what was measured where.

    python bench/gpu/figures.py report OUT_DIR   # OUT_DIR/raw/* -> figures.csv, tests.csv, summary.md

bench/gpu/run.sh calls it last. Inputs under OUT_DIR/raw: steps.csv (each step of the run and
its status), tests.xml (pytest's JUnit report), bench.json (pytest-benchmark) and
figures_*.csv (bench/gpu/steps.py). Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

COLUMNS = ["date", "device", "torch", "cuda", "transformers", "peft", "trl", "liger_kernel",
           "mergekit", "dafast_commit", "section", "case", "shape", "impl", "metric", "value",
           "unit"]
_PACKAGES = ["transformers", "peft", "trl", "liger_kernel", "mergekit"]
_ROOT = Path(__file__).resolve().parents[2]


def environment() -> dict:
    """The columns every row shares: when, on what, with which versions."""
    import torch

    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"cpu ({platform.processor() or platform.machine()})")
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": device, "torch": torch.__version__, "cuda": torch.version.cuda or ""}
    for name in _PACKAGES:
        try:
            env[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            env[name] = "absent"
    try:
        env["dafast_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT, capture_output=True, text=True,
            check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["dafast_commit"] = "unknown"  # a copy of the tree without its .git
    return env


def write_csv(path: Path, rows: list[dict], columns: list[str] = COLUMNS) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="raise")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class Figures:
    """Collects rows for one section; `add` fills the shared columns."""

    def __init__(self, section: str):
        self.section, self.env, self.rows = section, environment(), []

    def add(self, case: str, shape: str, impl: str, metric: str, value, unit: str) -> None:
        if isinstance(value, float):
            value = f"{value:.6g}"
        self.rows.append({**self.env, "section": self.section, "case": case, "shape": shape,
                          "impl": impl, "metric": metric, "value": value, "unit": unit})


def benchmark_rows(path: Path) -> list[dict]:
    """pytest-benchmark's JSON -> rows: median time and every numeric extra_info entry."""
    data = json.loads(path.read_text())
    fig = Figures("pytest-bench")
    for bench in data.get("benchmarks", []):
        extra = dict(bench.get("extra_info", {}))
        impl = str(extra.pop("role", "?"))
        case = bench.get("group") or bench["name"]
        fig.add(case, bench.get("param", ""), impl, "median", float(bench["stats"]["median"]), "s")
        for key, value in extra.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                fig.add(case, bench.get("param", ""), impl, key, float(value), "")
    return fig.rows


def test_rows(path: Path) -> list[dict]:
    """JUnit XML -> one row per test: outcome, seconds, the first line of a failure."""
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                detail = (node.get("message") or "").splitlines()[0][:200] if node.get("message") else ""
                break
        rows.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                     "seconds": case.get("time", ""), "detail": detail})
    return rows


def summary(out: Path, figures: list[dict], tests: list[dict], steps: list[dict]) -> str:
    env = figures[0] if figures else environment()
    lines = [f"# dafast GPU run, {env['date']}", "",
             f"Device {env['device']}; torch {env['torch']} (CUDA {env['cuda']}); transformers "
             f"{env['transformers']}, peft {env['peft']}, trl {env['trl']}, liger-kernel "
             f"{env['liger_kernel']}, mergekit {env['mergekit']}; dafast {env['dafast_commit']}.",
             "", "## Steps", "", "| step | status | s | detail |", "|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['detail']} |" for s in steps]
    if tests:
        counts: dict[str, int] = {}
        for t in tests:
            counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
        lines += ["", "## CUDA tests", "", ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))]
        lines += [f"- {t['test']}: {t['outcome']} {t['detail']}" for t in tests
                  if t["outcome"] in ("failed", "error")]
    lines += ["", "## Figures", "", "| section | case | shape | impl | metric | value | unit |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['section']} | {r['case']} | {r['shape']} | {r['impl']} | {r['metric']} | "
              f"{r['value']} | {r['unit']} |" for r in figures]
    lines += ["", f"All figures: figures.csv; tests: tests.csv; log: raw/run.log ({out.name})."]
    return "\n".join(lines) + "\n"


def report(out: Path) -> None:
    raw = out / "raw"
    steps = read_csv(raw / "steps.csv") if (raw / "steps.csv").exists() else []
    figures: list[dict] = []
    if (raw / "bench.json").exists():
        figures += benchmark_rows(raw / "bench.json")
    for path in sorted(raw.glob("figures_*.csv")):
        figures += read_csv(path)
    tests = test_rows(raw / "tests.xml") if (raw / "tests.xml").exists() else []
    write_csv(out / "figures.csv", figures)
    write_csv(out / "tests.csv", tests, ["test", "outcome", "seconds", "detail"])
    tmp = out / "summary.md.tmp"
    tmp.write_text(summary(out, figures, tests, steps))
    os.replace(tmp, out / "summary.md")
    print(f"figures.py: {len(figures)} figures, {len(tests)} tests -> {out}/summary.md")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "report":
        sys.exit("usage: python bench/gpu/figures.py report OUT_DIR")
    report(Path(sys.argv[2]))
