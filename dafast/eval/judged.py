"""Judged evaluations: the paper's conversations (Table 3) and its design-prompt experiment.

    items = load_items("builtin:biomat", "conversations")
    result = run_task("conversations", items, "cpt-sft", ChatModel(model_dir), teacher)
    write_files({"conversations": {"cpt-sft": result}}, report_dir / "judged")

Both tasks are one mechanism: every variant writes a text for each item with the paper's
sampling (top-k 50, top-p 0.9, repetition penalty 1.1, the temperature of the settings; item i
sampled with seed + i, so a rerun writes the same texts), a judge behind an OpenAI-compatible
endpoint (dafast.teacher: cached, retried, schema-checked) scores each text 1-10 on the task's
rubric as a JSON object, and each criterion's mean gets a 95% bootstrap interval over items
(dafast.eval.stats, the same resampling as the benchmark's accuracies).

- ``conversations``: the variant answers an open domain question ({"id", "question"} rows);
  scored on depth of reasoning, creativity, clarity and quantitative precision.
- ``design``: the variant combines biological-material concepts ({"id", "concepts"} rows) into
  an image-generation prompt; the prompts are saved for rendering elsewhere and scored on
  fidelity to the concepts, visual specificity, scientific plausibility and originality.

The rubric the judge reads is ``TASKS[task].criteria`` (also in the README). A judge of 135M
parameters (the local default) answers in the right form, not with expert scores: it checks the
plumbing, not the science.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from dafast.eval import stats

SCORE_RANGE = (1, 10)
JUDGE_SYSTEM = ("You are a strict expert judge of writing about biological materials and "
                "bio-inspired design. Answer with JSON only.")


class JudgedError(RuntimeError):
    """A text a variant could not write; the message names the variant, task and item."""


@dataclasses.dataclass(frozen=True)
class Task:
    title: str
    kind: str                  # the dafast.sources kind of its items
    criteria: dict[str, str]   # score name -> what the judge is told it measures
    what: str                  # what the variant writes, for the judge prompt and the files

    def prompt(self, item: Mapping) -> str:
        """What the variant is asked."""
        if self.kind == "conversations":
            return item["question"]
        concepts = "; ".join(item["concepts"])
        return ("Combine these biological-material concepts into one new bio-inspired material "
                f"design, and write an image-generation prompt that shows it: {concepts}. "
                "Write only the prompt, one paragraph describing what the image shows.")

    def judge_prompt(self, item: Mapping, text: str) -> str:
        rubric = "\n".join(f"- {name}: {meaning}" for name, meaning in self.criteria.items())
        task = (f"Question:\n{item['question']}" if self.kind == "conversations"
                else f"Concepts to combine:\n{'; '.join(item['concepts'])}")
        return (f"Score the {self.what} below from {SCORE_RANGE[0]} (poor) to {SCORE_RANGE[1]} "
                f"(excellent) on each criterion:\n{rubric}\n\n{task}\n\n{self.what.capitalize()}:"
                f"\n{text.strip() or '(empty)'}")

    def schema(self) -> dict:
        score = {"type": "integer", "minimum": SCORE_RANGE[0], "maximum": SCORE_RANGE[1]}
        return {"type": "object", "properties": {name: score for name in self.criteria},
                "required": list(self.criteria), "additionalProperties": False}


TASKS = {
    "conversations": Task("Judged conversations", "conversations", {
        "depth_of_reasoning": "explains mechanisms and causes step by step, beyond restating facts",
        "creativity": "makes original connections, examples or proposals",
        "clarity": "is well organised, precise in its terms and easy to follow",
        "quantitative_precision": "gives correct numbers with units and orders of magnitude "
                                  "where they matter"}, "answer"),
    "design": Task("Design prompts", "design", {
        "fidelity": "every given concept is present and they are combined, not just listed",
        "visual_specificity": "says concretely what the image shows: structure, scale, "
                              "materials, colours, viewpoint",
        "scientific_plausibility": "the design could work as the concepts' science says",
        "originality": "the combination is new and interesting rather than generic"}, "prompt"),
}


def load_items(source: str | os.PathLike, task: str, limit: int | None = None) -> list[dict]:
    """The task's items from ``source`` (a JSON Lines file, a dataset directory or
    builtin:NAME), validated (a bad row: DataError naming file, line and field), ids unique."""
    from dafast import sources
    from dafast.formats import DataError

    path, rows = sources.read(source, TASKS[task].kind)
    seen: dict[str, int] = {}
    items = []
    for number, row, model in rows:
        if model.id in seen:
            raise DataError(f"{path}:{number}: field 'id': {model.id!r} is also on line "
                            f"{seen[model.id]}")
        seen[model.id] = number
        items.append(model.model_dump())
    return items[:limit] if limit else items


def sampling(max_new_tokens: int = 128, temperature: float = 0.7) -> dict:
    """The paper's sampling for conversations with the given length and temperature."""
    from dafast.generation import CHAT_SAMPLING

    return {**CHAT_SAMPLING, "temperature": temperature, "max_tokens": max_new_tokens}


