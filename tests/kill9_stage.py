"""kill -9 a stage at random points, rerun it, and compare with an uninterrupted run.

    python tests/kill9_stage.py [--kills 3] [--seed N]

Trains SFT (6 steps, a checkpoint every 2) on a tiny random Llama through `python -m
dafast.train`, once uninterrupted and once killed with SIGKILL at a random moment of each
attempt (model loading, a step, a checkpoint save, the final write) and rerun until it
finishes. The two stage directories must hold the same files, the same adapter weights and the
same metrics.jsonl (wall-clock fields aside), with no checkpoint, staging or temporary file
left. Exits non-zero on a difference. tests/test_faults.py runs it with one kill.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]


def train_command(recipe: Path, output_dir: Path) -> list[str]:
    return [sys.executable, "-m", "dafast.train", str(recipe), f"output_dir={output_dir}"]


def run(recipe: Path, output_dir: Path, kill_after: float | None = None) -> bool:
    """One attempt; True if it ran to the end (and succeeded)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(train_command(recipe, output_dir), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return False
    if proc.returncode != 0:
        raise SystemExit(f"the run failed:\n{err[-3000:]}")
    return True


def stage_dir(output_dir: Path) -> Path:
    (stage,) = (output_dir / "stages").iterdir()
    return stage


def compare(whole: Path, resumed: Path) -> list[str]:
    import torch
    from safetensors.torch import load_file

    from test_faults import metrics

    problems = []
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*"))  # noqa: E731
    if files(whole) != files(resumed):
        problems.append(f"files differ: {files(whole)} vs {files(resumed)}")
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (whole, resumed))
    for name in a:
        if not torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-7):
            problems.append(f"adapter tensor {name} differs")
    ma, mb = metrics(whole), metrics(resumed)
    if [sorted(r) for r in ma] != [sorted(r) for r in mb] or any(
            abs(x[k] - y[k]) > 1e-6 * max(1.0, abs(x[k]))
            for x, y in zip(ma, mb) for k in x if isinstance(x[k], float)):
        problems.append("metrics.jsonl differs")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs before the final rerun")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="kill9-"))

    from conftest import save_smollm_tiny
    from test_train import _recipe_file, recipe_for

    model = save_smollm_tiny(work / "model")
    recipe = _recipe_file(work, recipe_for(work, model=str(model), pipelines=["sft"],
                                           kernels="native"))
    started = time.time()
    run(recipe, work / "whole")
    duration = time.time() - started
    kills = []
    for _ in range(args.kills):
        delay = rng.uniform(0.0, duration)
        if run(recipe, work / "killed", kill_after=delay):
            break  # finished before the kill: nothing left to interrupt
        kills.append(round(delay, 2))
    run(recipe, work / "killed")
    problems = compare(stage_dir(work / "whole"), stage_dir(work / "killed"))
    stray = [str(p) for p in (work / "killed").rglob("*") if ".tmp" in p.name or ".partial" in p.name]
    problems += [f"stray file {p}" for p in stray]
    print(f"seed {seed}: killed after {kills} s of a {duration:.1f} s run; "
          + ("same result as uninterrupted" if not problems else "; ".join(problems)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
