"""The streaming merge: plan every output tensor (and refuse bad input) before writing
anything, then merge tensor by tensor, chunk by chunk, into shards written in the background.

Memory stays bounded by a few chunks (`chunk_elements`) whatever the model size: inputs are
memory-mapped views whose pages are released after use, SLERP of a tensor larger than one chunk
takes two passes (slerp_sums over the chunks, then the write with the whole tensor's sums), and
output chunks go through a small pool of buffers that the writer thread hands back.
"""

from __future__ import annotations

import logging
import queue
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from dafast.merge.config import MergeConfig, lookup
from dafast.merge.safetensors_io import MappedFiles, OutputTensor, ShardWriter, iter_rows, plan_shards
from dafast.merge.sources import Checkpoint, LoraAdapter, open_model, row_layout
from dafast.merge.staging import Staging
from dafast.ops import slerp, slerp_sums

LAYER = re.compile(r"\.layers\.(\d+)\.")
DEFAULT_SHARD_BYTES = 5 * 10**9
DEFAULT_CHUNK_ELEMENTS = 1 << 24  # 32 MB of bf16: a 2048 x 8192 weight in one pass
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
                   "added_tokens.json")
Model = Checkpoint | LoraAdapter
log = logging.getLogger("dafast.merge")


@dataclass
class TensorTask:
    out: OutputTensor
    method: str  # "slerp", "linear" or "copy"
    inputs: list[tuple[Model, str]]  # (model, tensor name); for slerp the base model first
    t: float = 0.0
    weights: list[float] = field(default_factory=list)


def _num_layers(model: Model) -> int:
    layers = {int(m.group(1)) for name in model.names() if (m := LAYER.search(name))}
    return max(layers) + 1 if layers else 0


def _slices(config: MergeConfig):
    """(sources, base, parameters, layer ranges) per slice; `models:` is one full-range slice."""
    if config.models is not None:
        return [(config.models, config.base_model, None, None)]
    return [(s.sources, s.base_model or config.base_model, s.parameters,
             [src.layer_range for src in s.sources]) for s in config.slices]


def plan(config: MergeConfig, files: MappedFiles) -> tuple[list[TensorTask], dict[str, Model], int]:
    """Every output tensor with its inputs and parameters. Raises before any output exists."""
    models: dict[str, Model] = {}
    for sources, base, _, _ in _slices(config):
        for ref in [s.model for s in sources] + ([base] if base else []):
            if ref not in models:
                models[ref] = open_model(ref, files)
    merge_dtype = getattr(torch, config.dtype) if config.dtype else None
    out_dtype = getattr(torch, config.out_dtype) if config.out_dtype else merge_dtype
    tasks: list[TensorTask] = []
    out_layer = 0
    slices = _slices(config)
    for k, (sources, base, slice_params, ranges) in enumerate(slices):
        if config.merge_method == "slerp":  # the base model first: t = 0 keeps it
            sources = sorted(sources, key=lambda s: s.model != base)
        first = models[sources[0].model]
        ranges = ranges or [(0, _num_layers(models[s.model])) for s in sources]
        _check_same_tensors([models[s.model] for s in sources], ranges)
        n_layers = ranges[0][1] - ranges[0][0]
        for name in first.names():
            match = LAYER.search(name)
            if match is None:  # embeddings from the first slice, the rest from the last
                is_pre = "embed" in name
                if (is_pre and k != 0) or (not is_pre and k != len(slices) - 1):
                    continue
                position, names = 0.0, [name] * len(sources)
                out_name = name
            else:
                layer = int(match.group(1)) - ranges[0][0]
                if not 0 <= layer < n_layers:
                    continue
                position = layer / (n_layers - 1) if n_layers > 1 else 1.0
                names = [LAYER.sub(f".layers.{r[0] + layer}.", name, count=1) for r in ranges]
                out_name = LAYER.sub(f".layers.{out_layer + layer}.", name, count=1)
            inputs = [(models[s.model], n) for s, n in zip(sources, names)]
            tasks.append(_task(config, out_name, inputs, sources, slice_params, position,
                               merge_dtype, out_dtype))
        out_layer += n_layers
    tasks.sort(key=lambda task: task.out.name)
    return tasks, models, out_layer


def _slice_names(model: Model, layers: tuple[int, int]) -> set[str]:
    """The model's tensors in a slice, layers renumbered from the slice's first layer."""
    names = set()
    for name in model.names():
        match = LAYER.search(name)
        if match is None:
            names.add(name)
        elif layers[0] <= int(match.group(1)) < layers[1]:
            names.add(LAYER.sub(f".layers.{int(match.group(1)) - layers[0]}.", name, count=1))
    return names


def _renumber(name: str, first_layer: int) -> str:
    match = LAYER.search(name)
    return name if match is None else LAYER.sub(f".layers.{int(match.group(1)) + first_layer}.",
                                                 name, count=1)


