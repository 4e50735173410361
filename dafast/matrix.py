"""The strategy matrix of the study as a DAG: starting models, stage chains, SLERP merges, evals.

    plan = build_plan(recipe)      # nodes in dependency order
    outcome = run(recipe)          # trains, merges, evaluates, writes the report

Nodes are named as the paper names its rows: `instruct` (and `base`) are the untouched models;
`cpt-sft-dpo` is the instruct model after CPT, SFT and DPO (`base-cpt-sft-dpo` from the base
model); `cpt-sft-dpo-slerp` is that model SLERP-merged with the instruct model. Pipelines that
share a prefix share its nodes (CPT-SFT feeds both DPO and ORPO), so each is trained once.

Every node has a key: a hash of everything that determines its output (its own settings and its
parents' keys), and its directory is named by it, so a finished node is reused by any rerun or
any other recipe that asks for the same thing, and a changed setting retrains only what depends
on it. An interrupted stage resumes from its last checkpoint. A node that fails is reported and
fails only its descendants; everything else still runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from dafast.models import resolve_model
from dafast.recipe import Recipe

log = logging.getLogger("dafast.matrix")
MERGE_DONE = "merge.json"


@dataclass
class Node:
    name: str
    kind: str                      # "model", a stage ("cpt", "sft", "dpo", "orpo"), or "merge"
    parents: list[str]
    key: str
    evaluate: bool = False         # a variant of the results table
    source: Path | None = None     # kind "model": the model directory
    status: str = "pending"        # then "done", "failed" or "skipped"
    error: str | None = None
    seconds: float = 0.0
    model_dir: Path | None = None
    summary: dict | None = field(default=None, repr=False)
    records: list | None = field(default=None, repr=False)  # the eval's per-question records
    recipe: Recipe | None = field(default=None, repr=False)  # a stage: its (swept) settings
    merge_t: object = None         # a merge: its t-schedule (None: the paper's)


def _hash(*parts) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _data_identity(source: str, kind: str) -> str:
    """A data or benchmark file by its contents, so an edited file is not mistaken for a done
    one; a missing file keeps its name (the stage then fails, saying so)."""
    from dafast.data import DataError, resolve_source

    try:
        return _file_digest(resolve_source(source, kind))
    except DataError:
        return source


def _model_identity(path: Path) -> dict:
    """A starting model: its config, and its weight files by name and size (hashing gigabytes
    of weights on every plan would cost more than it protects)."""
    config = path / "config.json"
    return {"config": _file_digest(config) if config.is_file() else None,
            "weights": sorted((p.name, p.stat().st_size) for p in path.glob("*.safetensors"))}


def _training_identity(recipe: Recipe, kind: str) -> dict:
    """What a stage's result depends on (not: kernels, logging, checkpoint frequency)."""
    settings = recipe.stage(kind)
    return {"settings": settings.model_dump(exclude={"data"}),  # the data by contents instead
            "data": _data_identity(settings.data, kind),
            "finetune": recipe.finetune,
            "lora": recipe.lora.model_dump() if recipe.finetune == "lora" else None,
            "seed": recipe.seed, "dtype": recipe.training_dtype()}


def _cpt_variants(recipe: Recipe) -> list[tuple[str, Recipe]]:
    """The recipe's CPT, named "cpt", and one variant per swept epoch count, named "cpt_eN"."""
    variants = [("cpt", recipe)]
    for epochs in dict.fromkeys(recipe.sweep.cpt_epochs):
        if epochs != recipe.cpt.epochs:
            cpt = recipe.cpt.model_copy(update={"epochs": epochs})
            variants.append((f"cpt_e{epochs:g}", recipe.model_copy(update={"cpt": cpt})))
    return variants


def _merge_schedules(recipe: Recipe) -> dict[str, object]:
    """Merge-name suffix -> t: the recipe's t ("") and the named alternatives."""
    return {"": recipe.merge.t, **{f"_{name}": t for name, t in recipe.merge.alternatives.items()}}


def build_plan(recipe: Recipe) -> dict[str, Node]:
    """All nodes, parents before children."""
    nodes: dict[str, Node] = {}
    starts = {"instruct": recipe.model}
    if recipe.base_model:
        starts["base"] = recipe.base_model
    for start, model in starts.items():
        source = resolve_model(model)
        nodes[start] = Node(start, "model", [], _hash("model", _model_identity(source)),
                            evaluate=True, source=source)
    for start in starts:
        for cpt_name, variant in _cpt_variants(recipe):
            for pipeline in recipe.pipelines:
                parent = start
                stages = pipeline.split("-")
                names = [cpt_name if kind == "cpt" else kind for kind in stages]
                for i, kind in enumerate(stages):
                    name = "-".join(names[:i + 1])
                    name = name if start == "instruct" else f"{start}-{name}"
                    if name not in nodes:
                        key = _hash(kind, _training_identity(variant, kind), nodes[parent].key)
                        nodes[name] = Node(name, kind, [parent], key, recipe=variant)
                    parent = name
                nodes[parent].evaluate = True
    if recipe.merge is not None:
        for trained in [n for n in nodes.values() if n.evaluate and n.kind != "model"]:
            for suffix, t in _merge_schedules(recipe).items():
                name = f"{trained.name}-slerp{suffix}"
                settings = {"t": t, "dtype": recipe.merge.dtype}
                key = _hash("slerp", settings, trained.key, nodes["instruct"].key)
                nodes[name] = Node(name, "merge", [trained.name, "instruct"], key, evaluate=True,
                                   merge_t=t)
    return nodes


