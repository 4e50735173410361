"""The models a merge reads: HF checkpoints, and PEFT LoRA adapters standing for base + adapter.

A model is referenced as in mergekit: a local HF directory (or dafast's default model name), a
PEFT adapter directory (its base is `base_model_name_or_path` in adapter_config.json), or
"base+adapter". An adapter's tensors are W + scale * B A, computed row chunk by row chunk as
the merge reads them, so a LoRA run merges without a merged copy on disk first.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from dafast.merge.safetensors_io import MappedFiles, TensorEntry, read_checkpoint, read_header
from dafast.models import resolve_model

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def row_layout(shape: tuple[int, ...]) -> tuple[int, int]:
    """A tensor as [rows, row_len]: chunks of a merge are row ranges."""
    if not shape:
        return 1, 1
    return shape[0], math.prod(shape[1:])


class Checkpoint:
    """A HF model directory: tensor names, shapes, dtypes, and row ranges as tensors."""

    def __init__(self, ref: str, path: Path, files: MappedFiles):
        self.ref, self.path, self.files = ref, path, files
        self.entries: dict[str, TensorEntry] = read_checkpoint(path)

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name].dtype

    def prefetch(self, name: str) -> None:
        self.files.prefetch(self.entries[name])

    def rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) as a flat tensor in the stored dtype: a view of the mapped file."""
        entry = self.entries[name]
        _, row_len = row_layout(entry.shape)
        self.files.populate(entry, r0 * row_len, (r1 - r0) * row_len)
        return self.files.view(entry)[r0 * row_len:r1 * row_len]

    def release(self, name: str, r0: int, r1: int) -> None:
        entry = self.entries[name]
        _, row_len = row_layout(entry.shape)
        self.files.release(entry, r0 * row_len, (r1 - r0) * row_len)


class LoraAdapter:
    """A PEFT LoRA adapter over its base checkpoint, read as the merged model W + scale * B A."""

    def __init__(self, ref: str, path: Path, base: Checkpoint):
        self.ref, self.path, self.base = ref, path, base
        config = json.loads((path / ADAPTER_CONFIG).read_text())
        self._refuse_unsupported(config)
        weights = path / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"{path}: no {ADAPTER_WEIGHTS} (dafast loads safetensors only)")
        entries = read_header(weights)
        self.lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.replaced: dict[str, torch.Tensor] = {}
        a_keys = {k for k in entries if k.endswith(".lora_A.weight")}
        for key in entries:
            if not key.startswith(PEFT_PREFIX):
                raise ValueError(f"{weights}: unexpected tensor {key!r} (not a PEFT LoRA adapter?)")
            if key.endswith((".lora_A.weight", ".lora_B.weight")):
                continue
            if ".lora_" in key:
                raise ValueError(f"{weights}: {key!r}: only LoRA A/B matrices of linear layers "
                                 "are supported (no embedding LoRA, biases or magnitudes)")
            self.replaced[key[len(PEFT_PREFIX):]] = self._load(base.files, entries[key])
        for key in sorted(a_keys):
            module = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
            b_key = f"{PEFT_PREFIX}{module}.lora_B.weight"
            if b_key not in entries:
                raise ValueError(f"{weights}: {key!r} has no matching lora_B")
            a = self._load(base.files, entries[key]).float()
            b = self._load(base.files, entries[b_key]).float()
            rank = a.shape[0]
            alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
            scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
            if config.get("fan_in_fan_out"):
                a, b = b.t().contiguous(), a.t().contiguous()  # delta = (B A)^T = A^T B^T
            target = f"{module}.weight"
            if target not in base.entries:
                raise ValueError(f"{path}: adapter targets {module!r}, but {base.path} has no {target!r}")
            if b.shape[0] * a.shape[1] != math.prod(base.shape(target)):
                raise ValueError(f"{path}: LoRA of {module!r} is {b.shape[0]}x{a.shape[1]}, "
                                 f"but {target!r} has shape {list(base.shape(target))}")
            self.lora[target] = (a, b, scale)
        for name, tensor in self.replaced.items():
            if name not in base.entries or tuple(tensor.shape) != base.shape(name):
                raise ValueError(f"{path}: adapter replaces {name!r}, which {base.path} does not "
                                 "store with that shape (tied embeddings are not supported here)")

    @staticmethod
    def _refuse_unsupported(config: dict) -> None:
        if config.get("peft_type") != "LORA":
            raise ValueError(f"only LoRA adapters can stand for a model, got {config.get('peft_type')}")
        for key in ("use_dora", "lora_bias", "layer_replication", "trainable_token_indices"):
            if config.get(key):
                raise ValueError(f"LoRA adapters with {key} are not supported by the merge")

    @staticmethod
    def _load(files: MappedFiles, entry: TensorEntry) -> torch.Tensor:
        return files.view(entry).clone().view(entry.shape)

    def names(self) -> list[str]:
        return self.base.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def prefetch(self, name: str) -> None:
        self.base.prefetch(name)

    def rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        if name in self.replaced:
            _, row_len = row_layout(self.shape(name))
            return self.replaced[name].reshape(-1)[r0 * row_len:r1 * row_len]
        rows = self.base.rows(name, r0, r1)
        if name not in self.lora:
            return rows
        a, b, scale = self.lora[name]
        delta = b[r0:r1] @ a  # [r1 - r0, in]: only these rows of B A
        return (rows.float() + scale * delta.reshape(-1)).to(rows.dtype)

    def release(self, name: str, r0: int, r1: int) -> None:
        self.base.release(name, r0, r1)


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's alpha_pattern: a key matches a module name it ends (as a regex)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def open_model(ref: str, files: MappedFiles) -> Checkpoint | LoraAdapter:
    """A model reference from a merge config, opened and its headers validated."""
    path = Path(ref).expanduser()
    if "+" in ref and not path.exists():
        base_ref, adapter_ref = ref.split("+", 1)
        base = Checkpoint(base_ref, resolve_model(base_ref), files)
        return LoraAdapter(ref, Path(adapter_ref).expanduser(), base)
    if (path / ADAPTER_CONFIG).is_file():
        base_ref = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        if not base_ref:
            raise ValueError(f"{path / ADAPTER_CONFIG} names no base_model_name_or_path; "
                             f"reference the adapter as 'BASE_DIR+{ref}'")
        return LoraAdapter(ref, path, Checkpoint(base_ref, resolve_model(base_ref), files))
    return Checkpoint(ref, resolve_model(ref), files)
