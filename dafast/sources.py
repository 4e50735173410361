"""Where data and benchmarks come from, and the one reader of their JSON Lines.

A source is, for a stage, the benchmark or a judged task (`kind`: cpt, sft, dpo, orpo,
benchmark, conversations, design):
- a JSON Lines file;
- a dataset directory holding the kind's file (FILES: corpus.jsonl, sft.jsonl,
  preferences.jsonl, benchmark.jsonl, conversations.jsonl, design_concepts.jsonl), the layout
  `python -m dafast.distill` writes;
- `builtin:NAME` for the dataset bundled in dafast/data/NAME (the kind's file), or
  `builtin:NAME/PART` for its PART.jsonl;
- a bare `NAME` or `NAME/PART` that is no existing path: the same as `builtin:NAME[/PART]`.
  An existing path always wins, so a bundled name never hides a user's file.

Blank (whitespace-only) lines are skipped and the other lines keep their file line numbers in
errors. The trainers, the evaluation and the matrix's cache keys all go through `resolve` and
`read_lines`, so a key hashes exactly the lines that are trained or evaluated on.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
from pathlib import Path

from dafast.formats import DataError, check_row, error_class

# The file a stage or the benchmark reads from a dataset directory.
FILES = {"cpt": "corpus", "sft": "sft", "dpo": "preferences", "orpo": "preferences",
         "benchmark": "benchmark", "conversations": "conversations", "design": "design_concepts"}
BUILTIN_PREFIX = "builtin:"


class MissingSource(DataError, FileNotFoundError):
    """A source that names no file: no such path, and no bundled dataset of that name."""


def data_root():
    return importlib.resources.files("dafast") / "data"


def bundled() -> list[str]:
    """The names of the bundled datasets (the folders of dafast/data)."""
    return sorted(p.name for p in data_root().iterdir()
                  if p.is_dir() and not p.name.startswith(("_", ".")))


def _kind_file(kind: str) -> str:
    if kind not in FILES:
        raise ValueError(f"unknown data kind {kind!r}; one of {', '.join(FILES)}")
    return f"{FILES[kind]}.jsonl"


def resolve(source: str | os.PathLike, kind: str) -> Path:
    """The file read for `source` by a stage or benchmark of `kind` (see the module docstring)."""
    text = os.fspath(source)
    file = _kind_file(kind)
    if text.startswith(BUILTIN_PREFIX):
        return _builtin(text, text[len(BUILTIN_PREFIX):], file)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / file).is_file():
            raise MissingSource(f"{text}: the directory has no {file} (the {kind} file of a "
                                "dataset directory)")
        return (path / file).resolve()
    if path.is_file():
        return path.resolve()
    if text.partition("/")[0] in bundled():
        return _builtin(text, text, file)
    raise MissingSource(f"{text}: no such data file, nor a bundled dataset (bundled: "
                        f"{', '.join(BUILTIN_PREFIX + n for n in bundled())})")


def _builtin(text: str, spec: str, file: str) -> Path:
    name, _, part = spec.partition("/")
    root = data_root() / name
    if not name or not root.is_dir():
        raise MissingSource(f"{text}: no bundled dataset {name!r}; bundled: {', '.join(bundled())}")
    path = Path(str(root / (f"{part}.jsonl" if part else file)))
    if not path.is_file():
        raise MissingSource(f"{text}: the bundled dataset {name!r} has no file {path.name}")
    return path


def read_lines(path: str | os.PathLike) -> list[tuple[int, bytes]]:
    """(line number, bytes without the line ending) of every line that is not blank."""
    with open(path, "rb") as f:
        return [(number, raw.rstrip(b"\r\n")) for number, raw in enumerate(f, 1) if raw.strip()]


def digest(source: str | os.PathLike, kind: str) -> str:
    """SHA-256 of the lines `source` gives a `kind` reader, each closed by a newline: the same
    for a blank line more or less or another line ending, and, for a file without blank lines
    that ends with a newline, the SHA-256 of the file."""
    sha = hashlib.sha256()
    for _, line in read_lines(resolve(source, kind)):
        sha.update(line + b"\n")
    return sha.hexdigest()


def parse_lines(lines: list[tuple[int, bytes]], name: str, kind: str | None) -> list[tuple[int, dict, object]]:
    """(line number, row, its model) per line; without a kind, rows are only checked to be JSON
    objects (model None). Errors name `name`, the line and the field (formats.check_row)."""
    error = error_class(kind or "")
    rows = []
    for number, raw in lines:
        where = f"{name}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                        f"{e.start + 1})") from None
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if kind is None:
            if not isinstance(row, dict):
                raise error(f"{where}: a row must be a JSON object, got {type(row).__name__}")
            rows.append((number, row, None))
        else:
            rows.append((number, row, check_row(row, where, kind)))
    if not rows:
        raise error(f"{name}: no {'questions' if kind == 'benchmark' else 'rows'}")
    return rows


def read_jsonl(path: str | os.PathLike, kind: str | None = None) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of `path`, validated for `kind` when
    given; DataError on bad UTF-8, bad JSON, a non-object or (with a kind) a bad row."""
    return [(number, row) for number, row, _ in parse_lines(read_lines(path), os.fspath(path), kind)]


def read(source: str | os.PathLike, kind: str) -> tuple[Path, list[tuple[int, dict, object]]]:
    """The file behind `source` and its validated rows: (line number, row, model) each."""
    path = resolve(source, kind)
    return path, parse_lines(read_lines(path), str(path), kind)