def _run_node(node: Node, nodes: dict[str, Node], recipe: Recipe, root: Path) -> Path:
    if node.kind == "model":
        return node.source
    if node.kind == "merge":
        trained, instruct = (nodes[p].model_dir for p in node.parents)
        out = root / "merges" / f"{node.name}-{node.key}"
        if not (out / MERGE_DONE).is_file():
            from dafast.merge import slerp_merge

            if out.exists():  # merges are renamed into place: no marker means a stale result
                shutil.rmtree(out)
            stats = slerp_merge(instruct, trained, out, t=node.merge_t, dtype=recipe.merge.dtype)
            (out / MERGE_DONE).write_text(json.dumps(stats, default=str))
        return out
    from dafast.stages import run_stage

    parent = nodes[node.parents[0]]
    return run_stage(node.kind, node.recipe, parent.model_dir, root / "stages" / f"{node.name}-{node.key}")


def _evaluate(node: Node, recipe: Recipe, root: Path) -> dict:
    """The node's benchmark summary, cached per node key and eval settings."""
    from dafast.eval.runner import default_device, evaluate_dir

    settings = recipe.eval
    # The device decides the eval dtype too (bf16 on a GPU, fp32 on the CPU).
    key = _hash(node.key, settings.model_dump(), _data_identity(settings.bench, "eval"),
                default_device())
    path = root / "eval" / f"{node.name}-{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = evaluate_dir(node.model_dir, settings.bench, batch_size=settings.batch_size,
                          loglik=settings.loglik, limit=settings.limit)
    payload = {"summary": result.summary, "records": [r.__dict__ for r in result.records]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
    return payload


def run(recipe: Recipe, *, only_plan: bool = False) -> dict[str, Node]:
    """Run the whole matrix; returns the nodes with their status. Distributed (accelerate
    launch, torchrun): every process trains, then the others leave and the main process merges,
    evaluates and reports (so no process waits at a barrier through the evaluation)."""
    main_process = is_main_process()
    root = Path(recipe.output_dir)
    nodes = build_plan(recipe)
    if only_plan:
        return nodes
    for node in nodes.values():
        failed = [p for p in node.parents if nodes[p].status != "done"]
        if failed:
            node.status, node.error = "skipped", f"{failed[0]} did not finish"
            continue
        if node.kind == "merge" and not main_process:
            node.status = "done"
            continue
        started = time.time()
        try:
            log.info("node %s (%s)", node.name, node.kind)
            node.model_dir = _run_node(node, nodes, recipe, root)
            node.status = "done"
        except Exception as e:  # one failing node fails only its descendants
            node.status, node.error = "failed", f"{type(e).__name__}: {e}"
            log.error("node %s failed:\n%s", node.name, traceback.format_exc())
        node.seconds = time.time() - started
    if main_process and recipe.eval is not None:
        for node in nodes.values():
            if not node.evaluate or node.status != "done":
                continue
            # A merge is read against its parents' scores: one whose parent failed evaluation
            # is skipped like any other descendant of a failure.
            unevaluated = [p for p in node.parents if nodes[p].status != "done"]
            if node.kind == "merge" and unevaluated:
                node.status, node.error = "skipped", f"{unevaluated[0]} was not evaluated"
            else:
                started = time.time()
                try:
                    payload = _evaluate(node, recipe, root)
                    node.summary, node.records = payload["summary"], payload.get("records")
                except Exception as e:
                    node.status, node.error = "failed", f"evaluation: {type(e).__name__}: {e}"
                    log.error("evaluating %s failed:\n%s", node.name, traceback.format_exc())
                node.seconds += time.time() - started
        write_report(recipe, nodes, root)
    return nodes


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch, or a plain run. (accelerate's PartialState is
    not used here: made before the trainer sets up torch.distributed on CPU, it sees one process.)"""
    return int(os.environ.get("RANK", "0")) == 0


def loss_curves(nodes: dict[str, Node]) -> dict[str, list[tuple[int, float]]]:
    curves = {}
    for node in nodes.values():
        metrics = node.model_dir.parent / "metrics.jsonl" if node.model_dir else None
        if node.kind in ("cpt", "sft", "dpo", "orpo") and metrics and metrics.is_file():
            records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
            curves[node.name] = [(r["step"], r["loss"]) for r in records if "loss" in r]
    return curves


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def write_report(recipe: Recipe, nodes: dict[str, Node], root: Path) -> Path:
    from dafast.eval.report import write_report as write

    # Records give the report its intervals and paired tests; the headline column is the
    # recipe's (getattr: recipes from before the field still report, on the cloze column).
    rows = [{"variant": n.name, "parents": n.parents if n.kind == "merge" else [],
             "summary": n.summary, "records": n.records}
            for n in nodes.values() if n.evaluate and n.summary]
    return write(root / "report", rows, loss_curves=loss_curves(nodes), config=recipe.model_dump(),
                 timings={n.name: n.seconds for n in nodes.values()}, machine=machine(),
                 instruct="instruct", primary=getattr(recipe.eval, "primary", "cloze"),
                 failures={n.name: n.error for n in nodes.values() if n.error})
