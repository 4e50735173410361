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

A recipe with `models:` runs this matrix for each model: nodes `small/cpt-sft`, ..., keyed as
each model's one-model recipe keys them, in directories of their own (stages/small/...: models
of one shape would otherwise share keys, which read config and weight sizes, not weights). Its
report adds the scaling view (dafast.eval.scaling); each model's own report goes to
OUTPUT_DIR/reports/MODEL.
"""

from __future__ import annotations

import contextlib
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
from dafast.runlock import run_lock

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
    action: str = ""               # what a run does with it: see plan_actions
    times: dict = field(default_factory=dict)  # "training"/"merge"/"evaluation" -> seconds
    model_dir: Path | None = None
    summary: dict | None = field(default=None, repr=False)
    records: list | None = field(default=None, repr=False)  # the eval's per-question records
    recipe: Recipe | None = field(default=None, repr=False)  # a stage: its (swept) settings
    merge_t: object = None         # a merge: its t-schedule (None: the paper's)
    stage: object = field(default=None, repr=False)  # a trained stage: its StageResult
    judged: dict = field(default_factory=dict, repr=False)  # judged task -> its result
    model: str = ""                # a run of several models (`models:`): this node's model


def _hash(*parts) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _data_identity(source: str, kind: str) -> str:
    """A data or benchmark source by the lines its reader reads (resolved as the stage or the
    evaluation resolves it), so an edited file is not mistaken for a done one; a missing file
    keeps its name (the stage then fails, saying so)."""
    from dafast import sources

    try:
        return sources.digest(source, kind)[:16]
    except sources.MissingSource:
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
    finetune = recipe.stage_finetune(kind)
    mixed = getattr(settings, "mix_sft", 0) > 0  # CPT with conversations mixed in
    return {"settings": settings.model_dump(exclude={"data", "finetune", "sft_data"}),
            "data": _data_identity(settings.data, kind),  # the data by contents
            **({"sft_data": _data_identity(settings.sft_data, "sft")} if mixed else {}),
            "finetune": finetune,
            "lora": recipe.lora.model_dump() if finetune == "lora" else None,
            "seed": recipe.seed, "dtype": recipe.training_dtype(),
            **({"autocast": "bfloat16"} if recipe.autocast_bf16(kind) else {}),
            # only when it differs, so results saved in the training dtype keep their keys
            **({"saved_dtype": recipe.saved_dtype()}
               if recipe.saved_dtype() != recipe.training_dtype() else {})}


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
    """All nodes, parents before children. Several models (`models:`): each model's own plan,
    its nodes named MODEL/NAME; a node's key is the one its model's one-model recipe gives it,
    so its results are the same whichever models run beside it."""
    if recipe.models is None:
        return _model_plan(recipe)
    nodes: dict[str, Node] = {}
    for model, model_recipe in recipe.model_recipes().items():
        for node in _model_plan(model_recipe).values():
            node.name, node.model = f"{model}/{node.name}", model
            node.parents = [f"{model}/{p}" for p in node.parents]
            nodes[node.name] = node
    return nodes


def _model_plan(recipe: Recipe) -> dict[str, Node]:
    nodes: dict[str, Node] = {}
    starts = {"instruct": recipe.model or "default"}
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


def node_dir(node: Node, root: Path) -> Path:
    """A stage's or merge's directory, named by the node's key."""
    return root / ("merges" if node.kind == "merge" else "stages") / f"{node.name}-{node.key}"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def plan_actions(nodes: dict[str, Node], recipe: Recipe, root: Path) -> None:
    """Set each node's `action`: "cached" (its finished result is on disk), "resume from
    checkpoint-N", "train", "merge", or "model" (a starting model); evaluated nodes add
    ", eval cached" or ", evaluate"."""
    from dafast.stages.checkpoints import last_checkpoint
    from dafast.stages.output import is_complete

    for node in nodes.values():
        if node.kind == "model":
            node.action = "model"
        elif node.kind == "merge":
            node.action = "cached" if (node_dir(node, root) / MERGE_DONE).is_file() else "merge"
        elif is_complete(node_dir(node, root)):
            node.action = "cached"
        else:
            checkpoint = last_checkpoint(node_dir(node, root))
            node.action = f"resume from {Path(checkpoint).name}" if checkpoint else "train"
        if node.evaluate and recipe.eval is not None:
            node.action += ", eval cached" if _eval_path(node, recipe, root).is_file() \
                else ", evaluate"


