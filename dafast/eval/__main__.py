"""Evaluate one model on the domain benchmark.

    python -m dafast.eval MODEL [--bench FILE|builtin:biomat] [--out results.json]
                                [--batch-size N] [--limit N] [--no-loglik]

MODEL is a local Hugging Face directory or "default" (the embedded SmolLM2-135M-Instruct).
Prints a table of accuracies with 95% intervals (one column per answer column: generation,
loglik, calibrated, cloze, pmi) and flags mostly-one-answer columns; --out writes the summary
and every question's record (reply, parsed answer, scores) as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from dafast.eval.answers import ANSWER_PREFIX, USER_TEMPLATE
from dafast.eval.benchmark import BenchmarkError
from dafast.eval import stats
from dafast.eval.runner import COLUMNS, GROUPS, default_device, eval_dtype, evaluate_dir


def format_table(summary: dict, records: list[dict] | None = None) -> str:
    """Accuracy (%) per group (lines) and column (columns), with the group sizes; with
    ``records`` (as dicts) each accuracy carries its 95% bootstrap interval and a column whose
    answers are mostly one letter or truth value is named below the table."""
    columns = [c for c in COLUMNS if summary.get(c) is not None]
    cells = {}
    for column in columns:
        for group in GROUPS:
            value = summary[column][group]
            members = stats.in_group(records, group) if records else []
            correct = stats.outcomes(members, column) if members else None
            if value is None:
                cells[column, group] = "-"
            elif correct is None:
                cells[column, group] = f"{100 * value:.1f}"
            else:
                lo, hi = stats.accuracy_interval(correct)
                cells[column, group] = f"{100 * value:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
    n = summary["n"]
    labels = [f"{g} ({n[g]})" for g in GROUPS]
    first = max(len(label) for label in labels + ["group"])
    widths = [max([len(c)] + [len(cells[c, g]) for g in GROUPS]) for c in columns]
    lines = ["group".ljust(first) + "  " + "  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    for label, group in zip(labels, GROUPS):
        lines.append(label.ljust(first) + "  "
                     + "  ".join(cells[c, group].rjust(w) for c, w in zip(columns, widths)))
    if records:
        lines.append("95% intervals: bootstrap over questions")
        for column in columns:
            for type_, share in stats.answer_shares(records, column).items():
                if share["flagged"]:
                    lines.append(f"degenerate: {column} answers {share['answer']!r} to "
                                 f"{100 * share['share']:.0f}% of {share['n']} {type_} questions")
    lines.append(f"unparseable replies: {summary['unparseable']} of {n['overall']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dafast.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help='local HF model directory, or "default"')
    parser.add_argument("--bench", default="builtin:biomat",
                        help="benchmark JSONL file or builtin:NAME (default: %(default)s)")
    parser.add_argument("--out", help="write the summary and per-question records here (JSON)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per batch (default: 16)")
    parser.add_argument("--max-new-tokens", type=int, default=8,
                        help="tokens generated per reply (default: 8)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N questions")
    parser.add_argument("--no-loglik", action="store_true", help="skip the log-likelihood column")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when there is one)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="auto: bfloat16 on a GPU and on a CPU with native bf16 arithmetic, "
                             "else float32")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # progress goes to stderr

    start = time.perf_counter()
    try:
        device = args.device or default_device()
        result = evaluate_dir(args.model, args.bench, device=device,
                              dtype=eval_dtype(device, args.dtype), limit=args.limit,
                              batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                              loglik=not args.no_loglik)
    except (BenchmarkError, OSError, ValueError) as exc:  # OSError: unreadable model or file
        print(f"dafast.eval: error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start

    print(format_table(result.summary, result.to_dict()["records"]))
    print(f"wall time: {seconds:.1f} s (model loading included)")
    if args.out:
        data = {"model": str(args.model), "bench": str(args.bench), "seconds": seconds,
                "prompt": {"user": USER_TEMPLATE, "answer_prefix": ANSWER_PREFIX},
                "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                **result.to_dict()}
        tmp = f"{args.out}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, args.out)  # never a half-written results file
        except OSError as exc:
            print(f"dafast.eval: error: cannot write {args.out}: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
