"""Evaluate one model on the domain benchmark.

    python -m dafast.eval MODEL [--bench FILE|builtin:biomat] [--out results.json]
                                [--batch-size N] [--limit N] [--no-loglik]

MODEL is a local Hugging Face directory or "default" (the embedded SmolLM2-135M-Instruct).
Prints a table of accuracies (generation and log-likelihood columns); --out writes the summary
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
from dafast.eval.runner import GROUPS, evaluate_dir


def format_table(summary: dict) -> str:
    """Accuracy (%) per group, one line per column, with the group sizes."""
    n = summary["n"]
    names = [f"{g} ({n[g]})" for g in GROUPS]
    widths = [max(len(name), 5) for name in names]
    lines = ["column      " + "  ".join(name.rjust(w) for name, w in zip(names, widths))]
    for column in ("generation", "loglik", "calibrated"):
        accuracies = summary.get(column)
        if accuracies is None:
            continue
        cells = ["-" if accuracies[g] is None else f"{100 * accuracies[g]:.1f}" for g in GROUPS]
        lines.append(f"{column:<12}" + "  ".join(c.rjust(w) for c, w in zip(cells, widths)))
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # progress goes to stderr

    start = time.perf_counter()
    try:
        result = evaluate_dir(args.model, args.bench, device=args.device, limit=args.limit,
                              batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                              loglik=not args.no_loglik)
    except (BenchmarkError, OSError, ValueError) as exc:  # OSError: unreadable model or file
        print(f"dafast.eval: error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start

    print(format_table(result.summary))
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