def _run_node(node: Node, nodes: dict[str, Node], recipe: Recipe, root: Path) -> Path:
    if node.kind == "model":
        return node.source
    out = node_dir(node, root)
    if node.kind == "merge":
        trained, instruct = (nodes[p].model_dir for p in node.parents)
        if not (out / MERGE_DONE).is_file():
            from dafast.merge import slerp_merge

            if out.exists():  # merges are renamed into place: no marker means a stale result
                shutil.rmtree(out)
            started = time.time()
            stats = slerp_merge(instruct, trained, out, t=node.merge_t, dtype=recipe.merge.dtype)
            stats["seconds"] = time.time() - started  # kept, so a rerun's report has it
            (out / MERGE_DONE).write_text(json.dumps(stats, default=str))
        _record_time(node, "merge", _read_json(out / MERGE_DONE))
        return out
    from dafast.stages import run_stage

    parent = nodes[node.parents[0]]
    node.stage = run_stage(node.kind, node.recipe, parent.model_dir, out)
    result = node.stage.summary
    _record_time(node, "training", result)
    if not node.action.startswith("cached"):
        loss = f"loss {result.get('first_loss') or float('nan'):.4g} -> " \
               f"{result.get('final_loss') or float('nan'):.4g}"
        log.info("%s (%s): trained %s steps, %s tokens, %s, %.1f s", node.name, node.kind,
                 result.get("steps"), result.get("tokens"), loss, result.get("seconds", 0.0))
    return node.stage.model_dir


def _record_time(node: Node, what: str, record: dict) -> None:
    """The seconds a result recorded when it was made (results older than that record have no
    time, and get no row rather than a false one)."""
    if "seconds" in record:
        node.times[what] = record["seconds"]


def _link(root: Path, node: Node) -> None:
    """OUTPUT_DIR/models/<node name> -> the node's model: a stable name for the latest result
    (the directories themselves are named by key). Relative inside OUTPUT_DIR, so a copied run
    keeps working; absolute for a starting model elsewhere."""
    link, model = (root / "models").absolute() / node.name, Path(node.model_dir).absolute()
    links = link.parent  # models/, or models/MODEL/ for a node named MODEL/NAME
    links.mkdir(parents=True, exist_ok=True)
    inside = model.is_relative_to(root.absolute())
    target = os.path.relpath(model, links) if inside else str(model)
    if link.is_symlink() and os.readlink(link) == target:
        return
    if link.exists() and not link.is_symlink():
        log.warning("%s is not a link dafast made; left as it is", link)
        return
    tmp = links / f".{link.name}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target, target_is_directory=True)
    tmp.replace(link)


def _eval_path(node: Node, recipe: Recipe, root: Path) -> Path:
    """The cached summary's path: by node key and eval settings."""
    from dafast.eval.runner import default_device, eval_dtype

    settings = recipe.eval
    # The headline column only changes how the report reads the answers; "auto" is keyed by the
    # device and the dtype it resolves to; the benchmark by the lines evaluated, not its name.
    device = default_device()
    key = _hash(node.key, settings.model_dump(exclude={"primary", "dtype", "bench", "judged"}),
                _data_identity(settings.bench, "benchmark"),
                device, str(eval_dtype(device, settings.dtype)))
    return root / "eval" / f"{node.name}-{key}.json"