def generate(task: str, items: Sequence[Mapping], variant: str, chat_model, *,
             sampling: Mapping, seed: int = 0) -> list[dict]:
    """The variant's text for each item: {"id", "prompt", "text", "finish_reason", "tokens"}."""
    spec = TASKS[task]
    out = []
    for i, item in enumerate(items):
        prompt = spec.prompt(item)
        try:
            o = chat_model.generate([{"role": "user", "content": prompt}], seed=seed + i,
                                    **sampling)
        except Exception as e:  # a model that cannot chat, out of memory, ...
            raise JudgedError(f"{variant}/{task}/{item['id']}: generation failed: "
                              f"{type(e).__name__}: {e}") from None
        out.append({"id": item["id"], "prompt": prompt, "text": o.text.strip(),
                    "finish_reason": o.finish_reason, "tokens": o.completion_tokens})
    return out


def judge_requests(task: str, items: Sequence[Mapping], texts: Sequence[Mapping], variant: str,
                   max_tokens: int = 256) -> list:
    """One judge request per text, named VARIANT/TASK/ITEM (errors and the cache say which)."""
    from dafast.teacher import Request

    spec = TASKS[task]
    return [Request([{"role": "system", "content": JUDGE_SYSTEM},
                     {"role": "user", "content": spec.judge_prompt(item, text["text"])}],
                    schema=spec.schema(), temperature=0.0, max_tokens=max_tokens,
                    name=f"{variant}/{task}/{item['id']}")
            for item, text in zip(items, texts)]


def summarize(task: str, scored: Sequence[Mapping]) -> dict:
    """Per criterion and "overall" (an item's mean over the criteria): mean and 95% bootstrap
    interval over the items, and n."""
    criteria = list(TASKS[task].criteria)
    if not scored:
        raise ValueError(f"{task}: no scored items to summarize")
    table = np.array([[row["scores"][c] for c in criteria] for row in scored], dtype=float)
    columns = {c: table[:, k] for k, c in enumerate(criteria)}
    columns["overall"] = table.mean(axis=1)
    summary = {"n": len(scored)}
    for name, values in columns.items():
        # accuracy_interval is the percentile bootstrap of a mean; a score's mean is one too
        lo, hi = stats.accuracy_interval(values)
        summary[name] = {"mean": float(values.mean()), "lo": lo, "hi": hi}
    return summary


