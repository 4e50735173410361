"""The domain benchmark: JSON Lines rows, validated in full before any model runs.

One row per line (the format of docs/design.md, "Data formats"):

    {"id": "q-001", "type": "mc", "category": "basic", "corpus_only": true,
     "question": "Which ...?\\nA. ...\\nB. ...\\nC. ...\\nD. ...", "answer": "B"}

- ``type`` is ``"mc"`` (options as lines ``"A. text"`` in the question, consecutive letters from
  A, at least two; ``answer`` is one of those letters) or ``"tf"`` (``answer`` is ``"True"`` or
  ``"False"``).
- ``category`` is ``"basic"`` or ``"advanced"``.
- ``corpus_only`` (optional, default false) marks questions whose fact is only in the CPT corpus.
- ``split`` (optional): ``"tune"`` or ``"held_out"``, the half of the benchmark the question
  belongs to. Without it the half follows from the id (:func:`split_of`), so it is fixed for a
  benchmark whatever model or run reads it: settings are chosen on the tune half and the
  held-out half shows whether the choice carries over.
- Other keys are ignored; blank lines are skipped.

The row model is dafast.formats.BenchmarkRow and the file is found and read by dafast.sources,
as the training data are. Any bad row (not JSON, a missing or invalid field, an answer that is
not among the options, a duplicate id) raises :class:`BenchmarkError` naming the file, the line
and the field, so a benchmark is never scored half-read.
"""

from __future__ import annotations

import dataclasses
import os

from dafast import formats, sources
# Public here as well: the benchmark's error, constants and option parsing live with its row model.
from dafast.formats import (CATEGORIES, SPLITS, TF_ANSWERS, TYPES, BenchmarkError,  # noqa: F401
                            parse_options, split_of)

BUILTIN_PREFIX = sources.BUILTIN_PREFIX


@dataclasses.dataclass(frozen=True)
class Question:
    id: str
    type: str  # "mc" | "tf"
    category: str  # "basic" | "advanced"
    corpus_only: bool
    question: str
    answer: str  # a letter for mc, "True"/"False" for tf
    options: dict[str, str] = dataclasses.field(default_factory=dict)  # mc: letter -> text
    split: str = "tune"  # "tune" | "held_out"

    @property
    def choices(self) -> tuple[str, ...]:
        """The answers a model can give: the option letters (mc) or True/False (tf)."""
        return tuple(self.options) if self.type == "mc" else TF_ANSWERS

    @classmethod
    def from_row(cls, row: formats.BenchmarkRow) -> "Question":
        return cls(row.id, row.type, row.category, row.corpus_only, row.question, row.answer,
                   row.options, row.split)


def check_row(row: object, where: str) -> Question:
    """One row -> Question, or BenchmarkError naming ``where`` (``file:line``) and the field."""
    return Question.from_row(formats.check_row(row, where, "benchmark"))


def _questions(lines: list[tuple[int, bytes]], name: str) -> list[Question]:
    questions: list[Question] = []
    first_line: dict[str, int] = {}
    for number, _, row in sources.parse_lines(lines, name, "benchmark"):
        if row.id in first_line:
            raise BenchmarkError(f"{name}:{number}: field 'id': duplicate id {row.id!r} "
                                 f"(first used on line {first_line[row.id]})")
        first_line[row.id] = number
        questions.append(Question.from_row(row))
    return questions


def parse_benchmark(text: str, name: str) -> list[Question]:
    """Validate JSON Lines ``text``; ``name`` (a file name) is what errors are reported against."""
    lines = [(n, line.encode("utf-8")) for n, line in enumerate(text.splitlines(), 1)
             if line.strip()]
    return _questions(lines, name)


def builtin_names() -> list[str]:
    """Bundled benchmarks: the dataset folders of dafast/data holding a benchmark.jsonl."""
    return [name for name in sources.bundled()
            if (sources.data_root() / name / "benchmark.jsonl").is_file()]


def load_benchmark(path: str | os.PathLike) -> list[Question]:
    """Load and validate a benchmark: a JSONL file, a directory holding benchmark.jsonl (what
    ``python -m dafast.distill --benchmark`` writes), or ``builtin:NAME`` / ``NAME`` (bundled),
    resolved by dafast.sources.resolve as the matrix's cache key is.

    An existing file wins over a bundled name; ``builtin:biomat`` is the paper-domain benchmark
    shipped in dafast/data/biomat (240 questions), ``builtin:keldara`` one of invented facts
    (40 questions) that no pretrained model can know.
    """
    file = sources.resolve(path, "benchmark")
    return _questions(sources.read_lines(file), str(file))
