"""mergekit-compatible merge configurations (the subset dafast merges: slerp and linear).

    merge_method: slerp
    base_model: path/to/instruct          # t = 0 keeps this model
    slices:                               # or `models: [{model: A}, {model: B}]`
      - sources:
          - {model: path/to/instruct, layer_range: [0, 30]}
          - {model: path/to/finetuned, layer_range: [0, 30]}
    parameters:
      t:
        - {filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}   # a gradient over the layers
        - {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}
        - {value: 0.5}                                        # no filter: the fallback
    dtype: bfloat16

Semantics follow mergekit: a list value is a gradient, interpolated piecewise-linearly at
layer_idx / (n_layers - 1) within its slice; tensors outside the layers (embeddings, final
norm, lm_head) take the first anchor (position 0); a filter matches a substring of the tensor
name and the first matching entry wins. Parameters are looked up per source model, then on the
slice, then at the top level. Unknown keys are refused, naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Scalar = Union[float, int, bool, str]
Value = Union[Scalar, list[Scalar]]


class Conditional(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: Optional[str] = Field(None, description="substring of the tensor name; none matches all")
    value: Value


Setting = Union[Scalar, list[Scalar], list[Conditional], Conditional]
Parameters = dict[str, Setting]


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="HF model directory, PEFT adapter directory, or 'model+adapter'")
    layer_range: Optional[tuple[int, int]] = Field(None, description="[first, end) input layers")
    parameters: Optional[Parameters] = None


class Slice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[Source]
    base_model: Optional[str] = None
    parameters: Optional[Parameters] = None


DTYPES = ("float32", "float16", "bfloat16")


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merge_method: Literal["slerp", "linear"]
    base_model: Optional[str] = Field(None, description="the model t = 0 keeps (slerp)")
    models: Optional[list[Source]] = None
    slices: Optional[list[Slice]] = None
    parameters: Optional[Parameters] = None
    dtype: Optional[Literal["float32", "float16", "bfloat16"]] = Field(
        None, description="dtype the inputs are cast to and merged in")
    out_dtype: Optional[Literal["float32", "float16", "bfloat16"]] = Field(
        None, description="dtype of the written tensors (default: dtype)")
    tokenizer_source: Optional[str] = Field(
        None, description="'base' (default) or a model whose tokenizer files are copied")
    name: Optional[str] = None

    @model_validator(mode="after")
    def _one_layout(self):
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of `models` and `slices`")
        for slice_ in self.slices or []:
            lengths = {s.layer_range[1] - s.layer_range[0] for s in slice_.sources if s.layer_range}
            if len(lengths) > 1 or (lengths and any(s.layer_range is None for s in slice_.sources)):
                raise ValueError("all sources of a slice need layer ranges of the same length")
        if self.merge_method == "slerp":
            for sources, base in self._source_groups():
                if len(sources) != 2:
                    raise ValueError(f"slerp merges exactly 2 models, got {len(sources)}")
                if base is None or base not in [s.model for s in sources]:
                    raise ValueError("slerp needs `base_model`, one of the two merged models")
        return self

    def _source_groups(self):
        if self.models is not None:
            yield self.models, self.base_model
        for slice_ in self.slices or []:
            yield slice_.sources, slice_.base_model or self.base_model


def load_config(path: str | Path) -> MergeConfig:
    """Read and validate a YAML merge config; errors name the file and the offending field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"merge config {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(raw, origin=str(path))


def parse_config(raw: Any, origin: str = "merge config") -> MergeConfig:
    """Validate a config mapping; errors name `origin` and each offending field."""
    if not isinstance(raw, dict):
        raise ValueError(f"{origin}: a merge config is a mapping, got {type(raw).__name__}")
    try:
        return MergeConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"{origin}: invalid merge config: {problems}") from None


def evaluate_setting(tensor_name: str, setting: Setting, position: float) -> Any:
    """A setting's value for one tensor at `position` in [0, 1] along its slice's layers.

    The rules of mergekit's evaluate_setting: a list of numbers is a gradient, interpolated
    piecewise-linearly; a list of conditionals takes the first whose filter is absent, "*" or
    a substring of the tensor name; None when nothing matches.
    """
    if isinstance(setting, Conditional):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if all(not isinstance(e, Conditional) for e in setting):
        numeric = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting)
        if not numeric:
            return setting[int(position * (len(setting) - 1))]
        scaled = position * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        if cond.filter is None or cond.filter == "*" or cond.filter in tensor_name:
            return evaluate_setting(tensor_name, cond.value, position)
    return None


def lookup(name: str, tensor_name: str, position: float, *scopes: Optional[Parameters]) -> Any:
    """A parameter from the first scope (highest precedence first) that sets it."""
    for scope in scopes:
        if scope and name in scope:
            value = evaluate_setting(tensor_name, scope[name], position)
            if value is not None:
                return value
    return None