def run_task(task: str, items: Sequence[Mapping], variant: str, chat_model, teacher, *,
             max_new_tokens: int = 128, temperature: float = 0.7, seed: int = 0,
             judge_max_tokens: int = 256) -> dict:
    """Generate, judge and summarize one task for one variant; returns the result (what
    :func:`write_result` stores). TeacherError (naming the request) if the judge fails."""
    if task not in TASKS:
        raise ValueError(f"unknown judged task {task!r}; one of {', '.join(TASKS)}")
    texts = generate(task, items, variant, chat_model,
                     sampling=sampling(max_new_tokens, temperature), seed=seed)
    scores = teacher.complete_many(judge_requests(task, items, texts, variant, judge_max_tokens))
    rows = [{**text, **({"concepts": item["concepts"]} if "concepts" in item else
                        {"question": item["question"]}), "scores": score}
            for item, text, score in zip(items, texts, scores)]
    return {"task": task, "variant": variant,
            "judge": {"base_url": teacher.config.base_url, "model": teacher.config.model},
            "settings": {"max_new_tokens": max_new_tokens, "temperature": temperature,
                         "seed": seed, **{k: v for k, v in sampling().items()
                                          if k not in ("temperature", "max_tokens")}},
            "rubric": TASKS[task].criteria, "items": rows, "summary": summarize(task, rows)}


# --- files -------------------------------------------------------------------------------------

def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_result(path: str | os.PathLike, result: Mapping) -> None:
    """Store a result whole or not at all (a temporary file renamed into place)."""
    _atomic_write(Path(path), json.dumps(result, indent=1, ensure_ascii=False) + "\n")


def read_result(path: str | os.PathLike) -> dict | None:
    """A stored result, or None if there is none (or it is damaged: it is then redone)."""
    try:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and "summary" in result else None


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", "<br>")


def _mean(entry: Mapping) -> str:
    return f"{entry['mean']:.2f} [{entry['lo']:.2f}, {entry['hi']:.2f}]"


def summary_table(task: str, results: Mapping[str, Mapping]) -> str:
    """Markdown: one line per variant, each criterion's mean with its 95% interval."""
    names = list(TASKS[task].criteria) + ["overall"]
    lines = ["| variant | n | " + " | ".join(n.replace("_", " ") for n in names) + " |",
             "|" + "---|" * (len(names) + 2)]
    for variant, result in results.items():
        s = result["summary"]
        lines.append(f"| {_cell(variant)} | {s['n']} | "
                     + " | ".join(_mean(s[n]) for n in names) + " |")
    return "\n".join(lines)


def _judges(results: Mapping[str, Mapping]) -> str:
    judges = sorted({f"{r['judge']['model']} at {r['judge']['base_url']}" for r in results.values()})
    return ", ".join(f"`{j}`" for j in judges)


def _task_markdown(task: str, results: Mapping[str, Mapping]) -> str:
    """Every text of every variant with its scores, for people to read."""
    spec = TASKS[task]
    first = next(iter(results.values()))
    parts = [f"# {spec.title}", "",
             f"Judge: {_judges(results)}. Sampling: {json.dumps(first['settings'])}.", "",
             "Rubric (each 1-10):", "", *[f"- **{n}**: {m}" for n, m in spec.criteria.items()],
             "", "Means with 95% bootstrap intervals over items:", "",
             summary_table(task, results), ""]
    for variant, result in results.items():
        parts += [f"## {variant}", ""]
        for row in result["items"]:
            asked = row.get("question") or "; ".join(row.get("concepts", []))
            scores = ", ".join(f"{n} {row['scores'][n]}" for n in spec.criteria)
            cut = " (cut off at max_new_tokens)" if row.get("finish_reason") == "length" else ""
            parts += [f"### {row['id']}: {asked}", "", f"*Scores: {scores}*{cut}", "",
                      *[f"> {line}" if line else ">" for line in
                        (row["text"] or "(empty)").splitlines()], ""]
    return "\n".join(parts)


