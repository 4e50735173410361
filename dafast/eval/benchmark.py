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
- Other keys are ignored.

Any bad row (not JSON, a missing or invalid field, an answer that is not among the options, a
duplicate id) raises :class:`BenchmarkError` naming the file, the line and the field, so a
benchmark is never scored half-read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import os
import re

TYPES = ("mc", "tf")
CATEGORIES = ("basic", "advanced")
TF_ANSWERS = ("True", "False")
SPLITS = ("tune", "held_out")
BUILTIN_PREFIX = "builtin:"

# An option line of an mc question: "A. Flagelliform silk".
_OPTION_LINE = re.compile(r"^([A-Z])\.\s+(\S.*?)\s*$", re.MULTILINE)


class BenchmarkError(ValueError):
    """A benchmark file that cannot be used; the message names file, line and field."""


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


def split_of(qid: str) -> str:
    """The benchmark half of a question without a ``split`` field: the parity of its id's
    SHA-256, a fixed, model-independent and roughly even split."""
    return SPLITS[hashlib.sha256(qid.encode("utf-8")).digest()[0] % 2]


def parse_options(question: str) -> dict[str, str]:
    """The options of an mc question, letter -> text, in the order they appear."""
    return {m.group(1): m.group(2) for m in _OPTION_LINE.finditer(question)}


def check_row(row: object, where: str) -> Question:
    """One row -> Question, or BenchmarkError naming ``where`` (``file:line``) and the field."""
    if not isinstance(row, dict):
        raise BenchmarkError(f"{where}: a row must be a JSON object, got {type(row).__name__}")

    def field(name: str, kind: type, default: object = dataclasses.MISSING) -> object:
        if name not in row:
            if default is not dataclasses.MISSING:
                return default
            raise BenchmarkError(f"{where}: missing field {name!r}")
        value = row[name]
        if not isinstance(value, kind) or (kind is str and not value.strip()):
            expect = "a non-empty string" if kind is str else "true or false"
            raise BenchmarkError(f"{where}: field {name!r} must be {expect}, got {value!r}")
        return value

    qid = field("id", str)
    qtype = field("type", str)
    if qtype not in TYPES:
        raise BenchmarkError(f"{where}: field 'type' must be one of {TYPES}, got {qtype!r}")
    category = field("category", str)
    if category not in CATEGORIES:
        raise BenchmarkError(
            f"{where}: field 'category' must be one of {CATEGORIES}, got {category!r}"
        )
    corpus_only = field("corpus_only", bool, default=False)
    question = field("question", str)
    answer = field("answer", str)

    options: dict[str, str] = {}
    if qtype == "mc":
        options = parse_options(question)
        letters = "".join(options)
        # Options must be A, B, C, ... in order: a gap or a repeat is a typo in the row.
        if len(options) < 2 or letters != "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(letters)]:
            raise BenchmarkError(
                f"{where}: field 'question': an mc question needs option lines 'A. ...', "
                f"'B. ...', ... (consecutive letters from A, at least two); found {letters!r}"
            )
        if answer not in options:
            raise BenchmarkError(
                f"{where}: field 'answer': {answer!r} is not among the options {letters!r}"
            )
    elif answer not in TF_ANSWERS:
        raise BenchmarkError(
            f"{where}: field 'answer': a tf answer must be 'True' or 'False', got {answer!r}"
        )
    split = field("split", str, default=split_of(qid))
    if split not in SPLITS:
        raise BenchmarkError(f"{where}: field 'split' must be one of {SPLITS}, got {split!r}")
    return Question(qid, qtype, category, corpus_only, question, answer, options, split)


def parse_benchmark(text: str, name: str) -> list[Question]:
    """Validate JSON Lines ``text``; ``name`` (a file name) is what errors are reported against."""
    questions: list[Question] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        where = f"{name}:{number}"
        if not line.strip():
            raise BenchmarkError(f"{where}: empty line (one JSON object per line)")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchmarkError(f"{where}: not valid JSON: {exc.msg} (column {exc.colno})") from None
        question = check_row(row, where)
        if question.id in first_line:
            raise BenchmarkError(
                f"{where}: field 'id': duplicate id {question.id!r} "
                f"(first used on line {first_line[question.id]})"
            )
        first_line[question.id] = number
        questions.append(question)
    if not questions:
        raise BenchmarkError(f"{name}: the benchmark holds no questions")
    return questions


def builtin_names() -> list[str]:
    """Bundled benchmarks: the dataset folders of dafast/data holding a benchmark.jsonl."""
    data = importlib.resources.files("dafast") / "data"
    return sorted(d.name for d in data.iterdir() if (d / "benchmark.jsonl").is_file())


def load_benchmark(path: str | os.PathLike) -> list[Question]:
    """Load and validate a benchmark: a JSONL file, a directory holding benchmark.jsonl (what
    ``python -m dafast.distill --benchmark`` writes), or ``builtin:NAME`` / ``NAME`` (bundled).

    An existing file wins over a bundled name; ``builtin:biomat`` is the paper-domain benchmark
    shipped in dafast/data/biomat (240 questions), ``builtin:keldara`` one of invented facts
    (40 questions) that no pretrained model can know.
    """
    spec = os.fspath(path)
    if not spec.startswith(BUILTIN_PREFIX) and os.path.isdir(spec):  # a dataset directory
        spec = os.path.join(spec, "benchmark.jsonl")
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"{path}: the directory has no benchmark.jsonl")
    if not spec.startswith(BUILTIN_PREFIX) and os.path.exists(spec):
        with open(spec, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise BenchmarkError(f"{spec}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None
        return parse_benchmark(text, spec)

    name = spec.removeprefix(BUILTIN_PREFIX)
    if name in builtin_names():
        resource = importlib.resources.files("dafast") / "data" / name / "benchmark.jsonl"
        return parse_benchmark(resource.read_text(encoding="utf-8"), str(resource))
    raise FileNotFoundError(
        f"benchmark {spec!r} is neither a file nor a bundled benchmark "
        f"(bundled: {', '.join(BUILTIN_PREFIX + n for n in builtin_names())})"
    )