def _evaluate(node: Node, recipe: Recipe, root: Path) -> dict:
    """The node's benchmark summary, cached per node key and eval settings."""
    from dafast.eval.runner import default_device, eval_dtype, evaluate_dir

    settings = recipe.eval
    path = _eval_path(node, recipe, root)
    if path.is_file():
        return json.loads(path.read_text())
    started = time.time()
    device = default_device()
    result = evaluate_dir(node.model_dir, settings.bench, device=device,
                          dtype=eval_dtype(device, settings.dtype), batch_size=settings.batch_size,
                          loglik=settings.loglik, cloze=settings.cloze, limit=settings.limit)
    payload = {"summary": result.summary, "records": [r.__dict__ for r in result.records],
               "seconds": time.time() - started}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
    return payload


def _judged_path(node: Node, recipe: Recipe, root: Path, task: str) -> Path:
    """A judged task's cached result: by node key, the items by contents, the sampling and the
    judge's model (not its URL or key: the teacher's cache is keyed the same way)."""
    from dafast.eval.judged import TASKS

    settings = recipe.eval.judged
    key = _hash(node.key, task, _data_identity(getattr(settings, task), TASKS[task].kind),
                settings.model_dump(include={"max_new_tokens", "temperature", "seed", "limit"}),
                settings.judge.model_dump(include={"model", "max_tokens"}))
    return root / "judged" / f"{node.name}-{task}-{key}.json"


def _judge(node: Node, recipe: Recipe, root: Path) -> None:
    """The node's judged tasks (after its benchmark eval), each cached like the eval. A failure
    is the node's error (listed in the report); its benchmark result stands."""
    from dafast.eval.judged import evaluate_variant

    try:
        node.judged = evaluate_variant(node.model_dir, node.name, recipe.eval.judged,
                                       lambda task: _judged_path(node, recipe, root, task))
        log.info("%s: judged %s", node.name, ", ".join(
            f"{t} {r['summary']['overall']['mean']:.2f}" for t, r in node.judged.items()))
    except Exception as e:
        node.error = f"judged: {type(e).__name__}: {e}"
        log.error("judging %s failed:\n%s", node.name, traceback.format_exc())


def _accuracy_line(summary: dict) -> str:
    parts = [f"{column} {summary[column]['overall']:.3f}" for column in ("generation", "loglik")
             if summary.get(column) and summary[column].get("overall") is not None]
    questions = (summary.get("n") or {}).get("overall")
    return ", ".join(parts) + (f" on {questions} questions" if questions else "")


def run(recipe: Recipe, *, only_plan: bool = False) -> dict[str, Node]:
    """Run the whole matrix; returns the nodes with their status. Distributed (accelerate
    launch, torchrun): every process trains, then the others leave and the main process merges,
    evaluates and reports (so no process waits at a barrier through the evaluation)."""
    main_process = is_main_process()
    root = Path(recipe.output_dir)
    nodes = build_plan(recipe)
    plan_actions(nodes, recipe, root)
    if only_plan:
        return nodes
    # One run per output directory (the main process holds the lock; the other processes of a
    # distributed run are its own). RunLocked names the holder.
    with run_lock(root) if main_process else contextlib.nullcontext():
        _run_nodes(recipe, nodes, root, main_process)
    return nodes