def _check_same_tensors(inputs: list[Model], ranges: list[tuple[int, int]]) -> None:
    """Every model of a slice has the same tensors: a tensor one of them lacks would be
    dropped (and initialised randomly by transformers) or could not be merged."""
    names = [_slice_names(model, layers) for model, layers in zip(inputs, ranges)]
    union = set().union(*names)
    problems = []
    for model, own, layers in zip(inputs, names, ranges):
        if missing := sorted(_renumber(name, layers[0]) for name in union - own):
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            problems.append(f"{model.ref} lacks {len(missing)} tensor(s) the other model(s) "
                            f"have: {shown}")
    if problems:
        raise ValueError("the models do not have the same tensors; " + "; ".join(problems))


def _task(config, out_name, inputs, sources, slice_params, position, merge_dtype, out_dtype):
    shape = dtype = None
    for model, name in inputs:
        if name not in model.names():
            raise ValueError(f"tensor {name!r} is missing in {model.ref}")
        if shape is None:
            shape, dtype = model.shape(name), model.dtype(name)
        elif model.shape(name) != shape:
            raise ValueError(f"tensor {name!r}: shape {list(model.shape(name))} in {model.ref} but "
                             f"{list(shape)} in {inputs[0][0].ref}")
        elif model.dtype(name) != dtype and merge_dtype is None:
            raise ValueError(f"tensor {name!r}: dtype {model.dtype(name)} in {model.ref} but {dtype} "
                             f"in {inputs[0][0].ref}; set `dtype:` in the config to merge in one dtype")
    if not dtype.is_floating_point:  # integer buffers are taken from the first model as they are
        return TensorTask(OutputTensor(out_name, dtype, shape), "copy", inputs[:1])
    out = OutputTensor(out_name, out_dtype or dtype, shape)
    if config.merge_method == "slerp":
        t = lookup("t", out_name, position, slice_params, config.parameters)
        if t is None:
            raise ValueError(f"no `t` for tensor {out_name!r}: add a fallback entry without a filter")
        if not 0.0 <= float(t) <= 1.0:
            raise ValueError(f"t = {t} for tensor {out_name!r} is outside [0, 1]")
        return TensorTask(out, "slerp", inputs, t=float(t))
    weights = [lookup("weight", out_name, position, s.parameters, slice_params, config.parameters)
               for s in sources]
    if any(w is None for w in weights):
        raise ValueError(f"linear merge: no `weight` for tensor {out_name!r} in every model")
    normalize = lookup("normalize", out_name, position, slice_params, config.parameters)
    weights = [float(w) for w in weights]
    if normalize is None or normalize:
        if sum(weights) == 0:
            raise ValueError(f"linear merge: the weights of {out_name!r} sum to 0 and normalize is on")
        weights = [w / sum(weights) for w in weights]
    return TensorTask(out, "linear", inputs, weights=weights)


class _Executor:
    """Runs the tasks in output order, chunk by chunk, on `device`."""

    def __init__(self, writer: ShardWriter, merge_dtype, device: torch.device, chunk_elements: int):
        self.writer, self.merge_dtype, self.device = writer, merge_dtype, device
        self.chunk_elements = chunk_elements
        self.finite: dict[str, torch.Tensor] = {}  # per tensor, on device: no host sync per chunk
        pin = device.type == "cuda"
        self.pool: queue.Queue = queue.Queue()
        for _ in range(3):  # one being filled, one queued, one being written
            self.pool.put(torch.empty(chunk_elements * 4, dtype=torch.uint8, pin_memory=pin))

    def _read(self, model: Model, name: str, r0: int, r1: int, dtype) -> torch.Tensor:
        rows = model.rows(name, r0, r1)
        return rows.to(device=self.device, dtype=dtype or rows.dtype, non_blocking=True)

    def run(self, shard: int, task: TensorTask) -> None:
        rows, row_len = row_layout(task.out.shape)
        chunks = list(iter_rows(rows * row_len, row_len, self.chunk_elements))
        sums = None
        if task.method == "slerp" and len(chunks) > 1:  # pass 1: the whole tensor's sums
            sums = torch.zeros(3, dtype=torch.float64, device=self.device)
            for r0, r1 in chunks:
                a, b = (self._read(m, n, r0, r1, self.merge_dtype) for m, n in task.inputs)
                sums += slerp_sums(a, b)
                for m, n in task.inputs:
                    m.release(n, r0, r1)
        for r0, r1 in chunks:
            tensors = [self._read(m, n, r0, r1, self.merge_dtype) for m, n in task.inputs]
            buffer = self.pool.get()
            nbytes = tensors[0].numel() * task.out.dtype.itemsize
            if nbytes > buffer.numel():  # one row longer than a chunk: grow this buffer
                buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=buffer.is_pinned())
            out = buffer[:nbytes].view(task.out.dtype)
            if task.method == "slerp" and out.dtype == tensors[0].dtype and out.device == tensors[0].device:
                slerp(tensors[0], tensors[1], task.t, sums=sums, out=out)  # straight into the buffer
            elif task.method == "slerp":
                out.copy_(slerp(tensors[0], tensors[1], task.t, sums=sums))
            elif task.method == "linear":
                result = torch.zeros(tensors[0].shape, dtype=torch.float32, device=self.device)
                for x, w in zip(tensors, task.weights):
                    result.add_(x, alpha=w)  # fp32 accumulation, as mergekit's linear
                out.copy_(result)
            else:
                out.copy_(tensors[0])
            if task.method != "copy":
                finite = torch.isfinite(out).all()
                name = task.out.name
                self.finite[name] = self.finite[name] & finite if name in self.finite else finite
            for m, n in task.inputs:
                m.release(n, r0, r1)
            self.writer.write(shard, buffer[:nbytes].numpy(), done=lambda b=buffer: self.pool.put(b))


