"""Command line of the merge: `python -m dafast.merge CONFIG.yml OUT_DIR` / `dafast-merge`."""

from __future__ import annotations

import argparse
import json
import sys

from dafast.merge import DEFAULT_CHUNK_ELEMENTS, DEFAULT_SHARD_BYTES, merge

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count."""
    number = text.strip().upper()
    for unit in sorted(UNITS, key=len, reverse=True):
        if unit and number.endswith(unit):
            return int(float(number[: -len(unit)]) * UNITS[unit])
    return int(float(number))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dafast.merge",
        description="Merge models as a mergekit YAML config says (slerp, linear), streaming "
                    "tensor by tensor on dafast's kernels.")
    parser.add_argument("config", help="mergekit-style YAML config")
    parser.add_argument("out_dir", help="output HF model directory (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    parser.add_argument("--device", default="cpu", help="where the kernels run: cpu or cuda")
    parser.add_argument("--shard-size", default=str(DEFAULT_SHARD_BYTES), type=parse_size,
                        help="largest output shard, e.g. 5GB or 500MB (default: 5GB)")
    parser.add_argument("--fsync", action="store_true",
                        help="wait until the output is on disk before renaming it into place")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="write merged tensors that came out with NaN or infinity (by "
                             "default the merge refuses, naming them)")
    parser.add_argument("--chunk-elements", type=int, default=DEFAULT_CHUNK_ELEMENTS,
                        help="elements per streamed chunk; bounds memory (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        summary = merge(args.config, args.out_dir, overwrite=args.overwrite, device=args.device,
                        shard_bytes=args.shard_size, chunk_elements=args.chunk_elements,
                        fsync=args.fsync, allow_nonfinite=args.allow_nonfinite)
    except (ValueError, OSError) as exc:  # bad input, or a file that cannot be read or written
        print(f"dafast.merge: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0