def write_files(judged: Mapping[str, Mapping[str, Mapping]], out_dir: str | os.PathLike) -> list[str]:
    """Into ``out_dir``: per task TASK.md (every text with its scores) and TASK.jsonl (one row a
    text: variant, id, what was asked, the text, its scores), design_prompts.jsonl (the design
    prompts alone, for rendering elsewhere) and judged.png. Returns the file names."""
    from dafast.eval.plots import plot_judged

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for task, results in judged.items():
        if not results:
            continue
        (out / f"{task}.md").write_text(_task_markdown(task, results), encoding="utf-8")
        with open(out / f"{task}.jsonl", "w", encoding="utf-8") as f:
            for variant, result in results.items():
                for row in result["items"]:
                    f.write(json.dumps({"variant": variant, **row}, ensure_ascii=False) + "\n")
        written += [f"{task}.md", f"{task}.jsonl"]
        if task == "design":
            with open(out / "design_prompts.jsonl", "w", encoding="utf-8") as f:
                for variant, result in results.items():
                    for row in result["items"]:
                        f.write(json.dumps({"variant": variant, "id": row["id"],
                                            "concepts": row["concepts"], "prompt": row["text"]},
                                           ensure_ascii=False) + "\n")
            written.append("design_prompts.jsonl")
    if written:
        plot_judged({t: r for t, r in judged.items() if r},
                    {t: list(TASKS[t].criteria) + ["overall"] for t in judged}, out / "judged.png")
        written.append("judged.png")
    return written


def report_section(judged: Mapping[str, Mapping[str, Mapping]], folder: str = "judged") -> list[str]:
    """The report's Markdown lines for the judged tasks (files written by write_files into
    ``folder`` next to report.md)."""
    parts = []
    for task, results in judged.items():
        if not results:
            continue
        spec = TASKS[task]
        parts += [f"## {spec.title}", "",
                  f"Each variant's {spec.what}s scored 1-10 by {_judges(results)}: means with 95% "
                  "bootstrap intervals over items. Rubric: "
                  + "; ".join(f"*{n.replace('_', ' ')}*: {m}" for n, m in spec.criteria.items())
                  + f". Every {spec.what} with its scores: [{folder}/{task}.md]({folder}/{task}.md)"
                  + (f"; the prompts for rendering: [{folder}/design_prompts.jsonl]"
                     f"({folder}/design_prompts.jsonl)" if task == "design" else "") + ".", "",
                  summary_table(task, results), ""]
    if parts:
        from dafast.teacher import TeacherConfig

        if any(r["judge"]["model"] == TeacherConfig.model for t in judged.values()
               for r in t.values()):
            parts += ["The judge is the local default, a model of 135M parameters: it checks the "
                      "plumbing, not the science; point `eval.judged.judge` at a strong endpoint "
                      "for scores that mean something.", ""]
        parts += [f"![judged scores]({folder}/judged.png)", ""]
    return parts


def evaluate_variant(model_dir: str | os.PathLike, variant: str, settings, path_of) -> dict:
    """Every task ``settings`` (a recipe's eval.judged) turns on, for one variant: task ->
    result. ``path_of(task)`` is where the task's result is stored; a stored result is read, not
    redone. The items are read (and checked) before the model is loaded, the model once for all
    tasks; each result is stored whole once it is complete."""
    from dafast.teacher import Teacher, TeacherConfig

    results, todo = {}, []
    for task in TASKS:
        source = getattr(settings, task)
        if source is None:
            continue
        stored = read_result(path_of(task))
        if stored is not None:
            results[task] = stored
        else:
            todo.append((task, load_items(source, task, settings.limit)))
    if not todo:
        return results
    from dafast.generation import ChatModel

    j = settings.judge
    teacher = Teacher(TeacherConfig(base_url=j.base_url, model=j.model, api_key_env=j.api_key_env,
                                    cache_dir=j.cache_dir, concurrency=j.concurrency,
                                    retries=j.retries, timeout=j.timeout))
    try:
        chat_model = ChatModel(model_dir)
    except (OSError, ValueError) as e:
        raise JudgedError(f"{variant}: cannot chat with {model_dir}: {e}") from None
    for task, items in todo:
        result = run_task(task, items, variant, chat_model, teacher,
                          max_new_tokens=settings.max_new_tokens,
                          temperature=settings.temperature, seed=settings.seed,
                          judge_max_tokens=j.max_tokens)
        write_result(path_of(task), result)
        results[task] = result
    return results
