"""The domain benchmark, its runner, the synergy analysis of merges, and the report.

    python -m dafast.eval MODEL [--bench builtin:biomat] [--out results.json]

From Python (what the strategy matrix calls):

    result = evaluate_dir(model_dir, "builtin:biomat")           # -> EvalResult
    rows.append({"variant": "CPT-SFT-SLERP", "parents": ["CPT-SFT", "Instruct"],
                 "summary": result.summary, "records": result.to_dict()["records"]})
    write_report(out_dir, rows, primary="cloze", loss_curves=..., config=..., timings=...)

The statistics of the report (intervals, paired tests, degenerate answers) are in
dafast.eval.stats.
"""

from dafast.eval.answers import ANSWER_PREFIX, USER_TEMPLATE, parse_answer, prompt_text
from dafast.eval.benchmark import BenchmarkError, Question, load_benchmark
from dafast.eval.report import write_report
from dafast.eval.runner import GROUPS, EvalResult, Record, evaluate, evaluate_dir, load_model
from dafast.eval.synergy import diversity, expected, improvement, synergy_table

__all__ = [
    "ANSWER_PREFIX", "USER_TEMPLATE", "GROUPS", "BenchmarkError", "EvalResult", "Question",
    "Record", "diversity", "evaluate", "evaluate_dir", "expected", "improvement",
    "load_benchmark", "load_model", "parse_answer", "prompt_text", "synergy_table",
    "write_report",
]
