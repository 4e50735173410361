"""The paper's SLERP merge of two sharded bf16 checkpoints of SmolLM-1.7B's shapes (3.4 GB
each): dafast against mergekit (the peer) and the I/O floor (read both inputs, write one output
of the same size, fsync), each in its own process, in the same run; wall time and peak RSS.
dafast is also run at half the depth, to show its memory does not grow with the model.

    pytest bench/test_merge.py --benchmark-autosave -s
    DAFAST_BENCH_MERGE=small pytest bench/test_merge.py --benchmark-disable   # CI's smoke run

Inputs are generated once into $DAFAST_BENCH_DIR (default /tmp/dafast-bench) and stay in the page
cache for every contender alike.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from make_checkpoints import write_checkpoint  # noqa: E402

from dafast.merge import PAPER_T  # noqa: E402

SMALL = os.environ.get("DAFAST_BENCH_MERGE") == "small"
SHAPES = dict(hidden=256, intermediate=1024, vocab=4096) if SMALL else {}
LAYERS = 4 if SMALL else 24
ROOT = Path(os.environ.get("DAFAST_BENCH_DIR", "/tmp/dafast-bench")) / ("small" if SMALL else "smollm-1.7b")
GROUP = f"merge slerp bf16 {'small' if SMALL else 'SmolLM-1.7B'}"


def _config(a: Path, b: Path, layers: int) -> Path:
    config = {"merge_method": "slerp", "base_model": str(a), "dtype": "bfloat16",
              "parameters": {"t": PAPER_T},
              "slices": [{"sources": [{"model": str(a), "layer_range": [0, layers]},
                                      {"model": str(b), "layer_range": [0, layers]}]}]}
    path = a.parent / f"merge-{layers}.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def checkpoints():
    a = write_checkpoint(ROOT / "a", 0, layers=LAYERS, **SHAPES)
    b = write_checkpoint(ROOT / "b", 1, layers=LAYERS, **SHAPES)
    return a, b


# A child's ru_maxrss counts the pages it shared with its parent at fork time, so the command is
# forked by this small fresh process rather than by the (large) pytest process.
PEAK_RSS = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _run(command: list[str]) -> float:
    """Run to completion; return the command's own peak RSS in MB."""
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, *command], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed: {done.stderr[-2000:]}")
    return int(done.stdout.split()[-1]) / 1024


def _bench(benchmark, role: str, command: list[str], out: Path, **info):
    benchmark.group = GROUP
    benchmark.extra_info.update(role=role, **info)
    rss = []

    def once():
        shutil.rmtree(out, ignore_errors=True)
        rss.append(_run(command))

    benchmark.pedantic(once, rounds=1 if SMALL else 2, iterations=1)
    benchmark.extra_info["peak_rss_mb"] = max(rss)
    print(f"\n{role:8s} peak RSS {max(rss):7.0f} MB")


def test_dafast(benchmark, checkpoints):
    a, b = checkpoints
    _bench(benchmark, "dafast", [sys.executable, "-m", "dafast.merge", str(_config(a, b, LAYERS)),
                                 str(ROOT / "out-dafast"), "--overwrite"], ROOT / "out-dafast")


def test_dafast_fsync(benchmark, checkpoints):
    """With --fsync: waits for the disk, like the I/O floor (mergekit does not)."""
    a, b = checkpoints
    _bench(benchmark, "dafast-fsync", [sys.executable, "-m", "dafast.merge", str(_config(a, b, LAYERS)),
                                       str(ROOT / "out-dafast-fsync"), "--overwrite", "--fsync"],
           ROOT / "out-dafast-fsync")


def test_dafast_half_depth(benchmark, checkpoints):
    a, b = checkpoints
    benchmark.group = GROUP + " (half depth, memory)"
    _bench(benchmark, "dafast-half", [sys.executable, "-m", "dafast.merge", str(_config(a, b, LAYERS // 2)),
                                      str(ROOT / "out-dafast-half"), "--overwrite"], ROOT / "out-dafast-half")


def test_mergekit(benchmark, checkpoints):
    mergekit_yaml = shutil.which("mergekit-yaml")
    if mergekit_yaml is None:
        pytest.skip("mergekit is not installed (pip install mergekit)")
    a, b = checkpoints
    _bench(benchmark, "peer", [mergekit_yaml, str(_config(a, b, LAYERS)), str(ROOT / "out-mergekit"),
                               "--lazy-unpickle"], ROOT / "out-mergekit")


IO_FLOOR = """
import os, sys, glob
buffer = bytearray(64 << 20)
total = 0
for model in sys.argv[1:3]:
    for path in sorted(glob.glob(os.path.join(model, "*.safetensors"))):
        with open(path, "rb", buffering=0) as f:
            while (n := f.readinto(buffer)):
                total += n
with open(sys.argv[3], "wb", buffering=0) as f:
    remaining = total // 2
    while remaining > 0:
        remaining -= f.write(memoryview(buffer)[:min(len(buffer), remaining)])
    os.fsync(f.fileno())
"""


def test_io_floor(benchmark, checkpoints):
    a, b = checkpoints
    (ROOT / "out-floor").mkdir(exist_ok=True)
    _bench(benchmark, "baseline", [sys.executable, "-c", IO_FLOOR, str(a), str(b),
                                   str(ROOT / "out-floor" / "floor.bin")], ROOT / "out-floor-unused")


def test_outputs_equal_mergekit(checkpoints):
    """Every tensor within one bf16 rounding step of mergekit's (plus fp32 noise of the inputs)."""
    ours, theirs = ROOT / "out-dafast", ROOT / "out-mergekit"
    if not (ours.is_dir() and theirs.is_dir()):
        pytest.skip("run after test_dafast and test_mergekit")
    index = {}
    for file in glob.glob(str(theirs / "*.safetensors")):
        index.update({name: file for name in load_file(file)})  # names only would need the header
    a, b = checkpoints
    inputs = {}
    for model in (a, b):
        for file in glob.glob(str(model / "*.safetensors")):
            inputs.setdefault(model, {}).update(load_file(file))
    mine = {}
    for file in glob.glob(str(ours / "*.safetensors")):
        mine.update(load_file(file))
    assert sorted(mine) == sorted(index)
    worst = 0.0
    for file in set(index.values()):
        for name, m in load_file(file).items():
            o, m = mine[name].float(), m.float()
            step = torch.exp2(torch.floor(torch.log2(torch.maximum(o.abs(), m.abs()).clamp_min(2 ** -126))) - 7)
            noise = 2 ** -20 * torch.maximum(inputs[a][name].float().abs(), inputs[b][name].float().abs())
            excess = ((o - m).abs() - step - noise).max().item()
            worst = max(worst, excess)
            assert excess <= 0, name
    print(f"\nall {len(mine)} tensors within one bf16 step of mergekit's")