def _run_nodes(recipe: Recipe, nodes: dict[str, Node], root: Path, main_process: bool) -> None:
    for node in nodes.values():
        failed = [p for p in node.parents if nodes[p].status != "done"]
        if failed:
            node.status, node.error = "skipped", f"{failed[0]} did not finish"
            continue
        if node.kind == "merge" and not main_process:
            node.status = "done"
            continue
        try:
            if node.kind != "model":
                log.info("%s (%s): %s", node.name, node.kind, node.action.split(",")[0])
            node.model_dir = _run_node(node, nodes, recipe, root)
            node.status = "done"
            if main_process:
                _link(root, node)
            if node.kind == "merge" and not node.action.startswith("cached"):
                log.info("%s (merge): merged in %.1f s", node.name, node.times.get("merge", 0.0))
        except Exception as e:  # one failing node fails only its descendants
            node.status, node.error = "failed", f"{type(e).__name__}: {e}"
            log.error("node %s failed:\n%s", node.name, traceback.format_exc())
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
                try:
                    payload = _evaluate(node, recipe, root)
                    node.summary, node.records = payload["summary"], payload.get("records")
                    _record_time(node, "evaluation", payload)
                    cached = "(cached) " if node.action.endswith("eval cached") else ""
                    log.info("%s: evaluated %s%s, %.1f s", node.name, cached,
                             _accuracy_line(node.summary), payload.get("seconds", 0.0))
                except Exception as e:
                    node.status, node.error = "failed", f"evaluation: {type(e).__name__}: {e}"
                    log.error("evaluating %s failed:\n%s", node.name, traceback.format_exc())
                if node.status == "done" and recipe.eval.judged is not None:
                    _judge(node, recipe, root)
        write_report(recipe, nodes, root)


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch, or a plain run. (accelerate's PartialState is
    not used here: made before the trainer sets up torch.distributed on CPU, it sees one process.)"""
    return int(os.environ.get("RANK", "0")) == 0


def loss_curves(nodes: dict[str, Node]) -> dict[str, list[tuple[int, float]]]:
    curves = {node.name: node.stage.loss_curve() for node in nodes.values()
              if node.stage is not None}
    return {name: curve for name, curve in curves.items() if curve}


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def timings(nodes: dict[str, Node]) -> dict[str, float]:
    """"NODE: what" -> seconds, as recorded when the work was done (a rerun that reuses a node
    reports the time it took then)."""
    return {f"{n.name}: {what}": seconds for n in nodes.values() for what, seconds in n.times.items()}


def write_report(recipe: Recipe, nodes: dict[str, Node], root: Path) -> Path:
    """OUTPUT_DIR/report. Several models: that report shows every node and leads with the
    scaling view, and each model's own report, as its one-model run would write it, goes to
    OUTPUT_DIR/reports/MODEL."""
    if recipe.models is not None:
        return _write_scaling_report(recipe, nodes, root)
    return _write_report(recipe, nodes, root / "report")


def _report_rows(nodes: dict[str, Node]) -> list[dict]:
    # Records give the report its intervals and paired tests.
    return [{"variant": n.name, "parents": n.parents if n.kind == "merge" else [],
             "summary": n.summary, "records": n.records}
            for n in nodes.values() if n.evaluate and n.summary]


def _write_report(recipe: Recipe, nodes: dict[str, Node], out: Path, **extra) -> Path:
    from dafast.eval.report import write_report as write

    # The headline column is the recipe's (getattr: recipes from before the field still report,
    # on the cloze column).
    return write(out, _report_rows(nodes), loss_curves=loss_curves(nodes),
                 config=recipe.model_dump(), timings=timings(nodes), machine=machine(),
                 instruct="instruct", primary=recipe.eval.primary,
                 failures={n.name: n.error for n in nodes.values() if n.error},
                 judged={task: {n.name: n.judged[task] for n in nodes.values() if task in n.judged}
                         for task in dict.fromkeys(t for n in nodes.values() for t in n.judged)},
                 **extra)


def _write_scaling_report(recipe: Recipe, nodes: dict[str, Node], root: Path) -> Path:
    from dataclasses import replace

    from dafast.eval.scaling import parameter_count, scaling_view

    models = []
    for model, model_recipe in recipe.model_recipes().items():
        prefix, own = f"{model}/", {}
        for node in nodes.values():
            if node.model == model:  # named as its one-model run names it
                node = replace(node, name=node.name.removeprefix(prefix),
                               parents=[p.removeprefix(prefix) for p in node.parents])
                own[node.name] = node
        _write_report(model_recipe, own, root / "reports" / model)
        try:
            parameters = parameter_count(own["instruct"].source)
        except (OSError, ValueError) as e:  # the model is then listed without a point
            log.error("%s: cannot count its parameters: %s", model, e)
            parameters = None
        models.append({"name": model, "parameters": parameters, "rows": _report_rows(own),
                       "report": f"../reports/{model}/report.md"})
    view = scaling_view(models, primary=recipe.eval.primary)
    return _write_report(recipe, nodes, root / "report", scaling=view)