def run_merge(config: MergeConfig, out_dir: str | Path, *, overwrite: bool = False,
              device: str = "cpu", shard_bytes: int = DEFAULT_SHARD_BYTES,
              chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, fsync: bool = False,
              allow_nonfinite: bool = False) -> dict:
    """Merge as `config` says into `out_dir` (a HF model directory). Returns a small summary.

    Everything is checked before the first byte is written; the output is assembled in a
    temporary directory next to out_dir and renamed into place when complete, so an interrupted
    merge leaves no partial output. fsync=True also waits for the disk before the rename (durable across
    power loss, at disk speed); like save_pretrained and mergekit, the default leaves the
    writing-back to the kernel. A merge killed before the rename leaves its temporary directory
    behind: the next merge into the same place removes it (see dafast.merge.staging).

    An output tensor with a NaN or infinity (SLERP makes the whole tensor NaN when an input has
    one) is refused, naming the tensors, unless allow_nonfinite=True; the summary lists them.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    start = time.perf_counter()
    files = MappedFiles()
    try:
        tasks, models, n_layers = plan(config, files)
        base = models[config.base_model] if config.base_model in models else next(iter(models.values()))
        tokenizer_source = base
        if config.tokenizer_source not in (None, "base"):
            tokenizer_source = models.get(config.tokenizer_source) or open_model(config.tokenizer_source, files)
        with Staging(out_dir) as staging:
            tmp = staging.path
            shards = plan_shards([task.out for task in tasks], shard_bytes)
            writer = ShardWriter(tmp, shards, {"merged_by": "dafast"}, fsync=fsync)
            merge_dtype = getattr(torch, config.dtype) if config.dtype else None
            executor = _Executor(writer, merge_dtype, torch.device(device), chunk_elements)
            try:
                shard_of = {t.name: i for i, shard in enumerate(shards) for t in shard}
                for i, task in enumerate(tasks):
                    if i + 1 < len(tasks):
                        for model, name in tasks[i + 1].inputs:
                            model.prefetch(name)  # the kernel reads ahead while we merge
                    executor.run(shard_of[task.out.name], task)
            except BaseException:
                writer.abort()
                raise
            nonfinite = sorted(name for name, ok in executor.finite.items() if not bool(ok))
            if nonfinite and not allow_nonfinite:
                writer.abort()
                shown = ", ".join(nonfinite[:8]) + (" ..." if len(nonfinite) > 8 else "")
                raise ValueError(f"{len(nonfinite)} merged tensor(s) came out with NaN or "
                                 f"infinity (an input holds one): {shown}; nothing was written "
                                 "(allow_nonfinite=True / --allow-nonfinite writes them anyway)")
            if nonfinite:
                log.warning("merged tensors with NaN or infinity: %s", ", ".join(nonfinite))
            writer.close()
            _write_metadata(tmp, config, base, tokenizer_source, n_layers, tasks)
            staging.publish()
    finally:
        files.close()
    return {"out_dir": str(out_dir), "tensors": len(tasks), "shards": len(shards),
            "bytes": sum(t.out.nbytes for t in tasks), "seconds": time.perf_counter() - start,
            "nonfinite": nonfinite}


def _base_dir(model: Model) -> Path:
    return model.base.path if isinstance(model, LoraAdapter) else model.path


def _write_metadata(out: Path, config: MergeConfig, base: Model, tokenizer_source: Model,
                    n_layers: int, tasks: list[TensorTask]) -> None:
    """config.json (layer count and dtype updated), generation config, tokenizer, the recipe."""
    import json

    base_dir = _base_dir(base)
    if (base_dir / "config.json").is_file():
        model_config = json.loads((base_dir / "config.json").read_text())
        if n_layers and "num_hidden_layers" in model_config:
            model_config["num_hidden_layers"] = n_layers
        dtypes = {t.out.dtype for t in tasks if t.out.dtype.is_floating_point}
        if len(dtypes) == 1:
            model_config["dtype"] = str(dtypes.pop()).removeprefix("torch.")
            model_config.pop("torch_dtype", None)
        (out / "config.json").write_text(json.dumps(model_config, indent=2) + "\n")
    if (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", out)
    for name in TOKENIZER_FILES:
        if (_base_dir(tokenizer_source) / name).is_file():
            shutil.copy2(_base_dir(tokenizer_source) / name, out)
    recipe = config.model_dump(exclude_none=True)
    (out / "mergekit_config.yml").write_text(yaml.safe_dump(recipe, sort_keys=False))
