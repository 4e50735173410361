"""Streaming, mergekit-compatible model merging on dafast's SLERP kernel.

    python -m dafast.merge CONFIG.yml OUT_DIR          # or: dafast-merge CONFIG.yml OUT_DIR

    from dafast.merge import merge, slerp_merge
    slerp_merge("path/to/instruct", "path/to/finetuned", "out/merged")   # the paper's t-schedule
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dafast.merge.config import MergeConfig, load_config, parse_config
from dafast.merge.streaming import DEFAULT_CHUNK_ELEMENTS, DEFAULT_SHARD_BYTES, run_merge

# The paper's SLERP t-schedule (Lu, Luu, Buehler 2024): attention leans from the base model to
# the other across the layers, the MLPs the opposite way, everything else halfway.
PAPER_T: list[dict[str, Any]] = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]


def merge(config: MergeConfig | dict | str | Path, out_dir: str | Path, **options) -> dict:
    """Merge as a mergekit-style config (a MergeConfig, a dict, or a YAML path) says.

    options: overwrite=False, device="cpu", shard_bytes, chunk_elements (see run_merge).
    """
    if isinstance(config, (str, Path)):
        config = load_config(config)
    elif isinstance(config, dict):
        config = parse_config(config)
    return run_merge(config, out_dir, **options)


def slerp_merge(base_model: str | Path, other_model: str | Path, out_dir: str | Path, *,
                t: Any = None, dtype: str = "float32", **options) -> dict:
    """SLERP `other_model` into `base_model` (t = 0 keeps the base), by default with the paper's
    t-schedule; either model may be a PEFT adapter directory. dtype: of the merged weights (the
    recipe's merge.dtype default too)."""
    config = {
        "merge_method": "slerp",
        "base_model": str(base_model),
        "models": [{"model": str(base_model)}, {"model": str(other_model)}],
        "parameters": {"t": PAPER_T if t is None else t},
        "dtype": dtype,
    }
    return merge(config, out_dir, **options)


__all__ = ["DEFAULT_CHUNK_ELEMENTS", "DEFAULT_SHARD_BYTES", "MergeConfig", "PAPER_T",
           "load_config", "merge", "slerp_merge"]
