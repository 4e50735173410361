"""`python -m dafast.distill CORPUS.jsonl OUT_DIR`: training data and a benchmark from raw text.

The paper's construction: for each document of a CPT corpus ({"text": ...} rows) a teacher
writes question-answer conversations (SFT), preference pairs (chosen = the correct answer,
rejected = a fluent answer the teacher is told to make scientifically wrong) and, with
--benchmark, questions with their answer key. OUT_DIR then holds, in dafast's own formats
(docs/design.md, "Data formats"):

    sft.jsonl           {"messages": [user, assistant]}
    preferences.jsonl   {"prompt", "chosen", "rejected"}
    benchmark.jsonl     {"id", "type", "category", "corpus_only", "question", "answer", "source"}
    manifest.json       the teacher, the counts, what was dropped and why

and a recipe trains on it with `sft.data=OUT_DIR dpo.data=OUT_DIR eval.bench=OUT_DIR`.

What is not left to the teacher: mc options are shuffled here, with the correct one placed so
that the answer letters cycle A, B, C, D over the benchmark; each tf item is written by the
teacher as a true and a false statement and one of them is kept, alternately, so truth is
balanced. Every row is checked with dafast's validators (a row that fails is dropped and
counted in the manifest), duplicates (same question, case and spacing aside) are dropped, and
the files are written into a temporary directory that replaces OUT_DIR only once every file
has been read back by dafast's own loaders. Teacher answers are cached (dafast.teacher), so an
interrupted run resumes and a rerun costs nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from dafast import data
from dafast.eval import benchmark
from dafast.teacher import DEFAULT_BASE_URL, Request, Teacher, TeacherConfig, TeacherError

logger = logging.getLogger(__name__)

LETTERS = "ABCD"


def _array(item: dict, count: int) -> dict:
    return {"type": "array", "items": item, "minItems": 1, "maxItems": count}


def _object(**properties) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


def schemas(count: int, max_chars: int = 400) -> dict[str, dict]:
    """The JSON the teacher is asked for, per task: at most ``count`` items each, strings of at
    most ``max_chars`` (a bound on the answer's length that a small model needs)."""
    text = {"type": "string", "minLength": 1, "maxLength": max_chars}
    return {
        "sft": _object(conversations=_array(_object(question=text, answer=text), count)),
        "preferences": _object(pairs=_array(
            _object(question=text, correct_answer=text, wrong_answer=text), count)),
        "benchmark": _object(
            multiple_choice=_array(_object(
                question=text, correct_option=text,
                wrong_options={"type": "array", "items": text, "minItems": 3, "maxItems": 3},
                level={"enum": ["basic", "advanced"]}), count),
            true_false=_array(_object(
                true_statement=text, false_statement=text,
                level={"enum": ["basic", "advanced"]}), count)),
    }


INSTRUCTIONS = {
    "sft": "Write {count} questions a student could ask about the document below, each with a "
           "correct, self-contained answer taken from the document.",
    "preferences": "Write {count} questions about the document below. For each, write a correct "
                   "answer taken from the document, and a wrong answer: fluent and confident, "
                   "of the same length and style, but scientifically wrong (a changed number, "
                   "mechanism, material or cause).",
    "benchmark": "Write {count} multiple-choice questions about facts in the document below, "
                 "each with the correct option and three plausible wrong options, and {count} "
                 "pairs of statements: one true according to the document and one that changes "
                 "a fact so it is false. Mark each as basic (a stated fact) or advanced "
                 "(needs reasoning over the document).",
}
SYSTEM = "You write training data for a domain expert model. Answer with JSON only."


def document_requests(doc_id: str, text: str, tasks: list[str], count: int,
                      max_tokens: int, max_chars: int = 400) -> list[Request]:
    all_schemas = schemas(count, max_chars)
    requests = []
    for task in tasks:
        prompt = f"{INSTRUCTIONS[task].format(count=count)}\n\nDocument:\n{text}"
        requests.append(Request([{"role": "system", "content": SYSTEM},
                                 {"role": "user", "content": prompt}],
                                schema=all_schemas[task], max_tokens=max_tokens,
                                name=f"{doc_id}/{task}"))
    return requests


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


class Collector:
    """Rows of one output file: validated, de-duplicated, with what was dropped counted."""

    def __init__(self, name: str, kind: str):
        self.name, self.kind = name, kind
        self.rows: list[dict] = []
        self.seen: set[str] = set()
        self.dropped = {"invalid": 0, "duplicate": 0}

    def add(self, row: dict, key: str, where: str) -> bool:
        try:
            data.check_row(row, where, self.kind)
        except data.DataError as e:  # a BenchmarkError too
            logger.warning("dropped: %s", e)
            self.dropped["invalid"] += 1
            return False
        if _norm(key) in self.seen:
            self.dropped["duplicate"] += 1
            return False
        self.seen.add(_norm(key))
        self.rows.append(row)
        return True


def build_rows(doc_id: str, task: str, answer: dict, out: dict[str, Collector]) -> None:
    """Turn one teacher answer into rows of the output files."""
    where = f"teacher answer {doc_id}/{task}"
    if task == "sft":
        for item in answer["conversations"]:
            row = {"messages": [{"role": "user", "content": item["question"].strip()},
                                {"role": "assistant", "content": item["answer"].strip()}]}
            out["sft"].add(row, item["question"], where)
    elif task == "preferences":
        for item in answer["pairs"]:
            row = {"prompt": item["question"].strip(), "chosen": item["correct_answer"].strip(),
                   "rejected": item["wrong_answer"].strip()}
            out["preferences"].add(row, item["question"], where)
    else:
        bench = out["benchmark"]
        for item in answer["multiple_choice"]:
            options = [item["correct_option"].strip()] + [w.strip() for w in item["wrong_options"]]
            if len({_norm(o) for o in options}) < len(options):
                bench.dropped["invalid"] += 1  # two equal options: no single right letter
                continue
            letter = LETTERS[sum(r["type"] == "mc" for r in bench.rows) % len(LETTERS)]
            wrong = options[1:]
            # The wrong options keep the teacher's order around the placed correct one.
            placed = wrong[:LETTERS.index(letter)] + [options[0]] + wrong[LETTERS.index(letter):]
            lines = "\n".join(f"{l}. {o}" for l, o in zip(LETTERS, placed))
            row = {"id": f"{doc_id}-mc-{len(bench.rows) + 1:04d}", "type": "mc",
                   "category": item["level"], "corpus_only": True,
                   "question": f"{item['question'].strip()}\n{lines}", "answer": letter,
                   "source": doc_id}
            bench.add(row, item["question"], where)
        for item in answer["true_false"]:
            truth = sum(r["type"] == "tf" for r in bench.rows) % 2 == 0
            statement = (item["true_statement"] if truth else item["false_statement"]).strip()
            row = {"id": f"{doc_id}-tf-{len(bench.rows) + 1:04d}", "type": "tf",
                   "category": item["level"], "corpus_only": True,
                   "question": f"True or false: {statement}", "answer": str(truth),
                   "source": doc_id}
            bench.add(row, statement, where)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def distill(corpus: str | os.PathLike, out_dir: str | os.PathLike, teacher: Teacher, *,
            with_benchmark: bool = False, count: int = 3, max_doc_chars: int = 6000,
            max_tokens: int = 768, max_chars: int = 400, overwrite: bool = False) -> dict:
    """Write OUT_DIR (see the module docstring); returns the manifest."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty (pass --overwrite to replace it)")
    corpus_path = data.resolve_source(corpus, "cpt")
    rows = data.read_jsonl(corpus_path, "cpt")
    tasks = ["sft", "preferences"] + (["benchmark"] if with_benchmark else [])
    requests, docs = [], []
    for number, row in rows:
        doc_id = str(row.get("id") or f"line-{number}")
        docs.append(doc_id)
        requests.extend(document_requests(doc_id, row["text"][:max_doc_chars], tasks, count,
                                          max_tokens, max_chars))
    logger.info("%d documents, %d teacher requests to %s", len(docs), len(requests),
                teacher.config.base_url)
    answers = teacher.complete_many(requests)  # raises TeacherError naming the request

    out = {"sft": Collector("sft", "sft"), "preferences": Collector("preferences", "dpo"),
           "benchmark": Collector("benchmark", "benchmark")}
    for request, answer in zip(requests, answers):
        doc_id, task = request.name.rsplit("/", 1)
        try:
            build_rows(doc_id, task, answer, out)
        except (KeyError, TypeError, AttributeError) as e:  # JSON, but not of the schema
            raise TeacherError(f"request {request.name}: the answer does not follow the schema "
                               f"({type(e).__name__}: {e}): {json.dumps(answer)[:200]}") from None

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        manifest = {"corpus": str(corpus_path), "documents": len(docs),
                    "teacher": {"base_url": teacher.config.base_url,
                                "model": teacher.config.model},
                    "files": {}}
        for name, collector in out.items():
            if name == "benchmark" and not with_benchmark:
                continue
            if not collector.rows:
                raise TeacherError(f"no valid {name} rows from {len(docs)} documents "
                                   f"(dropped: {collector.dropped})")
            _write_jsonl(tmp / f"{name}.jsonl", collector.rows)
            manifest["files"][f"{name}.jsonl"] = {"rows": len(collector.rows),
                                                 "dropped": collector.dropped}
        # Read back with the loaders the stages and the benchmark use.
        data.load_rows(tmp, "sft")
        data.load_rows(tmp, "dpo")
        if with_benchmark:
            benchmark.load_benchmark(tmp)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.chmod(0o755)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dafast.distill",
        description="Write SFT conversations, preference pairs and (with --benchmark) benchmark "
                    "questions from a corpus with a teacher model behind an OpenAI-compatible "
                    "endpoint. Default endpoint: the local server (python -m dafast.serve).")
    parser.add_argument("corpus", help="corpus JSON Lines ({\"text\": ...} rows) or builtin:NAME")
    parser.add_argument("out_dir", help="output directory (replaced when complete)")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help="OpenAI-compatible base URL")
    parser.add_argument("--model", default=TeacherConfig.model, help="model name at the endpoint")
    parser.add_argument("--api-key-env", default=None,
                        help="environment variable holding the API key (e.g. OPENAI_API_KEY)")
    parser.add_argument("--cache-dir", default=None,
                        help="teacher answer cache (default: $DAFAST_CACHE/teacher)")
    parser.add_argument("--concurrency", type=int, default=TeacherConfig.concurrency)
    parser.add_argument("--retries", type=int, default=TeacherConfig.retries)
    parser.add_argument("--timeout", type=float, default=TeacherConfig.timeout,
                        help="seconds per attempt")
    parser.add_argument("--count", type=int, default=3, help="items per document and task")
    parser.add_argument("--benchmark", action="store_true", help="also write benchmark.jsonl")
    parser.add_argument("--max-doc-chars", type=int, default=6000,
                        help="documents are cut to this many characters in the prompt")
    parser.add_argument("--max-tokens", type=int, default=768, help="per teacher answer")
    parser.add_argument("--max-chars", type=int, default=400,
                        help="longest question, answer or option the teacher may write")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        teacher = Teacher(TeacherConfig(base_url=args.base_url, model=args.model,
                                        api_key_env=args.api_key_env, cache_dir=args.cache_dir,
                                        concurrency=args.concurrency, retries=args.retries,
                                        timeout=args.timeout))
        manifest = distill(args.corpus, args.out_dir, teacher, with_benchmark=args.benchmark,
                           count=args.count, max_doc_chars=args.max_doc_chars,
                           max_tokens=args.max_tokens, max_chars=args.max_chars,
                           overwrite=args.overwrite)
    except (TeacherError, data.DataError, benchmark.BenchmarkError, FileExistsError,
            ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(manifest["files"]))
    print(f"wrote {args.out_dir} (teacher answers: {teacher.calls} fetched, "
          f"{teacher.hits} from the cache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
